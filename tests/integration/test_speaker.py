"""The ExaBGP adapter with a real ExaBGP and a real BIRD peer, in namespaces.

What is tested is what ExaBGP 5.0.15 made hard: a reload asked for before ExaBGP can
take a signal (it used to die: exit -10), a reload that ExaBGP drops while it is busy
sending (it used to be lost), and what a stop leaves at the peers.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import time

import pytest

from bgp import api
from bgp import speaker as bgp_speaker
from bgp.config import SpeakerSettings, environment, render
from bgp.peers import Peer
from fabric.kernel import netns
from fabric.kernel.netns import entered
from fabric.lab.peers import Bird
from fabric.processes import kill_pid
from tests.conftest import PREFIX, needs_root
from tests.support.fabric import wait_until

pytestmark = [needs_root, pytest.mark.root, pytest.mark.slow]

OURS, PEER_ONE, PEER_TWO = "10.77.0.1", "10.77.0.2", "10.78.0.2"
EXABGP = [sys.executable, "-m", "bgp.exabgp_run"]


@pytest.fixture
def link(netns_factory):
    """Our namespace and two peers' (one BIRD each), each peer on a veth of its own."""
    ours = netns_factory("s")
    peers = []
    for index, (mine, theirs) in enumerate(((OURS, PEER_ONE), ("10.78.0.1", PEER_TWO))):
        peer = netns_factory(f"p{index}")
        a, b = f"{PREFIX}s{index}", f"{PREFIX}p{index}"
        subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
        for name, ns, address in ((a, ours, mine), (b, peer, theirs)):
            subprocess.run(["ip", "link", "set", name, "netns", ns], check=True)
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", name],
                           check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", name, "up"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", peer, "route", "add", "default", "via", mine], check=True)
        peers.append(peer)
    return ours, peers


@pytest.fixture
def bird(link, tmp_path):
    """Two BIRDs, `p0` and `p1`: `bird_state` reads both."""
    _, namespaces = link
    daemons, pids = [], []
    for index, (ns, address) in enumerate(zip(namespaces, (PEER_ONE, PEER_TWO), strict=True)):
        daemon = Bird(ns, tmp_path / f"bird{index}")
        pids.append(daemon.start(
            f"router id {address};\nprotocol device {{}}\n"
            f"protocol bgp p{index} {{ local {address} as 64512; neighbor {OURS} as 64512; "
            "multihop; hold time 9; ipv4 { import all; export none; }; }\n"))
        daemons.append(daemon)
    yield daemons
    for pid in pids:
        kill_pid(pid)


class Reports:
    def __init__(self) -> None:
        self.seen: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.all: list[object] = []

    def __call__(self, report: object) -> None:
        self.seen.put(report)

    def wait(self, match, what: str, timeout: float = 20.0) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                report = self.seen.get(timeout=0.2)
            except queue.Empty:
                continue
            self.all.append(report)
            if match(report):
                return report
        raise AssertionError(f"no report of {what} within {timeout:.0f}s: {self.all[-10:]}")


def config(speaker: bgp_speaker.Speaker, peers: list[str], routes: list[str]) -> str:
    settings = SpeakerSettings(OURS, 64512, 9, 120, speaker.relay_command)
    return render(settings, {p: Peer(p, 64512, "mesh", f"p{p[-1]}") for p in peers}, routes)


@pytest.fixture
def speaker(link, tmp_path):
    ours, _ = link
    reports = Reports()
    made = bgp_speaker.Speaker(EXABGP, tmp_path / "run", environment(OURS),
                               f"@{PREFIX}/bgp", reports)
    made.reports = reports  # type: ignore[attr-defined]
    made.netns = ours  # type: ignore[attr-defined]
    yield made
    made.stop()


def start(speaker: bgp_speaker.Speaker, text: str) -> None:
    with entered(netns.path(speaker.netns)):  # type: ignore[attr-defined]
        speaker.start(text)  # its thread, and so ExaBGP, live in our namespace


def bird_state(birds: list[Bird]) -> dict[str, str]:
    state = {}
    for bird in birds:
        for words in (line.split() for line in bird.cli("show", "protocols").splitlines()):
            if words and words[0] in ("p0", "p1"):
                state[words[0]] = words[-1]
    return state


def bird_routes(birds: list[Bird]) -> set[str]:
    return {line.split()[0] for line in birds[0].cli("show", "route").splitlines()
            if line.startswith("10.")}


def test_a_reload_asked_10_ms_after_start_is_applied_not_fatal(speaker, bird):
    reports = speaker.reports
    start(speaker, config(speaker, [PEER_ONE], ["10.244.1.0/26"]))
    time.sleep(0.01)  # ExaBGP has not installed its signal handlers yet
    speaker.configure(config(speaker, [PEER_ONE, PEER_TWO], ["10.244.1.0/26"]), reload=True)
    reports.wait(lambda r: isinstance(r, bgp_speaker.Reloaded), "a reload outcome")
    assert isinstance(reports.all[-1], bgp_speaker.Reloaded) and reports.all[-1].ok
    wait_until(lambda: bird_state(bird) == {"p0": "Established", "p1": "Established"},
               "both sessions up (the second one exists only after the reload)", 20)
    assert not any(isinstance(r, bgp_speaker.Exited) for r in reports.all)


def test_a_reload_dropped_by_a_busy_exabgp_is_asked_again(speaker, bird):
    reports = speaker.reports
    start(speaker, config(speaker, [PEER_ONE], ["10.244.1.0/26"]))
    wait_until(lambda: bird_state(bird).get("p0") == "Established", "session up", 20)
    prefixes = [f"10.{100 + i // 250}.{i % 250}.0/30" for i in range(20_000)]
    speaker.send(api.announce_self(prefixes))  # keeps ExaBGP's queue to the peer busy
    speaker.configure(config(speaker, [PEER_ONE], ["10.244.1.0/26", "10.244.9.0/26"]),
                      reload=True)
    reports.wait(lambda r: isinstance(r, bgp_speaker.Reloaded) and r.ok, "a confirmed reload",
                 60)
    wait_until(lambda: "10.244.9.0/26" in bird_routes(bird), "the reloaded route at BIRD", 30)
    log = (speaker.run_dir / "exabgp.log").read_text()
    assert log.count("loaded new configuration successfully") >= 2  # start-up, and ours


def test_stop_leaves_our_routes_with_peers_for_the_restart_time(speaker, bird):
    """ExaBGP closes without a NOTIFICATION (graceful restart): the peer keeps our
    route, marked stale, instead of withdrawing it: a restart does not cut traffic."""
    start(speaker, config(speaker, [PEER_ONE], ["10.244.1.0/26"]))
    wait_until(lambda: "10.244.1.0/26" in bird_routes(bird), "our route at BIRD", 20)
    speaker.stop()
    detail = bird[0].cli("show", "protocols", "all", "p0")
    assert "Neighbor graceful restart active" in detail, detail
    assert "10.244.1.0/26" in bird_routes(bird)


def test_exabgp_killed_is_started_again_and_reported(speaker, bird):
    reports = speaker.reports
    start(speaker, config(speaker, [PEER_ONE], ["10.244.1.0/26"]))
    first = reports.wait(lambda r: isinstance(r, bgp_speaker.Started), "start")
    reports.wait(lambda r: isinstance(r, bgp_speaker.Connected), "API connected")
    kill_pid(first.pid, sig=9)
    reports.wait(lambda r: isinstance(r, bgp_speaker.Exited), "exit")
    second = reports.wait(lambda r: isinstance(r, bgp_speaker.Started), "restart")
    assert second.generation == first.generation + 1 and second.pid != first.pid
    reports.wait(lambda r: isinstance(r, bgp_speaker.Connected) and r.generation == 2,
                 "the new API connected")
    wait_until(lambda: bird_state(bird).get("p0") == "Established", "session up again", 20)


FOREIGN = """
import socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect("\\0" + sys.argv[1][1:])
time.sleep(0.5)
try:
    sock.sendall(b'{"type":"update","neighbor":{"address":{"peer":"10.77.0.2"},"message":'
                 b'{"update":{"withdraw":{"ipv4 unicast":[{"nlri":"10.244.1.0/26"}]}}}}}\\n')
    print(sock.recv(100) == b"")
except (BrokenPipeError, ConnectionResetError):
    print(True)
"""


def test_a_process_that_is_not_our_exabgp_cannot_be_its_api(speaker, bird):
    """A local process (here an unprivileged one) connecting to the API socket is
    turned away; it neither replaces nor joins ExaBGP's connection."""
    reports = speaker.reports
    start(speaker, config(speaker, [PEER_ONE], ["10.244.1.0/26"]))
    reports.wait(lambda r: isinstance(r, bgp_speaker.Connected), "API connected")
    foreign = subprocess.run(
        ["ip", "netns", "exec", speaker.netns, "setpriv", "--reuid=65534", "--regid=65534",
         "--clear-groups", sys.executable, "-c", FOREIGN, speaker.relay_socket],
        capture_output=True, text=True, timeout=30)
    assert foreign.stdout.strip() == "True", foreign.stderr  # closed on it at once
    time.sleep(0.5)
    assert not any(isinstance(r, bgp_speaker.Event) and isinstance(r.event, api.Update)
                   for r in _drain(reports))  # its UPDATE never reached the agent
    speaker.send(["# still our exabgp"])
    wait_until(lambda: "10.244.1.0/26" in bird_routes(bird), "our route still at BIRD", 10)
    assert not any(isinstance(r, (bgp_speaker.Exited, bgp_speaker.Restarting))
                   for r in reports.all)


def test_a_stopped_exabgp_is_noticed_and_restarted(speaker, bird):
    reports = speaker.reports
    start(speaker, config(speaker, [PEER_ONE], ["10.244.1.0/26"]))
    first = reports.wait(lambda r: isinstance(r, bgp_speaker.Started), "start")
    reports.wait(lambda r: isinstance(r, bgp_speaker.Connected), "API connected")
    subprocess.run(["kill", "-STOP", str(first.pid)], check=True)
    restarting = reports.wait(lambda r: isinstance(r, bgp_speaker.Restarting),
                              "the watchdog restarting ExaBGP", 30)
    assert "stopped answering" in restarting.reason
    reports.wait(lambda r: isinstance(r, bgp_speaker.Started) and r.generation == 2,
                 "a new ExaBGP")
    wait_until(lambda: bird_state(bird).get("p0") == "Established", "session up again", 30)


def test_a_refused_reload_restarts_exabgp_which_then_takes_valid_ones(speaker, bird):
    """ExaBGP 5.0.15 refuses every reload after one it refused, even of a valid file."""
    reports = speaker.reports
    start(speaker, config(speaker, [PEER_ONE], ["10.244.1.0/26"]))
    reports.wait(lambda r: isinstance(r, bgp_speaker.Connected), "API connected")
    good = config(speaker, [PEER_ONE], ["10.244.1.0/26"])
    speaker.configure(good.replace("hold-time 9;", "hold-time x;"), reload=True)
    refused = reports.wait(lambda r: isinstance(r, bgp_speaker.Reloaded), "the reload outcome")
    assert not refused.ok
    reports.wait(lambda r: isinstance(r, bgp_speaker.Restarting), "a restart")
    speaker.configure(config(speaker, [PEER_ONE, PEER_TWO], ["10.244.1.0/26"]), reload=True)
    wait_until(lambda: bird_state(bird) == {"p0": "Established", "p1": "Established"},
               "both sessions up: the valid configuration was taken", 40)


def _drain(reports: Reports) -> list[object]:
    while True:
        try:
            reports.all.append(reports.seen.get_nowait())
        except queue.Empty:
            return reports.all
