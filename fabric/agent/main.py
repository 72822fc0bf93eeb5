"""`fabric-agent`: parse settings, run the agent until SIGTERM/SIGINT (stop; peers keep
our routes for the graceful-restart time) or SIGUSR2 (leave: withdraw our routes, then
stop; fabric-agent.service sends it when the machine shuts down)."""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading
from collections.abc import Sequence

from fabric import logs
from fabric.agent import config as agent_config
from fabric.agent.service import Agent, AgentAlreadyRunning
from fabric.settings import SettingsError
from fabric.store.errors import DatastoreError
from fabric.store.registry import RegistrationError

HEALTH_INTERVAL = 2.0  # seconds between health checks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fabric-agent",
        description="The l3fabric host agent: registers the node, speaks BGP through "
                    "ExaBGP, keeps the kernel's routes, serves the CNI plugin.")
    agent_config.add_arguments(parser)
    parser.add_argument("--check-config", action="store_true",
                        help="validate the settings, print them, and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = agent_config.load(args)
    except SettingsError as exc:
        print(f"fabric-agent: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        for field, value in sorted(config.__dict__.items()):
            print(f"{field} = {value}")
        return 0
    logs.configure("json", config.log_level)
    # The agent keeps 100,000s of small objects (paths, prefixes, routes) that live
    # long: with Python's default thresholds its cyclic GC walked them over and over
    # during a bulk update, a quarter of the owner loop's time. Collect less often.
    gc.set_threshold(50_000, 20, 100)
    done, leaving = threading.Event(), threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())

    def leave(*_: object) -> None:
        leaving.set()
        done.set()

    signal.signal(signal.SIGUSR2, leave)
    agent = Agent(config)
    log = logs.get("agent", node=config.node_name)
    try:
        agent.start()
    except AgentAlreadyRunning as exc:  # touch nothing of the running agent's
        log.error("agent could not start", error=str(exc))
        print(f"fabric-agent: {exc}", file=sys.stderr)
        return 1
    except (RegistrationError, DatastoreError, OSError) as exc:
        log.error("agent could not start", error=str(exc))
        print(f"fabric-agent: {exc}", file=sys.stderr)
        agent.stop()
        return 1
    # A thread that died or a stuck owner loop is a failed health check: exit non-zero,
    # and the supervisor (systemd's Restart=, the lab's) starts a fresh agent.
    while not done.wait(HEALTH_INTERVAL):
        problems = agent.problems()
        if problems:
            log.critical("agent unhealthy; exiting so that it is restarted", problems=problems)
            agent.stop()
            return 3
    agent.stop(leave=leaving.is_set())
    return 0


if __name__ == "__main__":
    sys.exit(main())
