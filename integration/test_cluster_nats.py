"""A real 3-server NATS cluster (JetStream, every stream R3) under load, with the URL
naming every server: a server killed (``kill -9``) mid-stream and restarted after a
pause, the leader of the task stream or the server the producer is connected to; a
server frozen (``SIGSTOP``) for 10 s. The verdicts are in integration/cluster_load.py;
the stall and duplicate figures are printed (``-s``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from integration.cluster_load import Figures, check_verdicts, run_load
from integration.conftest import require_tools
from integration.nats_cluster import NatsCluster, NatsNode, nats_cluster
from integration.processes import workers
from qtasks import QueueTasks
from qtasks.brokers.nats import NatsBroker
from qtasks.errors import BrokerUnavailableError

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

DOWN = 5.0
FROZEN = 10.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[NatsCluster]:
    require_tools("/usr/sbin/nats-server")
    with nats_cluster() as formed:
        yield formed


@pytest.fixture
def healthy(cluster: NatsCluster) -> NatsCluster:
    """Every server running and the meta leader elected (a test that failed half-way
    may have left one down)."""
    for node in cluster.nodes:
        node.thaw()
        if node.proc is None:
            node.start()
    cluster.await_meta_leader()
    return cluster


def url_of(cluster: NatsCluster, prefix: str) -> str:
    return cluster.url(prefix=prefix, replicas="3")


@contextlib.asynccontextmanager
async def apps(url: str) -> AsyncIterator[tuple[QueueTasks, QueueTasks]]:
    made = [QueueTasks(broker=url, results=url, embedded_worker=False) for _ in range(2)]
    try:
        yield made[0], made[1]
    finally:
        for app in made:
            with contextlib.suppress(Exception):
                await app.close()


async def scenario(cluster: NatsCluster, prefix: str, tmp_path: Path, name: str,
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


async def kill_and_restart(node: NatsNode) -> None:
    await asyncio.to_thread(node.kill)
    await asyncio.sleep(DOWN)
    await asyncio.to_thread(node.start)


def producer_node(cluster: NatsCluster, producer: QueueTasks) -> NatsNode:
    broker = producer.broker
    assert isinstance(broker, NatsBroker)
    connected = broker.conn.nc.connected_url
    assert connected is not None
    return cluster.node_of_port(connected.port or 0)


async def test_kill_the_task_stream_leader_mid_stream(healthy: NatsCluster, prefix: str,
                                                      tmp_path: Path) -> None:
    async def fault(_producer: QueueTasks) -> None:
        await kill_and_restart(await healthy.stream_leader(f"{prefix}_TASKS"))

    await scenario(healthy, prefix, tmp_path, "NATS kill -9 of the task stream's leader",
                   fault)


async def test_kill_the_server_the_producer_is_connected_to(healthy: NatsCluster,
                                                            prefix: str,
                                                            tmp_path: Path) -> None:
    async def fault(producer: QueueTasks) -> None:
        await kill_and_restart(producer_node(healthy, producer))

    await scenario(healthy, prefix, tmp_path, "NATS kill -9 of the producer's server", fault)


async def test_freeze_a_server_for_10_s(healthy: NatsCluster, prefix: str,
                                        tmp_path: Path) -> None:
    async def fault(_producer: QueueTasks) -> None:
        node = await healthy.stream_leader(f"{prefix}_TASKS")
        node.freeze()
        try:
            await asyncio.sleep(FROZEN)
        finally:
            node.thaw()

    await scenario(healthy, prefix, tmp_path, "NATS SIGSTOP of the task stream's leader "
                   "for 10 s", fault)


async def test_start_up_waits_for_placement_then_names_the_cause(prefix: str) -> None:
    """A cluster forming: two of its three servers up, the third not yet. An R3 stream
    has no room (``no suitable peers for placement``): the start-up retries it until the
    third server is up, and without it fails with an error that says what it means."""
    require_tools("/usr/sbin/nats-server")
    forming = NatsCluster()
    try:
        for node in forming.nodes[:2]:
            node.spawn()
        for node in forming.nodes[:2]:
            node.await_up()
        await asyncio.to_thread(forming.await_meta_leader, 60.0, 2)  # of the two
        running = ",".join(node.url for node in forming.nodes[:2])
        broker = NatsBroker(f"{running}?prefix={prefix}&replicas=3&connect_timeout=5")
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError,
                           match=f"{prefix}_TASKS.*too few JetStream servers"):
            await broker.start()
        assert 5 <= time.monotonic() - started < 5 + 10  # retried, then given up
        await broker.close()

        waiting = NatsBroker(f"{running}?prefix={prefix}&replicas=3&connect_timeout=120")
        starting = asyncio.ensure_future(waiting.start())
        try:
            await asyncio.sleep(1)  # a retry or two of the placement (no event to wait on)
            assert not starting.done()
            await asyncio.to_thread(forming.nodes[2].start)
            async with asyncio.timeout(60):
                await starting
            await waiting.declare(["default"])
        finally:
            starting.cancel()
            await waiting.close()
    finally:
        forming.stop()
