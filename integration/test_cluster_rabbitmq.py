"""A real 3-node RabbitMQ cluster (quorum queues, the result stream replicated) under
load, with the URL naming every node: a node killed (``kill -9``) mid-stream and
restarted after a pause, the leader of the task queue or the node the producer is
connected to; a node frozen (``SIGSTOP``) for 10 s. The verdicts are in
integration/cluster_load.py; the stall and duplicate figures are printed (``-s``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from integration.cluster_load import Figures, check_verdicts, run_load
from integration.conftest import require_tools
from integration.processes import workers
from integration.rabbitmq_cluster import ClusterNode, RabbitCluster, rabbit_cluster
from qtasks import QueueTasks
from qtasks.brokers.rabbitmq import RabbitMQBroker
from qtasks.errors import BrokerUnavailableError

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

#: How long a killed node stays down before it is started again.
DOWN = 5.0
FROZEN = 10.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    require_tools("rabbitmq-server", "rabbitmqctl")
    with rabbit_cluster() as formed:
        yield formed


@pytest.fixture
def healthy(cluster: RabbitCluster) -> RabbitCluster:
    """Every node running (a test that failed half-way may have left one down)."""
    for node in cluster.nodes:
        node.thaw()
        if node.pid is None:
            node.start()
    return cluster


def url_of(cluster: RabbitCluster, prefix: str) -> str:
    return cluster.url(prefix=prefix, queue_type="quorum", heartbeat="5")


@contextlib.asynccontextmanager
async def apps(url: str) -> AsyncIterator[tuple[QueueTasks, QueueTasks]]:
    """The producer, and a reader app that never submitted anything."""
    made = [QueueTasks(broker=url, results=url, embedded_worker=False) for _ in range(2)]
    try:
        yield made[0], made[1]
    finally:
        for app in made:
            with contextlib.suppress(Exception):
                await app.close()


async def scenario(cluster: RabbitCluster, prefix: str, tmp_path: Path, name: str,
                   fault: Callable[[QueueTasks], Awaitable[None]]) -> Figures:
    url = url_of(cluster, prefix)
    env = {"QTASKS_BROKER_URL": url, "QTASKS_RESULTS_URL": url,
           "QTASKS_TEST_DIR": str(tmp_path), "QTASKS_LOG_LEVEL": "INFO"}
    async with apps(url) as (producer, reader):
        await producer.start()
        await producer.broker.declare(["default"])
        with workers(env, count=2, concurrency=20) as procs:
            figures = await run_load(producer, lambda: fault(producer), procs)
            print("\n" + figures.line(name))
            await check_verdicts(figures, reader, procs)
    return figures


async def kill_and_restart(node: ClusterNode) -> None:
    await asyncio.to_thread(node.kill)
    await asyncio.sleep(DOWN)
    await asyncio.to_thread(node.start)


def producer_node(cluster: RabbitCluster, producer: QueueTasks) -> ClusterNode:
    broker = producer.broker
    assert isinstance(broker, RabbitMQBroker)
    return cluster.node_of_connection(broker.connection_name)


async def test_kill_the_task_queue_leader_mid_stream(healthy: RabbitCluster, prefix: str,
                                                     tmp_path: Path) -> None:
    async def fault(_producer: QueueTasks) -> None:
        await kill_and_restart(
            await asyncio.to_thread(healthy.queue_leader, f"{prefix}.q.default"))

    await scenario(healthy, prefix, tmp_path, "RabbitMQ kill -9 of the task queue's leader",
                   fault)


async def test_kill_the_node_the_producer_is_connected_to(healthy: RabbitCluster, prefix: str,
                                                          tmp_path: Path) -> None:
    async def fault(producer: QueueTasks) -> None:
        await kill_and_restart(await asyncio.to_thread(producer_node, healthy, producer))

    figures = await scenario(healthy, prefix, tmp_path,
                             "RabbitMQ kill -9 of the producer's node", fault)
    assert figures.stall < 3.0, f"stalled {figures.stall:.2f} s"


async def test_freeze_a_node_for_10_s(healthy: RabbitCluster, prefix: str,
                                      tmp_path: Path) -> None:
    async def fault(_producer: QueueTasks) -> None:
        node = await asyncio.to_thread(healthy.queue_leader, f"{prefix}.q.default")
        node.freeze()
        try:
            await asyncio.sleep(FROZEN)
        finally:
            node.thaw()

    await scenario(healthy, prefix, tmp_path, "RabbitMQ SIGSTOP of the leader for 10 s",
                   fault)


async def test_start_up_waits_for_a_majority_then_names_the_cause(
        healthy: RabbitCluster, prefix: str) -> None:
    """With two of three nodes down, a new quorum queue cannot be declared: the broker's
    start-up retries it (RabbitMQ's ``cluster_not_formed``, or a declaration that never
    returns), succeeds once a second node is back, and without it fails with an error
    that names the cause."""
    down = healthy.nodes[1:]
    for node in down:
        await asyncio.to_thread(node.kill)
    alone = healthy.nodes[0]
    url = f"{alone.url}?prefix={prefix}&queue_type=quorum&connect_timeout=4"
    broker = RabbitMQBroker(url)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match="majority") as caught:
        await broker.declare(["default"])
    assert time.monotonic() - started < 4 + 12  # connect_timeout + one declaration try
    assert "guest" not in str(caught.value).replace("guest:***", "")
    await broker.close()

    waiting = RabbitMQBroker(f"{alone.url}?prefix={prefix}&queue_type=quorum&"
                             "connect_timeout=120")
    declared = asyncio.ensure_future(waiting.declare(["default"]))
    try:
        await asyncio.to_thread(down[0].start)
        async with asyncio.timeout(60):
            await declared
        assert healthy.queue_leader(f"{prefix}.q.default") in (alone, down[0])
    finally:
        declared.cancel()
        await waiting.close()
