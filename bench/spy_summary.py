#!/usr/bin/env python3
"""Summarise py-spy raw recordings (`py-spy record --format raw --threads [--idle]`).

    python bench/spy_summary.py FILE... [--threads REGEX] [--top N] [--leaf]

Prints, for the threads whose name matches REGEX (default: the CNI request threads),
the share of samples in which each function appears (inclusive), or with --leaf the
function on top of the stack (where the time is spent itself). With `--idle` in the
recording, samples of threads waiting (on etcd, on the owner loop, on the GIL-free
parts of netlink) are included, so the shares are shares of wall time; without it,
of time spent running.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path


def frames(line: str) -> tuple[str, list[str], int]:
    stack, _, count = line.rstrip("\n").rpartition(" ")
    parts = stack.split(";")
    thread = parts[0]
    return thread, [re.sub(r" \((.*?):\d+\)$", r" (\1)", p) for p in parts[1:]], int(count)


def summarise(files: list[Path], threads: str, top: int, leaf: bool) -> list[str]:
    """The summary's lines: sample count, then `top` frames by share of samples."""
    pattern = re.compile(threads)
    seen: Counter[str] = Counter()
    total = 0
    for path in files:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            thread, stack, count = frames(line)
            if not pattern.search(thread + ";" + ";".join(stack[:3])):
                continue
            total += count
            if leaf:
                seen[stack[-1] if stack else "?"] += count
            else:
                for frame in set(stack):
                    seen[frame] += count
    return [f"{total} samples"] + [f"{100 * count / max(total, 1):6.1f}%  {frame}"
                                   for frame, count in seen.most_common(top)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--threads", default=r"process_request_thread|cni-unwire")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--leaf", action="store_true")
    args = parser.parse_args()
    print("\n".join(summarise(args.files, args.threads, args.top, args.leaf)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
