"""`fabricctl cni install`: the plugin executables and a conflist, where runtimes look."""

from __future__ import annotations

import argparse

from cni.install import DEFAULT_BIN_DIR, DEFAULT_CONF_DIR, install
from fabric.cli.context import Context
from fabric.cli.output import OK, CliError, emit_json


def register(sub: argparse._SubParsersAction) -> None:
    cni = sub.add_parser("cni", help="the CNI plugin")
    cni_sub = cni.add_subparsers(dest="cni_cmd", required=True, metavar="COMMAND")
    inst = cni_sub.add_parser("install", help="install l3fabric and l3fabric-ipam and a "
                              "conflist")
    inst.add_argument("--bin-dir", default=DEFAULT_BIN_DIR,
                      help=f"CNI plugin directory (default {DEFAULT_BIN_DIR})")
    inst.add_argument("--conf-dir", default=DEFAULT_CONF_DIR,
                      help=f"network config directory (default {DEFAULT_CONF_DIR}); "
                           "'' for none")
    inst.add_argument("--network", default="l3fabric", help="network name")
    inst.add_argument("--mtu", type=int, default=1500)
    inst.add_argument("--pool", action="append", dest="pools", metavar="NAME",
                      help="allocate only from these pools (repeatable)")
    inst.add_argument("--ipv6", action="store_true", help="also an IPv6 address")
    inst.set_defaults(handler=install_cmd)


def install_cmd(ctx: Context) -> int:
    if not 576 <= ctx.mtu <= 65535:
        raise CliError(f"--mtu {ctx.mtu}: must be from 576 to 65535")
    try:
        written = install(ctx.bin_dir, ctx.conf_dir or None, network=ctx.network,
                          mtu=ctx.mtu, pools=ctx.pools, families=(4, 6) if ctx.ipv6 else (4,))
    except OSError as exc:  # a directory that cannot be made or written (a typo, /proc)
        raise CliError(f"cni install: cannot write {exc.filename or 'the files'}: "
                       f"{exc.strerror or exc}") from exc
    if ctx.json:
        emit_json({"written": [str(p) for p in written]})
    else:
        for path in written:
            print(f"wrote {path}")
    return OK
