"""What only the RabbitMQ backend does: its options and names, plain-AMQP producers and
listeners, delay buckets, redelivery limits, dead-letter operations, and settling or
watching across a connection that the server closed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.exceptions import ChannelInvalidStateError
from aiormq import spec

from integration.conftest import require_tools
from integration.rabbitmq_node import private_rabbitmq
from integration.rabbitmq_support import (
    Namespace,
    close_connection,
    connection_figure,
    consumer_prefetch,
    max_message_size,
    open_namespace,
    publish_raw,
    queue_arguments,
    queue_figure,
    queues_of,
    until_queue_figure,
    url_with,
)
from qtasks import (
    BrokerUnavailableError,
    ConfigurationError,
    QTasksError,
    QueueTasks,
    TaskMessage,
    TaskStatus,
)
from qtasks.brokers.rabbitmq import RabbitMQBroker, RabbitMQDelivery
from qtasks.interfaces import dead_letter_ref
from qtasks.protocol import ResultEvent, encode, uuid7
from qtasks.results.rabbitmq import RabbitMQResultStore
from tests.contract import Drain, check_copies_join_the_run, running_worker, three_readers

DEADLINE = 30.0


@pytest.fixture
async def namespace(rabbitmq_url: str, prefix: str, tmp_path: Path) -> AsyncIterator[Namespace]:
    async with open_namespace(rabbitmq_url, prefix, tmp_path) as ns:
        yield ns


def _alive(delivery: RabbitMQDelivery) -> bool:
    try:
        return not delivery.message.channel.is_closed
    except ChannelInvalidStateError:  # what aio-pika says of a closed channel
        return False


def worker_app(ns: Namespace, **options: Any) -> QueueTasks:
    """An in-process worker's app with a generator task."""
    app = QueueTasks(broker=RabbitMQBroker(ns.url, **options),
                     results=RabbitMQResultStore(ns.url), embedded_worker=False)
    ns.apps.append(app)

    @app.task(name="squares")
    async def squares(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i * i

    @app.task(name="add")
    async def add(a: int, b: int) -> int:
        return a + b

    return app


async def test_options_come_from_the_url_and_keywords() -> None:
    broker = RabbitMQBroker("amqp://u:pw@h:5673/vh?prefix=app&queue_type=quorum&heartbeat=30",
                            max_priority=5)
    assert broker.settings.prefix == "app" and broker.settings.max_priority == 5
    assert broker.settings.connection_url == "amqp://u:pw@h:5673/vh?heartbeat=30&" \
        "reconnect_interval=1.0"
    assert "pw" not in repr(broker) and "***" in broker.url
    assert not broker.supports_priority and RabbitMQBroker.supports_priority
    app = QueueTasks(broker=broker, results="memory://", embedded_worker=False)
    with pytest.raises(ConfigurationError, match="priorities"):
        app.task(name="urgent", priority=3)(lambda: None)
    with pytest.raises(ConfigurationError, match="priorities"):
        await app.add_task("anything", priority=1)
    with pytest.raises(ConfigurationError, match="unknown RabbitMQ option"):
        RabbitMQBroker("amqp://h/", prefx="typo")
    with pytest.raises(ConfigurationError, match="queue_type"):
        RabbitMQResultStore("amqp://h/?queue_type=mirrored")
    assert RabbitMQResultStore("amqp://h/?ttl=60").ttl == 60.0


@pytest.mark.parametrize("query", ["queue_typ=quorum", "prefetchs=2", "timeout=5",
                                   "fail_fast=0"])
async def test_a_url_option_nobody_reads_is_refused_not_ignored(query: str) -> None:
    """aio-pika ignores query keys it does not know: a typo would leave the defaults in
    silence (``timeout`` too: aiormq 7 parses it and never uses it; ``fail_fast`` off
    would bypass ``connect_timeout``)."""
    key = query.partition("=")[0]
    for backend in (RabbitMQBroker, RabbitMQResultStore):
        with pytest.raises(ConfigurationError) as raised:
            backend(f"amqp://h/?prefix=app&{query}")
        message = str(raised.value)
        assert f"unknown RabbitMQ URL option {key!r}" in message
        assert "'queue_type'" in message and "'heartbeat'" in message  # the known ones


def test_a_misspelt_option_names_the_one_meant() -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'queue_type'"):
        QueueTasks(broker="amqp://h/?queue_typ=quorum", embedded_worker=False)


@pytest.mark.parametrize("query", ["heartbeat=3O", "heartbeat=65535", "no_verify_ssl=false",
                                   "auth=plane", "cadata=not*base64",
                                   "cafile=/nonexistent/ca.pem", "capath=/nonexistent"])
async def test_a_connection_option_with_a_value_aiormq_would_misread_is_refused(
        query: str) -> None:
    """aiormq reads ``heartbeat=3O`` or ``65535`` as 0 (heartbeats off) and any
    ``no_verify_ssl`` but "0" as "do not verify the server"; bad ``cadata`` makes
    aio-pika's reconnect loop spin forever; a missing TLS file would be retried as a
    network fault: each is refused at once instead."""
    with pytest.raises(ConfigurationError, match=f"URL option {query.partition('=')[0]}="):
        RabbitMQBroker(f"amqp://h/?{query}")


async def test_connection_options_reach_the_connection(namespace: Namespace) -> None:
    """``heartbeat`` goes to aio-pika (the server shows the negotiated value) and ``name``
    leads the connection's name (aiormq's own use of it would be overridden)."""
    broker = RabbitMQBroker(url_with(namespace.url, heartbeat=17, name="billing"))
    try:
        await broker.start()
        assert broker.connection_name.startswith(f"billing {namespace.prefix} broker ")
        heartbeat = await asyncio.to_thread(connection_figure, broker.connection_name,
                                            "timeout")
        assert heartbeat == "17"
    finally:
        await broker.close()


async def test_the_prefetch_option_caps_what_rabbitmq_hands_a_worker(
        namespace: Namespace) -> None:
    """``?prefetch=2``: a consumer started with a larger prefetch (the worker's
    concurrency, 5 here) has at most 2 unsettled deliveries, on the server's side."""
    broker = RabbitMQBroker(url_with(namespace.url, prefetch=2))
    queue = namespace.settings.work_queue("default")
    try:
        await broker.start()
        bodies = await _published(broker, 5)
        deliveries = Drain(broker.consume(["default"], prefetch=5))
        first, second = await deliveries.next(), await deliveries.next()
        assert await deliveries.nothing_within(0.5)
        assert await asyncio.to_thread(consumer_prefetch, queue) == [2]
        assert await asyncio.to_thread(queue_figure, queue, "messages_unacknowledged") == 2
        assert await asyncio.to_thread(queue_figure, queue, "messages_ready") == 3
        received = [first, second]
        for _ in range(3):
            await received[-2].ack()  # one settled: one more comes
            received.append(await deliveries.next())
        for delivery in received[-2:]:
            await delivery.ack()
        assert await deliveries.nothing_within(0.3)
        await deliveries.close()
    finally:
        await broker.close()
    assert [d.body for d in received] == bodies


async def test_a_prefetch_above_the_concurrency_buffers_without_running_more(
        namespace: Namespace) -> None:
    """``prefetch=4`` with a consumer of prefetch 1 (concurrency 1): RabbitMQ hands 4
    ahead (Celery's prefetch), the consumer still yields one unsettled delivery at a
    time, and closing it gives the buffered ones back."""
    broker = RabbitMQBroker(namespace.url, prefetch=4)
    queue = namespace.settings.work_queue("default")
    try:
        await broker.start()
        bodies = await _published(broker, 5)
        deliveries = Drain(broker.consume(["default"], prefetch=1))
        first = await deliveries.next()
        await until_queue_figure(queue, "messages_unacknowledged", 4)
        assert await asyncio.to_thread(consumer_prefetch, queue) == [4]
        assert await deliveries.nothing_within(0.5)  # one at a time all the same
        await first.ack()
        second = await deliveries.next()
        assert await deliveries.nothing_within(0.3)
        await second.ack()
        await deliveries.close()
        await until_queue_figure(queue, "messages_ready", 3)  # the 3 buffered went back
    finally:
        await broker.close()
    assert [first.body, second.body] == bodies[:2]


async def test_the_result_stream_keeps_results_for_the_ttl(namespace: Namespace) -> None:
    """``ttl`` is the stream's ``x-max-age`` (rounded up to whole seconds), and a store
    with another ttl on the same prefix is refused, not silently given the old one."""
    store = RabbitMQResultStore(namespace.url, ttl=90.5)
    try:
        await store.start()
        arguments = await asyncio.to_thread(queue_arguments, namespace.settings.stream_queue)
        assert arguments["x-max-age"] == "91s" and arguments["x-queue-type"] == "stream"
    finally:
        await store.close()
    other = RabbitMQResultStore(namespace.url, ttl=3600)
    try:
        with pytest.raises(ConfigurationError, match="x-max-age") as raised:
            await other.start()
        assert repr(namespace.prefix) in str(raised.value)
    finally:
        await other.close()


async def test_an_unreachable_broker_is_named_without_its_password() -> None:
    broker = RabbitMQBroker("amqp://guest:s3cret@127.0.0.1:1/?connect_timeout=0.5")
    with pytest.raises(BrokerUnavailableError) as raised:
        await broker.start()
    assert "127.0.0.1:1" in str(raised.value) and "s3cret" not in str(raised.value)


async def test_a_producer_and_a_listener_that_speak_only_amqp(namespace: Namespace) -> None:
    """Nothing but the names and properties in docs/rabbitmq.md: a foreign producer
    enqueues a task, a foreign listener follows its partials."""
    prefix = namespace.prefix
    connection = await aio_pika.connect(namespace.base_url)
    try:
        channel = await connection.channel(on_return_raises=True)
        follow = await channel.declare_queue(exclusive=True)
        async with running_worker(worker_app(namespace)):
            await follow.bind(f"{prefix}.results", "squares.*")
            body = orjson.dumps({"v": 1, "id": "ext-1", "task": "squares", "args": [3]})
            tasks = await channel.get_exchange(f"{prefix}.tasks")
            await tasks.publish(aio_pika.Message(body, delivery_mode=2, message_id="ext-1"),
                                "default", mandatory=True)
            events = []
            async with follow.iterator() as messages, asyncio.timeout(DEADLINE):
                async for message in messages:
                    await message.ack()
                    assert message.correlation_id == "ext-1"
                    events.append(orjson.loads(message.body))
                    if message.type == "final":
                        break
    finally:
        await connection.close()
    assert [e["kind"] for e in events] == ["status", "partial", "partial", "partial", "final"]
    assert [e["value"] for e in events[1:4]] == [0, 1, 4]
    assert events[-1]["returning"] == [0, 1, 4]


async def test_a_delay_waits_in_a_bucket_queue_and_never_runs_early(
        namespace: Namespace) -> None:
    producer = namespace.app()
    await producer.start()
    async with running_worker(worker_app(namespace)):
        begin = time.time()
        task = await producer.add_task("add", 1, 2, delay=1.234)
        # Rounded down to 2 significant digits (1200 ms, a little less if the publish
        # took time); the worker sends what is left back through a smaller bucket.
        delay_queue = f"{namespace.prefix}.delay.default."
        buckets = [int(q.removeprefix(delay_queue)) for q in queues_of(namespace.prefix)
                   if q.startswith(delay_queue)]
        assert len(buckets) == 1 and 1100 <= buckets[0] <= 1200
        await task.wait(DEADLINE)
    assert task.returning == 3
    assert task.started_at is not None and 1.234 <= task.started_at - begin < 2.0


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_message_that_is_never_settled_ends_in_the_dead_letter_queue(
        namespace: Namespace, queue_type: str) -> None:
    """As if it crashed every worker that took it: each delivery goes back unsettled."""
    broker = RabbitMQBroker(namespace.url, queue_type=queue_type, delivery_limit=3)
    try:
        await broker.start()
        message = TaskMessage(id=uuid7(), task="crashes", queue="default")
        await broker.publish(message, encode(message))
        deliveries = Drain(broker.consume(["default"], prefetch=1))
        seen = 0
        async with asyncio.timeout(DEADLINE):
            while not await broker.dead_letters():
                if not await deliveries.nothing_within(0.2):
                    delivery = await deliveries.next()
                    seen += 1
                    assert delivery.redelivered == (seen > 1)
                    await delivery.requeue()
        await deliveries.close()
        (letter,) = await broker.dead_letters()
    finally:
        await broker.close()
    assert letter.body == encode(message) and letter.queue == "default"
    if queue_type == "classic":
        assert seen == 3 and letter.reason.startswith("redelivery limit")
    else:
        assert seen >= 3 and letter.reason == "RabbitMQ: delivery_limit"


async def test_dead_letters_can_be_listed_requeued_and_purged(namespace: Namespace) -> None:
    broker = RabbitMQBroker(namespace.url)
    try:
        await broker.start()
        message = TaskMessage(id=uuid7(), task="add", queue="default")
        await broker.publish(message, b"raw body")
        deliveries = Drain(broker.consume(["default"], prefetch=1))
        await (await deliveries.next()).dead_letter("a reason")
        (letter,) = await broker.dead_letters()
        assert (letter.ref, letter.queue, letter.body, letter.reason) == (
            dead_letter_ref(b"raw body"), "default", b"raw body", "a reason")
        assert await broker.dead_count() == 1  # the queue's own count
        assert await broker.requeue_dead(["0123456789abcdef"]) == []
        assert await broker.requeue_dead() == [letter.ref]
        again = await deliveries.next()
        assert again.body == b"raw body"
        await again.dead_letter("twice")
        await deliveries.close()
        assert [d.reason for d in await broker.dead_letters()] == ["twice"]
        assert await broker.purge_dead() == 1
        assert await broker.dead_letters() == []
        (stats,) = await broker.inspect(["default"])
        assert (stats.queue, stats.ready) == ("default", 0)
    finally:
        await broker.close()


async def test_a_body_as_large_as_rabbitmq_accepts_is_dead_lettered_whole(
        namespace: Namespace) -> None:
    """A task message of exactly the server's ``max_message_size`` (128 MiB by default),
    naming a task no worker knows: dead-lettered with its reason and every byte, and the
    worker goes on taking tasks. What dead-lettering adds (the reason and origin headers)
    travels in the content header, which RabbitMQ does not count against the limit."""
    limit = await asyncio.to_thread(max_message_size)
    head = orjson.dumps({"v": 1, "id": uuid7(), "task": "no-such-task", "args": [""]})
    body = head[:-3] + b"x" * (limit - len(head)) + head[-3:]  # the string argument padded
    assert len(body) == limit
    producer = namespace.app()
    await producer.start()
    async with running_worker(worker_app(namespace)):
        await publish_raw(namespace, body)
        async with asyncio.timeout(DEADLINE):
            while await producer.broker.dead_count() < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # counted by the server, not read: bounded
        task = await producer.add_task("add", 2, 3, timeout=DEADLINE)
        assert task.returning == 5  # the worker took the next task
    (letter,) = await producer.broker.dead_letters()
    assert (letter.queue, letter.reason) == ("default", "unknown task: 'no-such-task'")
    assert len(letter.body) == limit and letter.body == body
    assert letter.ref == dead_letter_ref(body)
    del body, letter
    assert await producer.broker.purge_dead() == 1


async def test_a_deleted_work_queue_is_declared_again_on_publish(namespace: Namespace) -> None:
    producer = namespace.app()
    await producer.start()
    await producer.broker.declare(["default"])
    connection = await aio_pika.connect(namespace.base_url)
    try:
        await (await connection.channel()).queue_delete(f"{namespace.prefix}.q.default")
    finally:
        await connection.close()
    async with running_worker(worker_app(namespace)):
        task = await producer.add_task("add", 2, 2, timeout=DEADLINE)
    assert task.returning == 4


async def test_settling_after_the_server_closed_the_channel_is_logged_and_redelivered(
        namespace: Namespace, caplog: pytest.LogCaptureFixture) -> None:
    broker = RabbitMQBroker(namespace.url)
    try:
        await broker.start()
        message = TaskMessage(id=uuid7(), task="add", queue="default")
        await broker.publish(message, encode(message))
        deliveries = Drain(broker.consume(["default"], prefetch=1))
        first = await deliveries.next()
        assert isinstance(first, RabbitMQDelivery)
        await asyncio.to_thread(close_connection, broker.connection_name)
        async with asyncio.timeout(DEADLINE):
            while _alive(first):  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # until the client has seen the close, bounded
        with caplog.at_level(logging.WARNING, "qtasks.brokers.rabbitmq"):
            await first.ack()  # must not raise, must not retry
        assert "could not ack" in caplog.text
        again = await deliveries.next()  # the consumer resumed on a new connection
        assert again.body == first.body and again.redelivered
        await again.ack()
        assert await deliveries.nothing_within(0.3)
        await deliveries.close()
        assert broker.reconnects == 1
    finally:
        await broker.close()


async def _published(broker: RabbitMQBroker, count: int) -> list[bytes]:
    bodies = []
    for _ in range(count):
        message = TaskMessage(id=uuid7(), task="add", queue="default")
        bodies.append(encode(message))
        await broker.publish(message, bodies[-1])
    return bodies


async def test_acks_batched_on_close_are_sent_and_not_redelivered(namespace: Namespace) -> None:
    """Acks go out once per loop iteration; a broker closed right after them sends them
    first."""
    broker = RabbitMQBroker(namespace.url)
    try:
        await broker.start()
        await _published(broker, 5)
        deliveries = Drain(broker.consume(["default"], prefetch=5))
        handed_out = [await deliveries.next() for _ in range(5)]
        for delivery in handed_out:
            await delivery.ack()
    finally:
        await broker.close()  # at once: the acks are not written yet
    await deliveries.close()
    again = RabbitMQBroker(namespace.url)
    try:
        await again.start()
        deliveries = Drain(again.consume(["default"], prefetch=5))
        assert await deliveries.nothing_within(0.5)
        await deliveries.close()
    finally:
        await again.close()


async def test_a_batch_of_acks_never_covers_an_unfinished_task(namespace: Namespace) -> None:
    """Deliveries 2 and 3 are acked while 1 still runs: when the connection is lost,
    RabbitMQ hands out 1 again, and only 1."""
    broker = RabbitMQBroker(namespace.url)
    try:
        await broker.start()
        bodies = await _published(broker, 3)
        deliveries = Drain(broker.consume(["default"], prefetch=3))
        first, second, third = [await deliveries.next() for _ in range(3)]
        assert [first.body, second.body, third.body] == bodies
        await second.ack()
        await third.ack()
        queue = namespace.settings.work_queue("default")
        # The server has the acks of 2 and 3.
        await until_queue_figure(queue, "messages_unacknowledged", 1)
        await asyncio.to_thread(close_connection, broker.connection_name)
        again = await deliveries.next()
        assert again.body == bodies[0] and again.redelivered
        await again.ack()
        assert await deliveries.nothing_within(0.5)
        await deliveries.close()
    finally:
        await broker.close()


async def test_watch_recovers_what_was_published_while_its_connection_was_down(
        namespace: Namespace) -> None:
    writer, reader = namespace.app(), namespace.app()
    await writer.start()
    await reader.start()
    store = reader.results_store
    assert isinstance(store, RabbitMQResultStore)
    task_id = uuid7()
    events = [ResultEvent(kind="status", id=task_id, task="t", status="running")]
    events += [ResultEvent(kind="partial", id=task_id, task="t", seq=i, value=i)
               for i in range(60)]
    events.append(ResultEvent(kind="final", id=task_id, task="t", status="success",
                              returning=list(range(60)), partials=60))
    await store.expect(task_id)  # as a submitter does before publishing
    watcher = store.watch(task_id)
    received: list[ResultEvent] = []
    async with asyncio.timeout(DEADLINE):
        for event in events[:10]:
            await writer.results_store.publish(event, encode(event), store.reply_address)
        while len(received) < 10:
            received.append(await anext(watcher))
        await asyncio.to_thread(close_connection, store.connection_name)
        for event in events[10:]:  # the reader's inbox is gone for some of these
            await writer.results_store.publish(event, encode(event), store.reply_address)
        received += [e async for e in watcher]
    # Each partial once, in order, then the final; the status may come again with the
    # recovered events (a reader's PartialOrder takes statuses again, the Task handle
    # drops the repeat).
    assert [e.seq for e in received if e.kind == "partial"] == list(range(60))
    assert [e.kind for e in received if e.kind != "partial"][-1] == "final"
    assert received[-1] == events[-1] and received[0] == events[0]
    assert {e.kind for e in received[1:-1]} <= {"status", "partial"}
    assert store.reconnects == 1
    state = await reader.get(task_id)
    assert state is not None and state.status is TaskStatus.SUCCESS


async def test_keep_alive_warns_before_the_servers_consumer_timeout(
        namespace: Namespace, caplog: pytest.LogCaptureFixture) -> None:
    broker = RabbitMQBroker(namespace.url, consumer_timeout=0.2)
    try:
        await broker.start()
        message = TaskMessage(id=uuid7(), task="long", queue="default")
        await broker.publish(message, encode(message))
        deliveries = Drain(broker.consume(["default"], prefetch=1))
        delivery = await deliveries.next()
        await delivery.keep_alive()
        assert "consumer_timeout" not in caplog.text
        await asyncio.sleep(0.2)  # the passing of time is what is tested here
        with caplog.at_level(logging.WARNING, "qtasks.brokers.rabbitmq"):
            await delivery.keep_alive()
            await delivery.keep_alive()  # once
        assert caplog.text.count("has been held") == 1 and "consumer_timeout" in caplog.text
        await delivery.ack()
        await deliveries.close()
    finally:
        await broker.close()


async def test_the_consumer_timeout_warning_counts_the_time_in_the_prefetch_buffer(
        namespace: Namespace, caplog: pytest.LogCaptureFixture) -> None:
    """RabbitMQ's ``consumer_timeout`` runs from the delivery, not from the hand-out: a
    task that waited in the buffer (``prefetch`` above the concurrency) is warned about
    as soon as it starts if it waited past 80 % of it."""
    broker = RabbitMQBroker(namespace.url, prefetch=2, consumer_timeout=0.5)
    queue = namespace.settings.work_queue("default")
    try:
        await broker.start()
        await _published(broker, 2)
        deliveries = Drain(broker.consume(["default"], prefetch=1))
        first = await deliveries.next()
        # The second one has arrived, buffered.
        await until_queue_figure(queue, "messages_unacknowledged", 2)
        await asyncio.sleep(0.5)  # the passing of time is what is tested here
        await first.ack()
        second = await deliveries.next()
        with caplog.at_level(logging.WARNING, "qtasks.brokers.rabbitmq"):
            await second.keep_alive()  # handed out just now, held for over 0.5 s
        assert caplog.text.count("has been held") == 1
        await second.ack()
        await deliveries.close()
    finally:
        await broker.close()


async def test_an_unroutable_message_is_an_error_not_a_loss(namespace: Namespace) -> None:
    broker = RabbitMQBroker(namespace.url)
    try:
        await broker.start()
        with pytest.raises(QTasksError, match="unroutable"):
            await broker.publisher.publish_raw("", f"{namespace.prefix}.no-such-queue", b"{}",
                                     spec.Basic.Properties(message_id="lost?"))
    finally:
        await broker.close()


async def test_a_listener_resumes_after_its_connection_was_closed(namespace: Namespace) -> None:
    writer, listener = namespace.app(), namespace.app()
    await writer.start()
    events = Drain(await listener.subscribe("t"))
    store = listener.results_store
    assert isinstance(store, RabbitMQResultStore)

    async def publish(seq: int) -> None:
        event = ResultEvent(kind="partial", id=uuid7(), task="t", seq=seq, value=seq)
        await writer.results_store.publish(event, encode(event))

    await publish(0)
    assert (await events.next()).value == 0
    await asyncio.to_thread(close_connection, store.connection_name)
    async with asyncio.timeout(DEADLINE):
        while store.reconnects == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # until the robust connection is back, bounded
    await publish(1)  # live means live: what was published while it was down is not seen
    assert (await events.next()).value == 1
    await events.close()


async def test_fast_partials_travel_in_batches_and_arrive_whole_and_in_order(
        namespace: Namespace) -> None:
    """A generator yielding faster than RabbitMQ confirms has its partials gathered into
    ``batch`` messages: far fewer messages than values in the stream queue, and every
    reader (the submitter, a late reader, a listener) still gets each value once, in
    order."""
    count = 3000
    app, reader = worker_app(namespace), namespace.app()
    listener = Drain(await reader.subscribe("squares"))
    async with running_worker(app):
        task = await namespace.app().add_task("squares", count)
        live, late, listened = await three_readers(task, reader, listener, count)
    expected = [i * i for i in range(count)]
    assert live == late == listened == expected
    stored = await asyncio.to_thread(
        queue_figure, namespace.settings.stream_queue)
    assert stored < count // 5, f"{stored} messages for {count} partials: not batched"


async def test_finals_of_quick_tasks_are_committed_in_groups_and_reach_only_their_readers(
        namespace: Namespace) -> None:
    """Many tasks finishing at once have their finals stored as a few grouped messages,
    yet each reader gets exactly its own: the submitter's ``wait``, another process's
    live ``wait`` by id (bound before the task ran), a late ``get`` by id, and a listener
    of one task name, which must not see the other task's finals from the same group."""
    count = 300
    app, submitter, other = worker_app(namespace), namespace.app(), namespace.app()

    @app.task(name="negate")
    async def negate(n: int) -> int:
        return -n

    adds_heard = Drain(await other.subscribe("add"))
    adds = [await submitter.add_task("add", i, 1) for i in range(count)]
    negated = [await submitter.add_task("negate", i) for i in range(count)]
    followed = [asyncio.ensure_future(other.task_handle(t.id).wait(DEADLINE))
                for t in adds[::10]]
    async with running_worker(app), asyncio.timeout(DEADLINE):
        done = [await t.wait() for t in adds + negated]
        assert [t.returning for t in done] == [i + 1 for i in range(count)] + \
            [-i for i in range(count)]
        assert [t.returning for t in await asyncio.gather(*followed)] == \
            [i + 1 for i in range(0, count, 10)]
        late = [await other.get(t.id) for t in adds[::30] + negated[::30]]
        assert [t.returning for t in late] == \
            [i + 1 for i in range(0, count, 30)] + [-i for i in range(0, count, 30)]
        heard = []
        while len(heard) < count:
            event = await adds_heard.next()
            assert event.task == "add", f"a listener of 'add' got {event}"
            if event.kind == "final":
                heard.append(event.returning)
        assert sorted(heard) == [i + 1 for i in range(count)]
    await adds_heard.close()
    stored = await asyncio.to_thread(
        queue_figure, namespace.settings.stream_queue)
    assert stored < count, f"{stored} messages for {2 * count} finals: not grouped"


async def test_grouped_finals_in_flight_when_the_connection_drops_are_sent_again(
        namespace: Namespace) -> None:
    """Finals published in groups while the server closes the publisher's connection:
    every ``publish`` still returns (its group is sent again after the reconnect), and a
    listener on another connection hears every final."""
    writer, reader = namespace.app(), namespace.app()
    await writer.start()
    store = writer.results_store
    assert isinstance(store, RabbitMQResultStore)
    heard = Drain(await reader.subscribe("*"))
    ids: list[str] = []

    async def publish_batch() -> None:
        batch = [ResultEvent(kind="final", id=uuid7(), task="t", status="success")
                 for _ in range(50)]
        ids.extend(e.id for e in batch)
        await asyncio.gather(*(store.publish(e, encode(e)) for e in batch))

    async with asyncio.timeout(DEADLINE):
        closing = asyncio.ensure_future(
            asyncio.to_thread(close_connection, store.connection_name))
        while not closing.done():  # groups in flight when the connection goes
            await publish_batch()
        await closing
        while store.reconnects < 1:
            await publish_batch()
        await publish_batch()
        seen: set[str] = set()
        while not seen.issuperset(ids):
            seen.add((await heard.next()).id)
    await heard.close()
    assert store.reconnects == 1


@pytest.mark.timeout(300)  # boots a RabbitMQ node of its own (up to 120 s)
async def test_past_consumer_timeout_the_redelivered_task_joins_its_run(
        caplog: pytest.LogCaptureFixture) -> None:
    """RabbitMQ closes the channel of a delivery held past ``consumer_timeout`` and hands
    the message out again, here to the same worker while the task still runs. The copy
    joins the run: one run, one final, the message acked once the run ends. Held through
    two timeouts, the run keeps one prefetch slot, not one per copy: with concurrency 2,
    another task still runs meanwhile."""
    require_tools("rabbitmq-server")
    # 1 s timeout, checked every 0.2 s (3.10 checks on the channel tick, 60 s by default).
    with private_rabbitmq("consumer_timeout = 1000\n",
                          "[{rabbit, [{channel_tick_interval, 200}]}].\n") as node:
        url = f"{node.url}?prefix=ct&consumer_timeout=1"
        app = QueueTasks(broker=url, results=url, embedded_worker=False)

        @app.task
        async def quick_add(a: int, b: int) -> int:
            return a + b

        async def another_task_runs() -> None:
            assert (await quick_add.add_task(2, 3, timeout=DEADLINE)).returning == 5

        try:
            await check_copies_join_the_run(app, 2, caplog, another_task_runs)
        finally:
            await app.close()
