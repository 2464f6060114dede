"""Raw nats-py limits, with the durability QTasks uses on NATS JetStream.

Tasks: JetStream publishes into a work-queue stream (file storage), every PubAck awaited
but ``window`` of them in flight at once; one durable pull consumer, batched fetches
bounded by a prefetch credit, explicit acks. Results: the replier publishes the reply with
a JetStream publish (PubAck awaited: the final result is confirmed before the request is
acked) into a results stream (file storage, ``max_age``) that the requester follows with a
core subscription made before it publishes. Streams: core-NATS publishes into a subject
the results stream captures, received by a core subscription.

"Client" functions run in the measuring process, "peer" functions in a second process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from typing import Any

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from benchmarks.common import (
    NATS_URL,
    CpuMeter,
    Replies,
    emit_ready,
    lag_summary,
    loop_name,
    timed_windowed,
)

BODY = b"x" * 200
REPLY_HEADER = "Bench-Reply"


def names(base: str) -> dict[str, str]:
    """Stream, consumer and subject names for one raw run (``base``: [A-Za-z0-9_-])."""
    return {"tasks": f"{base}_TASKS", "results": f"{base}_RESULTS",
            "task_subject": f"{base}.tasks", "result_subject": f"{base}.results",
            "consumer": f"{base}_workers"}


async def _connect() -> tuple[Client, JetStreamContext]:
    nc = await nats.connect(NATS_URL, connect_timeout=5, max_reconnect_attempts=3)
    return nc, nc.jetstream(timeout=10)


async def _topology(js: JetStreamContext, base: str) -> None:
    n = names(base)
    for config in (
        StreamConfig(name=n["tasks"], subjects=[n["task_subject"]],
                     retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE),
        StreamConfig(name=n["results"], subjects=[f"{n['result_subject']}.>"],
                     retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                     max_age=3600.0),
    ):
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            pass  # the other process of this run made it first


async def delete(base: str) -> None:
    """Remove the two streams of ``base`` (their consumers go with them)."""
    nc, js = await _connect()
    try:
        for stream in (names(base)["tasks"], names(base)["results"]):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream)
    finally:
        await nc.close()


# -- client side ---------------------------------------------------------------------

async def client_publish(base: str, n: int, window: int, timeout: float,
                         cpu: dict[str, list[int]] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    nc, js = await _connect()
    subject = names(base)["task_subject"]
    try:
        await _topology(js, base)

        async def op(_: int) -> None:
            await js.publish(subject, BODY)

        return await timed_windowed(n, window, op, deadline, cpu)
    finally:
        await nc.close()


async def client_rtt(base: str, n: int, window: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    nc, js = await _connect()
    n_ = names(base)
    reply_id = uuid.uuid4().hex
    replies = Replies()
    try:
        await _topology(js, base)

        async def on_reply(msg: Msg) -> None:
            replies.resolve(msg.subject.rpartition(".")[2])

        await nc.subscribe(f"{n_['result_subject']}.{reply_id}.*", cb=on_reply,
                           pending_msgs_limit=-1, pending_bytes_limit=-1)
        await nc.flush()
        headers = {REPLY_HEADER: f"{n_['result_subject']}.{reply_id}"}

        async def op(i: int) -> None:
            replied = replies.expect(str(i))
            await js.publish(n_["task_subject"], BODY, headers={**headers, "Bench-Id": str(i)})
            await replied

        return await timed_windowed(n, window, op, deadline)
    finally:
        await nc.close()


async def client_stream(base: str, n: int, timeout: float, latency: bool) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    nc, js = await _connect()
    stamps: list[float] = []
    lags: list[float] = []
    done = asyncio.Event()
    try:
        await _topology(js, base)

        async def on_message(msg: Msg) -> None:
            now = time.time()
            stamps.append(now)
            if latency:
                lags.append(now - orjson.loads(msg.data))
            if len(stamps) >= n:
                done.set()

        await nc.subscribe(f"{names(base)['result_subject']}.stream.>", cb=on_message,
                           pending_msgs_limit=-1, pending_bytes_limit=-1)
        await nc.flush()
        emit_ready()
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await done.wait()
    finally:
        await nc.close()
    result: dict[str, Any] = {"received": len(stamps), "loop": loop_name()}
    if len(stamps) > 1:
        result["rate"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    if lags:
        result["lags"] = lag_summary(lags)
    return result


# -- peer side -----------------------------------------------------------------------

async def _pull(js: JetStreamContext, base: str) -> JetStreamContext.PullSubscription:
    n = names(base)
    config = ConsumerConfig(durable_name=n["consumer"], ack_policy=AckPolicy.EXPLICIT,
                            ack_wait=30.0, max_ack_pending=10_000)
    return await js.pull_subscribe(n["task_subject"], durable=n["consumer"],
                                   stream=n["tasks"], config=config)


async def peer_consume(base: str, n: int, prefetch: int, timeout: float,
                       cpu: dict[str, list[int]] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    nc, js = await _connect()
    times: list[float] = []
    try:
        await _topology(js, base)
        sub = await _pull(js, base)
        meter = CpuMeter({"consumer": [os.getpid()], **(cpu or {})})
        meter.start()
        emit_ready()
        while len(times) <= n:
            if time.monotonic() > deadline:
                raise TimeoutError("consume ran out of time")
            try:
                msgs = await sub.fetch(batch=prefetch, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            if not times:
                times.append(time.time())
            for msg in msgs:
                await msg.ack()
                times.append(time.time())
        await nc.flush()
    finally:
        await nc.close()
    return {"first": times[0], "last": times[-1], "acked": len(times) - 1,
            "cpu": meter.stop()}


async def peer_reply(base: str, prefetch: int, timeout: float) -> dict[str, Any]:
    """Fetch requests (at most ``prefetch`` unsettled), publish each reply with a
    confirmed JetStream publish, then ack the request; until ``timeout`` or SIGTERM."""
    deadline = time.monotonic() + timeout
    nc, js = await _connect()
    handled = 0
    in_flight = 0
    slot = asyncio.Event()
    try:
        await _topology(js, base)
        sub = await _pull(js, base)
        emit_ready()

        async def handle(msg: Msg) -> None:
            nonlocal handled, in_flight
            try:
                headers = msg.headers or {}
                await js.publish(f"{headers[REPLY_HEADER]}.{headers['Bench-Id']}", BODY)
                await msg.ack()
                handled += 1
            finally:
                in_flight -= 1
                slot.set()

        tasks: set[asyncio.Task[None]] = set()
        while time.monotonic() < deadline:
            free = prefetch - in_flight
            if free <= 0:
                slot.clear()
                await slot.wait()
                continue
            try:
                msgs = await sub.fetch(batch=free, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                in_flight += 1
                task = asyncio.create_task(handle(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        await nc.close()
    return {"handled": handled}


async def peer_stream(base: str, n: int, rate: float | None, window: int,
                      timeout: float) -> dict[str, Any]:
    """Core-publish ``n`` time stamps into the results stream's subjects (no PubAck, as
    QTasks partials may ride), paced at ``rate``/s if given; flush at the end."""
    del window  # core publishes are buffered by the client, not windowed
    deadline = time.monotonic() + timeout
    nc, js = await _connect()
    subject = f"{names(base)['result_subject']}.stream.x"
    try:
        await _topology(js, base)
        start = time.monotonic()
        for i in range(n):
            if rate:
                wait = start + i / rate - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            elif i % 1000 == 0:
                await asyncio.sleep(0)  # let the client's flusher write out
            if time.monotonic() > deadline:
                raise TimeoutError("stream publish ran out of time")
            await nc.publish(subject, orjson.dumps(time.time()))
        await nc.flush(timeout=30)
    finally:
        await nc.close()
    return {"published": n}
