"""Workflows: chain, group, chord and the stream fan-out, and the guarantees under copies
and redeliveries (a continuation published twice runs once)."""

from __future__ import annotations

import asyncio
import time

import pytest

from qtasks import Part, Restarted, TaskMessage, TaskStatus, WorkflowFailed, chain, chord, group
from qtasks.canvas.wire import FLOW_HEADER, Flow, derive_id, id_ms, new_claim, step_path
from qtasks.protocol import uuid7
from tests.contract.support import DEADLINE, Backend, redeliver_with_final, running_worker
from tests.contract.tasks import CALLS, gate


def runs(token: str, label: str) -> int:
    return CALLS.get(f"{token}:{label}", 0)


class WorkflowsContract:
    """Workflows advance on the workers, from what their messages and results carry."""

    async def test_a_chain_passes_each_result_to_the_next_step(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        add = producer.signature
        flow = add("wf_add", (1, 2)) | add("wf_add", (), {"b": 10}) | add("wf_add", (), {"b": 100})
        assert flow == chain(add("wf_add", (1, 2)), add("wf_add", (), {"b": 10}),
                             add("wf_add", (), {"b": 100}))
        async with running_worker(worker_app):
            handle = await flow.add_task()
            last = await handle.wait(DEADLINE)
        assert (last.status, last.returning, last.name) == (TaskStatus.SUCCESS, 113, "wf_add")
        assert list(handle.tasks)[-1] == last.id and len(handle.tasks) == 3

    async def test_a_chains_stream_tags_every_partial_with_its_step(
            self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        sig = producer.signature
        async with running_worker(worker_app):
            handle = await (sig("wf_stage", ("a", 2)) | sig("wf_stage", (), {"n": 3})).add_task()
            async with asyncio.timeout(DEADLINE):
                parts = [part async for part in handle.stream()]
            last = await handle.wait(DEADLINE)
        # The second step gets the first one's returning (the list of its yields) first.
        assert parts == [Part(0, "a0"), Part(0, "a1"), Part(1, "['a0', 'a1']0"),
                         Part(1, "['a0', 'a1']1"), Part(1, "['a0', 'a1']2")]
        assert last.returning == ["['a0', 'a1']0", "['a0', 'a1']1", "['a0', 'a1']2"]

    async def test_a_step_that_fails_ends_the_chain_and_later_steps_never_run(
            self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        token, sig = uuid7(), producer.signature
        flow = chain(sig("wf_add", (1,), {"token": token}), sig("wf_fail", (token,)),
                     sig("wf_add", (), {"token": token, "label": "after"}))
        async with running_worker(worker_app):
            handle = await flow.add_task()
            with pytest.raises(WorkflowFailed) as failed:
                await handle.wait(DEADLINE)
            await producer.add_task("add", 1, 1, timeout=DEADLINE)  # the worker went on
        assert failed.value.step == 1 and failed.value.task.name == "wf_fail"
        assert failed.value.task.error is not None
        assert failed.value.task.error.type == "ValueError"
        assert (runs(token, "add"), runs(token, "fail"), runs(token, "after")) == (1, 1, 0)

    async def test_a_step_retried_after_a_failure_continues_the_chain(
            self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        token, sig = uuid7(), producer.signature
        async with running_worker(worker_app):
            handle = await (sig("wf_flaky", (1, token)) | sig("wf_add", (), {"b": 5})).add_task()
            assert await handle.result(DEADLINE) == 7
        assert runs(token, "flaky") == 2

    async def test_a_group_returns_its_results_in_member_order(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        sig = producer.signature
        async with running_worker(worker_app, concurrency=8):
            handle = await group(sig("wf_stage", (f"m{i}", i + 1)) for i in range(3)).add_task()
            async with asyncio.timeout(DEADLINE):
                parts = [part async for part in handle.stream()]
            results = await handle.wait(DEADLINE)
        assert results == [["m00"], ["m10", "m11"], ["m20", "m21", "m22"]]
        # (index, partial) pairs, each member's in its order, members interleaved.
        for index in range(3):
            assert [v for i, v in parts if i == index] == results[index]

    async def test_a_failed_member_fails_the_group_after_the_others_ended(
            self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        token, sig = uuid7(), producer.signature
        members = [sig("wf_add", (1,), {"token": token}), sig("wf_fail", (0, token)),
                   sig("wf_add", (2,), {"token": token})]
        async with running_worker(worker_app):
            handle = await group(members).add_task()
            with pytest.raises(WorkflowFailed) as failed:
                await handle.wait(DEADLINE)
        assert failed.value.step == 1 and failed.value.task.name == "wf_fail"
        # Members are independent: the others ran and ended.
        assert runs(token, "add") == 2
        assert sorted(t.status.value for t in handle.tasks.values()) == \
            ["error", "success", "success"]

    async def test_a_chord_starts_its_body_once_with_the_results_in_order(
            self, backend: Backend) -> None:
        """The members finish together (a barrier), so several find the group complete
        at once and start the body: it runs once."""
        producer, workers = backend.app(), [backend.app(), backend.app()]
        token, sig, size = uuid7(), producer.signature, 4
        flow = chord((sig("wf_member", (i, token, size)) for i in range(size)),
                     sig("wf_total", (), {"token": token}))
        async with running_worker(workers[0], concurrency=size), \
                running_worker(workers[1], concurrency=size):
            handle = await flow.add_task()
            body = await handle.wait(DEADLINE)
            await producer.add_task("add", 0, 0, timeout=DEADLINE)
        assert (body.status, body.returning, runs(token, "total")) == (TaskStatus.SUCCESS, 6, 1)

    async def test_a_failed_member_never_starts_the_chord_body(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        token, sig = uuid7(), producer.signature
        flow = chord([sig("wf_add", (1,)), sig("wf_fail", (1, token))],
                     sig("wf_total", (), {"token": token}))
        async with running_worker(worker_app):
            handle = await flow.add_task()
            with pytest.raises(WorkflowFailed):
                await handle.wait(DEADLINE)
            await producer.add_task("add", 0, 0, timeout=DEADLINE)
        assert runs(token, "total") == 0

    async def test_fan_out_starts_each_item_while_the_generator_runs(
            self, backend: Backend) -> None:
        """``wf_chunks`` yields 0, then waits until item 0 has run, then yields the rest:
        the workflow completes only if items start while their generator runs."""
        producer, worker_app = backend.app(), backend.app()
        token, sig = uuid7(), producer.signature
        flow = (sig("wf_chunks", (4, token)) | sig("wf_item", (token,)).each()
                | sig("wf_total", ()))
        async with running_worker(worker_app, concurrency=4):
            handle = await flow.add_task()
            assert await handle.result(DEADLINE) == 60
        assert [runs(token, f"item{i}") for i in range(4)] == [1, 1, 1, 1]

    async def test_fan_out_handle_waits_and_streams_the_items(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        sig = producer.signature
        flow = sig("wf_stage", ("x", 3)) | sig("wf_stage", (), {"n": 2}).each()
        async with running_worker(worker_app, concurrency=4):
            handle = await flow.add_task()
            async with asyncio.timeout(DEADLINE):
                parts = [part async for part in handle.stream()]
            results = await handle.wait(DEADLINE)
        assert results == [["x00", "x01"], ["x10", "x11"], ["x20", "x21"]]
        assert [v for step, v in parts if step == 0] == ["x0", "x1", "x2"]
        for seq in range(3):
            assert [v for step, v in parts if step == (1, seq)] == results[seq]

    async def test_a_generator_retried_starts_the_items_of_its_last_attempt(
            self, backend: Backend) -> None:
        """``wf_flaky`` as the source fails once after nothing; a generator that yields
        then fails is retried and its retry's items are the workflow's."""
        producer, worker_app = backend.app(), backend.app()
        token = uuid7()
        flow = (producer.signature("flaky", (token, 1)) | producer.signature(
            "wf_add", (), {"b": 1}).each() | producer.signature("wf_total", ()))
        async with running_worker(worker_app, concurrency=4):
            handle = await flow.add_task()
            async with asyncio.timeout(DEADLINE):
                parts = [part async for part in handle.stream()]
            total = await handle.result(DEADLINE)
        # Attempt 1 yielded 1 and failed; attempt 2 yielded 2 and succeeded: its item's
        # result (2 + 1) is the fan-out's only one.
        source = [part.value for part in parts if part.step == 0]
        assert source[0] == 1 and isinstance(source[1], Restarted) and source[2:] == [2]
        assert total == 3

    async def test_a_producer_may_leave_right_after_starting_a_workflow(
            self, backend: Backend) -> None:
        producer, worker_app, reader = backend.app(), backend.app(), backend.app()
        sig = producer.signature
        handle = await (sig("wf_add", (1, 1)) | sig("wf_add", (), {"b": 1})).add_task()
        saved = handle.to_dict()
        await producer.close()  # before any worker took a step
        async with running_worker(worker_app):
            later = reader.workflow_handle(saved)
            assert await later.result(DEADLINE) == 3

    async def test_a_redelivered_step_whose_final_is_stored_starts_what_follows(
            self, backend: Backend) -> None:
        """A worker killed after the step's final and before its ack: the redelivery does
        not run the step again but does start the next one."""
        producer, worker_app = backend.app(), backend.app()
        token, sig = uuid7(), producer.signature
        handle = await (sig("wf_add", (1,), {"token": token})
                        | sig("wf_add", (), {"b": 5})).add_task()
        first = derive_id(handle.id, "0", id_ms(handle.id))
        await redeliver_with_final(worker_app, first, "wf_add", 37)
        async with running_worker(worker_app):
            assert await handle.result(DEADLINE) == 42
        assert runs(token, "add") == 0

    async def test_copies_of_a_continuation_run_once(self, backend: Backend) -> None:
        """Three copies of one continuation (as a step redelivered twice publishes),
        each with its own claim token, reach two workers: one runs, and a copy sent
        after the end is settled unrun, leaving the final readable."""
        producer, workers = backend.app(), [backend.app(), backend.app()]
        token, workflow = uuid7(), uuid7()
        ms = id_ms(workflow)
        task_id = derive_id(workflow, step_path(1), ms)

        def copy() -> TaskMessage:
            flow = Flow(workflow, 1, ms, [], claim=new_claim())
            return TaskMessage(id=task_id, task="wf_held", args=["v", token],
                               created_at=time.time(), headers={FLOW_HEADER: flow.to_header()})

        await producer.start()
        async with running_worker(workers[0], concurrency=2) as one, \
                running_worker(workers[1], concurrency=2) as two:
            for _ in range(3):
                await producer.publish(copy())
            async with asyncio.timeout(DEADLINE):
                await gate(f"{token}:held").wait()
            if not producer.broker.deduplicates:
                async with asyncio.timeout(DEADLINE):
                    while one.processed + two.processed < 2:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)  # two copies settled unrun; bounded
            gate(token).set()
            done = await producer.task_handle(task_id).wait(DEADLINE)
            await producer.publish(copy())  # after the end
            await producer.add_task("add", 0, 0, timeout=DEADLINE)
            handled = 2 if producer.broker.deduplicates else 5
            async with asyncio.timeout(DEADLINE):
                while one.processed + two.processed < handled:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)  # the late copy settled; bounded
        assert (done.status, done.returning, runs(token, "held")) == (TaskStatus.SUCCESS, "v", 1)
        kept = await backend.app().get(task_id)
        assert kept is not None and kept.status is TaskStatus.SUCCESS

