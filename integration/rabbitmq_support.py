"""Helpers for the RabbitMQ tests: URLs with a namespace, cleanup, broker control.

Every test works under its own ``prefix`` and deletes every queue and exchange of it
afterwards. The exchanges have fixed names; queues include names made at run time (delay
buckets, per-process inboxes), so they are listed with ``rabbitmqctl`` and filtered by the
prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelLockedResource

from integration.processes import ROOT
from qtasks import QueueTasks
from qtasks.brokers.rabbitmq.control import control_exchange
from qtasks.brokers.rabbitmq.settings import AmqpSettings


def url_with(url: str, **options: object) -> str:
    """``url`` with backend options added to its query."""
    return f"{url}{'&' if '?' in url else '?'}{urlencode(options)}"


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        raise RuntimeError("rabbitmqctl is not on PATH")
    done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=timeout,
                          check=True)
    return done.stdout


def max_message_size() -> int:
    """The server's ``max_message_size``: the largest message body it accepts."""
    out = rabbitmqctl("eval", "application:get_env(rabbit, max_message_size).")
    found = re.search(r"\{ok,\s*(\d+)\}", out)
    if found is None:
        raise AssertionError(f"no max_message_size in {out!r}")
    return int(found.group(1))


def queues_of(prefix: str) -> list[str]:
    out = rabbitmqctl("list_queues", "name", "--quiet", "--no-table-headers")
    return [line.strip() for line in out.splitlines() if line.strip().startswith(prefix + ".")]


def queue_figure(queue: str, column: str = "messages") -> int:
    """One ``rabbitmqctl list_queues`` column of one queue (``messages``,
    ``messages_unacknowledged``, ...)."""
    out = rabbitmqctl("list_queues", "name", column, "--quiet", "--no-table-headers")
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == queue:
            return int(fields[1])
    raise AssertionError(f"no queue {queue!r}")


def queue_arguments(queue: str) -> dict[str, str]:
    """The ``x-`` arguments one queue was declared with, as ``rabbitmqctl list_queues``
    shows them (values as text: ``{"x-max-age": "91s", ...}``): a passive declaration
    cannot read them back."""
    out = rabbitmqctl("list_queues", "name", "arguments", "--quiet", "--no-table-headers")
    for line in out.splitlines():
        name, _, arguments = line.partition("\t")
        if name == queue:
            return {key: value for key, _, value in
                    re.findall(r'\{"([^"]+)",("?)([^"}]*)\2\}', arguments)}
    raise AssertionError(f"no queue {queue!r}")


def consumer_prefetch(queue: str) -> list[int]:
    """The ``basic.qos`` prefetch count of each consumer of ``queue``, as the server
    applies it (``rabbitmqctl list_consumers``)."""
    out = rabbitmqctl("list_consumers", "queue_name", "prefetch_count", "--quiet",
                      "--no-table-headers")
    return [int(count) for name, count in (line.split("\t") for line in out.splitlines()
                                           if "\t" in line) if name == queue]


#: Bound of every wait on the server's figures.
DEADLINE = 30.0


async def until_queue_figure(queue: str, column: str, value: int) -> None:
    """Until ``queue_figure(queue, column)`` is ``value`` (RabbitMQ has no event for it;
    bounded by ``DEADLINE``)."""
    async with asyncio.timeout(DEADLINE):
        while await asyncio.to_thread(queue_figure, queue, column) != value:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def connection_figure(name: str, column: str) -> str:
    """One ``rabbitmqctl list_connections`` column (``timeout``: the negotiated heartbeat,
    ``client_properties``, ...) of the connection whose name starts with ``name``."""
    out = rabbitmqctl("list_connections", column, "client_properties", "--quiet",
                      "--no-table-headers")
    found = [line.split("\t")[0] for line in out.splitlines()
             if f'{{"connection_name","{name}' in line]
    if len(found) != 1:
        raise AssertionError(f"expected one connection named {name!r}..., found {found}")
    return found[0]


async def delete_namespace(url: str, prefix: str) -> None:
    """Delete every queue and exchange named ``{prefix}.*``."""
    settings = AmqpSettings.parse(url, {"prefix": prefix})
    names = await asyncio.to_thread(queues_of, prefix)
    connection = await aio_pika.connect(settings.connection_url)
    try:
        for name in names:
            try:
                async with connection.channel() as channel:
                    await channel.queue_delete(name)
            except ChannelLockedResource:
                pass  # exclusive to a connection that is closing: it goes with it
        for exchange in (settings.tasks_exchange, settings.dead_exchange,
                         settings.results_exchange, control_exchange(settings)):
            async with connection.channel() as channel:
                await channel.exchange_delete(exchange)
    finally:
        await connection.close()


def close_connection(name: str) -> None:
    """Close, from the server side, the connection a client named ``name`` (what a
    network cut or a node failover does to it)."""
    rabbitmqctl("close_connection", connection_figure(name, "pid"), "closed by a test")


async def restart_rabbitmq(base_url: str) -> None:
    """``rabbitmqctl stop_app`` then ``start_app``; whatever happens, RabbitMQ runs and
    answers again before this returns (other tests share it)."""
    try:
        await asyncio.to_thread(rabbitmqctl, "stop_app")
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(rabbitmqctl, "start_app")
        await wait_for_rabbitmq(base_url)


def delete_namespace_sync(url: str, prefix: str) -> None:
    """``delete_namespace`` for synchronous tests and fixtures."""
    asyncio.run(delete_namespace(url, prefix))


async def wait_for_rabbitmq(url: str, timeout: float = 120.0) -> None:
    """Until RabbitMQ has booted and accepts an AMQP connection (after ``start_app``)."""
    deadline = time.monotonic() + timeout
    await asyncio.to_thread(rabbitmqctl, "await_startup", timeout=timeout)
    settings = AmqpSettings.parse(url, {})
    while True:
        try:
            connection = await aio_pika.connect(settings.connection_url, timeout=5)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
            continue
        await connection.close()
        return


@dataclass
class Namespace:
    """One test's deployment: a prefix on the shared RabbitMQ, apps on it, worker env."""

    base_url: str
    prefix: str
    test_dir: Path
    apps: list[QueueTasks] = field(default_factory=list)

    @property
    def url(self) -> str:
        return url_with(self.base_url, prefix=self.prefix)

    @property
    def settings(self) -> AmqpSettings:
        """The backend's names for this prefix (queues, exchanges)."""
        return AmqpSettings.parse(self.url, {})

    @property
    def env(self) -> dict[str, str]:
        return {"QTASKS_BROKER_URL": self.url, "QTASKS_RESULTS_URL": self.url,
                "QTASKS_TEST_DIR": str(self.test_dir), "QTASKS_LOG_LEVEL": "INFO"}

    def app(self) -> QueueTasks:
        """A producer/reader app (no task code, no embedded worker)."""
        app = QueueTasks(broker=self.url, results=self.url, embedded_worker=False)
        self.apps.append(app)
        return app

    async def close(self) -> None:
        for app in self.apps:
            with contextlib.suppress(Exception):
                await app.close()


@contextlib.asynccontextmanager
async def open_namespace(base_url: str, prefix: str, test_dir: Path,
                         ) -> AsyncIterator[Namespace]:
    """A ``Namespace``; afterwards its apps are closed and everything under it deleted."""
    ns = Namespace(base_url, prefix, test_dir)
    try:
        yield ns
    finally:
        await ns.close()
        await delete_namespace(base_url, prefix)


async def publish_raw(ns: Namespace, body: bytes, queue: str = "default") -> None:
    """What a producer in another language does: persistent, confirmed, mandatory."""
    settings = AmqpSettings.parse(ns.url, {})
    connection = await aio_pika.connect(settings.connection_url)
    try:
        channel = await connection.channel(on_return_raises=True)
        exchange = await channel.get_exchange(settings.tasks_exchange)
        await exchange.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.
                                                PERSISTENT), queue, mandatory=True)
    finally:
        await connection.close()


async def peek_dead(ns: Namespace) -> list[AbstractIncomingMessage]:
    """The messages on ``{prefix}.dead``, left in place (never acked)."""
    settings = AmqpSettings.parse(ns.url, {})
    connection = await aio_pika.connect(settings.connection_url)
    found = []
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(settings.dead_queue)
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            found.append(message)
    finally:
        await connection.close()
    return found


class Child:
    """``python -m integration.rabbitmq_support ...`` in another process, its stdout read
    line by line (JSON), each line awaited with a deadline."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, ns: Namespace, *args: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "integration.rabbitmq_support", *args, cwd=ROOT,
            env={**os.environ, **ns.env}, stdout=asyncio.subprocess.PIPE)
        return cls(proc)

    async def line(self, timeout: float = 30.0) -> Any:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            raw = await self.proc.stdout.readline()
        if not raw:
            raise AssertionError(f"child exited ({await self.proc.wait()}) before writing")
        return orjson.loads(raw)

    async def wait(self, timeout: float = 30.0) -> int:
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


async def _child(command: str, args: list[str]) -> None:
    """The other process: ``listen TASK`` prints "ready" then every event; ``submit TASK
    JSON_ARGS`` enqueues and prints the id (and never watches it)."""
    app = QueueTasks(embedded_worker=False)

    def out(value: object) -> None:
        sys.stdout.write(orjson.dumps(value).decode() + "\n")
        sys.stdout.flush()

    try:
        if command == "listen":
            events = await app.subscribe(args[0])
            out("ready")
            async for event in events:
                out(event.to_dict())
        elif command == "submit":
            task = await app.add_task(args[0], *orjson.loads(args[1]))
            out(task.id)
    finally:
        await app.close()


if __name__ == "__main__":
    asyncio.run(_child(sys.argv[1], sys.argv[2:]))
