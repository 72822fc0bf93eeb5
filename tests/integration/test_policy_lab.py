"""Network policy on a real 3-host fabric, in the style of the Kubernetes network-policy
e2e suite: namespaces x, y, z with workloads a, b, c each (labelled pod=NAME), spread
round robin over h1, h2, h3 (x/a, y/a, z/a share h1: same-host pairs; the rest cross
hosts), each serving TCP and UDP on ports 80 and 81, over IPv4 and IPv6.

Every case writes its policies to etcd as `fabricctl policy apply` does, waits until
real connections give the whole expected matrix (from every workload to every other,
TCP and UDP, ports 80 and 81, both families), and asserts that matrix; then it removes
its policies and waits for the fabric to be open again, so the next case starts from a
known state (and its own expectation, which always denies something, cannot be met by
the previous case's rules).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from fabric.kernel import netns
from fabric.lab.topology import connects
from fabric.model.policy import parse_policy
from fabric.store import keys
from fabric.store import policies as store_policies
from tests.conftest import needs_root, running_lab
from tests.support import spoof
from tests.support.fabric import status

pytestmark = [needs_root, pytest.mark.root, pytest.mark.slow]
HOSTS = ("h1", "h2", "h3")
NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
NAMES = [f"{ns}/{pod}" for ns, pod in itertools.product(NAMESPACES, PODS)]
# (family, protocol, port): every matrix each case asserts
PROBES = [(4, "tcp", 80), (4, "tcp", 81), (4, "udp", 80), (4, "udp", 81),
          (6, "tcp", 80), (6, "udp", 81)]
CONVERGE = 20.0  # seconds an expectation may take to hold everywhere (a bound, not a goal)


@pytest.fixture(scope="module")
def lab():
    with running_lab(pool="10.244.0.0/16", families=(4, 6), pool6="fd00:244::/64") as lab:
        for host in HOSTS:
            lab.add_host(host, agent_args=["--resync-interval", "3"])
        for host in HOSTS:
            lab.wait_agent(host)
        for index, name in enumerate(NAMES):
            ns, pod = name.split("/")
            lab.add_workload(HOSTS[index % 3], pod, namespace=ns, labels={"pod": pod},
                             serve=True)
        yield lab


Matrix = dict[str, dict[str, bool]]
Expect = Callable[[int, str, int], Matrix]


def address(lab, name: str, family: int) -> str:
    return next(ip for ip in lab.state.workloads[name].ips if (":" in ip) == (family == 6))


def probe_all(lab) -> dict[tuple[int, str, int], Matrix]:
    """Every probe of PROBES, all pairs, in parallel."""
    jobs = [(key, a, b) for key in PROBES for a in NAMES for b in NAMES if a != b]
    paths = {n: netns.path(lab.state.workloads[n].netns) for n in NAMES}

    def one(job):
        (family, protocol, port), a, b = job
        return connects(paths[a], address(lab, b, family), port, protocol, timeout=2.0)

    with ThreadPoolExecutor(max_workers=96) as pool:
        results = list(pool.map(one, jobs))
    out: dict[tuple[int, str, int], Matrix] = {key: {a: {} for a in NAMES} for key in PROBES}
    for (key, a, b), ok in zip(jobs, results, strict=True):
        out[key][a][b] = ok
    return out


def reachability(default: bool = True) -> Matrix:
    return {a: {b: default for b in NAMES if b != a} for a in NAMES}


def ingress(matrix: Matrix, target: str, allowed: bool, sources=None) -> Matrix:
    for source in sources or NAMES:
        if source != target:
            matrix[source][target] = allowed
    return matrix


def egress(matrix: Matrix, source: str, allowed: bool, targets=None) -> Matrix:
    for target in targets or NAMES:
        if target != source:
            matrix[source][target] = allowed
    return matrix


def in_ns(namespace: str) -> list[str]:
    return [n for n in NAMES if n.startswith(f"{namespace}/")]


def render(matrix: Matrix) -> str:
    lines = ["from\\to " + " ".join(n.replace("/", "") for n in NAMES)]
    for a in NAMES:
        lines.append(f"{a:7} " + " ".join("-- " if a == b else (" . " if matrix[a][b]
                                                                  else " X ") for b in NAMES))
    return "\n".join(lines)


def assert_matrices(lab, expect: Expect) -> None:
    """Wait until real connections give every expected matrix, then assert them."""
    wanted = {key: expect(*key) for key in PROBES}
    deadline = time.monotonic() + CONVERGE
    while True:
        found = probe_all(lab)
        if found == wanted or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for key in PROBES:
        assert found[key] == wanted[key], (
            f"IPv{key[0]} {key[1]} port {key[2]}: expected\n{render(wanted[key])}\n"
            f"found\n{render(found[key])}")


def apply(lab, *docs: dict) -> None:
    store = lab.store()
    try:
        store_policies.apply_policies(store, [parse_policy(d) for d in docs])
    finally:
        store.close()


def policy(namespace: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def pod(name: str) -> dict:
    return {"matchLabels": {"pod": name}}


def namespace(name: str) -> dict:
    return {"matchLabels": {"kubernetes.io/metadata.name": name}}


@pytest.fixture(autouse=True)
def clean(lab) -> Iterator[None]:
    """Each case starts and ends with no policy, no namespace label, pod=NAME labels,
    and a fabric where everything reaches everything."""
    yield
    store = lab.store()
    try:
        store.delete_prefix(keys.POLICIES)
        store.delete_prefix(keys.NAMESPACES)
        for name in NAMES:
            store_policies.label_workload(store, name, {"pod": name.split("/")[1]},
                                          ["team"])
    finally:
        store.close()
    assert_matrices(lab, lambda *_: reachability(True))


def test_default_deny_ingress(lab):
    apply(lab, policy("x", "deny-ingress", {"podSelector": {}}))
    expected = reachability()
    for target in in_ns("x"):
        ingress(expected, target, False)
    assert_matrices(lab, lambda *_: expected)


def test_default_deny_egress(lab):
    apply(lab, policy("x", "deny-egress", {"podSelector": {}, "policyTypes": ["Egress"]}))
    expected = reachability()
    for source in in_ns("x"):
        egress(expected, source, False)
    assert_matrices(lab, lambda *_: expected)


def test_default_deny_all(lab):
    apply(lab, policy("x", "deny-all", {"podSelector": {},
                                        "policyTypes": ["Ingress", "Egress"]}))
    expected = reachability()
    for name in in_ns("x"):
        ingress(expected, name, False)
        egress(expected, name, False)
    assert_matrices(lab, lambda *_: expected)


def tcp_connects(netns_name: str, address: str, port: int) -> bool:
    """A TCP connection from a namespace is accepted (nothing read: any listener)."""
    import socket

    with netns.entered(netns.path(netns_name)):
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    try:
        sock.settimeout(2.0)
        sock.connect((address, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def test_a_workload_and_its_own_host_always_reach_each_other(lab):
    apply(lab, policy("x", "deny-all", {"podSelector": {},
                                        "policyTypes": ["Ingress", "Egress"]}))
    expected = reachability()
    for name in in_ns("x"):
        ingress(expected, name, False)
        egress(expected, name, False)
    assert_matrices(lab, lambda *_: expected)
    x_a = lab.state.workloads["x/a"]
    own = lab.state.hosts[x_a.host]
    other = next(h for n, h in lab.state.hosts.items() if n != x_a.host)
    for family in (4, 6):
        target = address(lab, "x/a", family)
        assert connects(netns.path(own.netns), target, 80, "tcp", timeout=2.0)
        assert not connects(netns.path(other.netns), target, 80, "tcp", timeout=2.0)
    # and the other way: x/a to its host's metrics port, not to another host's
    assert tcp_connects(x_a.netns, own.address, 9473)
    assert not tcp_connects(x_a.netns, other.address, 9473)


def spoofed_and_honest(lab, sender: str, forged: str, target: str, family: int,
                       port: int) -> tuple[list[bytes], list[bytes]]:
    """What `target` receives of a datagram `sender` sends with `forged`'s source
    address, and of one it sends with its own (the honest one last, so that the wait
    for it also covers the forged one)."""
    sock = spoof.receiver(lab.state.workloads[target].netns, family, port)
    try:
        dst = address(lab, target, family)
        attacker = lab.state.workloads[sender].netns
        spoof.send_raw(attacker, address(lab, forged, family), dst, port, b"forged")
        spoof.send_raw(attacker, address(lab, sender, family), dst, port, b"honest")
        got = spoof.received(sock)
    finally:
        sock.close()
    return [g for g in got if g.endswith(b"forged")], [g for g in got if g.endswith(b"honest")]


def test_a_forged_source_address_is_dropped_with_or_without_policy(lab):
    """A workload sending with another workload's address (raw socket) gets nothing
    through, IPv4 and IPv6: not to a workload that admits only the forged address (x/a
    admits pod=b of x; y/a on x/a's host forges x/b), not out of an egress isolation
    (z/a, denied all egress, forging y/a), and not with no policy at all. Its honest
    datagrams still arrive where policy allows them."""
    assert lab.state.workloads["y/a"].host == lab.state.workloads["x/a"].host
    for family in (4, 6):  # no policy: identity is still the source address
        forged, honest = spoofed_and_honest(lab, "y/a", "x/b", "x/a", family, 7001)
        assert (forged, len(honest)) == ([], 1), family
    apply(lab, policy("x", "a-from-b", {"podSelector": pod("a"), "ingress": [
              {"from": [{"podSelector": pod("b")}]}]}),
          policy("z", "deny-egress", {"podSelector": {}, "policyTypes": ["Egress"]}))
    expected = ingress(reachability(), "x/a", False)
    expected["x/b"]["x/a"] = True
    for name in in_ns("z"):
        egress(expected, name, False)
    assert_matrices(lab, lambda *_: expected)
    for family in (4, 6):
        forged, honest = spoofed_and_honest(lab, "y/a", "x/b", "x/a", family, 7002)
        assert (forged, honest) == ([], []), family  # y/a itself is not admitted
        forged, honest = spoofed_and_honest(lab, "z/a", "y/a", "y/b", family, 7003)
        assert (forged, honest) == ([], []), family  # z/a may send nothing
        forged, honest = spoofed_and_honest(lab, "x/b", "y/b", "x/a", family, 7004)
        assert (forged, len(honest)) == ([], 1), family  # x/b is admitted as itself


def test_neighbour_discovery_and_ping_between_workloads_still_work(lab):
    """The anti-spoofing check leaves a container's link-local and unspecified-source
    IPv6 traffic alone: with its neighbour cache flushed, a container finds its host
    again (neighbour solicitation) and pings, IPv4 and IPv6, a workload of its own host
    and one of another."""
    source = lab.state.workloads["x/a"].netns
    netns.run(source, "ip", "-6", "neigh", "flush", "all")
    netns.run(source, "ip", "-4", "neigh", "flush", "all")
    for target in ("y/a", "x/b"):  # same host, other host
        for family in (4, 6):
            result = netns.run(source, "ping", f"-{family}", "-c", "1", "-W", "2",
                               address(lab, target, family), check=False)
            assert result.returncode == 0, (target, family, result.stdout, result.stderr)


def test_pod_selector_alone_means_the_policys_namespace(lab):
    apply(lab, policy("x", "a-from-b", {"podSelector": pod("a"),
                                        "ingress": [{"from": [{"podSelector": pod("b")}]}]}))
    expected = ingress(reachability(), "x/a", False)
    expected["x/b"]["x/a"] = True  # y/b and z/b are pod=b too, but not in x
    assert_matrices(lab, lambda *_: expected)


def test_namespace_selector_alone(lab):
    apply(lab, policy("x", "a-from-y", {"podSelector": pod("a"),
                                        "ingress": [{"from": [{"namespaceSelector":
                                                               namespace("y")}]}]}))
    expected = ingress(reachability(), "x/a", False)
    ingress(expected, "x/a", True, in_ns("y"))
    assert_matrices(lab, lambda *_: expected)


def test_pod_and_namespace_selector_together_and_as_two_peers(lab):
    apply(lab,
          policy("x", "a-from-yb", {"podSelector": pod("a"), "ingress": [{"from": [
              {"namespaceSelector": namespace("y"), "podSelector": pod("b")}]}]}),
          policy("x", "b-from-y-or-c", {"podSelector": pod("b"), "ingress": [{"from": [
              {"namespaceSelector": namespace("y")}, {"podSelector": pod("c")}]}]}))
    expected = ingress(reachability(), "x/a", False)
    expected["y/b"]["x/a"] = True
    ingress(expected, "x/b", False)
    ingress(expected, "x/b", True, [*in_ns("y"), "x/c"])
    assert_matrices(lab, lambda *_: expected)


def test_match_expressions(lab):
    store = lab.store()
    try:
        store_policies.label_namespace(store, "z", {"team": "blue"}, [])
    finally:
        store.close()
    apply(lab,
          policy("x", "a-from-teams", {"podSelector": pod("a"), "ingress": [{"from": [{
              "namespaceSelector": {"matchExpressions": [
                  {"key": "team", "operator": "Exists"}]},
              "podSelector": {"matchExpressions": [
                  {"key": "pod", "operator": "In", "values": ["a", "b"]}]}}]}]}),
          policy("x", "b-from-no-team", {"podSelector": pod("b"), "ingress": [{"from": [{
              "namespaceSelector": {"matchExpressions": [
                  {"key": "team", "operator": "DoesNotExist"}]},
              "podSelector": {"matchExpressions": [
                  {"key": "pod", "operator": "NotIn", "values": ["a"]}]}}]}]}))
    expected = ingress(reachability(), "x/a", False)
    ingress(expected, "x/a", True, ["z/a", "z/b"])
    ingress(expected, "x/b", False)
    ingress(expected, "x/b", True, ["x/c", "y/b", "y/c"])
    assert_matrices(lab, lambda *_: expected)


def test_ip_block_with_except_per_family(lab):
    apply(lab, policy("x", "a-from-blocks", {"podSelector": pod("a"), "ingress": [{"from": [
        {"ipBlock": {"cidr": "10.244.0.0/16",
                     "except": [address(lab, "y/b", 4) + "/32"]}},
        {"ipBlock": {"cidr": "fd00:244::/64",
                     "except": [address(lab, "z/c", 6) + "/128"]}}]}]}))

    def expect(family: int, *_: object) -> Matrix:
        matrix = reachability()
        matrix["y/b" if family == 4 else "z/c"]["x/a"] = False
        return matrix

    assert_matrices(lab, expect)


def test_ports_and_port_ranges(lab):
    apply(lab,
          policy("x", "a-on-81", {"podSelector": pod("a"),
                                  "ingress": [{"ports": [{"port": 81}]}]}),
          policy("x", "b-udp-range", {"podSelector": pod("b"), "ingress": [{"ports": [
              {"protocol": "UDP", "port": 80, "endPort": 81}]}]}))

    def expect(family: int, protocol: str, port: int) -> Matrix:
        matrix = reachability()
        ingress(matrix, "x/a", protocol == "tcp" and port == 81)
        ingress(matrix, "x/b", protocol == "udp")
        return matrix

    assert_matrices(lab, expect)


def test_several_policies_on_one_workload_are_a_union(lab):
    apply(lab,
          policy("x", "y-on-80", {"podSelector": pod("a"), "ingress": [{
              "from": [{"namespaceSelector": namespace("y")}], "ports": [{"port": 80}]}]}),
          policy("x", "z-on-81", {"podSelector": {}, "ingress": [{
              "from": [{"namespaceSelector": namespace("z")}], "ports": [{"port": 81}]}]}))

    def expect(family: int, protocol: str, port: int) -> Matrix:
        matrix = reachability()
        for target in in_ns("x"):
            ingress(matrix, target, False)
            if protocol == "tcp" and port == 81:
                ingress(matrix, target, True, in_ns("z"))
        if protocol == "tcp" and port == 80:
            ingress(matrix, "x/a", True, in_ns("y"))
        return matrix

    assert_matrices(lab, expect)


def test_egress_to_a_namespace_on_one_port(lab):
    apply(lab, policy("x", "out-to-y", {"podSelector": {}, "policyTypes": ["Egress"],
                                        "egress": [{"to": [{"namespaceSelector":
                                                            namespace("y")}],
                                                    "ports": [{"port": 80}]}]}))

    def expect(family: int, protocol: str, port: int) -> Matrix:
        matrix = reachability()
        for source in in_ns("x"):
            egress(matrix, source, False)
            if protocol == "tcp" and port == 80:
                egress(matrix, source, True, in_ns("y"))
        return matrix

    assert_matrices(lab, expect)


def test_policies_added_relabelled_and_removed_while_traffic_runs(lab):
    stop = False
    counts = {"probes": 0}

    def traffic() -> None:  # connections all the time, from everywhere to x
        while not stop:
            probe_all(lab)
            counts["probes"] += 1

    with ThreadPoolExecutor(max_workers=1) as background:
        running = background.submit(traffic)
        try:
            apply(lab, policy("x", "deny", {"podSelector": {}}),
                  policy("x", "a-from-y", {"podSelector": pod("a"), "ingress": [{
                      "from": [{"namespaceSelector": namespace("y")}]}]}))
            expected = reachability()
            for target in in_ns("x"):
                ingress(expected, target, False)
            ingress(expected, "x/a", True, in_ns("y"))
            assert_matrices(lab, lambda *_: expected)
            # x/b becomes pod=a: the same policies now admit y to it (set elements only)
            store = lab.store()
            try:
                store_policies.label_workload(store, "x/b", {"pod": "a"}, [])
            finally:
                store.close()
            ingress(expected, "x/b", True, in_ns("y"))
            assert_matrices(lab, lambda *_: expected)
            # the allow goes: x is closed to everyone
            store = lab.store()
            try:
                store_policies.remove_policy(store, "x", "a-from-y")
            finally:
                store.close()
            for target in in_ns("x"):
                ingress(expected, target, False)
            assert_matrices(lab, lambda *_: expected)
        finally:
            stop = True
            running.result()
    assert counts["probes"] > 0
    assert all(status(lab, host)["policy"]["failures"] == 0 for host in HOSTS)
    # the relabel reached x/b's host (h2) as set elements, not as a new ruleset
    assert status(lab, "h2")["policy"]["element_updates"] > 0


def test_a_new_workload_is_isolated_from_its_first_moment_and_its_del_clears_it(lab):
    apply(lab, policy("x", "deny-all", {"podSelector": {},
                                        "policyTypes": ["Ingress", "Egress"]}))
    expected = reachability()
    for name in in_ns("x"):
        ingress(expected, name, False)
        egress(expected, name, False)
    assert_matrices(lab, lambda *_: expected)
    made = lab.add_workload("h2", "d", namespace="x", labels={"pod": "d"}, serve=True)
    try:
        # No waiting: the ADD has returned, so its rules are in place already.
        for family in (4, 6):
            target = next(ip for ip in made.ips if (":" in ip) == (family == 6))
            for source in NAMES:
                assert not connects(netns.path(lab.state.workloads[source].netns), target,
                                    80, "tcp", timeout=2.0), (source, target)
            assert not connects(netns.path(made.netns), address(lab, "y/b", family), 80,
                                "tcp", timeout=2.0)
    finally:
        lab.remove_workload("x/d")
    gone = set(made.ips)
    host_ns = lab.state.hosts["h2"].netns
    listing = netns.run(host_ns, "nft", "-j", "list", "table", "inet", "l3fabric").stdout
    assert not any(ip in listing for ip in gone)
    assert_matrices(lab, lambda *_: expected)


def test_a_restarted_agent_keeps_enforcing(lab):
    apply(lab, policy("x", "deny-ingress", {"podSelector": {}}))
    expected = reachability()
    for target in in_ns("x"):
        ingress(expected, target, False)
    assert_matrices(lab, lambda *_: expected)
    x_a = address(lab, "x/a", 4)  # on h1
    y_b = netns.path(lab.state.workloads["y/b"].netns)  # on h2
    lab.stop_agent("h1")
    try:
        assert not connects(y_b, x_a, 80, "tcp", timeout=2.0)  # no agent, rules stay
        lab.start_agent("h1")
        lab.wait_agent("h1")
        assert not connects(y_b, x_a, 80, "tcp", timeout=2.0)
    finally:
        if not lab.state.hosts["h1"].agent_pid:
            lab.start_agent("h1")
            lab.wait_agent("h1")
    assert_matrices(lab, lambda *_: expected)


def test_a_table_tampered_with_under_its_comments_is_repaired_by_the_agent(lab):
    """The reviewer's tampering (deny's rejects replaced by accepts with the same
    comments) is drift: the agent's periodic check (every 3 s here) replaces the table,
    counts the repair, and the denial holds again."""
    apply(lab, policy("x", "deny-ingress", {"podSelector": {}}))
    expected = reachability()
    for target in in_ns("x"):
        ingress(expected, target, False)
    assert_matrices(lab, lambda *_: expected)
    host = lab.state.workloads["x/a"].host
    before = status(lab, host)["policy"]["repaired"]
    netns.run(lab.state.hosts[host].netns, "nft", "-f", "-", input=(
        "flush chain inet l3fabric deny\n"
        'add rule inet l3fabric deny accept comment "denied by network policy"\n'
        'add rule inet l3fabric deny accept comment "denied by network policy"\n'))
    y_b = netns.path(lab.state.workloads["y/b"].netns)
    assert connects(y_b, address(lab, "x/a", 4), 80, "tcp", timeout=2.0)  # the hole
    deadline = time.monotonic() + CONVERGE
    while status(lab, host)["policy"]["repaired"] == before:
        assert time.monotonic() < deadline, "the agent never repaired the table"
        time.sleep(0.5)
    assert not connects(y_b, address(lab, "x/a", 4), 80, "tcp", timeout=2.0)
    assert status(lab, host)["policy"]["in_sync"]


def test_every_hosts_kernel_agrees_with_the_model_and_the_cli_says_so(lab):
    """The tables the live agents hold, read back from nftables, judged packet by packet
    against the reference semantics for every pair; then `policy explain --host` and
    `lab probe -o json` as a user runs them."""
    import json
    import subprocess
    import sys

    from fabric.model.policy import decide
    from fabric.policy.compiler import Listed, Packet, evaluate
    from fabric.store.registry import Registry

    store = lab.store()
    try:
        store_policies.label_namespace(store, "y", {"team": "blue"}, [])
    finally:
        store.close()
    apply(lab, policy("x", "deny", {"podSelector": {}}),
          policy("x", "a-from-y", {"podSelector": pod("a"), "ingress": [{
              "from": [{"namespaceSelector": namespace("y")}], "ports": [{"port": 80}]}]}),
          policy("z", "out-blue", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
              "to": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]}))

    def expect(family: int, protocol: str, port: int) -> Matrix:
        matrix = reachability()
        for name in in_ns("x"):
            ingress(matrix, name, False)
        if (protocol, port) == ("tcp", 80):
            ingress(matrix, "x/a", True, in_ns("y"))
        for name in in_ns("z"):
            egress(matrix, name, False)
            egress(matrix, name, True, in_ns("y"))
        return matrix

    assert_matrices(lab, expect)
    store = lab.store()
    try:
        from fabric.model.policy import Endpoint
        endpoints = {a: Endpoint.of(w) for w in Registry(store).workloads() for a in w.ips}
        policies = store_policies.policies(store)
        spaces = store_policies.namespaces(store)
    finally:
        store.close()
    tables = {h: Listed.parse(lab.call(h, "policy")["listing"]) for h in HOSTS}
    checked = 0
    for family, protocol, port in PROBES:
        for a, b in itertools.permutations(NAMES, 2):
            src, dst = address(lab, a, family), address(lab, b, family)
            s, d = endpoints[src], endpoints[dst]
            decision = decide(policies, spaces, src, dst, endpoints, protocol.upper(), port)
            for host in {s.node, d.node}:
                packet = Packet(src, dst, protocol, port,
                                s.host_ifname if s.node == host else "eth0",
                                d.host_ifname if d.node == host else "eth0")
                wanted = (s.node != host or decision.egress.allowed) and \
                    (d.node != host or decision.ingress.allowed)
                assert (evaluate(tables[host], packet)[0] == "accept") == wanted, \
                    (host, a, b, family, protocol, port)
                checked += 1
    assert checked > 400

    def ctl(*argv: str) -> dict:
        result = subprocess.run([sys.executable, "-m", "fabric.cli.main", "--lab", lab.name,
                                 "-o", "json", *argv], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    host_of_x_a = lab.state.workloads["x/a"].host
    allowed = ctl("--host", host_of_x_a, "policy", "explain", "y/b", "x/a", "--port", "80/tcp")
    denied = ctl("--host", host_of_x_a, "policy", "explain", "y/b", "x/a", "--port", "81/tcp")
    assert (allowed["allowed"], allowed["host"]["verdict"], allowed["host"]["agrees"]) == \
        (True, "accept", True)
    assert (denied["allowed"], denied["host"]["verdict"], denied["host"]["agrees"]) == \
        (False, "reject", True)
    own_address = lab.state.hosts[host_of_x_a].address  # x/a is isolated for ingress
    for src, dst in ((own_address, "x/a"), ("x/a", own_address)):
        own = ctl("--host", host_of_x_a, "policy", "explain", src, dst, "--port", "80/tcp")
        assert (own["allowed"], own["own_host"], own["host"]["verdict"],
                own["host"]["agrees"]) == (True, True, "accept", True)
    probed = ctl("lab", "probe", "--port", "80")
    assert probed["matrix"] == expect(4, "tcp", 80)
    added = ctl("--host", "h2", "lab", "add-workload", "z/d", "--label", "team=red")
    try:
        assert (added["workload"], added["host"], added["labels"]) == (
            "z/d", "h2", {"pod": "d", "team": "red"})
        # z/d is isolated for egress by z/out-blue from its first moment: y only
        made = lab.refresh().workloads["z/d"]
        for target in NAMES:
            assert connects(netns.path(made.netns), address(lab, target, 4), 80, "tcp",
                            timeout=2.0) == target.startswith("y/"), target
    finally:
        lab.remove_workload("z/d")
