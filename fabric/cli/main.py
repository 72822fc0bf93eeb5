"""fabricctl entry point: argument tree, error handling and exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fabric import logs
from fabric.cli import bgp as bgp_cmds
from fabric.cli import cni as cni_cmds
from fabric.cli import ipam as ipam_cmds
from fabric.cli import lab as lab_cmds
from fabric.cli import node as node_cmds
from fabric.cli.context import Context
from fabric.cli.output import ERROR, CliError
from fabric.model.handles import IpamError
from fabric.model.pools import PoolError
from fabric.settings import SettingsError, add_etcd_arguments
from fabric.sockets import AgentError, AgentUnreachable
from fabric.store.errors import CorruptValue, DatastoreError, Unavailable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fabricctl", description="Operate an l3fabric routed container fabric.")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table",
                        help="table for people (default) or json for scripts")
    parser.add_argument("--log-level", default="warning", help="log level on stderr")
    parser.add_argument("--host", metavar="HOST",
                        help="a lab host: reach its agent (and the lab's etcd)")
    parser.add_argument("--lab", metavar="NAME", help="which lab (default: the one up)")
    add_etcd_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (node_cmds, bgp_cmds, ipam_cmds, cni_cmds, lab_cmds):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure("console", args.log_level)
    ctx = Context(args)
    try:
        return int(args.handler(ctx))
    except CliError as exc:
        print(f"fabricctl: {exc}", file=sys.stderr)
        return exc.code
    except (SettingsError, Unavailable, CorruptValue, IpamError, PoolError, AgentUnreachable,
            AgentError) as exc:
        print(f"fabricctl: {exc}", file=sys.stderr)
        return ERROR
    except DatastoreError as exc:
        print(f"fabricctl: datastore error: {exc}", file=sys.stderr)
        return ERROR
    except KeyboardInterrupt:
        return ERROR
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
