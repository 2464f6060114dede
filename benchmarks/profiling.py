"""Summaries of ``py-spy record --format raw`` output (collapsed stacks): where the time of
one process went, by own time and by inclusive time, and by package.

``python -m benchmarks.profiling FILE [FILE ...]`` prints the summary of each file.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")

#: Path fragments that name a package in a frame's file, most specific first.
PACKAGES = (
    ("/qtasks/", "qtasks"), ("/brokers/", "brokers"), ("/results/", "results"),
    ("/benchmarks/", "benchmarks"), ("/aio_pika/", "aio_pika"), ("/aiormq/", "aiormq"),
    ("/pamqp/", "pamqp"), ("/nats/", "nats-py"), ("/uvloop/", "uvloop"),
    ("/asyncio/", "asyncio"), ("/orjson", "orjson"),
)


def _key(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for fragment, _ in PACKAGES:
        if fragment in path:
            path = fragment.strip("/") + "/" + path.split(fragment, 1)[1]
            break
    else:
        path = Path(path).name
    return f"{match['func']} ({path})"


def _package(frame: str) -> str:
    for fragment, name in PACKAGES:
        if fragment in frame:
            return name
    return "other (stdlib, interpreter)"


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        stacks.append((frames, int(count)))
    return stacks


def summarize(path: Path, top: int = 12) -> str:
    stacks = load(path)
    total = sum(count for _, count in stacks)
    if not total:
        return f"{path.name}: no samples\n"
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    for frames, count in stacks:
        if not frames:
            continue
        own[_key(frames[-1])] += count
        packages[_package(frames[-1])] += count
        for key in {_key(f) for f in frames}:
            inclusive[key] += count
    lines = [f"{path.name}: {total} samples (active, non-idle)",
             "  own time by package: " + ", ".join(
                 f"{name} {100 * n / total:.0f}%" for name, n in packages.most_common())]
    lines.append("  top own time:")
    lines += [f"    {100 * n / total:5.1f}%  {k}" for k, n in own.most_common(top)]
    lines.append("  top inclusive (qtasks/brokers/results frames):")
    ours = [(k, n) for k, n in inclusive.most_common()
            if k.split("(")[-1].startswith(("qtasks/", "brokers/", "results/"))]
    lines += [f"    {100 * n / total:5.1f}%  {k}" for k, n in ours[:top]]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    for name in argv:
        print(summarize(Path(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
