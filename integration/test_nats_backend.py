"""NATS-specific behaviour beyond the shared contract: options and names, credentials
(passwords, NKeys, JWT creds) and redaction, TLS required, several server URLs, the
server's max_payload, max_deliver, fair pulling across queues, result TTLs, a final found
only in the bucket, and a producer and listener that speak only NATS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from integration.conftest import require_tools
from integration.nats_support import (
    PrivateServer,
    delete_namespace,
    nkey_pair,
    open_backend,
    operator_mode,
    private_server,
)
from integration.net import free_port
from integration.tls_support import certificates
from qtasks import (
    BrokerUnavailableError,
    ConfigurationError,
    MessageTooLargeError,
    QueueTasks,
    TaskStatus,
    Worker,
)
from qtasks.brokers.nats import NatsBroker
from qtasks.brokers.nats.client import CoalescingClient
from qtasks.brokers.nats.settings import parse_url, token
from qtasks.interfaces import dead_letter_ref
from qtasks.protocol import ResultEvent, TaskMessage, decode_result, encode, uuid7
from qtasks.registry import redact
from qtasks.results.nats import NatsResultStore
from tests.contract import (
    Drain,
    check_copies_join_the_run,
    kept_dead_letters,
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
        async with asyncio.timeout(5):  # refused credentials fail at once, never retried
            with pytest.raises(ConfigurationError, match="refused the credentials") as raised:
                await bad.start()
        assert secret not in str(raised.value)
        assert "***" in str(raised.value)


async def _echo_end_to_end(url: str, value: str) -> Any:
    """One task through a worker, both connecting with ``url``: its returning value."""
    app = QueueTasks(broker=url, results=url, embedded_worker=False)

    @app.task
    async def echo(x: str) -> str:
        return x

    try:
        async with running_worker(app):
            done = await echo.add_task(value, timeout=DEADLINE)
    finally:
        await app.close()
    return done.returning


async def test_an_nkey_user_runs_a_task_and_a_wrong_seed_is_refused(tmp_path: Path) -> None:
    """``nkeys_seed`` signs the server's nonce (nats-py needs the ``nkeys`` package for
    that: ``nats-py[nkeys]``); another user's seed is refused by the server, and a file
    that is no seed at all is a ``ConfigurationError`` at once, not ``connect_timeout``
    seconds of "cannot connect"."""
    seed, public = nkey_pair()
    (tmp_path / "user.nk").write_bytes(seed)
    (tmp_path / "stranger.nk").write_bytes(nkey_pair()[0])
    (tmp_path / "garbage.nk").write_text("SUNOTASEED\n")
    with private_server(str(tmp_path), f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}') \
            as port:
        base = f"nats://127.0.0.1:{port}"
        assert await _echo_end_to_end(f"{base}?nkeys_seed={tmp_path / 'user.nk'}",
                                      "signed") == "signed"
        stranger = NatsBroker(f"{base}?connect_timeout=30&nkeys_seed={tmp_path / 'stranger.nk'}")
        async with asyncio.timeout(5):  # refused credentials fail at once, never retried
            with pytest.raises(ConfigurationError,
                               match=r"refused the credentials.*Authorization Violation"):
                await stranger.start()
        for seed_file, why in (("garbage.nk", "ErrInvalidSeed"), ("missing.nk", "cannot read")):
            broken = NatsBroker(f"{base}?connect_timeout=30&nkeys_seed={tmp_path / seed_file}")
            async with asyncio.timeout(5):  # at once, not after connect_timeout
                with pytest.raises(ConfigurationError, match=why):
                    await broken.start()


async def test_a_creds_file_without_both_blocks_is_refused_at_once(tmp_path: Path) -> None:
    """nats-py reads a creds file until each block's marker: without one it loops forever,
    the event loop with it. Checked before connecting instead."""
    seed, _ = nkey_pair()
    only_seed = tmp_path / "only-seed.creds"
    only_seed.write_bytes(b"-----BEGIN USER NKEY SEED-----\n" + seed +
                          b"\n------END USER NKEY SEED------\n")
    (tmp_path / "empty.creds").write_bytes(b"")
    for name in ("only-seed.creds", "empty.creds"):
        broker = NatsBroker(f"nats://127.0.0.1:4222?creds={tmp_path / name}")
        async with asyncio.timeout(5):
            with pytest.raises(ConfigurationError, match="is not a credentials file"):
                await broker.start()


async def test_nkeys_without_the_nkeys_package_is_a_configuration_error_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a plain ``pip install nats-py`` left: nats-py imports ``nkeys`` inside
    ``connect``; the ImportError must say what to install, at once."""
    seed, public = nkey_pair()
    (tmp_path / "user.nk").write_bytes(seed)
    monkeypatch.setitem(sys.modules, "nkeys", None)  # ``import nkeys`` raises ImportError
    with private_server(str(tmp_path), f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}') \
            as port:
        for option in ("nkeys_seed", "creds"):
            broker = NatsBroker(f"nats://127.0.0.1:{port}?{option}={tmp_path / 'user.nk'}")
            async with asyncio.timeout(5):  # connect_timeout is 30
                with pytest.raises(ConfigurationError, match=r"nats-py\[nkeys\]"):
                    await broker.start()


async def test_jwt_credentials_run_a_task(tmp_path: Path) -> None:
    """A ``.creds`` file (user JWT and seed) against a server in operator mode, the
    account's JWT preloaded in a memory resolver with JetStream enabled."""
    config, creds = operator_mode(str(tmp_path))
    with private_server(str(tmp_path), config) as port:
        base = f"nats://127.0.0.1:{port}"
        assert await _echo_end_to_end(f"{base}?creds={creds}", "with a jwt") == "with a jwt"
        anonymous = NatsBroker(f"{base}?connect_timeout=30")
        async with asyncio.timeout(5):  # refused credentials fail at once, never retried
            with pytest.raises(ConfigurationError,
                               match=r"refused the credentials.*Authorization Violation"):
                await anonymous.start()


async def test_tls_is_required_when_asked_for(tmp_path: Path) -> None:
    """nats-py upgrades to TLS only when the server's INFO requires it: a ``tls://`` URL
    or a TLS option pointed at a plaintext server must be refused, not used in clear."""
    require_tools("openssl")
    certs = await asyncio.to_thread(certificates, tmp_path)
    with private_server(str(tmp_path)) as port:
        for url in (f"tls://127.0.0.1:{port}", f"nats://127.0.0.1:{port}?tls_ca={certs.ca}",
                    f"nats://127.0.0.1:{free_port()},tls://127.0.0.1:{port}"):
            broker = NatsBroker(url)
            async with asyncio.timeout(10):  # at once, not after connect_timeout (30 s)
                with pytest.raises(ConfigurationError, match="does not offer TLS"):
                    await broker.start()
            assert not broker.conn.started
        plain = NatsBroker(f"nats://127.0.0.1:{port}")  # no TLS asked for: fine
        await plain.start()
        assert not plain.conn.nc.uses_tls
        await plain.close()


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
        assert await _echo_end_to_end(url, "over tls") == "over tls"
        checked = NatsBroker(url)
        await checked.start()
        assert checked.conn.nc.uses_tls  # what test_tls_is_required_when_asked_for relies on
        await checked.close()
        untrusted = NatsBroker(f"tls://127.0.0.1:{port}?connect_timeout=1")
        with pytest.raises(BrokerUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.start()
        # A plaintext server first in the list is passed over, not fatal.
        (tmp_path / "plain").mkdir()
        with private_server(str(tmp_path / "plain")) as plain_port:
            mixed = NatsBroker(f"tls://127.0.0.1:{plain_port},tls://127.0.0.1:{port}"
                               f"?tls_ca={ca}", connect_options={"dont_randomize": True})
            try:
                await mixed.start()
                assert mixed.conn.nc.uses_tls
                assert mixed.conn.nc.plaintext_refused == {f"127.0.0.1:{plain_port}"}
            finally:
                await mixed.close()


async def test_a_reconnect_to_a_plaintext_server_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The TLS server goes away and a plaintext one takes its port: the client does not
    reconnect to it (no CONNECT, no credentials, no task in clear); it comes back once
    the TLS server does."""
    require_tools("openssl")
    certs = await asyncio.to_thread(certificates, tmp_path)
    (tmp_path / "tls").mkdir()
    (tmp_path / "plain").mkdir()
    secure = PrivateServer(
        str(tmp_path / "tls"), f'tls {{ cert_file: "{certs.server_cert}", '
        f'key_file: "{certs.server_key}" }}')
    plain = PrivateServer(str(tmp_path / "plain"), port=secure.port)
    refused, back = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    class Refusals(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "does not offer TLS" in record.getMessage():
                loop.call_soon_threadsafe(refused.set)

    handler = Refusals()
    caplog.set_level(logging.INFO, logger="qtasks.brokers.nats")  # failed reconnects log at INFO
    logging.getLogger("qtasks.brokers.nats").addHandler(handler)
    broker = NatsBroker(f"tls://127.0.0.1:{secure.port}?tls_ca={certs.ca}")
    await asyncio.to_thread(secure.start)
    try:
        await broker.start()
        broker.conn.reconnect_listeners.append(back.set)
        await asyncio.to_thread(secure.stop)
        await asyncio.to_thread(plain.start)
        async with asyncio.timeout(DEADLINE):
            await refused.wait()
        assert not broker.conn.nc.is_connected and not back.is_set()
        await asyncio.to_thread(plain.stop)
        await asyncio.to_thread(secure.start)
        async with asyncio.timeout(DEADLINE):
            await back.wait()
        assert broker.conn.nc.uses_tls
        await broker.publish(*task())  # and it works
    finally:
        logging.getLogger("qtasks.brokers.nats").removeHandler(handler)
        await broker.close()
        await asyncio.to_thread(plain.stop)
        await asyncio.to_thread(secure.stop)


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


@contextlib.asynccontextmanager
async def small_payloads(directory: Path, limit: int) -> AsyncIterator[tuple[str, QueueTasks]]:
    """A private server with ``max_payload: limit``: its URL and a started producer on
    it, closed and stopped afterwards."""
    with private_server(str(directory), f"max_payload: {limit}") as port:
        url = f"nats://127.0.0.1:{port}"
        producer = QueueTasks(broker=url, results=url, embedded_worker=False)
        try:
            await producer.start()
            yield url, producer
        finally:
            await producer.close()


def add_app(url: str) -> QueueTasks:
    app = QueueTasks(broker=url, results=url, embedded_worker=False)

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    return app


async def test_a_body_at_max_payload_is_dead_lettered_intact_and_the_worker_goes_on(
        tmp_path: Path) -> None:
    """Raw task messages as large as the server takes (one exactly ``max_payload``, no
    room left for a header) are dead-lettered byte for byte with their reason, and the
    same worker then runs the next task: dead-lettering never sends more than the server
    accepts, which would make it close the connection. Requeued, they come back intact."""
    limit = 8192
    bodies = [b"{" * limit, b"[" * (limit - 40), b"x" * (limit - 300)]
    async with small_payloads(tmp_path, limit) as (url, producer):
        worker_app = add_app(url)
        nc = await nats.connect(url)
        try:
            async with running_worker(worker_app):
                js = nc.jetstream()
                await js.publish("qtasks.tasks.default", bodies[0])  # no header at all
                for number_, body in enumerate(bodies[1:]):
                    await js.publish("qtasks.tasks.default", body,
                                     headers={"Nats-Msg-Id": f"raw-{number_}"})
                done = await producer.add_task("add", 2, 3, timeout=DEADLINE)
                letters = await kept_dead_letters(producer, len(bodies))
                assert await producer.broker.dead_count() == len(bodies)
            refs = [dead_letter_ref(body) for body in bodies[:2]]
            assert await producer.broker.requeue_dead(refs) == refs
            assert await producer.broker.dead_count() == 1
            async with running_worker(worker_app):  # dead-lettered again, intact again
                again = await kept_dead_letters(producer, len(bodies))
        finally:
            await nc.close()
            await worker_app.close()
    assert done.returning == 5
    for found in (letters, again):
        assert sorted(letter.body for letter in found) == sorted(bodies)
        for letter in found:
            assert letter.queue == "default"
            assert letter.ref == dead_letter_ref(letter.body)
            assert letter.reason.startswith("undecodable"), letter.reason


async def test_a_connection_closed_by_the_server_or_for_good_is_opened_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The server ends a connection after an error (here: a message over max_payload,
    written past nats-py's own check): the same client reconnects and subscribes again.
    A client closed for good (as nats-py leaves one after an error it does not recover
    from) is noticed and replaced. Either way the worker goes on taking tasks."""
    async with small_payloads(tmp_path, 8192) as (url, producer):
        worker_app = add_app(url)

        async def runs(a: int) -> int:
            return (await producer.add_task("add", a, 1, timeout=DEADLINE)).returning

        broker = worker_app.broker
        assert isinstance(broker, NatsBroker)
        try:
            async with running_worker(worker_app):
                assert await runs(1) == 2
                first, back = broker.conn.nc, asyncio.Event()
                broker.conn.reconnect_listeners.append(back.set)
                transport = first._transport
                assert transport is not None
                transport.write(b"PUB qtasks.junk 9000\r\n" + b"x" * 9000 + b"\r\n")
                async with asyncio.timeout(DEADLINE):
                    await back.wait()
                assert broker.conn.nc is first and not first.is_closed
                assert await runs(2) == 3
                await first.close()  # closed for good, behind the connection's back
                assert await runs(3) == 4
                assert broker.conn.nc is not first and broker.conn.nc.is_connected
        finally:
            await worker_app.close()
    assert "maximum payload violation" in caplog.text.lower()
    assert "opened again" in caplog.text


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


async def test_a_final_only_in_the_bucket_ends_a_late_readers_wait(
        nats_url: str, prefix: str) -> None:
    """A final put in the bucket whose publish on the stream never reached the server (a
    core publish, proven only by the worker's PING): a reader in another process, which
    replays the stream, ends with the bucket's final instead of waiting for its timeout,
    whether the stream holds nothing of the task or some of its events."""
    async with open_backend(nats_url, prefix) as backend:
        writer, reader = backend.app(), backend.app()
        await writer.start()
        await reader.start()
        store = writer.results_store
        assert isinstance(store, NatsResultStore)
        js = store.conn.js
        now = time.time()

        async def final_in_the_bucket(task_id: str, returning: Any) -> None:
            final = ResultEvent(kind="final", id=task_id, task="count", status="success",
                                returning=returning, ts=now, started_at=now,
                                finished_at=now, partials=2)
            await js.publish(store.key_subject(task_id), encode(final))

        silent = uuid7()  # nothing of it in the stream
        await final_in_the_bucket(silent, [])
        done = await reader.task_handle(silent).wait(DEADLINE / 2)
        assert (done.status, done.returning) == (TaskStatus.SUCCESS, [])

        halfway = uuid7()  # its status and partials in the stream, its final not
        subject = store.subject("count", halfway)
        await js.publish(subject, encode(ResultEvent(
            kind="status", id=halfway, task="count", status="running", ts=now, started_at=now)))
        for seq in (0, 1):
            await js.publish(subject, encode(ResultEvent(
                kind="partial", id=halfway, task="count", seq=seq, value=10 + seq, ts=now)))
        await final_in_the_bucket(halfway, [10, 11])
        handle = reader.task_handle(halfway)
        async with asyncio.timeout(DEADLINE / 2):
            streamed = [value async for value in handle.stream()]
        assert streamed == [10, 11]
        assert (handle.status, handle.returning) == (TaskStatus.SUCCESS, [10, 11])


async def test_results_live_as_long_as_the_ttl_says(nats_url: str, prefix: str) -> None:
    """``ttl`` is the results stream's and the bucket's ``max_age``, also when a store
    with another ``ttl`` finds them already made."""
    try:
        for ttl in (123.0, 456.0):
            store = NatsResultStore(f"{nats_url}?prefix={prefix}&ttl={ttl:g}")
            await store.start()
            try:
                js = store.conn.js
                stream = await js.stream_info(store.stream)
                bucket = await js.stream_info(f"KV_{store.bucket}")
                status = await (await js.key_value(store.bucket)).status()
            finally:
                await store.close()
            assert stream.config.max_age == ttl
            assert bucket.config.max_age == ttl
            assert status.ttl == ttl
    finally:
        await delete_namespace(nats_url, prefix)


async def test_a_dead_server_first_in_the_url_is_passed_over(
        nats_url: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Several URLs are one cluster: with the first unreachable, broker and result store
    connect to the second and a task runs end to end. (nats-py shuffles the servers;
    ``dont_randomize`` makes sure the dead one is tried, and first.)"""
    caplog.set_level(logging.INFO, logger="qtasks.brokers.nats")
    dead = free_port()
    url = f"nats://127.0.0.1:{dead},{nats_url}?prefix={prefix}"
    in_order = {"connect_options": {"dont_randomize": True}}
    app = QueueTasks(broker=NatsBroker(url, **in_order),
                     results=NatsResultStore(url, **in_order), embedded_worker=False)

    @app.task
    async def triple(x: int) -> int:
        return 3 * x

    try:
        async with running_worker(app):
            done = await triple.add_task(7, timeout=DEADLINE)
        broker, store = app.broker, app.results_store
        assert isinstance(broker, NatsBroker) and isinstance(store, NatsResultStore)
        live = int(nats_url.rsplit(":", 1)[1])
        assert broker.conn.nc.connected_url.port == store.conn.nc.connected_url.port == live
    finally:
        await app.close()
        await delete_namespace(nats_url, prefix)
    assert done.returning == 21
    refused = [r for r in caplog.records if "ConnectionRefusedError" in r.getMessage()]
    assert len(refused) >= 2, caplog.text  # both connections tried the dead server first


async def test_a_producer_and_a_listener_that_speak_only_nats(
        nats_url: str, prefix: str) -> None:
    """Nothing but the names and headers in docs/nats.md and the JSON of
    docs/protocol.md: a foreign producer enqueues a task with a JetStream publish, a
    foreign listener follows its events on the documented subjects, and a KV get reads
    its final."""
    task_id = "ext-1"
    async with open_backend(nats_url, prefix) as backend:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            by_name = await nc.subscribe(f"{prefix}.results.*.count.*")
            by_id = await nc.subscribe(f"{prefix}.results.*.*.{task_id}")
            await nc.flush()
            async with running_worker(backend.app()):  # it creates the streams, consumer
                body = orjson.dumps({"v": 1, "kind": "task", "id": task_id, "task": "count",
                                     "args": [3], "queue": "default"})  # as in the docs
                headers = {"Nats-Msg-Id": f"{task_id}:1"}
                ack = await js.publish(f"{prefix}.tasks.default", body, headers=headers)
                again = await js.publish(f"{prefix}.tasks.default", body, headers=headers)
                assert (ack.stream, again.duplicate) == (f"{prefix}_TASKS", True)
                heard = [await _events_until_final(sub) for sub in (by_name, by_id)]
            entry = await (await js.key_value(f"{prefix}_status")).get(task_id)
        finally:
            await nc.close()
    for subjects, events in heard:
        assert subjects == {f"{prefix}.results._.count.{task_id}"}  # no reply_to: "_"
        assert [e["kind"] for e in events] == ["status", "partial", "partial", "partial",
                                              "final"]
        assert [e["value"] for e in events if e["kind"] == "partial"] == [0, 1, 2]
        assert events[-1]["returning"] == [0, 1, 2]
    assert entry.value is not None
    stored = decode_result(entry.value)
    assert (stored.kind, stored.status, stored.returning) == ("final", "success", [0, 1, 2])


async def _events_until_final(sub: Any) -> tuple[set[str], list[dict[str, Any]]]:
    """What a foreign listener reads on one subscription: subjects, and events (a
    ``batch`` is its events one after the other) up to the final."""
    subjects: set[str] = set()
    events: list[dict[str, Any]] = []
    while not events or events[-1]["kind"] != "final":
        msg = await sub.next_msg(timeout=DEADLINE)
        subjects.add(msg.subject)
        data = orjson.loads(msg.data)
        events += data["events"] if data["kind"] == "batch" else [data]
    return subjects, events


async def test_a_task_redelivered_past_ack_wait_joins_its_run(
        nats_url: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """With its heartbeats lost (here: turned off), a running task's message is handed
    out again after ``ack_wait``, to the same worker: the copy joins the run instead of
    running it a second time, and the message is acked once, when the run ends."""
    url = f"{nats_url}?prefix={prefix}&ack_wait=1"
    app = QueueTasks(broker=url, results=url, embedded_worker=False)
    app.broker.lease_interval = None  # no in_progress(): as if they could not get through
    try:
        await check_copies_join_the_run(app, 1, caplog, quiet=1.5)  # past another ack_wait
    finally:
        await app.close()
        await delete_namespace(nats_url, prefix)
