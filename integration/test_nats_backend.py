"""NATS-specific behaviour beyond the shared contract: options and names, credentials and
redaction, the server's max_payload, max_deliver, fair pulling across queues."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from brokers._nats import parse_url, redact, token
from brokers._nats_client import CoalescingClient
from brokers.nats import NatsBroker
from integration.conftest import require_tools
from integration.nats_support import delete_namespace, open_backend, private_server
from integration.tls_support import certificates
from qtasks import (
    BrokerUnavailableError,
    ConfigurationError,
    MessageTooLargeError,
    QueueTasks,
    TaskStatus,
    Worker,
)
from qtasks.protocol import TaskMessage, encode, uuid7
from results.nats import NatsResultStore
from tests.contract import (
    Drain,
    redeliver_with_final,
    running_worker,
    settled,
    three_readers,
)

DEADLINE = 20.0


@pytest.fixture
async def cleanup(nats_url: str, prefix: str) -> AsyncIterator[list[QueueTasks | NatsBroker]]:
    opened: list[QueueTasks | NatsBroker] = []
    yield opened
    for thing in opened:
        await thing.close()
    await delete_namespace(nats_url, prefix)


def task(queue: str = "default", name: str = "add") -> tuple[TaskMessage, bytes]:
    message = TaskMessage(id=uuid7(), task=name, args=[1, 2], queue=queue,
                          created_at=time.time())
    return message, encode(message)


# -- no server needed ------------------------------------------------------------------

def test_url_options_cluster_and_refusals() -> None:
    servers, options = parse_url(
        "nats://u:p@a:4222,b:4223,nats://c:4224?prefix=shop&ack_wait=9", {"ack_wait": 3})
    assert servers == ["nats://u:p@a:4222", "nats://b:4223", "nats://c:4224"]
    assert options == {"prefix": "shop", "ack_wait": 3}
    with pytest.raises(ConfigurationError, match="ack_wiat"):
        parse_url("nats://a?ack_wiat=3", {})
    with pytest.raises(ConfigurationError, match="prefix"):
        parse_url("nats://a?prefix=a.b", {})
    with pytest.raises(ConfigurationError, match="fetch_timeout"):
        NatsBroker("nats://a?fetch_timeout=1")


def test_names_are_single_safe_tokens() -> None:
    assert token("default") == "default"
    assert token("billing.invoice") == "billing=2Einvoice"
    assert token("a b>*") == "a=20b=3E=2A"
    assert token("") == "="
    assert token("é") == "=C3=A9"
    assert token("a=2E") != token("a.")  # '=' itself is escaped: the encoding is injective
    broker = NatsBroker("nats://127.0.0.1:4222?prefix=p1")
    assert broker.subject("x.y") == "p1.tasks.x=2Ey"
    assert broker.consumer("x.y") == "p1_q_x=2Ey"
    store = NatsResultStore("nats://127.0.0.1:4222?prefix=p1")
    assert store.subject("mod.task", "id-1") == "p1.results._.mod=2Etask.id-1"
    assert store.subject("t", "id-1", "r.1") == "p1.results.r=2E1.t.id-1"
    assert store.task_subjects("id-1") == "p1.results.*.*.id-1"


def test_secrets_are_redacted() -> None:
    assert redact("nats://u:s3cret@a:1,nats://tok3n@b:2?token=t0k&prefix=x") == \
        "nats://u:***@a:1,nats://***@b:2?token=***&prefix=x"


# -- private servers ---------------------------------------------------------------------

async def test_credentials_pass_through_and_are_never_shown(tmp_path: Path) -> None:
    secret = "s3cret-pass"
    auth = f'authorization {{ user: qt, password: "{secret}" }}'
    with private_server(str(tmp_path), auth) as port:
        good = NatsBroker(f"nats://127.0.0.1:{port}", user="qt", password=secret)
        await good.start()
        await good.publish(*task())
        await good.close()
        in_url = NatsResultStore(f"nats://qt:{secret}@127.0.0.1:{port}")
        await in_url.start()
        await in_url.close()
        bad = NatsBroker(f"nats://qt:wrong-{secret}@127.0.0.1:{port}?connect_timeout=1")
        with pytest.raises(BrokerUnavailableError) as raised:
            await bad.start()
        assert secret not in str(raised.value)
        assert "***" in str(raised.value)


async def test_a_server_without_jetstream_is_a_clear_error(tmp_path: Path) -> None:
    with private_server(str(tmp_path), jetstream=False) as port:
        broker = NatsBroker(f"nats://127.0.0.1:{port}?connect_timeout=1")
        with pytest.raises(BrokerUnavailableError, match="JetStream"):
            await broker.start()
        await broker.close()


async def test_a_foreign_stream_on_our_subjects_is_a_clear_error(nats_url: str,
                                                                   prefix: str) -> None:
    nc = await nats.connect(nats_url)
    broker = NatsBroker(f"{nats_url}?prefix={prefix}")
    try:
        await nc.jetstream().add_stream(name=f"{prefix}_foreign", subjects=[f"{prefix}.>"])
        with pytest.raises(ConfigurationError, match=rf"{prefix}_TASKS: another stream"):
            await broker.start()
    finally:
        await broker.close()
        await nc.close()
        await delete_namespace(nats_url, prefix)


async def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    require_tools("openssl")
    certs = await asyncio.to_thread(certificates, tmp_path)
    ca, cert, key = certs.ca, certs.server_cert, certs.server_key
    with private_server(str(tmp_path), f'tls {{ cert_file: "{cert}", key_file: "{key}" }}') \
            as port:
        url = f"tls://127.0.0.1:{port}?tls_ca={ca}"
        app = QueueTasks(broker=url, results=url, embedded_worker=False)

        @app.task
        async def echo(x: str) -> str:
            return x

        try:
            async with running_worker(app):
                done = await echo.add_task("over tls", timeout=DEADLINE)
        finally:
            await app.close()
        assert done.returning == "over tls"
        untrusted = NatsBroker(f"tls://127.0.0.1:{port}?connect_timeout=1")
        with pytest.raises(BrokerUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.start()


async def test_max_payload_is_enforced_without_losing_the_connection(tmp_path: Path) -> None:
    with private_server(str(tmp_path), "max_payload: 8192") as port:
        url = f"nats://127.0.0.1:{port}"
        producer = QueueTasks(broker=url, results=url, embedded_worker=False)
        worker_app = QueueTasks(broker=url, results=url, embedded_worker=False)

        @worker_app.task
        async def big(n: int) -> str:
            return "x" * n

        @worker_app.task
        async def big_gen(n: int) -> AsyncIterator[str]:
            yield "ok"
            yield "x" * n

        try:
            await producer.start()
            assert producer.broker.max_message_size == 8192 - 512
            with pytest.raises(MessageTooLargeError, match="7680 bytes"):
                await producer.add_task("big", "y" * 9000)
            async with running_worker(worker_app):
                small = await producer.add_task("big", 10, timeout=DEADLINE)
                final_too_big = await producer.add_task("big", 9000, timeout=DEADLINE)
                partial_too_big = await producer.add_task("big_gen", 9000, timeout=DEADLINE)
        finally:
            await producer.close()
            await worker_app.close()
    assert small.returning == "x" * 10
    assert final_too_big.status is TaskStatus.ERROR
    assert final_too_big.error is not None
    assert final_too_big.error.type == "MessageTooLargeError"
    assert "max_payload" in final_too_big.error.message
    assert partial_too_big.status is TaskStatus.ERROR
    assert partial_too_big.error is not None
    assert partial_too_big.error.type == "MessageTooLargeError"


# -- the shared server ------------------------------------------------------------------

async def test_past_max_deliver_a_message_is_dead_lettered(
        nats_url: str, prefix: str, cleanup: list[Any]) -> None:
    url = f"{nats_url}?prefix={prefix}&ack_wait=1&max_deliver=1"
    holder, other = NatsBroker(url), NatsBroker(url)
    cleanup += [holder, other]
    await holder.declare(["default"])
    message, body = task()
    await holder.publish(message, body)
    nc = await nats.connect(nats_url)
    try:
        dead = await nc.subscribe(f"{prefix}.dead.>")
        await nc.flush()
        first = Drain(holder.consume(["default"], prefetch=1))
        held = await first.next()  # never settled, no heartbeat: as if its worker hung
        assert held.body == body
        second = Drain(other.consume(["default"], prefetch=1))
        letter = await dead.next_msg(timeout=DEADLINE)
        assert await second.nothing_within(0.3)  # dead-lettered, not handed to a worker
        await second.close()
        await first.close()
    finally:
        await nc.close()
    assert letter.data == body
    assert letter.headers is not None
    assert letter.headers["QTasks-Dead-Reason"].startswith("delivered 2 times, over max_deliver=1")
    assert letter.headers["QTasks-Delivered"] == "2"


async def test_an_idle_queue_does_not_hold_back_another(
        nats_url: str, prefix: str, cleanup: list[Any]) -> None:
    """Two queues, two slots: each idle queue holds a pull for one slot, so a task on
    either is delivered at once, not after the other queue's pull request expires."""
    broker = NatsBroker(f"{nats_url}?prefix={prefix}")
    cleanup.append(broker)
    await broker.declare(["a", "b"])
    deliveries = Drain(broker.consume(["a", "b"], prefetch=2))
    try:
        for queue in ("b", "a", "b"):
            message, body = task(queue)
            sent = time.monotonic()
            await broker.publish(message, body)
            got = await deliveries.next()
            assert got.body == body
            assert time.monotonic() - sent < 1.0
            await got.ack()
    finally:
        await deliveries.close()


async def test_a_closed_broker_gives_back_what_it_held(
        nats_url: str, prefix: str, cleanup: list[Any]) -> None:
    """Received but not yet yielded (the prefetch window) and yielded but unsettled:
    both go back at close, so another worker gets them at once, not after ack_wait."""
    url = f"{nats_url}?prefix={prefix}&ack_wait=60"
    first, second = NatsBroker(url), NatsBroker(url)
    cleanup += [first, second]
    await first.declare(["default"])
    bodies = set()
    for _ in range(3):
        message, body = task()
        await first.publish(message, body)
        bodies.add(body)
    held = Drain(first.consume(["default"], prefetch=2))
    await held.next()
    await held.next()
    await held.close()
    await first.close()
    elsewhere = Drain(second.consume(["default"], prefetch=3))
    try:
        got = {(await elsewhere.next(5.0)).body for _ in range(3)}
    finally:
        await elsewhere.close()
    assert got == bodies


async def test_worker_in_process_with_a_url_from_the_environment(
        nats_url: str, prefix: str, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QTASKS_BROKER_URL", f"{nats_url}?prefix={prefix}")
    app = QueueTasks()  # results follow the broker URL: same server, same prefix
    cleanup.append(app)

    @app.task
    async def double(x: int) -> int:
        return 2 * x

    assert isinstance(app.results_store, NatsResultStore)
    assert app.results_store.prefix == prefix
    worker = Worker(app, concurrency=4)
    run = asyncio.create_task(worker.run())
    try:
        await worker.wait_started()
        done = await double.add_task(21, timeout=DEADLINE)
        assert done.returning == 42
        found = await app.get(done.id)
        assert found is not None and found.returning == 42
    finally:
        worker.stop()
        await run


async def test_settling_after_the_connection_died_logs_and_returns(
        nats_url: str, prefix: str, cleanup: list[Any],
        caplog: pytest.LogCaptureFixture) -> None:
    url = f"{nats_url}?prefix={prefix}&ack_wait=1"
    dying, other = NatsBroker(url), NatsBroker(url)
    cleanup += [dying, other]
    await dying.declare(["default"])
    message, body = task()
    await dying.publish(message, body)
    deliveries = Drain(dying.consume(["default"], prefetch=1))
    delivery = await deliveries.next()
    await dying.conn.nc.close()  # the connection is gone for good
    async with asyncio.timeout(5):
        await delivery.ack()  # neither raises nor retries
        await delivery.keep_alive()
    assert "could not ack" in caplog.text
    await deliveries.close()
    elsewhere = Drain(other.consume(["default"], prefetch=1))
    try:
        again = await elsewhere.next()  # the server gave it out again after ack_wait
        assert again.body == body and again.redelivered
        await again.ack()
    finally:
        await elsewhere.close()


async def test_a_final_left_in_the_bucket_only_is_published_again(
        nats_url: str, prefix: str) -> None:
    """The worker died between storing the final in the bucket and publishing it on the
    stream: the redelivery publishes it on the stream, so that the submitter, which
    follows the stream, gets it; the task does not run again."""
    async with open_backend(nats_url, prefix) as backend:
        producer, worker_app = backend.app(), backend.app()
        task = await producer.add_task("add", 1, 2)
        store = worker_app.results_store
        assert isinstance(store, NatsResultStore)

        async def bucket_only(final: Any) -> None:
            await store.conn.js.publish(store.key_subject(final.id), encode(final))

        await redeliver_with_final(worker_app, task.id, "add", "from the bucket",
                                   store=bucket_only)
        assert (await producer.get(task.id)).returning == "from the bucket"  # type: ignore[union-attr]
        async with running_worker(worker_app) as worker:
            done = await task.wait(DEADLINE)
            await settled(worker, 1)
        assert done.returning == "from the bucket"  # not 3: it did not run again


async def test_fast_partials_travel_in_batches_and_arrive_whole_and_in_order(
        nats_url: str, prefix: str) -> None:
    """Partials yielded in one event-loop turn go out as one message: far fewer messages
    than values in the results stream, and every reader (the submitter, a late reader, a
    listener) still gets each value once, in order."""
    count = 3000
    async with open_backend(nats_url, prefix) as backend:
        producer, worker_app, reader = backend.app(), backend.app(), backend.app()
        listener = Drain(await reader.subscribe("count"))
        async with running_worker(worker_app):
            task = await producer.add_task("count", count)
            live, late, listened = await three_readers(task, reader, listener, count)
        assert live == late == listened == list(range(count))
        store = producer.results_store
        assert isinstance(store, NatsResultStore)
        info = await store.conn.js.stream_info(store.stream)
        assert info.state.messages < count // 5, \
            f"{info.state.messages} messages for {count} partials: not batched"


async def test_headers_written_by_the_fast_publish_arrive_as_nats_py_would_send_them(
        nats_url: str, prefix: str) -> None:
    """``CoalescingClient.publish_with_headers`` writes the HPUB itself: every header
    arrives intact, and a value with a line break (a user's task id) cannot add a header
    of its own: it takes nats-py's path, which strips the break."""
    client = CoalescingClient()
    await client.connect(servers=[nats_url])
    try:
        subject = f"{prefix}.fast-headers"
        subscription = await client.subscribe(subject)
        await client.publish_with_headers(subject, f"{prefix}.reply", b"one",
                                          {"Nats-Msg-Id": "0190-abc:1", "QTasks-X": "1.5"})
        await client.publish_with_headers(subject, "", b"two",
                                          {"Nats-Msg-Id": "evil\r\nInjected: yes"})
        await client.publish_with_headers(subject, "", b"three", {"Nats-Msg-Id": "tâche-ü:1"})
        await client.publish(subject, b"four")  # the connection survived the one before
        first = await subscription.next_msg(timeout=DEADLINE)
        second = await subscription.next_msg(timeout=DEADLINE)
        third = await subscription.next_msg(timeout=DEADLINE)
        fourth = await subscription.next_msg(timeout=DEADLINE)
    finally:
        await client.close()
    assert (first.data, first.reply) == (b"one", f"{prefix}.reply")
    assert first.headers == {"Nats-Msg-Id": "0190-abc:1", "QTasks-X": "1.5"}
    assert second.data == b"two" and second.headers is not None
    assert "Injected" not in second.headers
    assert "\n" not in second.headers["Nats-Msg-Id"]
    assert (third.data, third.headers) == (b"three", {"Nats-Msg-Id": "tâche-ü:1"})
    assert fourth.data == b"four"
