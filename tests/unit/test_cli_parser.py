"""fabricctl's argument tree: global options anywhere, and errors mapped to one line."""

from __future__ import annotations

import argparse
import errno

import pytest

from fabric.cli.context import with_lab
from fabric.cli.main import build_parser, command_tree, failure, parse
from fabric.cli.output import CliError
from fabric.lab.topology import LabError
from fabric.store.errors import Unavailable


def leaves() -> list[tuple[str, ...]]:
    """Every runnable command, as its words (`ipam pool list`)."""
    return [path for path, parser in command_tree(build_parser())
            if not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)]


def required_words(path: tuple[str, ...]) -> list[str]:
    """Values for the command's required arguments, so that it parses."""
    parser = dict(command_tree(build_parser()))[path]
    words = []
    for action in parser._actions:
        if action.option_strings and action.required:
            words += [action.option_strings[-1], "1"]
        elif not action.option_strings and action.nargs not in ("?", "*",
                                                                argparse.REMAINDER):
            words.append("x")
    if path == ("ipam", "release"):
        words = ["10.0.0.1"]
    return words


def test_the_tree_has_every_command():
    found = {" ".join(p) for p in leaves()}
    assert {"node status", "routes", "nodes", "workloads", "ipam pool list", "bgp peer add",
            "cni install", "lab up", "lab restart-agent", "lab env"} <= found


# `lab exec HOST ...` gives everything after HOST to the command it runs on the host.
@pytest.mark.parametrize("path", [p for p in leaves() if p != ("lab", "exec")], ids=" ".join)
def test_global_options_work_after_the_command(path):
    parser = build_parser()
    words = [*path, *required_words(path)]
    before = parse(parser, ["-o", "json", "--lab", "lab1", "--host", "h1", *words])
    after = parse(parser, [*words, "-o", "json", "--lab", "lab1", "--host", "h1"])
    plain = parse(parser, words)
    for args in (before, after):
        assert (args.output, args.lab, args.host) == ("json", "lab1", "h1")
    assert (plain.output, plain.lab, plain.host, plain.log_level) == (
        "table", None, None, "warning")
    assert parse(parser, [*words, "--etcd-endpoints", "http://a:1"]).etcd_endpoints == \
        "http://a:1"


def test_a_value_before_the_command_is_not_reset_by_it():
    args = parse(build_parser(), ["--output", "json", "ipam", "pool", "list"])
    assert args.output == "json"
    args = parse(build_parser(), ["-o", "json", "ipam", "pool", "list", "-o", "table"])
    assert args.output == "table"  # the later one wins, as usual


def test_lab_exec_keeps_the_options_of_the_command_it_runs():
    args = parse(build_parser(), ["lab", "exec", "h1", "--", "ip", "-o", "link"])
    assert args.output == "table"
    assert args.argv == ["ip", "-o", "link"]


@pytest.mark.parametrize("exc, line, code", [
    (CliError("no such pool"), "no such pool", 2),
    (CliError("a check failed", code=1), "a check failed", 1),
    (LabError("lab name 'X': use ..."), "lab name 'X': use ...", 2),
    (Unavailable("etcd at http://127.0.0.1:2379 is unreachable"),
     "etcd at http://127.0.0.1:2379 is unreachable", 2),
    (ValueError("'notanip' does not appear to be an IPv4 or IPv6 address"),
     "'notanip' does not appear to be an IPv4 or IPv6 address", 2),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/foo"),
     "/proc/foo: No such file or directory", 2),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
     "connection lost: Connection reset by peer", 2),
    (KeyError("peers"), "internal error: KeyError: 'peers' (--log-level debug shows where)", 1),
])
def test_every_exception_is_one_line_and_a_status(exc, line, code):
    assert failure(exc) == (line, code)


def test_a_multi_line_message_becomes_one_line():
    assert failure(ValueError("first\n  second"))[0] == "first second"


def test_the_lab_hint_repeats_the_command_without_the_etcd_options():
    argv = ["--etcd-endpoints", "http://127.0.0.1:2379", "ipam", "pool", "list",
            "--etcd-ca=/x", "-o", "json"]
    assert with_lab(argv, "l3lab") == "fabricctl --lab l3lab ipam pool list -o json"
    assert with_lab(["node", "status"], "l3lab", "h1") == \
        "fabricctl --lab l3lab --host h1 node status"
    assert with_lab(["workloads", "a b"], "l3lab") == "fabricctl --lab l3lab workloads 'a b'"
