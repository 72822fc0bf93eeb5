"""`fabricctl lab ...`: a routed multi-host fabric in network namespaces on this machine."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fabric.cli.context import Context, program
from fabric.cli.output import ERROR, OK, PROBLEM, CliError, emit_json, table
from fabric.lab.topology import (
    DEFAULT_UNDERLAY,
    DEFAULT_UNDERLAY6,
    FIRST_RESERVED,
    IP_FAMILIES,
    NOT_READY,
    HostState,
    Lab,
    LabError,
    all_labs,
    size_neighbour_tables,
)
from fabric.processes import is_running

DEFAULT_LAB = "l3lab"
# An agent that does not answer a status request: starting, dying, or gone with its host.
UNANSWERED: tuple[type[Exception], ...] = (*NOT_READY, OSError)


def register(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="a multi-host fabric in network namespaces")
    lab_sub = lab.add_subparsers(dest="lab_cmd", required=True, metavar="COMMAND")
    # Every lab command takes --name LAB (the same as fabricctl's global --lab).
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("--name", dest="lab_name", metavar="LAB",
                       help=f"the lab (default {DEFAULT_LAB}, or the only one up)")
    lab_sub = _WithName(lab_sub, named)

    up = lab_sub.add_parser("up", help="build the lab and show it working")
    up.add_argument("--hosts", type=int, default=3, help="hosts (default 3)")
    up.add_argument("--containers-per-host", type=int, default=2, metavar="M",
                    help="workloads per host (default 2)")
    up.add_argument("--peer", choices=("bird", "frr", "none"), default="none",
                    help="an external BGP speaker (default none: full mesh)")
    up.add_argument("--peer-role", choices=("rr", "tor"), default="rr",
                    help="the speaker as route reflector, or as eBGP ToR with an AS per host")
    up.add_argument("--route-reflectors", type=int, default=0, metavar="K",
                    help="make the first K hosts route reflectors")
    up.add_argument("--ip-family", choices=tuple(IP_FAMILIES), default="dual",
                    help="the underlay, sessions and workloads: IPv4, IPv6 or both "
                         "(default dual)")
    up.add_argument("--pool", default="10.244.0.0/16", help="IPv4 pool (default 10.244.0.0/16)")
    up.add_argument("--pool6", default="fd00:244::/64",
                    help="IPv6 pool (default fd00:244::/64, /122 blocks)")
    up.add_argument("--underlay", default=DEFAULT_UNDERLAY, help="IPv4 underlay subnet")
    up.add_argument("--underlay6", default=DEFAULT_UNDERLAY6, help="IPv6 underlay subnet")
    up.add_argument("--check", choices=("all", "sample", "none"), default=None,
                    help="reachability check: every pair, a sample that has every host as "
                         "source and destination, or none (default: all up to 10 hosts, "
                         "else sample)")
    up.add_argument("--parallel", type=int, default=8, metavar="N",
                    help="hosts built at once (default 8)")
    up.add_argument("--etcd-members", type=int, default=1, choices=(1, 3, 5),
                    help="etcd cluster members, each in its own namespace (default 1)")
    up.add_argument("--workloads", metavar="NS/NAME,...", type=_workload_list, default=[],
                    help="workloads NS/NAME placed round robin on the hosts, labelled "
                         "pod=NAME, serving TCP and UDP on ports 80 and 81 (as the "
                         "Kubernetes network-policy tests); instead of "
                         "--containers-per-host")
    up.set_defaults(handler=up_cmd)

    lab_sub.add_parser("status", help="hosts, sessions, routes, workloads"
                       ).set_defaults(handler=status_cmd)
    run = lab_sub.add_parser("exec", help="run a command on a lab host or workload")
    run.add_argument("target", help="host (h1) or workload (h1-w1)")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS]")
    run.set_defaults(handler=exec_cmd)
    add = lab_sub.add_parser("add-host", help="add a host (and its workloads)")
    add.add_argument("host_name", nargs="?", metavar="HOST", help="name (default: next hN)")
    add.add_argument("--containers", type=int, default=0, help="workloads on it")
    add.set_defaults(handler=add_host_cmd)
    kill = lab_sub.add_parser("kill", help="a host dies (link down, processes killed), or "
                              "an etcd member (etcd-N) is killed")
    kill.add_argument("host_name", metavar="HOST|etcd-N")
    kill.set_defaults(handler=kill_cmd)
    revive = lab_sub.add_parser("restart-etcd", help="start a killed etcd member again: "
                                "it rejoins the cluster with its data")
    revive.add_argument("member", metavar="etcd-N")
    revive.set_defaults(handler=restart_etcd_cmd)
    restart = lab_sub.add_parser("restart-agent", help="stop a host's agent (SIGTERM, or "
                                 "--kill for SIGKILL) and start it again")
    restart.add_argument("host_name", metavar="HOST")
    restart.add_argument("--kill", action="store_true", help="kill -9, as in a crash")
    restart.set_defaults(handler=restart_cmd)
    add_workload = lab_sub.add_parser(
        "add-workload", help="a workload NS/NAME labelled pod=NAME, serving TCP and UDP on "
                             "ports 80 and 81, on --host HOST (default: the host with fewest)")
    add_workload.add_argument("workload", metavar="NS/NAME")
    add_workload.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                              help="another label (repeatable)")
    add_workload.set_defaults(handler=add_workload_cmd)
    probe = lab_sub.add_parser("probe", help="connectivity truth table: connect from every "
                               "workload (row) to every other one (column)")
    probe.add_argument("--port", type=int, default=80, help="port (default 80)")
    probe.add_argument("--protocol", choices=("tcp", "udp"), default="tcp",
                       help="tcp (connect and read) or udp (datagram and answer)")
    probe.add_argument("--family", type=int, choices=(4, 6), default=None,
                       help="the address family probed (default: the lab's first, 4 in a "
                            "dual-stack lab)")
    probe.set_defaults(handler=probe_cmd)
    lab_sub.add_parser("down", help="remove everything the lab made (safe to repeat)"
                       ).set_defaults(handler=down_cmd)
    lab_sub.add_parser("env", help="shell exports to use fabricctl against the lab's etcd"
                       ).set_defaults(handler=env_cmd)


class _WithName:
    """add_parser() for lab subcommands, each inheriting the --name option."""

    def __init__(self, sub: argparse._SubParsersAction, parent: argparse.ArgumentParser
                 ) -> None:
        self.sub, self.parent = sub, parent

    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser:
        return self.sub.add_parser(name, parents=[self.parent], **kwargs)  # type: ignore[arg-type]


def _lab_option(ctx: Context) -> str | None:
    return getattr(ctx.args, "lab_name", None) or getattr(ctx.args, "lab", None)


def _name(ctx: Context) -> str:
    return _lab_option(ctx) or DEFAULT_LAB


def _existing(ctx: Context) -> Lab:
    name = _lab_option(ctx)
    if not name:
        labs = all_labs()
        name = labs[0] if len(labs) == 1 else DEFAULT_LAB
    lab = Lab(name)
    if not lab.state_path.exists():
        raise CliError(f"no lab named {name} is up (fabricctl lab up)")
    return lab


class Progress:
    """One line per step, with its duration, on stderr (stdout stays for results)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet = total, 0, quiet

    def step(self, text: str, work: Callable[[], Any]) -> Any:
        self.done += 1
        started = time.monotonic()
        if not self.quiet:
            print(f"[{self.done}/{self.total}] {text} ...", end="", file=sys.stderr, flush=True)
        result = work()
        if not self.quiet:
            print(f" ok ({time.monotonic() - started:.1f}s)", file=sys.stderr, flush=True)
        return result


MAX_HOSTS = FIRST_RESERVED - 11


def _check_underlay(text: str, family: int, longest: int) -> None:
    """The lab puts hosts at .11-.240 of its underlay (::b-::f0 in IPv6), etcd and
    peers at .241-.253 and the router at .254: it needs 256 addresses."""
    option = "--underlay" if family == 4 else "--underlay6"
    try:
        network = ipaddress.ip_network(text)
    except ValueError:
        raise CliError(f"{option} {text!r} is not a network (like 10.99.0.0/24)") from None
    if network.version != family or network.prefixlen > longest:
        raise CliError(f"{option} {text}: use an IPv{family} network of /{longest} or "
                       "larger (hosts at .11-.240, etcd and peers at .241-.253, the router "
                       "at .254)")


def up_cmd(ctx: Context) -> int:
    if ctx.hosts < 1 or ctx.containers_per_host < 0 or ctx.route_reflectors < 0:
        raise CliError("--hosts must be at least 1, the other counts at least 0")
    if ctx.route_reflectors > ctx.hosts:
        raise CliError("--route-reflectors cannot exceed --hosts")
    if ctx.hosts > MAX_HOSTS:
        raise CliError(f"--hosts {ctx.hosts}: a lab has room for {MAX_HOSTS} hosts on its "
                       "underlay (.11 to .240)")
    if ctx.parallel < 1:
        raise CliError(f"--parallel {ctx.parallel}: build at least 1 host at a time")
    if ctx.route_reflectors and ctx.peer != "none" and ctx.peer_role == "rr":
        raise CliError("--route-reflectors and --peer-role rr both ask for the reflectors: "
                       f"use agents as reflectors (--route-reflectors) or {ctx.peer} "
                       "(--peer-role rr), not both")
    _check_underlay(ctx.underlay, 4, 24)
    _check_underlay(ctx.underlay6, 6, 120)
    if os.geteuid() != 0:
        raise CliError("the lab needs root (network namespaces)")
    lab = Lab(_name(ctx))
    if lab.exists:
        raise CliError(f"a lab named {lab.name} is already up; use it, or remove it with "
                       f"`fabricctl lab down --name {lab.name}`")
    peer = ctx.peer != "none"
    tor = peer and ctx.peer_role == "tor"

    families = IP_FAMILIES[ctx.ip_family]

    def underlay() -> None:
        lab.create_underlay(ctx.underlay, families, ctx.underlay6)
        lab.start_etcd(ctx.etcd_members)

    def pools() -> None:
        if 4 in families:
            lab.add_pool("default", ctx.pool, nat_outgoing=True)
        if 6 in families:
            lab.add_pool("default6", ctx.pool6)

    def host(index: int, rr: str | None) -> None:
        own = Lab(lab.name)  # a Lab per thread: each holds its own state and file lock
        own.add_host(f"h{index}", asn=65000 + index if tor else None, rr_cluster_id=rr)
        own.wait_agent(f"h{index}")

    def hosts(indexes: list[int]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, ctx.parallel)) as pool:
            list(pool.map(lambda i: host(i, reflector(i)), indexes))
        lab.refresh()

    def reflector(index: int) -> str | None:
        return f"10.255.0.{index}" if index <= ctx.route_reflectors else None

    def install_cni() -> None:
        """Once, before threads attach workloads: each would otherwise install the plugin
        when it finds none, and two installs at once collide on the same file."""
        if not (lab.cni_bin / "l3fabric").exists():
            lab.install_cni()

    def workloads() -> None:
        install_cni()

        def attach(name: str) -> None:
            own = Lab(lab.name)
            for _ in range(ctx.containers_per_host):
                own.add_workload(name)

        with ThreadPoolExecutor(max_workers=max(1, ctx.parallel)) as pool:
            list(pool.map(attach, list(lab.refresh().hosts)))
        lab.refresh()

    def named_workloads() -> None:
        hosts = sorted(lab.refresh().hosts, key=lambda h: int(h[1:]) if h[1:].isdigit() else 0)
        install_cni()
        placed: dict[str, list[tuple[str, str]]] = {}
        for index, ref in enumerate(ctx.workloads):
            placed.setdefault(hosts[index % len(hosts)], []).append(ref)

        def attach(host: str) -> None:
            own = Lab(lab.name)  # a Lab per thread, as for the hosts
            for namespace, name in placed[host]:
                own.add_workload(host, name, namespace=namespace, labels={"pod": name},
                                 serve=True)

        with ThreadPoolExecutor(max_workers=max(1, ctx.parallel)) as pool:
            list(pool.map(attach, list(placed)))
        lab.refresh()

    nets = [n for f, n in ((4, ctx.underlay), (6, ctx.underlay6)) if f in families]
    wanted = [n for f, n in ((4, ctx.pool), (6, ctx.pool6)) if f in families]
    steps: list[tuple[str, Callable[[], Any]]] = [
        (f"underlay {' + '.join(nets)} and etcd" +
         (f" ({ctx.etcd_members} members)" if ctx.etcd_members > 1 else ""), underlay),
        (f"IP pool{'s' if len(wanted) > 1 else ''} {' + '.join(wanted)}", pools)]
    if peer:
        steps.append((f"{ctx.peer} as {'eBGP ToR' if tor else 'route reflector'}",
                      lambda: lab.add_peer(ctx.peer, ctx.peer_role)))
    steps.append(("neighbour tables sized for the lab",
                  lambda: _size_neighbours(ctx.hosts, max(ctx.containers_per_host, -(
                      -len(ctx.workloads) // ctx.hosts)), families)))
    if ctx.hosts <= 5:  # one line per host: what people see in a small lab
        for index in range(1, ctx.hosts + 1):
            rr = reflector(index)
            steps.append((f"host h{index} with fabric-agent and ExaBGP" +
                          (" (route reflector)" if rr else ""),
                          lambda i=index, r=rr: host(i, r)))  # type: ignore[misc]
    else:  # the reflectors first: the others peer with them
        first = list(range(1, ctx.route_reflectors + 1))
        rest = list(range(ctx.route_reflectors + 1, ctx.hosts + 1))
        if first:
            steps.append((f"{len(first)} route reflector(s) with fabric-agent and ExaBGP",
                          lambda: hosts(first)))
        steps.append((f"{len(rest)} hosts with fabric-agent and ExaBGP, {ctx.parallel} at a "
                      "time", lambda: hosts(rest)))
    steps.append(("BGP sessions established", lambda: _wait_sessions(lab)))
    if ctx.workloads:
        steps.append((f"{len(ctx.workloads)} workload(s) round robin through the CNI plugin, "
                      "serving TCP and UDP on 80 and 81", named_workloads))
    elif ctx.containers_per_host:
        steps.append((f"{ctx.containers_per_host} workload(s) per host through the CNI "
                      "plugin", workloads))
    check = ctx.check or ("all" if ctx.hosts <= 10 else "sample")
    if not ctx.workloads and not ctx.containers_per_host:
        check = "none"  # nothing to ping; the summary says why
    progress = Progress(len(steps) + (check != "none"), ctx.json)
    matrices: dict[str, Matrix] = {}
    try:
        for text, work in steps:
            progress.step(text, work)
        if check != "none":
            what = "every pair" if check == "all" else "a sample: every host as source " \
                "and destination"
            matrices = progress.step(f"reachability between workloads (ping, {what}" +
                                     (", each family)" if len(families) > 1 else ")"),
                                     lambda: _wait_matrices(lab, sample=check == "sample"))
    except (LabError, OSError) as exc:
        raise CliError(f"lab up failed: {exc}\n(everything made so far stays for "
                       f"inspection; `fabricctl lab down --name {lab.name}` removes it)"
                       ) from exc
    lab.mark_complete()
    return _summary(ctx, lab, matrices)


def _statuses(lab: Lab) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {}
    for name in lab.state.hosts:
        try:
            out[name] = lab.call(name, "status")
        except UNANSWERED:
            out[name] = None
    return out


def agent_state(host: HostState, answering: bool,
                running: Callable[[int], bool] = is_running) -> str:
    """One word (or two) for a host's agent, from its answer and its processes."""
    if not host.alive:
        return "killed"
    if answering:
        return "running"
    if host.agent_pid and running(host.agent_pid):
        return "not answering"
    if host.supervisor_pid and running(host.supervisor_pid):
        return "restarting"
    if not host.wanted:
        return "stopped"
    return f"exited ({host.last_exit})" if host.last_exit else "exited"  # nothing restarts it


def _wait_sessions(lab: Lab, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        statuses = _statuses(lab)
        down = [f"{h}->{p['address']}" for h, s in statuses.items() if s
                for p in s["peers"] if p["state"] != "Established"]
        if not down and all(statuses.values()):
            return
        if time.monotonic() > deadline:
            raise LabError(f"sessions not established after {timeout:.0f}s: "
                           f"{', '.join(down) or 'an agent is not answering'}")
        time.sleep(0.3)


Matrix = dict[str, dict[str, bool]]


def _matrices(lab: Lab, sample: bool = False) -> dict[str, Matrix]:
    """Reachability per family: {"ipv4": from -> to -> bool, "ipv6": ...}."""
    if not lab.state.workloads:
        return {}
    return {f"ipv{family}": lab.matrix(family, sample=sample) for family in lab.families}


def _green(matrices: dict[str, Matrix]) -> bool:
    return all(all(row.values()) for m in matrices.values() for row in m.values())


def _size_neighbours(hosts: int, per_host: int, families: tuple[int, ...]) -> None:
    for change in size_neighbour_tables(hosts, per_host, families):
        print(f"  {change}", file=sys.stderr)


def _coverage(matrices: dict[str, Matrix]) -> tuple[int, int]:
    """(pairs pinged, pairs there are): fewer pinged is a sample (--check sample)."""
    return (sum(len(row) for m in matrices.values() for row in m.values()),
            sum(len(m) * (len(m) - 1) for m in matrices.values()))


def _verdict(matrices: dict[str, Matrix], workloads: bool) -> str:
    if not matrices:
        return f"reachability not checked ({'--check none' if workloads else 'no workloads'})"
    if not _green(matrices):
        return "SOME PINGS FAILED"
    pinged, pairs = _coverage(matrices)
    if pinged == pairs:
        return "all workloads reach each other"
    return (f"all {pinged} sampled pairs of {pairs} reach each other (every host as "
            "source and destination; --check all pings every pair)")


def _cell(row: dict[str, bool], source: str, target: str) -> str:
    if source == target:
        return "-"
    if target not in row:
        return "."  # not pinged: --check sample
    return "ok" if row[target] else "FAIL"


def _wait_matrices(lab: Lab, timeout: float = 30.0,
                   sample: bool = False) -> dict[str, Matrix]:
    deadline = time.monotonic() + timeout
    while True:
        matrices = _matrices(lab, sample)
        if _green(matrices) or time.monotonic() > deadline:
            return matrices


def _summary(ctx: Context, lab: Lab, matrices: dict[str, Matrix]) -> int:
    statuses = _statuses(lab)
    lab.refresh()  # the supervisors record restarts in the state
    hosts = []
    for name, host in sorted(lab.state.hosts.items()):
        status = statuses.get(name)
        peers = status["peers"] if status else []
        kernel = _kernel_routes(host.netns)
        hosts.append({"host": name, "address": host.address,
                      "address6": host.address6 or None, "alive": host.alive,
                      "agent": status is not None,
                      "agent_state": agent_state(host, status is not None),
                      "agent_pid": host.agent_pid, "supervisor_pid": host.supervisor_pid,
                      "restarts": host.restarts, "last_exit": host.last_exit,
                      "sessions_up": sum(p["state"] == "Established" for p in peers),
                      "sessions": len(peers), "routes_installed": kernel,
                      "workloads": [w.name for w in lab.state.workloads.values()
                                    if w.host == name]})
    green = _green(matrices)
    first = next(iter(matrices.values()), {})
    if ctx.json:
        emit_json({"lab": lab.name, "hosts": hosts, "matrix": first, "matrices": matrices,
                   "all_reachable": green, "etcd": lab.etcd_local_endpoint,
                   "families": [f"ipv{f}" for f in lab.families]})
        return OK if green else PROBLEM
    nets = [n for f, n in ((4, lab.state.underlay), (6, lab.state.underlay6))
            if f in lab.families]
    print(f"\nlab {lab.name}: {len(hosts)} host(s) on {' + '.join(nets)}"
          + (f", {lab.state.peer.kind} as {lab.state.peer.role}" if lab.state.peer else ""))
    both = len(lab.families) > 1
    table(["host", "address", *(["address6"] if both else []), "agent", "restarts",
           "bgp sessions up", "routes installed", "workloads"],
          [[h["host"], h["address"], *([h["address6"]] if both else []), h["agent_state"],
            h["restarts"], f"{h['sessions_up']}/{h['sessions']}", h["routes_installed"],
            " ".join(h["workloads"]) or None] for h in hosts])
    if any(h["agent_state"] not in ("running", "killed") for h in hosts):
        print("\nThe lab starts an agent again when it crashes or is killed (kill -9), as "
              "systemd does on a real host;\none stopped on purpose or that exited cleanly "
              f"stays down: {program()} lab restart-agent HOST starts it.")
    pinged, pairs = _coverage(matrices)
    for family, matrix in matrices.items():
        names = sorted(matrix)
        label = f", {family[:2].upper()}{family[2:]}" if both else ""
        legend = "; '.' not pinged (a sample)" if pinged < pairs else ""
        print(f"\nreachability (ping from row to column{label}{legend}):")
        table(["from \\ to", *names],
              [[a, *[_cell(matrix[a], a, b) for b in names]] for a in names])
    ctl = program()
    lab_opt = "" if lab.name == DEFAULT_LAB else f"--lab {lab.name} "
    named = sorted(n for n, w in lab.state.workloads.items() if w.namespace)
    if len(named) >= 2:
        tries = (f"\n  {ctl} {lab_opt}lab probe --port 80 --protocol tcp"
                 f"\n  {ctl} {lab_opt}policy apply -f docs/examples/networkpolicy.yaml"
                 f"\n  {ctl} {lab_opt}--host {lab.state.workloads[named[1]].host} policy "
                 f"explain {named[0]} {named[1]} --port 80/tcp")
    else:
        tries = f"\n  {ctl} {lab_opt}lab exec h1-w1 -- ping -c1 h2-w1.fabric.internal"
    verdict = _verdict(matrices, bool(lab.state.workloads))
    print(f"\n{verdict}. Next:"
          f"\n  {ctl} {lab_opt}--host h1 node status\n  {ctl} {lab_opt}--host h1 bgp routes"
          f"\n  {ctl} {lab_opt}--host h1 routes\n  {ctl} --lab {lab.name} nodes{tries}"
          f"\n  {ctl} {lab_opt}lab down")
    return OK if green else PROBLEM


def _kernel_routes(ns: str) -> int:
    import subprocess

    total = 0
    for family in ("-4", "-6"):
        result = subprocess.run(["ip", "-n", ns, family, "route", "show", "proto", "73"],
                                capture_output=True, text=True, check=False)
        total += len(result.stdout.splitlines())
    return total


def status_cmd(ctx: Context) -> int:
    lab = _existing(ctx)
    return _summary(ctx, lab, _matrices(lab, sample=len(lab.state.hosts) > 10))


def exec_cmd(ctx: Context) -> int:
    lab = _existing(ctx)
    argv = list(ctx.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise CliError("give a command after --, e.g. fabricctl lab exec h1 -- ip route")
    target = ctx.target
    if target in lab.state.hosts:
        ns = lab.state.hosts[target].netns
    elif target in lab.state.workloads:
        ns = lab.state.workloads[target].netns
    else:
        raise CliError(f"lab {lab.name} has no host or workload {target} (hosts: "
                       f"{', '.join(sorted(lab.state.hosts))}; workloads: "
                       f"{', '.join(sorted(lab.state.workloads))})")
    os.execvp("ip", ["ip", "netns", "exec", ns, *argv])
    return ERROR  # not reached


def add_host_cmd(ctx: Context) -> int:
    if ctx.containers < 0:
        raise CliError(f"--containers {ctx.containers}: a count of at least 0")
    lab = _existing(ctx)
    name = ctx.host_name or f"h{len(lab.state.hosts) + 1}"
    try:
        host = lab.add_host(name)
        lab.wait_agent(name)
        made = [lab.add_workload(name) for _ in range(ctx.containers)]
    except LabError as exc:
        raise CliError(str(exc)) from exc
    if ctx.json:
        emit_json({"host": name, "address": host.address, "workloads": [w.name for w in made]})
    else:
        print(f"host {name} added ({host.address})" +
              (f" with {', '.join(w.name for w in made)}" if made else ""))
    return OK


def kill_cmd(ctx: Context) -> int:
    lab = _existing(ctx)
    if ctx.host_name.startswith("etcd-"):
        try:
            running = lab.kill_etcd(ctx.host_name)
        except LabError as exc:
            raise CliError(str(exc)) from exc
        members = len(lab.state.etcd_members)
        quorum = running > members // 2
        if not ctx.json:
            print(f"{ctx.host_name} killed (kill -9); {running} of {members} members run: "
                  + ("a majority, so etcd goes on" if quorum else
                     "no majority, so etcd answers nothing until one comes back")
                  + f". {program()} lab restart-etcd {ctx.host_name} brings it back")
        return OK
    if ctx.host_name not in lab.state.hosts:
        raise CliError(f"lab {lab.name} has no host {ctx.host_name}")
    lab.kill_host(ctx.host_name)
    if not ctx.json:
        print(f"host {ctx.host_name} killed: its underlay link is down and its processes are gone;"
              " peers notice when the hold time runs out")
    return OK


def restart_etcd_cmd(ctx: Context) -> int:
    lab = _existing(ctx)
    lab.restart_etcd(ctx.member)
    if not ctx.json:
        print(f"{ctx.member} started again; it rejoins the cluster with its data")
    return OK


def restart_cmd(ctx: Context) -> int:
    import signal

    lab = _existing(ctx)
    if ctx.host_name not in lab.state.hosts:
        raise CliError(f"lab {lab.name} has no host {ctx.host_name}")
    if not lab.state.hosts[ctx.host_name].alive:
        raise CliError(f"host {ctx.host_name} was killed (lab kill): it has no underlay and "
                       "runs nothing; a new host is `lab add-host`")
    try:
        old, pid = lab.restart_agent(ctx.host_name,
                                     sig=signal.SIGKILL if ctx.kill else signal.SIGTERM)
        lab.wait_agent(ctx.host_name)
    except LabError as exc:
        raise CliError(str(exc)) from exc
    if ctx.json:
        emit_json({"host": ctx.host_name, "old_pid": old, "pid": pid})
    else:
        how = "killed (-9)" if ctx.kill else "stopped"
        print(f"agent of {ctx.host_name} {how} (pid {old}) and started again (pid {pid})")
    return OK


def down_cmd(ctx: Context) -> int:
    names = [_lab_option(ctx)] if _lab_option(ctx) else (all_labs() or [DEFAULT_LAB])
    removed = []
    for name in names:
        removed += Lab(name).down()
    if ctx.json:
        emit_json({"removed": removed})
    else:
        print("removed: " + (", ".join(removed) if removed else "nothing (no lab was up)"))
    return OK


def _workload_ref(text: str) -> tuple[str, str]:
    from fabric.model.policy import namespace_problem

    namespace, slash, name = text.partition("/")
    if not slash or namespace_problem(namespace) or namespace_problem(name):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use NAMESPACE/NAME (lower-case letters, digits and '-')")
    return namespace, name


def _workload_list(text: str) -> list[tuple[str, str]]:
    return [_workload_ref(item) for item in text.split(",") if item]


def add_workload_cmd(ctx: Context) -> int:
    from fabric.model.policy import PolicyError, parse_label_assignments

    lab = _existing(ctx)
    try:
        namespace, name = _workload_ref(ctx.workload)
    except argparse.ArgumentTypeError as exc:
        raise CliError(str(exc)) from exc
    try:
        extra, _ = parse_label_assignments(ctx.label)
    except PolicyError as exc:
        raise CliError(f"--label: {exc}") from exc
    host = getattr(ctx.args, "host", None)  # the global --host: which lab host
    if host is None:
        counts = {h: 0 for h in lab.state.hosts}
        for workload in lab.state.workloads.values():
            counts[workload.host] = counts.get(workload.host, 0) + 1
        host = min(sorted(counts), key=lambda h: counts[h])
    elif host not in lab.state.hosts:
        raise CliError(f"lab {lab.name} has no host {host}")
    try:
        made = lab.add_workload(host, name, namespace=namespace,
                                labels={"pod": name, **extra}, serve=True)
    except LabError as exc:
        raise CliError(str(exc)) from exc
    if ctx.json:
        emit_json({"workload": made.name, "host": host, "ips": made.ips,
                   "labels": made.labels})
    else:
        print(f"workload {made.name} on {host} ({' '.join(made.ips)}), labels "
              + ",".join(f"{k}={v}" for k, v in made.labels.items()))
    return OK


def probe_cmd(ctx: Context) -> int:
    lab = _existing(ctx)
    if not lab.state.workloads:
        raise CliError(f"lab {lab.name} has no workloads (lab add-workload NS/NAME)")
    family = ctx.family or lab.families[0]
    matrix = lab.probe(ctx.port, ctx.protocol, family=family)
    if ctx.json:
        emit_json({"port": ctx.port, "protocol": ctx.protocol, "family": family,
                   "matrix": matrix})
        return OK
    names = sorted(matrix)
    print(f"{ctx.protocol} port {ctx.port}, IPv{family}, from row to column "
          "(ok: answered, X: refused or no answer):")
    width = max(len(n) for n in names)
    print(" " * width + "  " + "  ".join(n.ljust(width) for n in names).rstrip())
    for a in names:
        cells = ["-" if a == b else ("ok" if matrix[a].get(b) else "X") for b in names]
        print(a.ljust(width) + "  " + "  ".join(c.ljust(width) for c in cells).rstrip())
    return OK


def env_cmd(ctx: Context) -> int:
    lab = _existing(ctx)
    if ctx.json:
        emit_json({"FABRIC_ETCD_ENDPOINTS": lab.etcd_local_endpoint})
    else:
        print(f"export FABRIC_ETCD_ENDPOINTS={lab.etcd_local_endpoint}")
    return OK
