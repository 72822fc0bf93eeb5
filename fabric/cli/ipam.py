"""`fabricctl ipam ...`: pools, usage, check and release."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from fabric.cli.context import Context
from fabric.cli.output import OK, PROBLEM, CliError, emit_json, kv, table
from fabric.model.pools import parse_pool
from ipam.allocator import Ipam
from ipam.check import NEEDS_A_PERSON, check, usage


def register(sub: argparse._SubParsersAction) -> None:
    ipam = sub.add_parser("ipam", help="IP pools, blocks and allocations")
    ipam_sub = ipam.add_subparsers(dest="ipam_cmd", required=True, metavar="COMMAND")

    pool = ipam_sub.add_parser("pool", help="manage IP pools")
    pool_sub = pool.add_subparsers(dest="pool_cmd", required=True, metavar="COMMAND")
    add = pool_sub.add_parser("add", help="add an IP pool")
    add.add_argument("name")
    add.add_argument("cidr")
    add.add_argument("--block-size", type=int, metavar="N",
                     help="block prefix length (default 26 for IPv4, 122 for IPv6)")
    add.add_argument("--nat-outgoing", action="store_true",
                     help="masquerade traffic from this pool to destinations outside all pools")
    add.add_argument("--strict-affinity", action="store_true",
                     help="never borrow addresses from other hosts' blocks")
    add.add_argument("--disabled", action="store_true", help="add it disabled")
    add.set_defaults(handler=pool_add)
    pool_sub.add_parser("list", help="list IP pools").set_defaults(handler=pool_list)
    rm = pool_sub.add_parser("rm", help="remove an IP pool")
    rm.add_argument("name")
    rm.add_argument("--force", action="store_true",
                    help="remove even while addresses are in use (they are released)")
    rm.set_defaults(handler=pool_rm)
    for verb, disabled in (("disable", True), ("enable", False)):
        flip = pool_sub.add_parser(verb, help=f"{verb} allocation from a pool")
        flip.add_argument("name")
        flip.set_defaults(handler=pool_flip, disabled=disabled)

    show = ipam_sub.add_parser("show", help="usage per pool and per host")
    show.add_argument("--blocks", action="store_true", help="list every block")
    show.set_defaults(handler=show_usage)
    ipam_sub.add_parser("check", help="find leaks and inconsistencies (exit 1 if any)"
                        ).set_defaults(handler=check_cmd)
    release = ipam_sub.add_parser("release", help="release leaked addresses or one address")
    target = release.add_mutually_exclusive_group(required=True)
    target.add_argument("--leaked", action="store_true",
                        help="release everything `ipam check` reports as leaked")
    target.add_argument("address", nargs="?", help="one address to release")
    release.add_argument("--force", action="store_true",
                         help="release ADDRESS even though a registered workload uses it")
    release.set_defaults(handler=release_cmd)


def pool_add(ctx: Context) -> int:
    pool = parse_pool(ctx.name, ctx.cidr, ctx.block_size, nat_outgoing=ctx.nat_outgoing,
                      strict_affinity=ctx.strict_affinity, disabled=ctx.disabled)
    Ipam(ctx.store).add_pool(pool)
    if ctx.json:
        emit_json(pool.to_record())
    else:
        print(f"pool {pool.name} added: {pool.cidr}, blocks /{pool.block_size}")
    return OK


def pool_list(ctx: Context) -> int:
    pools = Ipam(ctx.store).pools()
    if ctx.json:
        emit_json([p.to_record() for p in pools])
        return OK
    table(["name", "cidr", "block", "nat-outgoing", "strict-affinity", "disabled"],
          [[p.name, p.cidr, f"/{p.block_size}", _yes(p.nat_outgoing),
            _yes(p.strict_affinity), _yes(p.disabled)] for p in pools])
    return OK


def pool_rm(ctx: Context) -> int:
    result = Ipam(ctx.store).remove_pool(ctx.name, force=ctx.force)
    if ctx.json:
        emit_json({"pool": result.pool, "blocks_freed": result.blocks_freed,
                   "addresses_released": result.addresses_released})
    else:
        print(f"pool {result.pool} removed ({result.blocks_freed} block(s) freed, "
              f"{result.addresses_released} address(es) released)")
    return OK


def pool_flip(ctx: Context) -> int:
    pool = Ipam(ctx.store).update_pool(ctx.name, disabled=ctx.disabled)
    if ctx.json:
        emit_json(pool.to_record())
    else:
        print(f"pool {pool.name} {'disabled' if pool.disabled else 'enabled'}")
    return OK


def show_usage(ctx: Context) -> int:
    snap = Ipam(ctx.store).snapshot()
    for bad in snap.corrupt:  # left out of the counts: say so (`ipam check` lists them)
        print(f"fabricctl: skipped an unreadable record: {bad.key}: {bad.reason}",
              file=sys.stderr)
    rows = usage(snap)
    used_per_block: dict[str, int] = {}
    for ip in snap.ips:
        used_per_block[ip.block] = used_per_block.get(ip.block, 0) + 1
    blocks = sorted(snap.blocks, key=lambda b: (b.pool, ipaddress.ip_network(b.cidr)))
    if ctx.json:
        out: dict[str, object] = {"usage": [r.__dict__ for r in rows]}
        if ctx.blocks:
            out["blocks"] = [{**b.to_record(), "used": used_per_block.get(b.cidr, 0)}
                             for b in blocks]
        emit_json(out)
        return OK
    table(["pool", "cidr", "host", "blocks", "used", "free"],
          [[r.pool, r.cidr, r.node or "(all)", r.blocks, r.used, r.free] for r in rows])
    if ctx.blocks:
        print()
        table(["block", "pool", "host", "used"],
              [[b.cidr, b.pool, b.affinity, used_per_block.get(b.cidr, 0)] for b in blocks])
    return OK


def check_cmd(ctx: Context) -> int:
    report = check(Ipam(ctx.store).snapshot())
    if ctx.json:
        emit_json(report.to_dict())
        return OK if report.ok else PROBLEM
    kv((k.replace("_", " "), v) for k, v in report.counts.items())
    if report.findings:
        print()
        table(["kind", "subject", "node", "detail"],
              [[f.kind, f.subject, f.node, f.detail] for f in report.findings])
        print(f"\n{len(report.findings)} problem(s) found; "
              "`fabricctl ipam release --leaked` frees leaks")
        return PROBLEM
    print("\nno problems found")
    return OK


def release_cmd(ctx: Context) -> int:
    ipam = Ipam(ctx.store)
    if ctx.leaked:
        if ctx.force:
            raise CliError("--force applies to one ADDRESS, not to --leaked")
        report = check(ipam.snapshot())
        done = ipam.release_found(report)
        untouched = sum(len(report.of(kind)) for kind in NEEDS_A_PERSON)
        if ctx.json:
            emit_json({"released": done, "needs_attention": untouched})
        else:
            print("released: " + ", ".join(f"{v} {k}" for k, v in sorted(done.items())))
            if untouched:
                print(f"{untouched} finding(s) need a person ({', '.join(NEEDS_A_PERSON)})")
        return PROBLEM if untouched else OK
    if not ctx.address:
        raise CliError("give an ADDRESS or --leaked")
    holder = ipam.release_address(ctx.address, force=ctx.force)
    if ctx.json:
        emit_json({"address": ctx.address, "handle": holder})
    else:
        print(f"{ctx.address} released" + (f" (was held by {holder})" if holder
                                            else " (it was already free)"))
    return OK


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
