"""`fabricctl node status`, `routes`, `nodes`, `workloads`: what a node's agent, its
kernel and the registrations in etcd say."""

from __future__ import annotations

import argparse
import time
from typing import Any

from fabric.cli.context import Context
from fabric.cli.output import OK, PROBLEM, CliError, emit_json, kv, table
from fabric.store import keys
from fabric.store.errors import CorruptValue
from fabric.store.registry import Registry
from ipam.allocator import Ipam


def register(sub: argparse._SubParsersAction) -> None:
    node = sub.add_parser("node", help="this node's agent")
    node_sub = node.add_subparsers(dest="node_cmd", required=True, metavar="COMMAND")
    node_sub.add_parser("status", help="BGP process and sessions (exit 1 if a session "
                        "is not Established)").set_defaults(handler=status)
    remove = node_sub.add_parser(
        "rm", help="remove a node that left the fabric for good: its peers drop it and its "
                   "routes at once, GC gives its empty blocks back")
    remove.add_argument("name")
    remove.add_argument("--force", action="store_true",
                        help="even while its agent is alive (it would register again)")
    remove.set_defaults(handler=remove_node)
    sub.add_parser("routes", help="kernel routes the agent owns, and drift it repaired"
                   ).set_defaults(handler=routes)
    sub.add_parser("nodes", help="registered nodes").set_defaults(handler=nodes)
    workloads_ = sub.add_parser("workloads", help="registered workloads (all, or by name)")
    workloads_.add_argument("name", nargs="?")
    workloads_.set_defaults(handler=workloads)


def _ago(when: float | None) -> str:
    if not when:
        return "-"
    seconds = max(0, int(time.time() - when))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def status(ctx: Context) -> int:
    doc = ctx.agent("status")
    peers = doc["peers"]
    health = doc["health"]
    healthy = all(p["state"] == "Established" for p in peers) and health["healthy"]
    if ctx.json:
        emit_json(doc)
        return OK if healthy else PROBLEM
    process = doc["bgp_process"]
    state = "running" if process["running"] else "NOT running"
    rr = f", route reflector (cluster {doc['route_reflector']})" if doc["route_reflector"] \
        else ""
    addresses = ", ".join(dict.fromkeys(a for a in (doc["address"], doc.get("address6")) if a))
    kv([("node", f"{doc['node']} ({addresses}, AS {doc['asn']}{rr})"),
        ("BGP process", f"exabgp {state}, pid {process['pid']}, up {_ago(process['started_at'])}"
                        f", {process['restarts']} restart(s)"),
        ("agent", _health(health)),
        ("registration", _registration(doc["registration"])),
        ("announcing", ", ".join(doc["exports"]) or "nothing"),
        ("kernel routes", f"{doc['kernel']['applied']} changes applied, "
                          f"{doc['kernel']['repaired']} repaired, "
                          f"{doc['kernel']['failures']} refused"),
        ("network policy", _policy(doc.get("policy")))])
    print()
    table(["peer address", "name", "kind", "as", "family", "state", "since", "received",
           "accepted", "advertised", "last error"],
          [[p["address"], p["name"], p["kind"], p["asn"], p["family"], p["state"],
            _ago(p["since"]), p["received"], p["accepted"], p["advertised"],
            # An old error under an Established session reads as a current one: the
            # JSON keeps it (with `flaps`), the table shows it while the session is down.
            None if p["state"] == "Established" else (p["last_error"] or None)]
           for p in peers])
    if not peers:
        print("(no peers: the only node, or the mesh is off and no peer is configured)")
    for cidr, why in sorted(doc.get("refused_blocks", {}).items()):
        print(f"NOT routing our own block {cidr}: {why}")
    for link, why in sorted(doc.get("unregistered_links", {}).items()):
        print(f"unregistered host interface {link}: {why}")
    for key, why in sorted((doc.get("policy") or {}).get("refused", {}).items()):
        print(f"DEGRADED: network policy record does not parse (fails closed): {key}: {why}")
    for key, why in sorted(doc.get("ignored_records", {}).items()):
        print(f"ignored etcd record {key}: {why}")
    if doc.get("last_host_repair"):
        print(f"host settings put back: {doc['last_host_repair']}")
    return OK if healthy else PROBLEM


def _health(health: dict[str, Any]) -> str:
    dead = [name for name, alive in health["threads"].items() if not alive]
    if dead:
        return f"UNHEALTHY: thread(s) {', '.join(dead)} died (it exits to be restarted)"
    if health["loop_beat_age"] >= 60:
        return f"UNHEALTHY: owner loop stuck for {health['loop_beat_age']:.0f}s"
    if health.get("degraded"):
        return "DEGRADED: " + "; ".join(health["degraded"])
    return f"healthy, {len(health['threads'])} threads"


def _policy(policy: dict[str, Any] | None) -> str:
    if not policy:
        return "-"
    state = "in sync" if policy["in_sync"] else (
        f"NOT applied: {policy['last_error']}" if policy["last_error"] else "applying")
    return (f"{policy['policies']} policies, {policy['local_workloads']} local workload(s), "
            f"{policy['rules']} rules, {policy['sets']} sets; {state} "
            f"({policy['full_replacements']} table replacements, "
            f"{policy.get('rule_updates', 0)} rule updates, "
            f"{policy['element_updates']} element updates, {policy['repaired']} repaired)")


def _registration(registration: dict[str, Any]) -> str:
    if registration["healthy"]:
        return "healthy"
    error = registration["last_error"]
    if not registration["registered"]:
        return f"NOT registered: {error}" if error else "NOT registered (writing it again)"
    return f"liveness NOT refreshed: {error}"


def routes(ctx: Context) -> int:
    doc = ctx.agent("routes")
    if ctx.json:
        emit_json(doc)
        return OK
    table(["prefix", "via", "dev", "kind", "state"],
          [[r["prefix"], " ".join(r["via"]) or ("blackhole" if r["type"] == "blackhole"
                                                else None),
            r["dev"], r["kind"], "ok" if r["in_sync"] else
            ("stale (kept until peers confirm)" if r["stale"] else "pending")]
           for r in doc["routes"]])
    if doc["failed"]:
        print()
        table(["prefix", "kernel refused"], sorted(doc["failed"].items()))
    if doc["drift"]:
        print("\ndrift repaired:")
        table(["when", "prefix", "found", "restored"],
              [[time.strftime("%H:%M:%S", time.localtime(d["at"])), d["prefix"], d["found"],
                d["wanted"]] for d in doc["drift"]])
    return OK


def nodes(ctx: Context) -> int:
    registry = Registry(ctx.store)
    found = registry.nodes()
    blocks = Ipam(ctx.store).blocks()
    rows: list[dict[str, Any]] = []
    for node in found:
        ttl = _liveness(ctx, node.name)
        rows.append({"name": node.name, "address": node.address,
                     "address6": node.ipv6 or None, "router_id": node.bgp_id,
                     "networks": list(node.networks), "asn": node.asn,
                     "labels": node.labels, "route_reflector": node.rr_cluster_id,
                     "blocks": [b.cidr for b in blocks if b.affinity == node.name],
                     "started_at": node.started_at, "agent_alive": ttl > 0,
                     "lease_ttl": ttl, "version": node.version})
    if ctx.json:
        emit_json(rows)
        return OK
    table(["name", "address", "as", "blocks", "agent", "started", "labels"],
          [[r["name"], ", ".join(dict.fromkeys(a for a in (r["address"], r["address6"]) if a)),
            r["asn"], " ".join(r["blocks"]) or None,
            "alive" if r["agent_alive"] else "NOT alive (lease expired)",
            _ago(r["started_at"]),
            ",".join(f"{k}={v}" for k, v in r["labels"].items()) or None] for r in rows])
    return OK


def _liveness(ctx: Context, name: str) -> int:
    """Seconds left on the node's liveness key (-1: gone: its agent is not running)."""
    entry = ctx.store.get(keys.liveness(name))
    if entry is None or not entry.lease:
        return -1
    return ctx.store.lease_remaining(entry.lease)[0]


def remove_node(ctx: Context) -> int:
    registry = Registry(ctx.store)
    try:
        missing = ctx.store.get(keys.node(ctx.name)) is None
    except CorruptValue:
        missing = False  # unreadable, but there: removing it is what the operator wants
    if missing:
        raise CliError(f"no node named {ctx.name}", code=PROBLEM)
    if _liveness(ctx, ctx.name) > 0 and not ctx.force:
        raise CliError(f"node {ctx.name}'s agent is alive: stop it first (it would register "
                       "again), or use --force")
    registry.remove_node(ctx.name)
    print(f"removed node {ctx.name}; its peers drop it now, GC frees its empty blocks")
    return OK


def workloads(ctx: Context) -> int:
    registry = Registry(ctx.store)
    found = registry.find_workloads(ctx.name) if ctx.name else registry.workloads()
    if ctx.name and not found:
        raise CliError(f"no workload named {ctx.name}", code=PROBLEM)
    if ctx.json:
        emit_json([w.to_record() for w in found])
        return OK
    table(["name", "node", "ips", "container", "interface", "network"],
          [[w.name, w.node, " ".join(w.ips), w.container_id[:20], w.ifname, w.network]
           for w in found])
    return OK
