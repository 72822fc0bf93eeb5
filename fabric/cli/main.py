"""fabricctl entry point: argument tree, error handling and exit codes.

Whatever goes wrong ends as one line on stderr and an exit status from output.py, never
a traceback: an operator reads the line, a script reads the status. Errors we expect
(etcd down, a bad value, a lab that is not there) say what to do; anything else is
reported as an internal error with exit 1, and `--log-level debug` shows where it came
from.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence

from fabric import logs
from fabric.cli import bgp as bgp_cmds
from fabric.cli import cni as cni_cmds
from fabric.cli import ipam as ipam_cmds
from fabric.cli import lab as lab_cmds
from fabric.cli import node as node_cmds
from fabric.cli import policy as policy_cmds
from fabric.cli.context import Context
from fabric.cli.output import (
    CLOSED,
    ERROR,
    PROBLEM,
    CliError,
    OutputClosed,
    guard_stdout,
    silence,
)
from fabric.kernel.netns import NetnsError
from fabric.lab.etcd import EtcdError
from fabric.lab.peers import PeerError
from fabric.lab.topology import LabError
from fabric.model.handles import IpamError
from fabric.model.policy import PolicyError
from fabric.model.pools import PoolError
from fabric.settings import SettingsError, add_etcd_arguments
from fabric.sockets import AgentError, AgentUnreachable
from fabric.store.errors import CorruptValue, DatastoreError, Unavailable
from fabric.store.policies import LabelError

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# Values of the global options when they are given nowhere on the command line.
GLOBAL_DEFAULTS: dict[str, object] = {
    "output": "table", "log_level": "warning", "host": None, "lab": None,
    "etcd_endpoints": None, "etcd_ca": None, "etcd_cert": None, "etcd_key": None,
}

# Errors that carry a message written for the user: shown as they are, exit 2.
EXPECTED: tuple[type[Exception], ...] = (
    SettingsError, Unavailable, CorruptValue, IpamError, PoolError, AgentUnreachable,
    AgentError, LabError, NetnsError, EtcdError, PeerError, PolicyError,
    LabelError)


def global_options() -> argparse.ArgumentParser:
    """The options every command takes, before or after its name.

    `fabricctl -o json ipam pool list` and `fabricctl ipam pool list -o json` both work,
    as with kubectl and calicoctl. This one parser is shared by every parser of the
    tree. Its defaults are SUPPRESS because argparse copies every attribute a
    subcommand's parser sets onto the result: a default there would overwrite a value
    given before the subcommand. GLOBAL_DEFAULTS fill the gaps after parsing.
    """
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    group = common.add_argument_group("global options (before or after the command)")
    group.add_argument("-o", "--output", choices=("table", "json"),
                       help="table for people (default) or json for scripts")
    group.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS,
                       help="log level on stderr (default warning)")
    group.add_argument("--host", metavar="HOST",
                       help="a lab host: reach its agent (and the lab's etcd)")
    group.add_argument("--lab", metavar="NAME", help="which lab (default: the one up)")
    add_etcd_arguments(common)  # its options take the SUPPRESS default of `common`
    return common


def command_tree(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                 ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command words, parser) for every subcommand below `parser`, at every level."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for word, child in action.choices.items():
                if id(child) in seen:  # an alias of a command already walked
                    continue
                seen.add(id(child))
                yield (*path, word), child
                yield from command_tree(child, (*path, word))


def build_parser() -> argparse.ArgumentParser:
    common = global_options()
    parser = argparse.ArgumentParser(
        prog="fabricctl", description="Operate an l3fabric routed container fabric.",
        parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (node_cmds, bgp_cmds, ipam_cmds, cni_cmds, policy_cmds, lab_cmds):
        group.register(sub)
    for _, child in command_tree(parser):
        child._add_container_actions(common)  # what parents=[common] does, after the fact
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    for name, value in GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def failure(exc: Exception) -> tuple[str, int]:
    """The line to print and the exit status for an exception a command raised."""
    if isinstance(exc, CliError):
        return str(exc), exc.code
    if isinstance(exc, EXPECTED):
        return _one_line(str(exc)), ERROR
    if isinstance(exc, DatastoreError):
        return _one_line(f"datastore error: {exc}"), ERROR
    if isinstance(exc, ConnectionError):  # an agent that died or restarted mid-request
        return f"connection lost: {exc.strerror or exc}", ERROR
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return _one_line(f"{where}{exc.strerror or exc}"), ERROR
    if isinstance(exc, ValueError):  # a value from the command line that is not usable
        return _one_line(str(exc)) or type(exc).__name__, ERROR
    return _one_line(f"internal error: {type(exc).__name__}: {exc} "
                     "(--log-level debug shows where)"), PROBLEM


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    logs.configure("console", args.log_level)
    log = logs.get("fabricctl")
    ctx = Context(args)
    try:
        return int(args.handler(ctx))
    except OutputClosed:
        raise
    except KeyboardInterrupt:
        return ERROR
    except Exception as exc:
        log.debug("command failed", exc_info=True)
        message, code = failure(exc)
        if isinstance(exc, Unavailable | AgentUnreachable):
            message += _hint(ctx, argv, agent=isinstance(exc, AgentUnreachable))
        print(f"fabricctl: {message}", file=sys.stderr)
        return code
    finally:
        try:
            ctx.close()
        except Exception:  # the command's outcome is already decided
            log.debug("closing the connection failed", exc_info=True)


def _hint(ctx: Context, argv: Sequence[str], agent: bool) -> str:
    """The --lab hint, or nothing if finding one fails: a hint must not hide the error."""
    try:
        return ctx.lab_hint(argv, agent=agent)
    except Exception:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    original = guard_stdout()
    try:
        try:
            code = run(argv)
        except SystemExit as exc:  # argparse, after --help or a usage error
            code = exc.code if isinstance(exc.code, int) else (ERROR if exc.code else 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except (OutputClosed, BrokenPipeError):  # BrokenPipeError: stderr itself is closed
        silence(sys.stdout, sys.stderr)
        return CLOSED
    finally:
        sys.stdout = original


if __name__ == "__main__":
    sys.exit(main())
