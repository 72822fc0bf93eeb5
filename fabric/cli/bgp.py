"""`fabricctl bgp ...`: fabric-wide BGP settings, configured peers, and the routes
BGP received, accepted, rejected and advertised on a node."""

from __future__ import annotations

import argparse
import ipaddress

from fabric import logs
from fabric.cli.context import Context
from fabric.cli.output import OK, CliError, emit_json, table
from fabric.kernel.features import tcp_md5_supported
from fabric.model.nodes import Node
from fabric.model.peers import BgpConfig, PeerError, PeerSpec, check_not_a_node, parse_peer
from fabric.model.pools import Pool, pool_of
from fabric.store import keys
from fabric.store.datastore import (
    Datastore,
    absent,
    get_op,
    prefix_unchanged_since,
    put,
    readable,
    unchanged,
)
from fabric.store.errors import Conflict


def register(sub: argparse._SubParsersAction) -> None:
    bgp = sub.add_parser("bgp", help="BGP peers, settings and routes")
    bgp_sub = bgp.add_subparsers(dest="bgp_cmd", required=True, metavar="COMMAND")

    config = bgp_sub.add_parser("config", help="show or change fabric-wide BGP settings")
    config.add_argument("--as", dest="asn", type=int, help="the fabric's AS number")
    mesh = config.add_mutually_exclusive_group()
    mesh.add_argument("--mesh", dest="mesh", action="store_true", default=None,
                      help="every node peers with every other (the default)")
    mesh.add_argument("--no-mesh", dest="mesh", action="store_false",
                      help="only configured peers (route reflectors, ToRs)")
    config.set_defaults(handler=config_cmd)

    peer = bgp_sub.add_parser("peer", help="configured BGP peers")
    peer_sub = peer.add_subparsers(dest="peer_cmd", required=True, metavar="COMMAND")
    add = peer_sub.add_parser("add", help="add a peer (global, or for one node)")
    add.add_argument("name")
    add.add_argument("address")
    add.add_argument("--as", dest="asn", type=int, required=True, help="the peer's AS")
    scope = add.add_mutually_exclusive_group()
    scope.add_argument("--node", help="only this node peers with it")
    scope.add_argument("--node-selector", metavar="KEY=VALUE", action="append",
                       help="only nodes with these labels peer with it")
    add.add_argument("--password", help="TCP MD5 password")
    add.add_argument("--max-prefixes", type=int, help="close the session beyond this many")
    add.add_argument("--route-reflector", action="store_true",
                     help="the peer is a route reflector (shown as such)")
    add.set_defaults(handler=peer_add)
    rm = peer_sub.add_parser("rm", help="remove a peer")
    rm.add_argument("name")
    rm.set_defaults(handler=peer_rm)
    peer_sub.add_parser("list", help="list configured peers").set_defaults(handler=peer_list)

    routes = bgp_sub.add_parser("routes", help="routes on a node's BGP sessions")
    routes.add_argument("--peer", metavar="ADDR", help="only this peer")
    which = routes.add_mutually_exclusive_group()
    which.add_argument("--received", dest="which", action="store_const", const="received",
                       help="everything received, accepted or not (default)")
    which.add_argument("--advertised", dest="which", action="store_const",
                       const="advertised", help="what this node announces")
    which.add_argument("--rejected", dest="which", action="store_const", const="rejected",
                       help="what import policy refused, with the reason")
    routes.set_defaults(handler=routes_cmd, which="received")


def config_cmd(ctx: Context) -> int:
    if ctx.asn is not None and not 1 <= ctx.asn <= 4294967295:
        raise CliError(f"AS {ctx.asn} is out of range (1 to 4294967295)")
    for _ in range(20):  # compare-and-swap: two operators changing it at once both win
        entry = ctx.store.get(keys.BGP_CONFIG)
        current = BgpConfig.from_record(entry.value if entry else None)
        if ctx.asn is None and ctx.mesh is None:
            break
        current = BgpConfig(ctx.asn if ctx.asn is not None else current.asn,
                            current.node_mesh if ctx.mesh is None else ctx.mesh)
        compare = [unchanged(entry.key, entry.mod_revision)] if entry else \
            [absent(keys.BGP_CONFIG)]
        ok, _ = ctx.store.txn(compare, [put(keys.BGP_CONFIG, current.to_record())])
        if ok:
            break
    else:
        raise CliError("the BGP settings kept changing under us; try again")
    if ctx.json:
        emit_json(current.to_record())
    else:
        print(f"AS {current.asn}, node mesh {'on' if current.node_mesh else 'off'}")
    return OK


def _selector(items: list[str] | None) -> dict[str, str]:
    selector = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--node-selector {item!r}: use KEY=VALUE")
        selector[key] = value
    return selector


def peer_add(ctx: Context) -> int:
    try:
        spec = parse_peer(ctx.name, ctx.address, ctx.asn, node=ctx.node,
                          node_selector=_selector(ctx.node_selector), password=ctx.password,
                          max_prefixes=ctx.max_prefixes, route_reflector=ctx.route_reflector)
    except PeerError as exc:
        raise CliError(str(exc)) from exc
    if spec.password is not None and not tcp_md5_supported():
        raise CliError("--password: this kernel does not support TCP MD5 signatures "
                           "(CONFIG_TCP_MD5SIG); BGP passwords cannot work here")
    try:
        add_peer(ctx.store, spec)
    except PeerError as exc:
        raise CliError(str(exc)) from exc
    if ctx.json:
        emit_json(_public(spec))
    else:
        where = f"node {spec.node}" if spec.node else (
            "nodes " + ",".join(f"{k}={v}" for k, v in spec.node_selector.items())
            if spec.node_selector else "every node")
        print(f"peer {spec.name} added: {spec.address} AS {spec.asn}, for {where}")
    return OK


def add_peer(store: Datastore, spec: PeerSpec, attempts: int = 20) -> None:
    """Write `spec` unless its name is taken, its address is a node's, or an IP pool
    contains its address (a host owning that block would blackhole the peer).

    The write compares the nodes and pools prefixes unchanged since they were listed,
    so a node registering at that address, or a pool added around it, between the
    check and the write makes it check again.
    """
    log = logs.get("cli.bgp")
    key = keys.bgp_peer(spec.name)
    for _ in range(attempts):
        nodes = store.list(keys.NODES)
        pools = store.list(keys.POOLS)
        check_not_a_node(spec, readable(nodes, Node.from_record, "node", log))
        pool = pool_of(spec.address, readable(pools, Pool.from_record, "pool", log))
        if pool is not None:
            raise PeerError(f"{spec.address} is inside IP pool {pool.name} ({pool.cidr}): "
                            "hosts would route it into the pool's blocks")
        ok, rows = store.txn([absent(key), prefix_unchanged_since(keys.NODES, nodes.revision),
                              prefix_unchanged_since(keys.POOLS, pools.revision)],
                             [put(key, spec.to_record())], [get_op(key)])
        if ok:
            return
        if rows[0]:
            raise PeerError(f"a peer named {spec.name} exists; remove it first")
    raise Conflict(f"could not add peer {spec.name}: nodes or pools kept changing")


def peer_rm(ctx: Context) -> int:
    if not ctx.store.delete(keys.bgp_peer(ctx.name)):
        raise CliError(f"no peer named {ctx.name}")
    if not ctx.json:
        print(f"peer {ctx.name} removed")
    else:
        emit_json({"removed": ctx.name})
    return OK


def peer_list(ctx: Context) -> int:
    specs = sorted(readable(ctx.store.list(keys.BGP_PEERS), PeerSpec.from_record, "BGP peer",
                            logs.get("cli.bgp")), key=lambda s: s.name)
    if ctx.json:
        emit_json([_public(s) for s in specs])
        return OK
    table(["name", "address", "as", "scope", "password", "max-prefixes", "reflector"],
          [[s.name, s.address, s.asn, s.node or _scope(s), "yes" if s.password else "no",
            s.max_prefixes, "yes" if s.route_reflector else "no"] for s in specs])
    return OK


def _scope(spec: PeerSpec) -> str:
    if spec.node_selector:
        return ",".join(f"{k}={v}" for k, v in spec.node_selector.items())
    return "all nodes"


def _public(spec: PeerSpec) -> dict[str, object]:
    record = spec.to_record()
    record["password"] = "***" if spec.password else None
    return record


def routes_cmd(ctx: Context) -> int:
    peer = ctx.peer
    if peer is not None:
        try:
            peer = str(ipaddress.ip_address(peer))
        except ValueError:
            raise CliError(f"--peer {peer!r} is not an IP address (a peer's address, "
                           "as `node status` lists them)") from None
    rows = ctx.agent("bgp_routes", peer=peer, which=ctx.which)
    if ctx.json:
        emit_json(rows)
        return OK
    if ctx.which == "advertised":
        table(["prefix", "peer", "next hop", "as path", "origin"],
              [[r["prefix"], r["peer"], r["next_hop"], _path(r["as_path"]), r["origin"]]
               for r in rows])
        return OK
    headers = ["prefix", "peer", "next hop", "as path", "status"]
    table(headers, [[r["prefix"], r["peer"], r["next_hop"], _path(r["as_path"]),
                     _status(r)] for r in rows])
    return OK


def _path(path: list[int]) -> str:
    return " ".join(map(str, path)) or "-"


def _status(row: dict[str, object]) -> str:
    if not row["accepted"]:
        return f"rejected: {row['reason']}"
    status = "best" if row["best"] else "accepted"
    return status + (" (stale)" if row.get("stale") else "")
