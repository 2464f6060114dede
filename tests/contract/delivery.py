"""Delivery: prefetch, requeue, redelivery and delayed retry on the broker, and a worker
that runs a redelivered task at most once."""

from __future__ import annotations

import asyncio
import time

from qtasks import TaskMessage, TaskStatus
from qtasks.protocol import uuid7
from tests.contract.support import (
    DEADLINE,
    Backend,
    Drain,
    publish_one,
    redeliver_with_final,
    running_worker,
    settled,
    task_message,
)
from tests.contract.tasks import CALLS, gate


class DeliveryContract:
    """At-least-once delivery, with a worker that never runs one task twice."""

    async def test_a_task_delivered_again_while_it_runs_is_not_run_twice(
            self, backend: Backend) -> None:
        """A copy of a running task's message (a lost lease redelivered, or a publish
        retried) joins the run: one run, one final, and nothing left to deliver."""
        producer, worker_app = backend.app(), backend.app()
        token = uuid7()
        async with running_worker(worker_app, concurrency=4) as worker:
            task = await producer.add_task("counted_hold", token)
            async with asyncio.timeout(DEADLINE):
                await gate(f"{token}:started").wait()
            copy = TaskMessage(id=task.id, task="counted_hold", args=[token],
                               created_at=time.time())
            await producer.publish(copy)
            if not producer.broker.deduplicates:
                await settled(worker, 1)  # the copy joined the run, which still waits
            assert CALLS[token] == 1
            gate(token).set()
            await task.wait(DEADLINE)
            after = await producer.add_task("add", 1, 1, timeout=DEADLINE)
            await settled(worker, 2 if producer.broker.deduplicates else 3)
        assert (task.returning, after.returning, CALLS[token]) == (1, 2, 1)
        # Exactly those deliveries: a copy a deduplicating broker let through would show.
        assert worker.processed == (2 if producer.broker.deduplicates else 3)
        # Both deliveries were settled with the run: a new consumer gets nothing.
        deliveries = Drain(producer.broker.consume(["default"], prefetch=4))
        try:
            assert await deliveries.nothing_within(0.5)
        finally:
            await deliveries.close()


    async def test_redelivered_task_with_a_stored_final_is_not_run_again(
            self, backend: Backend) -> None:
        """A worker stored the final and died before its ack: the redelivery is acked
        without running the task, and the stored final is what the submitter gets."""
        producer, worker_app = backend.app(), backend.app()
        token = uuid7()
        task = await producer.add_task("record", token)
        await redeliver_with_final(worker_app, task.id, "record", "stored")
        async with running_worker(worker_app) as worker:
            done = await task.wait(DEADLINE)
            await settled(worker, 1)
        assert (done.status, done.returning) == (TaskStatus.SUCCESS, "stored")
        assert token not in CALLS
        # Settled without a new run: what the store keeps is still the stored final.
        kept = await backend.app().get(task.id)
        assert kept is not None and kept.returning == "stored"


    async def test_prefetch_bounds_unsettled_deliveries(self, backend: Backend) -> None:
        app = backend.app()
        await app.start()
        queue = "bounded"
        await app.broker.declare([queue])
        bodies = []
        for _ in range(3):
            message, body = task_message(queue)
            await app.broker.publish(message, body)
            bodies.append(body)
        deliveries = Drain(app.broker.consume([queue], prefetch=2))
        try:
            first = await deliveries.next()
            second = await deliveries.next()
            assert await deliveries.nothing_within(0.5)
            await first.ack()
            third = await deliveries.next()
            await second.ack()
            await third.ack()
        finally:
            await deliveries.close()
        assert sorted([first.body, second.body, third.body]) == sorted(bodies)


    async def test_requeue_and_closed_consumer_redeliver(self, backend: Backend) -> None:
        app, other = backend.app(), backend.app()
        await other.start()
        queue = "redeliver"
        body = await publish_one(app, queue)
        deliveries = Drain(app.broker.consume([queue], prefetch=1))
        delivery = await deliveries.next()
        assert delivery.body == body and not delivery.redelivered
        await delivery.requeue()
        again = await deliveries.next()
        assert again.body == body and again.redelivered
        # Never settled: closing the consumer's broker gives it to another consumer.
        await deliveries.close()
        await app.broker.close()
        elsewhere = Drain(other.broker.consume([queue], prefetch=1))
        try:
            third = await elsewhere.next()
            assert third.body == body and third.redelivered
            await third.ack()
            assert await elsewhere.nothing_within(0.3)
        finally:
            await elsewhere.close()


    async def test_retry_later_comes_back_after_the_delay(self, backend: Backend) -> None:
        app = backend.app()
        queue = "later"
        body = await publish_one(app, queue)
        deliveries = Drain(app.broker.consume([queue], prefetch=1))
        try:
            delivery = await deliveries.next()
            settled = time.monotonic()
            await delivery.retry_later(0.4)
            again = await deliveries.next()
            assert time.monotonic() - settled >= 0.35
            assert again.body == body
            await again.ack()
        finally:
            await deliveries.close()

