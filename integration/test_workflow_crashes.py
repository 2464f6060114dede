"""Workflows whose workers are killed (SIGKILL) at the worst moments, on RabbitMQ and on
NATS, with real CLI worker processes (``integration/workflow_apps.py``): mid-chain, at
the chord's join, mid-fan-out. The verdict each time: the workflow completes with the
right result, every task has one outcome (its final, perhaps published again, is the
same final), and the steps after the crash ran once (counted from marker files)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from integration import nats_support, rabbitmq_support
from integration.processes import WorkerProcess, workers
from integration.workflow_apps import GENERATOR_QUEUE
from qtasks import QueueTasks, ResultEvent, WorkflowHandle, chord, group
from tests.contract.support import Drain

APP = "integration.workflow_apps:app"
DEADLINE = 60.0
#: NATS hands a dead worker's message out again after ``ack_wait``; short here.
ACK_WAIT = 1.5


@dataclass
class Deployment:
    """One broker's namespace for one test, a producer on it, what a worker needs."""

    broker: str
    env: dict[str, str]
    producer: QueueTasks
    directory: Path
    finals: Drain

    def signature(self, name: str, args: tuple[Any, ...] = (), **kwargs: Any) -> Any:
        return self.producer.signature(name, args, kwargs)

    def runs(self, label: str) -> list[int]:
        """The pids of the runs of ``label`` so far."""
        return [int(p.read_text()) for p in sorted(self.directory.glob(f"run-{label}-*"))]

    async def one_outcome_each(self, handle: WorkflowHandle) -> None:
        """Every task of the workflow ended once: whatever finals a listener heard for
        it (a redelivery may publish the stored one again) are the same final."""
        seen: dict[str, set[tuple[Any, ...]]] = {}
        async with asyncio.timeout(DEADLINE):
            while not set(handle.tasks) <= set(seen):
                event: ResultEvent = await self.finals.next()
                if event.kind == "final":
                    seen.setdefault(event.id, set()).add(
                        (event.status, event.worker, event.finished_at))
        for task_id, task in handle.tasks.items():
            assert len(seen[task_id]) == 1, (task.name, seen[task_id])


@pytest.fixture(params=["rabbitmq", "nats"])
async def deployment(request: pytest.FixtureRequest, prefix: str,
                     tmp_path: Path) -> AsyncIterator[Deployment]:
    if request.param == "rabbitmq":
        base = request.getfixturevalue("rabbitmq_url")
        url = rabbitmq_support.url_with(base, prefix=prefix)
        cleanup = rabbitmq_support.delete_namespace
    else:
        base = request.getfixturevalue("nats_url")
        url = f"{base}?prefix={prefix}&ack_wait={ACK_WAIT}"
        cleanup = nats_support.delete_namespace
    env = {"QTASKS_BROKER_URL": url, "QTASKS_RESULTS_URL": url,
           "QTASKS_TEST_DIR": str(tmp_path), "QTASKS_LOG_LEVEL": "INFO"}
    producer = QueueTasks(broker=url, results=url, embedded_worker=False)
    try:
        await producer.start()
        finals = Drain(await producer.subscribe("*"))
        yield Deployment(request.param, env, producer, tmp_path, finals)
        await finals.close()
    finally:
        await producer.close()
        await cleanup(base, prefix)


async def first_file(directory: Path, pattern: str) -> Path:
    """The first file matching ``pattern`` (a marker a worker process writes)."""
    async with asyncio.timeout(DEADLINE):
        while not (found := sorted(directory.glob(pattern))):  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.02)  # the file system has no event to wait on; bounded
    return found[0]


async def test_a_worker_killed_mid_chain_loses_no_step(deployment: Deployment) -> None:
    """Two workers; the one running the chain's middle step is killed while it runs: the
    other runs that step again and the chain goes on, each later step once."""
    sig = deployment.signature
    flow = (sig("flow_step", (0, "s0")) | sig("flow_step", label="s1", seconds=3 * ACK_WAIT)
            | sig("flow_step", label="s2"))
    with workers(deployment.env, count=2, concurrency=1, app=APP) as procs:
        handle = await flow.add_task()
        victim = int((await first_file(deployment.directory, "run-s1-*")).read_text())
        os.kill(victim, signal.SIGKILL)
        last = await handle.wait(DEADLINE)
        survivor = next(p.pid for p in procs if p.pid != victim)
    assert last.returning == 3
    assert len(deployment.runs("s0")) == 1
    assert sorted(deployment.runs("s1")) == sorted([victim, survivor])
    assert deployment.runs("s2") == [survivor]
    await deployment.one_outcome_each(handle)


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_worker_killed_at_the_chord_join_starts_the_body_once(
        deployment: Deployment, when: str) -> None:
    """Three workers; members end one by one, and the worker of the last, the one that
    completes the group, dies just ``before`` or just ``after`` it publishes the body (its
    final is durable, its message not acked): the member's redelivery finds its final and
    publishes the body (again), which runs once."""
    sig, size = deployment.signature, 4
    flow = chord(group(sig("flow_member", (i, 0.3)) for i in range(size)), sig("flow_body"))
    env = {**deployment.env, "QTASKS_TEST_DIE": f"{when}:flow_body"}
    with workers(env, count=3, concurrency=2, app=APP):
        handle = await flow.add_task()
        body = await handle.wait(DEADLINE)
    assert body.returning == sum(i * i for i in range(size))
    assert (deployment.directory / "died").exists()  # a worker did die there
    assert len(deployment.runs("body")) == 1
    assert all(len(deployment.runs(f"member{i}")) == 1 for i in range(size))
    await deployment.one_outcome_each(handle)


async def test_a_worker_killed_mid_fan_out_starts_no_item_twice(
        deployment: Deployment) -> None:
    """The generator runs on a worker of its own; killed after three yields, a new one
    runs it again from the start: the items it yields again are the same tasks, run
    once each by the item worker, and the sum runs once."""
    sig, count = deployment.signature, 6
    flow = (deployment.producer.signature("flow_chunks", (count, 0.3), queue=GENERATOR_QUEUE)
            | sig("flow_item").each() | sig("flow_body"))
    env = deployment.env
    with workers(env, count=1, concurrency=4, queues="default", app=APP):
        source = WorkerProcess(env, concurrency=1, queues=GENERATOR_QUEUE, app=APP)
        try:
            source.wait_ready()
            handle = await flow.add_task()
            await first_file(deployment.directory, "yielded-2-*")
        finally:
            source.kill()
        with workers(env, count=1, concurrency=1, queues=GENERATOR_QUEUE, app=APP) as again:
            body = await handle.wait(DEADLINE)
    assert body.returning == sum(i * 10 for i in range(count))
    assert sorted(deployment.runs("chunks")) == sorted([source.pid, again[0].pid])
    assert [len(deployment.runs(f"item{i}")) for i in range(count)] == [1] * count
    assert len(deployment.runs("body")) == 1
    await deployment.one_outcome_each(handle)
