"""fabricctl never shows a traceback: every command with bad or odd arguments, the
cases users reported, and output piped into a reader that stops early."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from fabric.cli.main import GLOBAL_DEFAULTS, build_parser, command_tree
from fabric.model.nodes import Workload
from fabric.store import keys

FABRICCTL = [sys.executable, "-m", "fabric.cli.main"]
ODD = "/proc/l3fabric-odd"  # no address, no valid name, no directory anyone can write
FLAGS = (argparse._HelpAction, argparse._StoreConstAction, argparse._CountAction,
         argparse._AppendConstAction)  # store_true/false are StoreConst


def run(argv: list[str], etcd: str | None = None, **kwargs: object
        ) -> subprocess.CompletedProcess[str]:
    prefix = ["--etcd-endpoints", etcd] if etcd else []
    return subprocess.run([*FABRICCTL, *prefix, *argv], capture_output=True, text=True,
                          timeout=120, **kwargs)  # type: ignore[call-overload]


def odd_arguments(parser: argparse.ArgumentParser, number: str) -> list[str]:
    """A value for each of the command's own arguments that no command accepts: a path
    under /proc, an upper-case lab name, `number` for integers. Flags are left out, and
    only the first of mutually exclusive options is given."""
    excluded = {id(a) for g in parser._mutually_exclusive_groups for a in g._group_actions[1:]}
    words: list[str] = []
    for action in parser._actions:
        if (isinstance(action, FLAGS) or action.choices or id(action) in excluded
                or action.dest in GLOBAL_DEFAULTS):
            continue
        value = number if action.type is int else ("UPPER" if action.dest == "lab_name"
                                                   else ODD)
        if action.nargs == argparse.REMAINDER:
            words += ["--", "true"]
        elif action.option_strings:
            words += [action.option_strings[-1], value]
        else:
            words.append(value)
    return words


def variants() -> list[list[str]]:
    """Bad command lines for every command of the tree (every lab command gets a bad
    --name, so none can touch a real lab; `cni install` never gets a usable directory).
    """
    found = []
    for path, parser in command_tree(build_parser()):
        if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            found.append([*path])  # a group without its command
            continue
        odd = odd_arguments(parser, "-1")
        sane_numbers = odd_arguments(parser, "1")
        found.append([*path, "--no-such-option"])
        found.append(["--lab", "BADNAME", "--host", "nohost", *path, *sane_numbers])
        found.append([*path, *sane_numbers, "--lab", "nolab00", "--host", "nohost"])
        if odd:
            found.append([*path, *odd])
        if sane_numbers != odd and {ODD, "UPPER"} & set(sane_numbers):
            found.append([*path, *sane_numbers])  # `--as 1` alone is a good command
    return found


def test_every_command_with_bad_arguments_fails_in_one_line(etcd_server, store):
    cases = variants()
    assert len(cases) > 80
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda argv: run(argv, etcd_server.endpoint), cases))
    failures = [(argv, r.returncode, r.stderr) for argv, r in zip(cases, results, strict=True)
                if r.returncode not in (1, 2) or "Traceback" in r.stderr
                or not r.stderr.strip().splitlines()[-1].startswith("fabricctl")]
    assert failures == []


@pytest.mark.parametrize("argv, message", [
    (["ipam", "release", "notanip"],
     "fabricctl: 'notanip' does not appear to be an IPv4 or IPv6 address"),
    (["--lab", "BADNAME", "nodes"], "fabricctl: lab name 'BADNAME': use 1 to 10 lower-case"),
    (["lab", "status", "--name", "UPPER"], "fabricctl: lab name 'UPPER': use 1 to 10"),
    (["cni", "install", "--bin-dir", "/proc/foo"],
     "fabricctl: cni install: cannot write /proc/foo: No such file or directory"),
    (["lab", "up", "--name", "errx", "--parallel", "0"],
     "fabricctl: --parallel 0: build at least 1 host at a time"),
    (["lab", "up", "--name", "errx", "--route-reflectors", "2", "--peer", "bird",
      "--peer-role", "rr"], "fabricctl: --route-reflectors and --peer-role rr both ask"),
    (["lab", "up", "--name", "errx", "--underlay", "10.98.0.0/28"],
     "fabricctl: --underlay 10.98.0.0/28: use an IPv4 network of /24 or larger"),
    (["lab", "up", "--name", "errx", "--underlay6", "nonsense"],
     "fabricctl: --underlay6 'nonsense' is not a network"),
])
def test_the_reported_cases(etcd_server, store, argv, message):
    result = run(argv, etcd_server.endpoint)
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_output_options_after_the_command(etcd_server, store):
    run(["ipam", "pool", "add", "default", "10.244.0.0/16"], etcd_server.endpoint)
    result = run(["ipam", "pool", "list", "-o", "json", "--etcd-endpoints",
                  etcd_server.endpoint])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[\n")
    assert run(["ipam", "pool", "list", "--output=json"], etcd_server.endpoint).stdout == \
        result.stdout


@pytest.fixture
def many_workloads(store):
    """About 600 kB of `-o json workloads`: far more than a pipe holds (64 kB)."""
    for index in range(2000):
        workload = Workload(f"c{index:05d}.eth0", "n1", f"c{index:05d}", "eth0",
                            f"/run/netns/c{index}", (f"10.244.{index // 250}.{index % 250}",),
                            f"w{index}", f"l3f{index:012d}", 1.0, "l3fabric")
        store.put(keys.workload("n1", workload.handle), workload.to_record())


@pytest.mark.parametrize("output", ["json", "table"])
def test_a_reader_that_stops_early_ends_the_command_quietly(etcd_server, many_workloads,
                                                           output):
    shell = f"{' '.join(FABRICCTL)} --etcd-endpoints {etcd_server.endpoint} -o {output} " \
            "workloads | head -1; echo \"status=${PIPESTATUS[0]}\" >&2"
    result = subprocess.run(["bash", "-c", shell], capture_output=True, text=True,
                            timeout=120)
    assert len(result.stdout.splitlines()) == 1
    assert result.stderr.strip() == "status=141", result.stderr  # no message at all


def test_output_into_a_pipe_already_closed(etcd_server, many_workloads):
    """The reader is gone before the first write: no "Exception ignored" at exit."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([*FABRICCTL, "--etcd-endpoints", etcd_server.endpoint, "-o",
                                 "json", "workloads"], stdout=write, stderr=subprocess.PIPE,
                                text=True, timeout=120)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (141, "")


def test_a_peer_that_is_not_an_address_is_refused_before_asking_any_agent():
    result = run(["bgp", "routes", "--peer", "notanip"])
    assert result.returncode == 2
    assert "--peer 'notanip' is not an IP address" in result.stderr
