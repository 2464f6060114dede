"""The harness's configuration (its command line) and the record of one run: every
figure of every round, and why a step failed."""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import AMQP_URL, NATS_URL, listening_pids

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


def broker_pids(backend: str) -> list[int]:
    """The broker's processes (those listening on its URL's port), for CPU per task."""
    if backend == "memory":
        return []
    url = urllib.parse.urlsplit(AMQP_URL if backend == "rabbitmq" else NATS_URL)
    return listening_pids(url.port or (5672 if backend == "rabbitmq" else 4222))


def timeout_for(n: int, floor_rate: float = 150.0) -> float:
    """A bound for a step of ``n`` messages: generous, but a hang ends."""
    return 60.0 + n / floor_rate


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse(argv: list[str] | None, description: str = "") -> Config:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=description,
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


