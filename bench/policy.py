#!/usr/bin/env python3
"""Network policy: scale of one host's ruleset, propagation across a lab, the data path.

    python bench/policy.py scale [--policies 1000] [--workloads 250] [--runs 5]
    python bench/policy.py propagation [--changes 50]
    python bench/policy.py datapath [--policies 1000] [--runs 5] [--seconds 5]
    python bench/policy.py all

scale: one host with 1,000 policies and 250 local workloads, in a network namespace of
its own: the full build (compile + render) and its apply as one transaction replacing
the table, against the goal of 1 s; then one more workload (compile + set-element
batch + apply), which must not touch the ruleset (its rules' handles are compared).
Reference, same run, same text: `nft -f FILE`, the command-line tool loading it.

propagation: a 3-host lab (with --loaded N, N other policies in place); a policy toggled
50 times with `policy apply` / `policy rm`
(etcd writes, as fabricctl does them); each change is timed from the write until real
TCP connections to workloads on all three hosts show the new verdict. Reference: one
round of those probes (the measurement's resolution). Goal: p99 < 1 s.

datapath: iperf3 between workloads on two hosts, with 1,000 policies loaded that select
both ends (and allow iperf3's port) against none, in alternating runs. Goal: >= 0.9x.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]

import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from fabric.kernel import netns
from fabric.kernel.nftables import Nft, PolicyTable
from fabric.model.policy import Endpoint, NetworkPolicy, parse_policy
from fabric.policy.compiler import compile_host, element_changes, render_text

PREFIX = f"pol{os.getpid() % 100000:05d}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def ms(value: float) -> str:
    return f"{value * 1000:.1f} ms"


# -- a realistic set of policies -------------------------------------------------------------
def synthetic(policies: int, workloads: int, seed: int = 7
              ) -> tuple[list[NetworkPolicy], dict[str, dict[str, str]], list[Endpoint]]:
    """`policies` policies over 10 namespaces and 50 apps: pod and namespace selectors,
    match expressions, ipBlocks with except, ports and ranges, ingress and egress."""
    rng = random.Random(seed)
    namespaces = {f"ns{i}": {"team": rng.choice(["red", "blue", "green"])} for i in range(10)}
    endpoints = [Endpoint(f"w{i}", f"ns{i % 10}", f"w{i}",
                          {"app": f"app{i % 50}", "tier": rng.choice(["web", "db", "cache"])},
                          (f"10.244.{i // 250}.{i % 250 + 1}", f"fd00:244::{i + 1:x}"),
                          "bench", f"l3f{i:012x}")
                 for i in range(workloads)]
    docs = []
    for index in range(policies):
        ns = f"ns{index % 10}"
        octet = rng.randrange(250)
        peers: list[dict[str, Any]] = [
            {"podSelector": {"matchLabels": {"app": f"app{rng.randrange(50)}"}}},
            {"namespaceSelector": {"matchLabels": {"team": rng.choice(["red", "blue"])}},
             "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In",
                                                   "values": ["web", "cache"]}]}},
            {"ipBlock": {"cidr": f"10.{octet}.0.0/16",
                         "except": [f"10.{octet}.{rng.randrange(250)}.0/24"]}}]
        ports = [{"port": 80}, {"port": 8000 + rng.randrange(100), "endPort": 8200},
                 {"protocol": "UDP", "port": 53}]
        spec: dict[str, Any] = {
            "podSelector": {"matchLabels": {"app": f"app{index % 50}"}},
            "ingress": [{"from": rng.sample(peers, 2), "ports": rng.sample(ports, 2)}]}
        if index % 4 == 0:
            spec["egress"] = [{"to": [rng.choice(peers)], "ports": [rng.choice(ports)]}]
        docs.append(parse_policy({"apiVersion": "networking.k8s.io/v1",
                                  "kind": "NetworkPolicy",
                                  "metadata": {"name": f"p{index}", "namespace": ns},
                                  "spec": spec}))
    return docs, namespaces, endpoints


# -- scale -------------------------------------------------------------------------------------
def in_namespace(path: str, work: Callable[[], Any]) -> Any:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            with netns.entered(path):
                box["result"] = work()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def scale(args: argparse.Namespace) -> dict[str, Any]:
    policies, namespaces, endpoints = synthetic(args.policies, args.workloads)
    newcomer = Endpoint("new", "ns3", "new", {"app": "app3", "tier": "web"},
                        ("10.244.9.9", "fd00:244::9999"), "bench", "l3fnew")
    extra = parse_policy({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                          "metadata": {"name": "one-more", "namespace": "ns3"},
                          "spec": {"podSelector": {"matchLabels": {"app": "app3"}},
                                   "ingress": [{"from": [{"namespaceSelector": {
                                       "matchLabels": {"team": "green"}}}],
                                       "ports": [{"port": 9090}, {"protocol": "UDP",
                                                                  "port": 9091}]}]}})
    ns = f"{PREFIX}-scale"
    netns.remove(ns)
    netns.create(ns)
    path = netns.path(ns)
    rows: dict[str, list[float]] = {k: [] for k in (
        "compile (first, cold memos)", "compile", "render (nft language)",
        "apply, new table", "apply, replacing the table",
        "full build + apply (compile, render, replace)",
        "  the same, CPU time of the thread",
        "reference: nft -f FILE, same text (replacing)",
        "one more workload: compile", "one more workload: apply (elements)",
        "one more workload: total", "one more policy: compile",
        "one more policy: apply (its rules and sets)", "one more policy: total")}
    sizes: dict[str, Any] = {}
    try:
        for run in range(args.runs):
            if run == 0:
                t0 = time.perf_counter()
                compile_host(policies, namespaces, endpoints, endpoints, (4, 6))
                rows["compile (first, cold memos)"].append(time.perf_counter() - t0)
            in_namespace(path, lambda: Nft().run("flush ruleset"))
            t0 = time.perf_counter()
            rules = compile_host(policies, namespaces, endpoints, endpoints, (4, 6))
            t1 = time.perf_counter()
            text = render_text(rules)
            t2 = time.perf_counter()
            in_namespace(path, lambda t=text: Nft().run(t))
            t3 = time.perf_counter()
            rows["compile"].append(t1 - t0)
            rows["render (nft language)"].append(t2 - t1)
            rows["apply, new table"].append(t3 - t2)
            def build_and_apply() -> tuple[float, float, float, Any]:
                """On one thread: (wall, apply wall, CPU of the thread (user + system:
                the kernel commits the batch in the sending thread), rules)."""
                c0, w0 = time.thread_time(), time.perf_counter()
                built = compile_host(policies, namespaces, endpoints, endpoints, (4, 6))
                text = render_text(built)
                w1 = time.perf_counter()
                nft = Nft()
                nft.run(text)
                nft.close()
                w2 = time.perf_counter()
                return w2 - w0, w2 - w1, time.thread_time() - c0, built

            wall, apply_wall, cpu, rules = in_namespace(path, build_and_apply)
            text = render_text(rules)
            rows["apply, replacing the table"].append(apply_wall)
            rows["full build + apply (compile, render, replace)"].append(wall)
            rows["  the same, CPU time of the thread"].append(cpu)
            with tempfile.NamedTemporaryFile("w", suffix=".nft") as handle:
                handle.write(text)
                handle.flush()
                t0 = time.perf_counter()
                subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", handle.name],
                               check=True)
                rows["reference: nft -f FILE, same text (replacing)"].append(
                    time.perf_counter() - t0)
            # the agent's owner of the table, then one more workload
            table = PolicyTable()
            in_namespace(path, lambda r=rules, t=table: t.apply(r, full=True))
            handles_before = _rule_handles(path)
            t0 = time.perf_counter()
            grown = compile_host(policies, namespaces, [*endpoints, newcomer],
                                 [*endpoints, newcomer], (4, 6))
            t1 = time.perf_counter()
            report = in_namespace(path, lambda g=grown, t=table: t.apply(g))
            t2 = time.perf_counter()
            assert report.ok and not report.full, report
            assert _rule_handles(path) == handles_before  # the ruleset was not touched
            rows["one more workload: compile"].append(t1 - t0)
            rows["one more workload: apply (elements)"].append(t2 - t1)
            rows["one more workload: total"].append(t2 - t0)
            # one more policy: its rules and sets added, the rest untouched
            t0 = time.perf_counter()
            more = compile_host([*policies, extra], namespaces, [*endpoints, newcomer],
                                [*endpoints, newcomer], (4, 6))
            t1 = time.perf_counter()
            report = in_namespace(path, lambda r=more, t=table: t.apply(r))
            t2 = time.perf_counter()
            assert report.ok and report.structural, report
            assert set(handles_before) <= set(_rule_handles(path))
            rows["one more policy: compile"].append(t1 - t0)
            rows["one more policy: apply (its rules and sets)"].append(t2 - t1)
            rows["one more policy: total"].append(t2 - t0)
            changes = element_changes(rules, grown)
            sizes = {"policies": len(policies), "workloads": len(endpoints),
                     "rules": len(rules.rules), "address_sets": len(rules.sets),
                     "port_sets": len(rules.port_sets),
                     "set_elements": sum(len(s.elements) for s in rules.sets),
                     "ruleset_lines": text.count("\n"),
                     "one_more_workload_commands": len(changes),
                     "one_more_workload_elements": sum(
                         len(c[v]["element"]["elem"]) for c in changes for v in c)}
    finally:
        netns.remove(ns)
    print(f"\nscale: {sizes}")
    print(f"{'step':40} {'median':>10} {'min':>10} {'max':>10}")
    for name, values in rows.items():
        print(f"{name:40} {ms(statistics.median(values)):>10} {ms(min(values)):>10} "
              f"{ms(max(values)):>10}")
    build = statistics.median(rows["full build + apply (compile, render, replace)"])
    print(f"machine load while measuring: {os.getloadavg()[0]:.1f} (1-minute average, "
          f"{os.cpu_count()} cores)")
    ratio = statistics.median(rows["apply, replacing the table"]) / \
        statistics.median(rows["reference: nft -f FILE, same text (replacing)"])
    print(f"goal: full build + apply < 1 s: {build:.3f} s ({'met' if build < 1 else 'MISSED'});"
          f" our apply (libnftables in process) / nft -f: {ratio:.2f}")
    return {"sizes": sizes, "seconds": {k: statistics.median(v) for k, v in rows.items()}}


def _rule_handles(path: str) -> list[int]:
    listing = in_namespace(path, lambda: Nft().list_table()) or []
    return sorted(item["rule"]["handle"] for item in listing if "rule" in item)


# -- labs --------------------------------------------------------------------------------------
def make_lab(name: str, workloads: list[tuple[str, str, str]]) -> Any:
    from fabric.lab.topology import Lab

    lab = Lab(name)
    lab.down()
    lab.create_underlay(families=(4,))
    lab.start_etcd()
    lab.add_pool("default", "10.244.0.0/16")
    for host in ("h1", "h2", "h3"):
        lab.add_host(host)
    for host in ("h1", "h2", "h3"):
        lab.wait_agent(host)
    for host, ns, pod in workloads:
        lab.add_workload(host, pod, namespace=ns, labels={"pod": pod}, serve=True)
    return lab


def propagation(args: argparse.Namespace) -> dict[str, Any]:
    from fabric.lab.topology import probe
    from fabric.store import policies as store_policies

    lab = make_lab(f"{PREFIX[:3]}{os.getpid() % 10000:04d}p"[:10],
                   [("h1", "x", "a"), ("h2", "x", "b"), ("h3", "x", "c"), ("h1", "y", "a")])
    try:
        client = netns.path(lab.state.workloads["y/a"].netns)
        targets = [lab.state.workloads[n].ips[0] for n in ("x/a", "x/b", "x/c")]
        deny = parse_policy({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                             "metadata": {"name": "deny", "namespace": "x"},
                             "spec": {"podSelector": {}}})

        def observe() -> list[str]:
            return [probe(client, t, 80, "tcp", timeout=0.25) for t in targets]

        store = lab.store()
        if args.loaded:  # other policies in place (in namespaces ns0..ns9)
            loaded, _, _ = synthetic(args.loaded, 0)
            store_policies.apply_policies(store, loaded)
            _wait_policies(lab, args.loaded)
        delays, rounds, lost = [], [], 0
        try:
            for change in range(args.changes):
                closing = change % 2 == 0
                t0 = time.perf_counter()
                if closing:
                    store_policies.apply_policies(store, [deny])
                else:
                    store_policies.remove_policy(store, "x", "deny")
                while True:
                    r0 = time.perf_counter()
                    seen = observe()
                    rounds.append(time.perf_counter() - r0)
                    lost += seen.count("timeout")  # no answer: neither verdict, probe again
                    if seen == ["refused" if closing else "answered"] * len(seen):
                        break
                    if time.perf_counter() - t0 > 30:
                        raise RuntimeError(f"change {change} not enforced after 30 s: {seen}")
                delays.append(time.perf_counter() - t0)
                time.sleep(0.1)
        finally:
            store.close()
    finally:
        lab.down()
    print("delays (ms):", " ".join(f"{d * 1000:.0f}" for d in delays))
    result = {"changes": len(delays), "p50": pct(delays, 50), "p99": pct(delays, 99),
              "max": max(delays), "probe_round_p50": pct(rounds, 50), "probes_lost": lost}
    print(f"\npropagation over {len(delays)} changes with {args.loaded} other policies in "
          f"place (policy apply/rm until real connections to 3 hosts agree): "
          f"p50 {ms(result['p50'])}, p99 {ms(result['p99'])}, max "
          f"{ms(result['max'])}; reference: one probe round {ms(result['probe_round_p50'])} "
          f"({lost} probe(s) unanswered within 0.25 s, retried); "
          f"goal p99 < 1 s: {'met' if result['p99'] < 1 else 'MISSED'}")
    return result


def datapath(args: argparse.Namespace) -> dict[str, Any]:
    from fabric.store import keys
    from fabric.store import policies as store_policies

    lab = make_lab(f"{PREFIX[:3]}{os.getpid() % 10000:04d}d"[:10],
                   [("h1", "x", "a"), ("h2", "x", "b")])
    server = None
    try:
        client_ns = lab.state.workloads["x/a"].netns
        server_ns = lab.state.workloads["x/b"].netns
        target = lab.state.workloads["x/b"].ips[0]
        policies, _, _ = synthetic(args.policies - 1, 0)
        # every synthetic policy lives in ns0..ns9; these select x/a and x/b themselves
        policies = [parse_policy({**p.manifest, "metadata": {**p.manifest["metadata"],
                                                              "namespace": "x"}})
                    for p in policies]
        policies.append(parse_policy({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "iperf", "namespace": "x"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"ports": [{"port": 5201}]}],
                     "egress": [{"ports": [{"port": 5201}]}]}}))
        server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        time.sleep(0.5)
        store = lab.store()
        results: dict[str, list[float]] = {"without policies": [], "with policies": []}
        try:
            for run in range(args.runs * 2):
                loaded = run % 2 == 1
                if loaded:
                    store_policies.apply_policies(store, policies)
                else:
                    store.delete_prefix(keys.POLICIES)
                _wait_policies(lab, len(policies) if loaded else 0)
                out = subprocess.run(["ip", "netns", "exec", client_ns, "iperf3", "-c", target,
                                      "-t", str(args.seconds), "-J"], capture_output=True,
                                     text=True, check=True, timeout=args.seconds + 30)
                bits = json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]
                results["with policies" if loaded else "without policies"].append(bits / 1e9)
        finally:
            store.delete_prefix(keys.POLICIES)
            store.close()
    finally:
        if server is not None:
            from fabric.processes import stop
            stop(server)  # type: ignore[arg-type]
        lab.down()
    base = statistics.median(results["without policies"])
    loaded_median = statistics.median(results["with policies"])
    print(f"\niperf3 x/a (h1) -> x/b (h2), {args.seconds} s runs, alternating:")
    for name, values in results.items():
        print(f"  {name:17} median {statistics.median(values):.2f} Gbit/s, runs "
              + ", ".join(f"{v:.2f}" for v in values))
    ratio = loaded_median / base
    print(f"ratio with/without: {ratio:.2f} (goal >= 0.9: {'met' if ratio >= 0.9 else 'MISSED'})"
          f"; spread without: {min(results['without policies']):.2f}-"
          f"{max(results['without policies']):.2f} Gbit/s")
    return {"gbits": results, "ratio": ratio}


def _wait_policies(lab: Any, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [lab.call(h, "status")["policy"] for h in ("h1", "h2")]
        if all(s["policies"] == count and s["in_sync"] for s in states):
            return
        time.sleep(0.2)
    raise RuntimeError(f"agents did not enforce {count} policies in {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("scale", "propagation", "datapath", "all"))
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--workloads", type=int, default=250)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--loaded", type=int, default=0,
                        help="propagation: this many other policies in place first")
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    from fabric import logs
    logs.configure("console", "warning")
    out = {}
    for name, run in (("scale", scale), ("propagation", propagation), ("datapath", datapath)):
        if args.what in (name, "all"):
            out[name] = run(args)
    print("\n" + json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
