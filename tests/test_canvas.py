"""Signatures, the composition of workflows, their wire format, and what a worker does
with a workflow header it cannot read. The behaviour of running workflows on every
backend is the contract's (``tests/contract/workflows.py``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qtasks import (
    MessageDecodeError,
    OptionError,
    QueueTasks,
    Signature,
    TaskMessage,
    WorkflowFailed,
    chain,
    chord,
    group,
)
from qtasks.canvas.launch import unit_messages
from qtasks.canvas.signature import Chain, Each, Group
from qtasks.canvas.wire import (
    FLOW_HEADER,
    Flow,
    derive_id,
    flow_of,
    id_ms,
    renewed,
)
from qtasks.protocol import uuid7
from tests.contract.support import DEADLINE, kept_dead_letters, running_worker

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def app() -> AsyncIterator[QueueTasks]:
    app = QueueTasks(broker=f"memory://{uuid.uuid4().hex}", embedded_worker=False)

    @app.task
    async def add(a: int, b: int = 0) -> int:
        return a + b

    @app.task(queue="slow", priority=0, max_time=9.0)
    async def total(values: list[int]) -> int:
        return sum(values)

    @app.task
    async def numbers(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    yield app
    await app.close()


def test_signatures_of_a_task_and_by_name(app: QueueTasks) -> None:
    @app.task
    async def scale(a: int, b: int = 0) -> int:
        return a * b

    assert scale.s(1, b=2) == Signature("scale", (1,), {"b": 2})
    assert scale.s(1).bound is app
    assert scale.each(3) == Each(Signature("scale", (3,)))
    sig = scale.signature((1,), {"b": 2}, queue="q", priority=0, delay=1.5)
    assert (sig.name, sig.args, sig.kwargs, sig.options) == \
        ("scale", (1,), {"b": 2}, {"queue": "q", "priority": 0, "delay": 1.5})
    remote = app.signature("elsewhere.report", ("weekly",), queue="reports")
    assert remote.to_dict() == {"task": "elsewhere.report", "args": ["weekly"], "kwargs": {},
                                "options": {"queue": "reports"}}


def test_a_signature_survives_json(app: QueueTasks) -> None:
    sig = app.signature("add", (1, [2, 3]), {"b": {"x": None}}, max_time=3.0)
    again = Signature.from_dict(sig.to_dict())
    assert again == sig and again.bound is None and sig.bound is app
    assert repr(sig) == "add.s(1, [2, 3], b={'x': None}) {'max_time': 3.0}"


async def test_a_signature_sent_alone_is_a_task(app: QueueTasks) -> None:
    async with running_worker(app):
        task = await app.signature("add", (1, 2)).add_task()
        assert (await task.wait(DEADLINE)).returning == 3


@pytest.mark.parametrize(("data", "problem"), [
    ({"args": []}, "a 'task' name"),
    ({"task": "t", "args": {}}, "'args' must be a list"),
    ({"task": "t", "options": {"colour": "red"}}, "unknown option colour"),
    ({"task": "t", "options": {"priority": "high"}}, "priority must be an integer"),
    ({"task": "t", "options": {"timeout": 3}}, "unknown option timeout"),
])
def test_a_malformed_signature_is_refused_with_what_is_wrong(
        data: dict[str, Any], problem: str) -> None:
    with pytest.raises(OptionError, match=problem):
        Signature.from_dict(data)


def test_composition(app: QueueTasks) -> None:
    a, b, c = (app.signature(n) for n in "abc")
    assert a | b | c == chain(a, b, c) == chain(chain(a, b), c) == Chain(a, chain(b, c))
    assert (a | b).steps() == [a, b]
    assert group(s for s in (a, b)) == group(a, b) == Group([a, b])
    assert chord([a, b], c) == chain(group(a, b), c)
    assert (a | c.each()).steps() == [a, Each(c)]
    assert repr(a | group(b) | c | a.each()) == "a.s() | group([b.s()]) | c.s() | a.s().each()"


@pytest.mark.parametrize(("build", "problem"), [
    (lambda s: chain(s("a").each(), s("b")), "must follow a single"),
    (lambda s: group(s("a")) | s("b").each(), "must follow a single"),
    (lambda s: s("a") | s("b").each() | s("c").each(), "must follow a single"),
    (lambda s: group([]), "at least one member"),
    (lambda s: group(s("a") | s("b")), "members are signatures"),
    (lambda s: chain(s("a"), 3), "a chain's steps are"),
])
def test_a_workflow_that_cannot_run_is_refused_when_built(
        app: QueueTasks, build: Any, problem: str) -> None:
    with pytest.raises(OptionError, match=problem):
        build(app.signature)


def test_a_plan_settles_queue_priority_and_max_time(app: QueueTasks) -> None:
    plan = (app.signature("add", (1,)) | app.signature("total")
            | app.signature("unknown", queue="x")).plan(app.runtime)
    assert [step["options"] for step in plan] == [
        {"queue": "default", "priority": 0}, {"queue": "slow", "priority": 0, "max_time": 9.0},
        {"queue": "x", "priority": 0}]
    with pytest.raises(OptionError, match="task_id is for a call sent alone"):
        chain(app.signature("add", task_id="fixed")).plan(app.runtime)


def test_derived_ids_are_deterministic_uuid7s() -> None:
    workflow = uuid7()
    ms = id_ms(workflow)
    one = derive_id(workflow, "1.0", ms)
    assert one == derive_id(workflow, "1.0", ms)
    assert len({one, derive_id(workflow, "1.1", ms), derive_id(uuid7(), "1.0", ms)}) == 3
    parsed = uuid.UUID(one)
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert id_ms(one) == ms
    # Fixed digits for a fixed input: what docs/workflows.md tells other languages.
    assert derive_id("0190a0b0-0000-7000-8000-000000000000", "2", 1_720_000_000_000) == \
        EXAMPLE_ID


#: ``derive_id("0190a0b0-0000-7000-8000-000000000000", "2", 1720000000000)``, the worked
#: example of docs/workflows.md (computed there from SHA-256 by hand, bit by bit).
EXAMPLE_ID = "019077fd-3000-7101-ad7a-217c2e21d91a"


def test_the_flow_header_round_trips_and_bad_ones_are_named() -> None:
    flow = Flow("w", 2, 17, [{"task": "t", "args": [], "kwargs": {}, "options": {}}],
                member=(1, 3), claim="abc")
    assert Flow.from_header(flow.to_header()) == flow
    assert flow_of({FLOW_HEADER: flow.to_header()}) == flow and flow_of({}) is None
    for bad in ["{nope", "[]", '{"v": 2}', '{"v": 1, "wf": "w", "step": "1", "t": 0, "rest": []}',
                '{"v": 1, "wf": "w", "step": 1, "t": 0, "rest": [{"task": 3}]}',
                '{"v": 1, "wf": "w", "step": 1, "t": 0, "rest": [], "item": [1, 2]}',
                '{"v": 1, "wf": "w", "step": 1, "t": 0, "rest": [{"group": []}]}',
                '{"v": 1, "wf": "w", "step": 1, "t": 0, "rest": [{"each": {"task": "t"}}]}']:
        with pytest.raises(MessageDecodeError, match=FLOW_HEADER):
            Flow.from_header(bad)


def test_a_retry_of_a_continuation_is_a_new_copy() -> None:
    header = Flow("w", 1, 0, [], claim="old").to_header()
    headers = renewed({FLOW_HEADER: header, "x": "y"})
    assert headers["x"] == "y" and Flow.from_header(headers[FLOW_HEADER]).claim != "old"
    unclaimed = {FLOW_HEADER: Flow("w", 0, 0, []).to_header()}
    assert renewed(unclaimed) is unclaimed


def test_the_messages_of_a_unit(app: QueueTasks) -> None:
    plan = (group(app.signature("add", (i,)) for i in range(2))
            | app.signature("numbers", delay=2.0) | app.signature("add").each()).plan(app.runtime)
    members = unit_messages("w", 0, plan, (5,), 1000, claim=True, default_queue="default")
    assert [m.args for m in members] == [[5, 0], [5, 1]]
    flows = [Flow.from_header(m.headers[FLOW_HEADER]) for m in members]
    assert [f.member for f in flows] == [(0, 2), (1, 2)] and flows[0].next_step == 1
    assert flows[0].claim and flows[0].claim != flows[1].claim
    (source,) = unit_messages("w", 1, plan[1:], (["x"],), 1000, claim=False,
                              default_queue="default")
    flow = Flow.from_header(source.headers[FLOW_HEADER])
    assert flow.each is not None and flow.rest == [] and flow.next_step == 3
    assert source.not_before is not None and 1.9 < source.not_before - time.time() <= 2.0
    assert source.id == derive_id("w", "1", 1000)


async def test_a_group_after_a_step_gets_its_result_in_every_member(app: QueueTasks) -> None:
    sig = app.signature
    async with running_worker(app):
        handle = await (sig("add", (1, 1)) | group(sig("add", (), {"b": i}) for i in range(3))
                        | sig("total", queue="default")).add_task()
        assert await handle.result(DEADLINE) == 2 * 3 + 3


async def test_a_step_with_a_delay_starts_no_sooner(app: QueueTasks) -> None:
    sig = app.signature
    async with running_worker(app):
        handle = await (sig("add", (1,)) | sig("add", delay=0.3)).add_task()
        last = await handle.wait(DEADLINE)
    first = next(iter(handle.tasks.values()))
    assert first.finished_at is not None and last.started_at is not None
    assert last.started_at - first.finished_at >= 0.29


async def test_a_task_of_no_workflow_publishes_no_claim(app: QueueTasks) -> None:
    events = await app.subscribe("numbers")
    seen: list[Any] = []
    async with running_worker(app):
        await app.add_task("numbers", 1, timeout=DEADLINE)
        async with asyncio.timeout(DEADLINE):
            async for event in events:
                seen.append(event)
                if event.kind == "final":
                    break
    assert [e.kind for e in seen] == ["status", "partial", "final"]
    assert seen[0].status == "running" and seen[0].claim is None


async def test_a_workflow_header_that_cannot_be_read_is_dead_lettered(app: QueueTasks) -> None:
    async with running_worker(app):
        await app.publish(TaskMessage(id=uuid7(), task="add", args=[1], created_at=time.time(),
                                      headers={FLOW_HEADER: '{"v": 1, "wf": 3}'}))
        (letter,) = await kept_dead_letters(app, 1)
        assert (await app.add_task("add", 1, 1, timeout=DEADLINE)).returning == 2
    assert letter.reason.startswith(f"undecodable: {FLOW_HEADER} header")


def test_the_file_pipeline_example_runs(tmp_path: Path) -> None:
    """``python -m examples.pipeline FILE``: 200 lines of three words, 40 lines a chunk."""
    text = tmp_path / "words.txt"
    text.write_text("alpha beta gamma\n" * 200)
    done = subprocess.run([sys.executable, "-m", "examples.pipeline", str(text)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
    assert f"{text}: 600 words in 5 chunks;" in done.stdout
    assert done.stdout.count("read chunk") == 5


async def test_a_continuation_that_cannot_be_sent_fails_the_workflow_once() -> None:
    """The step after one whose result is too large for a task message ends in error
    (the handle says why) instead of its predecessor being redelivered for ever."""
    app = QueueTasks(broker=f"memory://{uuid.uuid4().hex}", embedded_worker=False,
                     max_message_size=2000)

    @app.task
    async def big() -> str:
        return "x" * 5000

    @app.task
    async def size(text: str) -> int:
        return len(text)

    try:
        async with running_worker(app) as worker:
            handle = await (big.s() | size.s()).add_task()
            with pytest.raises(WorkflowFailed) as failed:
                await handle.wait(DEADLINE)
            assert (await app.add_task("big", timeout=DEADLINE)).returning == "x" * 5000
        assert failed.value.step == 1 and failed.value.task.error is not None
        assert failed.value.task.error.type == "MessageTooLargeError"
        assert worker.processed == 2  # the first step settled once
    finally:
        await app.close()


async def test_a_workflow_without_an_app_says_how_to_give_one() -> None:
    with pytest.raises(Exception, match="names no app"):
        await chain(Signature("a"), Signature("b")).add_task()
