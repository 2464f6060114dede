"""The table a run prints, and what it says about the machine and the code measured."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.common import median
from benchmarks.config import Config, Run
from benchmarks.procs import ROOT


@dataclass
class Row:
    label: str
    qt: str
    raw: str | None = None
    raw_label: str = ""
    unit: str = "/s"
    target: Callable[[float, float | None], bool] | None = None
    target_text: str = ""


def rows_for(backend: str, cfg: Config) -> list[Row]:
    n = f"{cfg.tasks:,}"
    if backend == "rabbitmq":
        floor, share, s_floor = 3000.0, 0.75, 7000.0
    elif backend == "nats":
        floor, share, s_floor = 8000.0, 0.5, 50000.0
    else:
        floor, share, s_floor = 0.0, 0.0, 0.0

    def e2e_target(q: float, raw: float | None) -> bool:
        return q >= floor and (raw is None or q >= share * raw)

    e2e_text = f">= {floor:,.0f}/s and >= {share} x raw" if floor else ""
    def within(times: float) -> Callable[[float, float | None], bool]:
        return lambda q, r: r is not None and q <= times * r

    # CPU per task first: it moves far less than a rate when the machine is shared.
    rows = [] if backend == "memory" else [
        Row("worker CPU per no-op task, 1 worker process", "cpu_worker_w1",
            "raw_cpu_consumer_oneway", "consumer CPU per message (decode, ack)", " µs",
            target=within(2.0), target_text="<= 2 x raw"),
        Row("producer CPU per add_task + wait, 1 worker", "cpu_producer_w1",
            "raw_cpu_publisher_publish", "publisher CPU per confirmed publish", " µs",
            target=within(2.0), target_text="<= 2 x raw"),
        Row("broker CPU per task with results, 1 worker", "cpu_broker_w1",
            "raw_cpu_broker_oneway", "broker CPU per message, one way", " µs"),
    ]
    rows.append(Row(f"enqueue, {n} add_task, {cfg.window} in flight, no worker", "enqueue",
                    "raw_publish", "publish, confirms, pipelined"))
    for count in cfg.workers:
        if backend == "memory" and count != 1:
            continue
        who = "embedded worker" if backend == "memory" else \
            f"{count} worker process{'es' if count > 1 else ''}"
        rows.append(Row(f"tasks/s with results, {n} no-op, {who}", f"e2e_w{count}",
                        f"raw_rtt_w{count}",
                        f"round trip, {count} replier process{'es' if count > 1 else ''}"))
        if backend == "memory":
            continue
        rows.append(Row(f"tasks/s with results, {n} no-op, {who}", f"e2e_w{count}",
                        "raw_oneway", "one way: publish, consume, ack",
                        target=e2e_target if floor else None, target_text=e2e_text))
    cross = "in-process" if backend == "memory" else "consumer in another process"
    rows += [
        Row(f"partials/s, {cfg.stream_values:,} yields, {cross}", "stream", "raw_stream",
            "publish -> subscriber",
            target=(lambda q, r: q >= s_floor) if s_floor else None,
            target_text=f">= {s_floor:,.0f}/s" if s_floor else ""),
        Row(f"burst of {cfg.stream_values:,}: first partial, from its yield", "burst_first",
            "raw_burst_first", "first message, from its publish", " ms",
            target=(lambda q, r: q <= 10.0) if backend != "memory" else None,
            target_text="<= 10 ms" if backend != "memory" else ""),
        Row(f"burst of {cfg.stream_values:,}: yield-to-receipt p50", "burst_p50",
            "raw_burst_p50", "publish -> subscriber p50", " ms"),
        Row(f"burst of {cfg.stream_values:,}: yield-to-receipt p99", "burst_p99",
            "raw_burst_p99", "publish -> subscriber p99", " ms",
            target=(lambda q, r: q <= 50.0) if backend != "memory" else None,
            target_text="<= 50 ms" if backend != "memory" else ""),
        Row(f"burst of {cfg.stream_values:,}: yield-to-receipt max", "burst_max",
            "raw_burst_max", "publish -> subscriber max", " ms"),
        Row(f"yield-to-receipt p50 at {cfg.paced_rate:,.0f}/s", "lat_p50", "raw_lat_p50",
            "publish -> subscriber p50", " ms",
            target=(lambda q, r: q <= 1.0) if backend != "memory" else None,
            target_text="<= 1 ms" if backend != "memory" else ""),
        Row(f"yield-to-receipt p99 at {cfg.paced_rate:,.0f}/s", "lat_p99", "raw_lat_p99",
            "publish -> subscriber p99", " ms",
            target=(lambda q, r: q <= 5.0) if backend != "memory" else None,
            target_text="<= 5 ms" if backend != "memory" else ""),
        Row(f"worker RSS after {min(cfg.memory_phases):,} tasks", "rss_first", unit=" MB"),
        Row(f"worker RSS after {max(cfg.memory_phases):,} tasks", "rss_last", unit=" MB"),
        Row("worker RSS growth between them", "rss_growth", unit=" MB",
            target=(lambda q, r: q < 5.0) if backend != "memory" else None,
            target_text="< 5 MB" if backend != "memory" else ""),
        Row(f"producer RSS, {n} tasks outstanding", "producer_rss", unit=" MB"),
        Row(f"  of which added by the {n} tasks", "producer_rss_delta", unit=" MB"),
    ]
    return rows


def _fmt(values: list[float], unit: str, rounds: int) -> str:
    if not values:
        return ""
    digits = 2 if unit == " ms" else 1 if unit in (" MB", " µs") else 0
    med, lo, hi = median(values), min(values), max(values)
    text = f"{med:,.{digits}f}"
    if len(values) > 1:
        text += f" ({lo:,.{digits}f}-{hi:,.{digits}f})"
    text += unit
    if len(values) < rounds:
        text += f" [{len(values)} of {rounds} rounds]"
    return text


def table(run: Run) -> str:
    cfg = run.config
    out = ["| backend | measure | QTasks median (min-max) | raw-client limit | "
           "median (min-max) | QTasks / raw | target | met |",
           "|---|---|---|---|---|---|---|---|"]
    notes: dict[str, int] = {}

    def cell(backend: str, name: str, unit: str, rounds: int) -> str:
        values = run.figures.get((backend, name), [])
        text = _fmt(values, unit, rounds) if values else "missing"
        reason = run.errors.get((backend, name))
        if reason is None and not values:
            reason = "not measured (see --only, --workers)"
        if reason is not None:
            text += f" [{notes.setdefault(reason, len(notes) + 1)}]"
        return text

    for backend in cfg.backends:
        for row in rows_for(backend, cfg):
            qt_values = run.figures.get((backend, row.qt), [])
            raw_values = run.figures.get((backend, row.raw), []) if row.raw else []
            rounds = cfg.memory_rounds if row.qt.startswith("rss_") else cfg.rounds
            qt_text = cell(backend, row.qt, row.unit, rounds)
            raw_text = raw_label = ""
            if row.raw and backend != "memory":
                raw_text = cell(backend, row.raw, row.unit, cfg.rounds)
                raw_label = row.raw_label
            ratio = ""
            if qt_values and raw_values:
                ratio = f"{median(qt_values) / median(raw_values):.2f}"
            met = ""
            if row.target is not None and qt_values:
                raw_med = median(raw_values) if raw_values else None
                met = "yes" if row.target(median(qt_values), raw_med) else "NO"
            out.append(f"| {backend} | {row.label} | {qt_text} | {raw_label} | {raw_text} "
                       f"| {ratio} | {row.target_text} | {met} |")
    if notes:
        out.append("")
    for reason, mark in notes.items():
        out.append(f"[{mark}] {reason}  ")
    return "\n".join(out)


def machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"nproc": os.cpu_count(), "load": os.getloadavg(), "commit": commit,
            "dirty": dirty_code(), "python": platform.python_version(),
            "platform": platform.platform()}


def dirty_code() -> str:
    """The library files that differ from HEAD (modified or untracked), with a digest of
    their contents, so that a figure measured on uncommitted code names that code."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--",
                             "qtasks", "brokers", "results", "pyproject.toml"],
                            cwd=ROOT, capture_output=True, text=True).stdout
    files = sorted(line[3:].strip() for line in status.splitlines() if line.strip())
    files = [f for f in files if not f.endswith(".pyc") and "__pycache__" not in f]
    if not files:
        return ""
    digest = hashlib.sha256()
    for name in files:
        path = ROOT / name
        digest.update(name.encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    return f"{', '.join(files)} (sha256 of their contents {digest.hexdigest()[:12]})"
