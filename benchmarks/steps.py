"""The measurements: each step starts its processes under its own broker namespace,
records its figures in the run, and deletes the namespace afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

from benchmarks import cleanup, procs
from benchmarks.config import Run, broker_pids, log, timeout_for, url_for
from benchmarks.procs import Child, agent, child_env, worker

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


def add_cpu(run: Run, backend: str, suffix: str, used: dict[str, float], n: int,
            head: str = "") -> None:
    """CPU microseconds per task of each role (``cpu_worker_w1``, ``raw_cpu_consumer_oneway``
    …) from the CPU seconds a step measured over ``n`` tasks."""
    for role, seconds in used.items():
        run.add(backend, f"{head}cpu_{role}{suffix}", seconds / n * 1e6)


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
    kwargs: dict[str, Any] = {"n": cfg.tasks, "window": cfg.window,
                              "warmup": min(500, cfg.tasks), "timeout": timeout_for(cfg.tasks)}
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
            kwargs["cpu"] = {"worker": [c.pid for c in started], "broker": broker_pids(backend)}
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
        add_cpu(run, backend, f"_w{count}", result["cpu"], cfg.tasks)
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
    """Paced: yield-to-receipt p50/p99. Burst: the rate, the first partial's delay from
    its yield, and yield-to-receipt p50/p99/max over the whole burst."""
    if result["received"] != n:
        raise RuntimeError(f"received {result['received']} of {n} messages")
    lags = result["lags"]
    if latency:
        run.add(backend, f"{head}lat_p50", lags["p50"])
        run.add(backend, f"{head}lat_p99", lags["p99"])
    else:
        run.add(backend, f"{head}stream", result["rate"])
        for figure in ("first", "p50", "p99", "max"):
            run.add(backend, f"{head}burst_{figure}", lags[figure])


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
                       {"base": base, "n": cfg.tasks, "window": cfg.window, "timeout": limit,
                        "cpu": {"broker": broker_pids(backend)}},
                       env, run.log_path(base, "client")).result(limit + 30)
        run.add(backend, "raw_publish", result["rate"])
        add_cpu(run, backend, "_publish", result["cpu"], cfg.tasks, "raw_")
    finally:
        _raw_delete(backend, base)
    base = run.namespace("rone")
    peer: Child | None = None
    try:
        peer = agent(f"{mod}.peer_consume",
                     {"base": base, "n": cfg.tasks, "prefetch": cfg.prefetch, "timeout": limit,
                      "cpu": {"broker": broker_pids(backend)}},
                     env, run.log_path(base, "peer"))
        peer.wait_ready(60)
        result = agent(f"{mod}.client_publish",
                       {"base": base, "n": cfg.tasks, "window": cfg.window, "timeout": limit},
                       env, run.log_path(base, "client")).result(limit + 30)
        done = peer.result(limit + 30)
        run.add(backend, "raw_oneway", cfg.tasks / (done["last"] - result["t0"]))
        add_cpu(run, backend, "_oneway", done["cpu"], cfg.tasks, "raw_")
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
                       {"base": base, "n": n, "timeout": limit, "latency": True},
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
