"""Dead letters and signing: undecodable, unknown, unsigned and forged messages never run
and are kept with their reason; a kept message can be requeued."""

from __future__ import annotations

import asyncio

from qtasks import QueueTasks, TaskMessage, TaskStatus
from qtasks.interfaces import dead_letter_ref
from qtasks.protocol import uuid7
from tests.contract.support import (
    DEADLINE,
    Backend,
    Drain,
    kept_dead_letters,
    publish_one,
    running_worker,
    settled,
    task_message,
)
from tests.contract.tasks import CALLS


class DeadLetterContract:
    """Messages a worker must not run, and what becomes of them."""

    async def test_unknown_task_is_dead_lettered_and_the_worker_goes_on(
            self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app) as worker:
            unknown = await producer.add_task("no_such_task", 1)
            garbage, garbage_body = TaskMessage(id=uuid7(), task="add"), b"\x00 not json"
            await producer.broker.publish(garbage, garbage_body)
            ok = await producer.add_task("add", 1, 2, timeout=DEADLINE)
            assert ok.returning == 3
            await settled(worker, 3)
            # The submitter hears of it at once, instead of waiting out its timeout.
            await unknown.wait(DEADLINE)
        assert unknown.status is TaskStatus.ERROR and unknown.error is not None
        assert unknown.error.type == "UnknownTaskError"
        assert "'no_such_task'" in unknown.error.message
        # Nothing is lost: both messages are kept with the reason.
        letters = await kept_dead_letters(producer, 2)
        assert {(letter.body == garbage_body, letter.reason.split(":")[0])
                for letter in letters} == {(False, "unknown task"), (True, "undecodable")}


    async def test_an_unknown_task_requeued_once_deployed_runs(self, backend: Backend) -> None:
        """Rolled out in the wrong order: the worker does not know the task yet, so it
        ends ``error`` and is kept; requeued once a worker knows it, it runs, and ``get``
        reports the new outcome."""
        producer = backend.app()
        old = QueueTasks(broker=backend.make_broker(), results=backend.make_results(),
                         embedded_worker=False)  # knows no task at all
        backend.apps.append(old)
        async with running_worker(old):
            task = await producer.add_task("add", 2, 3, timeout=DEADLINE)
        assert task.error is not None and task.error.type == "UnknownTaskError"
        [letter] = await kept_dead_letters(producer, 1)
        assert letter.ref == dead_letter_ref(letter.body)  # alike on every broker
        assert await producer.broker.dead_count() == 1
        assert await producer.broker.requeue_dead(["0123456789abcdef"]) == []
        assert await producer.broker.requeue_dead([letter.ref]) == [letter.ref]
        async with running_worker(backend.app()):
            async with asyncio.timeout(DEADLINE):
                while (found := await producer.get(task.id)) is None \
                        or found.status is not TaskStatus.SUCCESS:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)  # polling the store under test, bounded
        assert found.returning == 5
        assert await producer.broker.dead_letters() == []


    async def test_forged_or_unsigned_tasks_never_run(self, backend: Backend) -> None:
        producer, worker_app = backend.app(signing_key="k1"), backend.app(signing_key="k1")
        forger, unsigned = backend.app(signing_key="not the key"), backend.app()
        await producer.start()
        token = uuid7()
        async with running_worker(worker_app) as worker:
            forged = await forger.add_task("record", token)
            plain = await unsigned.add_task("record", token)
            # A signed body whose arguments were changed in transit.
            message, body = task_message("default", name="record")
            assert producer.signer is not None
            signed = producer.signer.sign(body)
            tampered = signed.replace(b"[1,2]", b"[1,3]")
            assert tampered != signed
            await producer.broker.publish(message, tampered)
            genuine = await producer.add_task("record", token, timeout=DEADLINE)
            await settled(worker, 4)
        assert genuine.returning == 1
        assert CALLS[token] == 1
        assert await producer.get(forged.id) is None
        assert await producer.get(plain.id) is None
        assert await producer.get(message.id) is None


    async def test_dead_letter_is_not_redelivered(self, backend: Backend) -> None:
        app = backend.app()
        queue = "dead"
        body = await publish_one(app, queue)
        deliveries = Drain(app.broker.consume([queue], prefetch=1))
        try:
            delivery = await deliveries.next()
            await delivery.dead_letter("test reason")
            await delivery.ack()  # settling twice is a no-op
            assert await deliveries.nothing_within(0.5)
        finally:
            await deliveries.close()
        [letter] = await kept_dead_letters(app, 1)
        assert (letter.queue, letter.body, letter.reason) == (queue, body, "test reason")
        # A new consumer does not get it either: it left the queue, not just this lease.
        again = Drain(app.broker.consume([queue], prefetch=1))
        try:
            assert await again.nothing_within(0.5)
        finally:
            await again.close()

