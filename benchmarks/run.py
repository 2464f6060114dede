"""The harness: ``python -m benchmarks.run --backends memory,rabbitmq,nats --tasks 10000
--rounds 3`` measures QTasks and the raw broker clients in one run and prints one table.

Every measurement runs in fresh child processes (``benchmarks.agent`` for producers and
raw clients, ``python -m qtasks worker benchmarks.bench_app:app`` for workers) under its
own broker namespace (``prefix``), which is deleted right after it. Rounds are the outer
loop, so that each round measures raw and QTasks figures side by side and a noisy
neighbour on the machine hurts both alike. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import os
import platform
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from benchmarks import cleanup, procs
from benchmarks.common import AMQP_URL, NATS_URL, median, percentile
from benchmarks.procs import ROOT, Child, agent, child_env, worker

BACKENDS = ("memory", "rabbitmq", "nats")
GROUPS = ("raw", "enqueue", "e2e", "stream", "memory")


@dataclass
class Config:
    backends: list[str]
    tasks: int
    rounds: int
    window: int
    workers: list[int]
    stream_values: int
    paced_values: int
    paced_rate: float
    memory_phases: list[int]
    memory_rounds: int
    prefetch: int
    groups: list[str]
    profile: Path | None
    quiet_cpu: float
    logs: Path
    json_out: Path | None


@dataclass
class Run:
    config: Config
    prefix: str
    figures: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    errors: dict[tuple[str, str], str] = field(default_factory=dict)
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, backend: str, name: str, value: float) -> None:
        self.figures.setdefault((backend, name), []).append(value)

    def fail(self, backend: str, names: list[str], reason: str) -> None:
        for name in names:
            self.errors.setdefault((backend, name), reason)

    def namespace(self, step: str) -> str:
        """A broker namespace no other step or user shares; starts with ``self.prefix``."""
        return f"{self.prefix}_{next(self.counter):03d}{step}"

    def log_path(self, ns: str, role: str) -> Path:
        return self.config.logs / f"{ns}-{role}.log"


#: Options added to the QTasks RabbitMQ URL only (not the raw clients'), e.g.
#: ``BENCH_AMQP_OPTIONS=max_priority=0`` to measure plain queues instead of priority queues.
AMQP_OPTIONS = os.environ.get("BENCH_AMQP_OPTIONS", "")


def url_for(backend: str, ns: str) -> str | None:
    if backend == "rabbitmq":
        return f"{AMQP_URL}?prefix={ns}" + (f"&{AMQP_OPTIONS}" if AMQP_OPTIONS else "")
    if backend == "nats":
        return f"{NATS_URL}?prefix={ns}"
    return None  # memory:// (the default of bench_app)


def timeout_for(n: int, floor_rate: float = 150.0) -> float:
    """A bound for a step of ``n`` messages: generous, but a hang ends."""
    return 60.0 + n / floor_rate


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- cleanup ---------------------------------------------------------------------------

def clean(backend: str, ns: str) -> None:
    """Delete every broker object whose name starts with ``ns``."""
    if backend == "memory":
        return
    try:
        if backend == "rabbitmq":
            deleted = asyncio.run(cleanup.rabbitmq(ns, []))
        else:
            deleted = asyncio.run(cleanup.nats(ns))
    except Exception as exc:
        log(f"cleanup of {ns} on {backend} failed: {type(exc).__name__}: {exc}")
        return
    if deleted:
        log(f"  deleted {len(deleted)} objects under {ns}")


@contextlib.contextmanager
def workers(run: Run, backend: str, ns: str, count: int) -> Iterator[list[Child]]:
    """``count`` CLI worker processes on namespace ``ns``, each past "consuming"."""
    started: list[Child] = []
    try:
        for i in range(count):
            started.append(worker(child_env(url_for(backend, ns)),
                                  run.log_path(ns, f"worker{i}"),
                                  None if run.config.prefetch == 100 else run.config.prefetch))
        for child in started:
            child.wait_ready(60)
        yield started
    finally:
        for child in started:
            child.stop()


# -- QTasks measurements ---------------------------------------------------------------

def qt_enqueue(run: Run, backend: str) -> None:
    cfg = run.config
    ns = run.namespace("enq")
    env = child_env(url_for(backend, ns), {"BENCH_EMBEDDED_WORKER": "0"})
    try:
        result = agent("qtasks_client.enqueue",
                       {"n": cfg.tasks, "window": cfg.window, "timeout": timeout_for(cfg.tasks)},
                       env, run.log_path(ns, "producer")).result(timeout_for(cfg.tasks) + 30)
        run.add(backend, "enqueue", result["rate"])
        run.add(backend, "producer_rss", result["rss_outstanding"])
        run.add(backend, "producer_rss_delta", result["rss_outstanding"] - result["rss_before"])
    finally:
        clean(backend, ns)


def qt_e2e(run: Run, backend: str, count: int) -> None:
    cfg = run.config
    ns = run.namespace(f"e2e{count}")
    env = child_env(url_for(backend, ns))
    kwargs = {"n": cfg.tasks, "window": cfg.window, "warmup": min(500, cfg.tasks),
              "timeout": timeout_for(cfg.tasks)}
    profile = cfg.profile if count == 1 and run.extra.get(f"profiled_{backend}") is None \
        else None
    try:
        with workers(run, backend, ns, 0 if backend == "memory" else count) as started:
            spies: list[procs.Attached] = []
            if profile is not None:
                run.extra[f"profiled_{backend}"] = True
                for i, child in enumerate(started):
                    spies.append(procs.Attached(child.pid, profile / f"{backend}-worker{i}.txt",
                                                run.log_path(ns, f"pyspy-worker{i}")))
                time.sleep(1.0)  # py-spy attached before the producer starts
            try:
                producer = agent("qtasks_client.end_to_end", kwargs, env,
                                 run.log_path(ns, "producer"),
                                 profile / f"{backend}-producer.txt" if profile else None)
                result = producer.result(timeout_for(cfg.tasks) + 60)
            finally:
                for spy in spies:
                    spy.stop()
        run.add(backend, f"e2e_w{count}", result["rate"])
        run.add(backend, f"e2e_enqueue_w{count}", result["enqueue_rate"])
    finally:
        clean(backend, ns)


def qt_stream(run: Run, backend: str, latency: bool) -> None:
    cfg = run.config
    ns = run.namespace("lat" if latency else "strm")
    n = cfg.paced_values if latency else cfg.stream_values
    limit = n / cfg.paced_rate + 60 if latency else timeout_for(n, 200)
    env = child_env(url_for(backend, ns))
    try:
        with workers(run, backend, ns, 0 if backend == "memory" else 1):
            result = agent("qtasks_client.stream",
                           {"n": n, "timeout": limit, "latency": latency,
                            "rate": cfg.paced_rate},
                           env, run.log_path(ns, "consumer")).result(limit + 30)
        _stream_figures(run, backend, "", result, n, latency)
    finally:
        clean(backend, ns)


def _stream_figures(run: Run, backend: str, head: str, result: dict[str, Any], n: int,
                    latency: bool) -> None:
    if result["received"] != n:
        raise RuntimeError(f"received {result['received']} of {n} messages")
    if latency:
        lags = [lag * 1000 for lag in result["lags"]]
        run.add(backend, f"{head}lat_p50", percentile(lags, 50))
        run.add(backend, f"{head}lat_p99", percentile(lags, 99))
    else:
        run.add(backend, f"{head}stream", result["rate"])


def qt_memory(run: Run, backend: str) -> None:
    cfg = run.config
    ns = run.namespace("mem")
    env = child_env(url_for(backend, ns))
    total = max(cfg.memory_phases)
    limit = timeout_for(total)
    try:
        with workers(run, backend, ns, 0 if backend == "memory" else 1) as started:
            result = agent("qtasks_client.worker_memory",
                           {"phases": cfg.memory_phases, "window": cfg.window,
                            "pids": [c.pid for c in started], "timeout": limit},
                           env, run.log_path(ns, "producer")).result(limit + 60)
        rss = {int(k): v[0] for k, v in result["rss"].items()}
        first, last = min(cfg.memory_phases), max(cfg.memory_phases)
        run.add(backend, "rss_first", rss[first])
        run.add(backend, "rss_last", rss[last])
        run.add(backend, "rss_growth", rss[last] - rss[first])
    finally:
        clean(backend, ns)


# -- raw client measurements -----------------------------------------------------------

def _raw_module(backend: str) -> str:
    return "raw_rabbitmq" if backend == "rabbitmq" else "raw_nats"


def _raw_delete(backend: str, base: str) -> None:
    try:
        if backend == "rabbitmq":
            from benchmarks import raw_rabbitmq

            asyncio.run(raw_rabbitmq.delete(base))
        else:
            from benchmarks import raw_nats

            asyncio.run(raw_nats.delete(base))
    except Exception as exc:
        log(f"deleting raw objects {base} failed: {type(exc).__name__}: {exc}")
    clean(backend, base)


def raw_publish_and_consume(run: Run, backend: str) -> None:
    """Publish-only rate (nobody consuming), then publish with one consumer peer: the
    one-way end-to-end rate, first publish to last ack."""
    cfg = run.config
    mod = _raw_module(backend)
    env = child_env(None)
    limit = timeout_for(cfg.tasks)
    base = run.namespace("rpub")
    try:
        result = agent(f"{mod}.client_publish",
                       {"base": base, "n": cfg.tasks, "window": cfg.window, "timeout": limit},
                       env, run.log_path(base, "client")).result(limit + 30)
        run.add(backend, "raw_publish", result["rate"])
    finally:
        _raw_delete(backend, base)
    base = run.namespace("rone")
    peer: Child | None = None
    try:
        peer = agent(f"{mod}.peer_consume",
                     {"base": base, "n": cfg.tasks, "prefetch": cfg.prefetch, "timeout": limit},
                     env, run.log_path(base, "peer"))
        peer.wait_ready(60)
        result = agent(f"{mod}.client_publish",
                       {"base": base, "n": cfg.tasks, "window": cfg.window, "timeout": limit},
                       env, run.log_path(base, "client")).result(limit + 30)
        done = peer.result(limit + 30)
        run.add(backend, "raw_oneway", cfg.tasks / (done["last"] - result["t0"]))
    finally:
        if peer is not None:
            peer.stop()
        _raw_delete(backend, base)


def raw_rtt(run: Run, backend: str, count: int) -> None:
    cfg = run.config
    mod = _raw_module(backend)
    env = child_env(None)
    limit = timeout_for(cfg.tasks)
    base = run.namespace(f"rrt{count}")
    peers: list[Child] = []
    try:
        for i in range(count):
            peers.append(agent(f"{mod}.peer_reply",
                               {"base": base, "prefetch": cfg.prefetch, "timeout": limit + 60},
                               env, run.log_path(base, f"peer{i}")))
        for peer in peers:
            peer.wait_ready(60)
        # Warm up like the QTasks producer does, then measure.
        warm = min(500, cfg.tasks)
        agent(f"{mod}.client_rtt", {"base": base, "n": warm, "window": cfg.window,
                                    "timeout": limit},
              env, run.log_path(base, "warmup")).result(limit + 30)
        result = agent(f"{mod}.client_rtt",
                       {"base": base, "n": cfg.tasks, "window": cfg.window, "timeout": limit},
                       env, run.log_path(base, "client")).result(limit + 30)
        run.add(backend, f"raw_rtt_w{count}", result["rate"])
    finally:
        for peer in peers:
            peer.stop()
        _raw_delete(backend, base)


def raw_stream(run: Run, backend: str, latency: bool) -> None:
    cfg = run.config
    mod = _raw_module(backend)
    env = child_env(None)
    n = cfg.paced_values if latency else cfg.stream_values
    limit = n / cfg.paced_rate + 60 if latency else timeout_for(n, 200)
    base = run.namespace("rlat" if latency else "rstr")
    client: Child | None = None
    peer: Child | None = None
    try:
        client = agent(f"{mod}.client_stream",
                       {"base": base, "n": n, "timeout": limit, "latency": latency},
                       env, run.log_path(base, "client"))
        client.wait_ready(60)
        peer = agent(f"{mod}.peer_stream",
                     {"base": base, "n": n, "rate": cfg.paced_rate if latency else None,
                      "window": cfg.window, "timeout": limit},
                     env, run.log_path(base, "peer"))
        result = client.result(limit + 30)
        peer.result(60)
        _stream_figures(run, backend, "raw_", result, n, latency)
    finally:
        for child in (client, peer):
            if child is not None:
                child.stop()
        _raw_delete(backend, base)


# -- the run ---------------------------------------------------------------------------

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
                step(run, backend, ["raw_stream"], partial(raw_stream, run, backend, False))
            step(run, backend, ["stream"], partial(qt_stream, run, backend, False))
            if raw:
                step(run, backend, ["raw_lat_p50", "raw_lat_p99"],
                     partial(raw_stream, run, backend, True))
            step(run, backend, ["lat_p50", "lat_p99"], partial(qt_stream, run, backend, True))
        if "memory" in groups and r < cfg.memory_rounds:
            step(run, backend, ["rss_first", "rss_last", "rss_growth"],
                 partial(qt_memory, run, backend))


# -- the table ---------------------------------------------------------------------------

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
    rows = [
        Row(f"enqueue, {n} add_task, {cfg.window} in flight, no worker", "enqueue",
            "raw_publish", "publish, confirms, pipelined"),
    ]
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
    digits = 2 if unit == " ms" else 1 if unit == " MB" else 0
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


def parse(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="memory,rabbitmq,nats")
    p.add_argument("--tasks", type=int, default=10_000, help="N no-op tasks per e2e figure")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=int, default=500, help="add_task/publishes in flight")
    p.add_argument("--workers", default="1,2", help="worker process counts to measure")
    p.add_argument("--stream-values", type=int, default=100_000)
    p.add_argument("--paced-values", type=int, default=5_000)
    p.add_argument("--paced-rate", type=float, default=1_000.0)
    p.add_argument("--memory-tasks", default="10000,200000",
                   help="cumulative task counts at which worker RSS is read")
    p.add_argument("--memory-rounds", type=int, default=None,
                   help="rounds of the (long) memory measurement (default: --rounds)")
    p.add_argument("--concurrency", type=int, default=100,
                   help="raw consumers' prefetch and QTasks workers' --concurrency "
                        "(100 = the worker's default)")
    p.add_argument("--only", default=",".join(GROUPS), help=f"groups: {','.join(GROUPS)}")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 1,000 tasks, 10,000 partials, 1,000/5,000 RSS")
    p.add_argument("--profile", type=Path, default=None,
                   help="directory: py-spy the worker and the producer of the first "
                        "1-worker end-to-end run of each backend")
    p.add_argument("--quiet-cpu", type=float, default=0.0, metavar="PCT",
                   help="before each step wait (up to 120 s) until CPU use is under PCT%%")
    p.add_argument("--logs", type=Path, default=None, help="child process logs directory")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    a = p.parse_args(argv)
    if a.quick:
        a.tasks, a.rounds, a.stream_values, a.paced_values = 1_000, 1, 10_000, 1_000
        a.memory_tasks = "1000,5000"
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        p.error(f"unknown backends {sorted(unknown)}; known: {', '.join(BACKENDS)}")
    groups = [g.strip() for g in a.only.split(",") if g.strip()]
    if set(groups) - set(GROUPS):
        p.error(f"unknown groups; known: {', '.join(GROUPS)}")
    phases = sorted(int(x) for x in a.memory_tasks.split(","))
    if a.rounds < 1 or a.tasks < 1 or len(phases) < 2:
        p.error("--rounds and --tasks must be positive; --memory-tasks needs two counts")
    logs = a.logs or Path("/tmp") / f"qtasks-bench-{time.strftime('%Y%m%d-%H%M%S')}"
    logs.mkdir(parents=True, exist_ok=True)
    if a.profile is not None:
        a.profile.mkdir(parents=True, exist_ok=True)
    return Config(backends=backends, tasks=a.tasks, rounds=a.rounds, window=a.window,
                  workers=[int(x) for x in a.workers.split(",")],
                  stream_values=a.stream_values, paced_values=a.paced_values,
                  paced_rate=a.paced_rate, memory_phases=phases,
                  memory_rounds=a.rounds if a.memory_rounds is None else a.memory_rounds,
                  prefetch=a.concurrency, groups=groups, profile=a.profile,
                  quiet_cpu=a.quiet_cpu, logs=logs,
                  json_out=a.json)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
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
        f"command: {command}" + (f" (BENCH_AMQP_OPTIONS={AMQP_OPTIONS})" if AMQP_OPTIONS else ""),
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
