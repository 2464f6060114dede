"""Raw aio-pika limits, with the durability QTasks uses on RabbitMQ.

Tasks: persistent messages into a durable queue, publisher confirms awaited for every
message but pipelined (``window`` publishes in flight on one channel), consumed with manual
ack and a prefetch bound. Results: one confirmed publish to a durable topic exchange that
routes to the requester's own queue and to a stream queue (``x-queue-type: stream``) kept
for late readers, then the request is acked. Streams: the same topic exchange path, with
pipelined confirms.

"Client" functions run in the measuring process, "peer" functions in a second process
(the raw counterpart of a worker); ``benchmarks.agent`` calls them.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from benchmarks.common import (
    AMQP_URL,
    CpuMeter,
    Replies,
    emit_ready,
    lag_summary,
    loop_name,
    timed_windowed,
    windowed,
)

PERSISTENT = aio_pika.DeliveryMode.PERSISTENT
BODY = b"x" * 200  # about the size of an encoded QTasks task message


def names(base: str) -> dict[str, str]:
    return {"queue": f"{base}.tasks", "exchange": f"{base}.results",
            "log": f"{base}.results-log"}


async def _topology(channel: aio_pika.abc.AbstractChannel, base: str) -> tuple[
        aio_pika.abc.AbstractQueue, aio_pika.abc.AbstractExchange]:
    n = names(base)
    queue = await channel.declare_queue(n["queue"], durable=True)
    exchange = await channel.declare_exchange(n["exchange"], aio_pika.ExchangeType.TOPIC,
                                              durable=True)
    log = await channel.declare_queue(
        n["log"], durable=True, arguments={"x-queue-type": "stream", "x-max-age": "1h"})
    await log.bind(exchange, "#")
    return queue, exchange


async def delete(base: str) -> None:
    """Remove what ``_topology`` made for ``base`` (and nothing else)."""
    n = names(base)
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for queue in (n["queue"], n["log"]):
            await channel.queue_delete(queue)
        await channel.exchange_delete(n["exchange"])
    finally:
        await connection.close()


# -- client side ---------------------------------------------------------------------

async def client_publish(base: str, n: int, window: int, timeout: float,
                         cpu: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Publish ``n`` persistent messages with pipelined confirms; the publish-only rate.
    With a consumer peer running, the peer reports the end-to-end time."""
    deadline = time.monotonic() + timeout
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue, _ = await _topology(channel, base)
        exchange = channel.default_exchange

        async def op(_: int) -> None:
            await exchange.publish(aio_pika.Message(BODY, delivery_mode=PERSISTENT),
                                   routing_key=queue.name)

        return await timed_windowed(n, window, op, deadline, cpu)
    finally:
        await connection.close()


async def client_rtt(base: str, n: int, window: int, timeout: float) -> dict[str, Any]:
    """``n`` requests pipelined; each reply comes back through the results exchange."""
    deadline = time.monotonic() + timeout
    connection = await aio_pika.connect(AMQP_URL)
    reply_id = uuid.uuid4().hex
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue, exchange = await _topology(channel, base)
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        await replies.bind(exchange, f"{reply_id}.#")
        waiting = Replies()

        async def on_reply(message: AbstractIncomingMessage) -> None:
            waiting.resolve(message.correlation_id or "")

        await replies.consume(on_reply, no_ack=True)
        target = channel.default_exchange

        async def op(i: int) -> None:
            replied = waiting.expect(str(i))
            await target.publish(
                aio_pika.Message(BODY, delivery_mode=PERSISTENT, correlation_id=str(i),
                                 reply_to=reply_id), routing_key=queue.name)
            await replied

        return await timed_windowed(n, window, op, deadline)
    finally:
        await connection.close()


async def client_stream(base: str, n: int, timeout: float, latency: bool) -> dict[str, Any]:
    """Receive ``n`` messages a peer publishes to the results exchange; rate or latency."""
    deadline = time.monotonic() + timeout
    connection = await aio_pika.connect(AMQP_URL)
    stamps: list[float] = []
    lags: list[float] = []
    done = asyncio.Event()
    try:
        channel = await connection.channel()
        _, exchange = await _topology(channel, base)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "stream.#")

        async def on_message(message: AbstractIncomingMessage) -> None:
            now = time.time()
            stamps.append(now)
            if latency:
                lags.append(now - orjson.loads(message.body))
            if len(stamps) >= n:
                done.set()

        await queue.consume(on_message, no_ack=True)
        emit_ready()
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await done.wait()
    finally:
        await connection.close()
    return _stream_result(stamps, lags)


def _stream_result(stamps: list[float], lags: list[float]) -> dict[str, Any]:
    result: dict[str, Any] = {"received": len(stamps), "loop": loop_name()}
    if len(stamps) > 1:
        result["rate"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    if lags:
        result["lags"] = lag_summary(lags)
    return result


# -- peer side -----------------------------------------------------------------------

async def peer_consume(base: str, n: int, prefetch: int, timeout: float,
                       cpu: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Consume and ack ``n`` messages; report when the first arrived and the last was acked."""
    connection = await aio_pika.connect(AMQP_URL)
    times: list[float] = []
    done = asyncio.Event()
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue, _ = await _topology(channel, base)

        async def on_message(message: AbstractIncomingMessage) -> None:
            if not times:
                times.append(time.time())
            await message.ack()
            times.append(time.time())
            if len(times) > n:
                done.set()

        await queue.consume(on_message)
        meter = CpuMeter({"consumer": [os.getpid()], **(cpu or {})})
        meter.start()
        emit_ready()
        async with asyncio.timeout(timeout):
            await done.wait()
    finally:
        await connection.close()
    return {"first": times[0], "last": times[-1], "acked": len(times) - 1,
            "cpu": meter.stop()}


async def peer_reply(base: str, prefetch: int, timeout: float) -> dict[str, Any]:
    """Reply to every request (confirmed publish to the results exchange), then ack it;
    until ``timeout`` or SIGTERM."""
    connection = await aio_pika.connect(AMQP_URL)
    handled = 0
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=prefetch)
        queue, exchange = await _topology(channel, base)

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal handled
            key = message.correlation_id or ""
            await exchange.publish(
                aio_pika.Message(BODY, delivery_mode=PERSISTENT, correlation_id=key),
                routing_key=f"{message.reply_to}.{key}")
            await message.ack()
            handled += 1

        await queue.consume(on_message)
        emit_ready()
        await asyncio.sleep(timeout)
    finally:
        await connection.close()
    return {"handled": handled}


async def peer_stream(base: str, n: int, rate: float | None, window: int,
                      timeout: float) -> dict[str, Any]:
    """Publish ``n`` small messages (pipelined confirms), paced at ``rate``/s if given;
    each carries its publish time."""
    deadline = time.monotonic() + timeout
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        _, exchange = await _topology(channel, base)
        if rate:
            # Paced: one publisher, each publish's confirm awaited in the background so
            # that a slow confirm does not delay the next message.
            start = time.monotonic()
            pending: set[asyncio.Task[Any]] = set()
            for i in range(n):
                wait = start + i / rate - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if time.monotonic() > deadline:
                    raise TimeoutError("paced publish ran out of time")
                task = asyncio.create_task(exchange.publish(
                    aio_pika.Message(orjson.dumps(time.time())), routing_key="stream.x"))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending)
        else:
            async def op(_: int) -> None:
                await exchange.publish(aio_pika.Message(orjson.dumps(time.time())),
                                       routing_key="stream.x")

            await windowed(n, window, op, deadline)
    finally:
        await connection.close()
    return {"published": n}
