"""Where a relay's time goes: a summary of py-spy's collapsed stacks (``--format raw``).

Each line of the input is ``frame;frame;...;leaf COUNT`` with frames like
``Ingest._publish (relay/ingest.py:326)``. Prints the share of samples (on-CPU time, as py-spy
samples only running threads by default) by package of the leaf frame (self time), and the
inclusive share of the heaviest functions, of relay/ and of the libraries it calls. Samples
whose leaf is the event loop's ``run`` are time spent inside uvloop's C code (socket reads and
writes, callbacks' dispatch), which py-spy cannot see into without ``--native``.

    python -m bench.hotspots bench/results/profile-RUN-relay.txt [--top 30]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path
from typing import Any

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


def parse(text: str) -> list[tuple[list[str], int]]:
    """(frames root first, samples) per line of py-spy's raw output."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def function(frame: str) -> str:
    """``relay/ingest.py:Ingest._publish`` from ``Ingest._publish (relay/ingest.py:326)``."""
    m = FRAME.match(frame)
    return f"{m['file']}:{m['func']}" if m else frame


def package(frame: str) -> str:
    """The package a frame's file belongs to (``relay``, ``aiohttp``, ``asyncio`` ...)."""
    m = FRAME.match(frame)
    path = m["file"] if m else frame
    head = path.split("/", 1)[0]
    if head.endswith(".py"):
        return "stdlib"
    return head.removeprefix("<frozen ").removesuffix(">")


def summarize(stacks: list[tuple[list[str], int]], top: int = 30) -> dict[str, Any]:
    """Self time by package, inclusive time by function (shares of all samples)."""
    total = sum(n for _, n in stacks) or 1
    by_package: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    for frames, n in stacks:
        leaf = frames[-1]
        name = function(leaf)
        in_loop = name.endswith(("Runner.run", "BaseEventLoop.run_until_complete"))
        by_package["(event loop C code: uvloop)" if in_loop else package(leaf)] += n
        self_time[name] += n
        for fn in {function(f) for f in frames}:
            inclusive[fn] += n

    def share(counter: Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(k)]

    relay_inclusive = Counter({k: v for k, v in inclusive.items() if k.startswith("relay/")})
    return {
        "samples": total,
        "self_by_package": share(by_package, 20),
        "self_by_function": share(self_time, top),
        "inclusive": share(inclusive, top),
        "inclusive_relay": share(relay_inclusive, top),
    }


def render(summary: dict[str, Any]) -> str:
    """The summary as text, one share per line."""
    out = [f"{summary['samples']} samples"]
    for key, title in (
        ("self_by_package", "self time by package of the leaf frame"),
        ("inclusive_relay", "inclusive time, relay/ functions"),
        ("inclusive", "inclusive time, all functions"),
        ("self_by_function", "self time by function"),
    ):
        out.append(f"\n{title}:")
        out.extend(f"  {pct:5.1f}%  {name}" for name, pct in summary[key])
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    print(render(summarize(parse(Path(args.file).read_text()), args.top)))


if __name__ == "__main__":
    main()
