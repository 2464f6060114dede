"""The harness: ``python -m benchmarks.run --backends memory,rabbitmq,nats --tasks 10000
--rounds 3`` measures QTasks and the raw broker clients in one run and prints one table.

Every measurement runs in fresh child processes (``benchmarks.agent`` for producers and
raw clients, ``python -m qtasks worker benchmarks.bench_app:app`` for workers) under its
own broker namespace (``prefix``), which is deleted right after it. Rounds are the outer
loop, so that each round measures raw and QTasks figures side by side and a noisy
neighbour on the machine hurts both alike. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from functools import partial

import orjson

from benchmarks.config import AMQP_OPTIONS, Run, log, parse
from benchmarks.procs import ROOT
from benchmarks.report import machine, rows_for, table
from benchmarks.steps import (
    clean,
    qt_e2e,
    qt_enqueue,
    qt_memory,
    qt_stream,
    raw_publish_and_consume,
    raw_rtt,
    raw_stream,
)

BURST = ("burst_first", "burst_p50", "burst_p99", "burst_max")


def step(run: Run, backend: str, names: list[str], fn: Callable[[], None]) -> None:
    label = ",".join(names)
    if run.config.quiet_cpu:
        wait_quiet(run.config.quiet_cpu)
    log(f"{backend}: {label} ...")
    started = time.monotonic()
    try:
        fn()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        log(f"{backend}: {label} FAILED: {reason}")
        run.fail(backend, names, reason)
        return
    shown = ", ".join(f"{n}={run.figures[(backend, n)][-1]:,.2f}" for n in names
                      if (backend, n) in run.figures)
    log(f"{backend}: {label}: {shown} ({time.monotonic() - started:.1f} s)")


def wait_quiet(limit: float, longest: float = 120.0) -> None:
    """Wait (at most ``longest`` seconds) until the machine's CPU use over one second is
    under ``limit`` percent: other people's test runs on a shared machine."""
    import psutil  # type: ignore[import-untyped]

    deadline = time.monotonic() + longest
    busy = float(psutil.cpu_percent(interval=1.0))
    while busy >= limit and time.monotonic() < deadline:
        busy = float(psutil.cpu_percent(interval=1.0))
    if busy >= limit:
        log(f"  machine still {busy:.0f}% busy after {longest:.0f} s; measuring anyway")


def backend_available(backend: str) -> str | None:
    """None when the backend's modules import; else why not."""
    if backend == "memory":
        return None
    modules = {"rabbitmq": ("qtasks.brokers.rabbitmq", "qtasks.results.rabbitmq", "aio_pika"),
               "nats": ("qtasks.brokers.nats", "qtasks.results.nats", "nats")}[backend]
    code = "; ".join(f"import {m}" for m in modules)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"backend does not import: {last}"
    return None


def one_round(run: Run, r: int) -> None:
    cfg = run.config
    groups = cfg.groups
    for backend in cfg.backends:
        log(f"round {r + 1}/{cfg.rounds}: {backend}")
        raw = backend != "memory" and "raw" in groups
        if raw:
            step(run, backend, ["raw_publish", "raw_oneway"],
                 partial(raw_publish_and_consume, run, backend))
        if "enqueue" in groups:
            step(run, backend, ["enqueue", "producer_rss", "producer_rss_delta"],
                 partial(qt_enqueue, run, backend))
        if "e2e" in groups:
            for count in cfg.workers:
                if backend == "memory" and count != 1:
                    continue
                if raw:
                    step(run, backend, [f"raw_rtt_w{count}"],
                         partial(raw_rtt, run, backend, count))
                step(run, backend, [f"e2e_w{count}", f"e2e_enqueue_w{count}"],
                     partial(qt_e2e, run, backend, count))
        if "stream" in groups:
            if raw:
                step(run, backend, ["raw_stream"] + [f"raw_{b}" for b in BURST],
                     partial(raw_stream, run, backend, False))
            step(run, backend, ["stream", *BURST], partial(qt_stream, run, backend, False))
            if raw:
                step(run, backend, ["raw_lat_p50", "raw_lat_p99"],
                     partial(raw_stream, run, backend, True))
            step(run, backend, ["lat_p50", "lat_p99"], partial(qt_stream, run, backend, True))
        if "memory" in groups and r < cfg.memory_rounds:
            step(run, backend, ["rss_first", "rss_last", "rss_growth"],
                 partial(qt_memory, run, backend))


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv, __doc__ or "")
    run = Run(cfg, prefix=f"qtb{uuid.uuid4().hex[:10]}")
    before = machine()
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    log(f"run {run.prefix}: logs in {cfg.logs}")
    for backend in list(cfg.backends):
        why = backend_available(backend)
        if why:
            log(f"{backend}: {why}")
            for row in rows_for(backend, cfg):
                run.fail(backend, [row.qt] + ([row.raw] if row.raw else []), why)
    started = time.monotonic()
    try:
        for r in range(cfg.rounds):
            one_round(run, r)
            partial_table = cfg.logs / f"table-after-round-{r + 1}.md"
            partial_table.write_text(table(run) + "\n")
            log(f"table so far: {partial_table}")
    finally:
        for backend in cfg.backends:
            clean(backend, run.prefix)  # anything a failed step left behind
    after = machine()
    header = [
        f"command: {command}" + (f" (BENCH_AMQP_OPTIONS={AMQP_OPTIONS})" if AMQP_OPTIONS else "")
        + (" (BENCH_OBSERVE=1: metrics and tracing middleware on)"
           if os.environ.get("BENCH_OBSERVE", "0") not in ("", "0") else ""),
        f"commit: {before['commit']}"
        + (f", plus uncommitted: {before['dirty']}" if before["dirty"] else ""),
        f"machine: {before['nproc']} CPUs, {before['platform']}, Python {before['python']}; "
        f"load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.2f}' for x in before['load'])}, at end "
        f"{'/'.join(f'{x:.2f}' for x in after['load'])}",
        f"rounds: {cfg.rounds} (memory: {cfg.memory_rounds}), {cfg.tasks:,} tasks, "
        f"window {cfg.window}, {time.monotonic() - started:.0f} s; logs: {cfg.logs}",
    ]
    text = "\n".join(header) + "\n\n" + table(run)
    print(text)
    if cfg.json_out is not None:
        cfg.json_out.write_text(orjson.dumps({
            "header": header, "figures": {f"{b}:{n}": v for (b, n), v in run.figures.items()},
            "errors": {f"{b}:{n}": e for (b, n), e in run.errors.items()},
        }, option=orjson.OPT_INDENT_2).decode())
    if cfg.profile is not None:
        from benchmarks.profiling import summarize

        for path in sorted(cfg.profile.glob("*.txt")):
            print("\n" + summarize(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
