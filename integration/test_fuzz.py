"""Fuzzing the task decoder, the signature check and the result-event reader (issue 11).

Generated bodies are mostly near-valid protocol-v1 messages (docs/protocol.md) with up to
three fields mutated (wrong types, numbers as strings, booleans, nulls, missing fields,
huge or negative numbers, nested junk, unknown task names) and sometimes a byte cut,
inserted or replaced (non-UTF-8 among them); the rest are raw bytes and JSON that is not
an object. Task bodies go through a real ``Worker`` on a fresh ``memory://`` namespace,
raw, as a foreign producer would publish them. For every body exactly one outcome: it ran
(its final is readable by id) or it is kept as a dead letter with a reason (or, with a
``not_before`` in the future, it waits in the broker); nothing is lost, nothing runs that
should not, the worker goes on consuming, and no exception escapes into the log.

Speed: hypothesis draws, per example, a pool of junk values and a list of small recipes
(which valid value of each field, which fields get which junk, which byte changes); a
recipe becomes a body without further drawing. Each test prints how many bodies it tried
and asserts a floor (the task-body test: at least 10,000 a run).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from qtasks import QueueTasks, TaskStatus
from qtasks.brokers.memory import MemoryBroker
from qtasks.errors import MessageDecodeError, QTasksError
from qtasks.interfaces import DeadLetter
from qtasks.protocol import ResultEvent, decode_results, decode_task, read_results, uuid7
from qtasks.results.memory import MemoryResultStore
from qtasks.signing import Signer
from tests.contract import DEADLINE, running_worker, settled

#: Bodies tried by each test in this run, counted as they are tried; and what became of
#: those a worker took, by test.
TRIED: Counter[str] = Counter()
OUTCOMES: dict[str, Counter[str]] = {"worker": Counter(), "signed": Counter()}

#: Bodies per generated example; examples per test. Their product is each count's floor.
BATCH = (100, 120)
WORKER_EXAMPLES = 100  # >= 10,000 task bodies through a worker
SIGNED_EXAMPLES = 30
READER_EXAMPLES = 100

#: Without hypothesis's ``explain`` phase: tracing every line of a failing example again
#: takes minutes here, and the failure itself names the body.
FUZZ = settings(max_examples=WORKER_EXAMPLES, derandomize=False, deadline=None,
                database=None, suppress_health_check=[HealthCheck.too_slow],
                phases=[Phase.explicit, Phase.generate, Phase.shrink])
#: Through a worker, a failing batch is narrowed down to one body by ``check_batch``
#: (each body's outcome is its own), quicker than shrinking a hundred-body example.
WORKER_FUZZ = settings(FUZZ, phases=[Phase.explicit, Phase.generate])

KEY = "fuzz key"
KNOWN = ("echo", "add", "sync_echo", "gen", "sync_gen", "fail")


def register_fuzz_tasks(app: QueueTasks) -> None:
    """Quick tasks that take any arguments (or fail on them): every run ends at once."""

    @app.task(name="echo")
    async def echo(*args: Any, **kwargs: Any) -> list[Any]:
        return [list(args), kwargs]

    @app.task(name="add")
    async def add(a: Any, b: Any) -> Any:
        return a + b

    @app.task(name="sync_echo")
    def sync_echo(*args: Any, **kwargs: Any) -> list[Any]:
        return [list(args), kwargs]

    @app.task(name="gen")
    async def gen(*args: Any):  # type: ignore[no-untyped-def]
        for arg in args:
            yield arg

    @app.task(name="sync_gen")
    def sync_gen(*args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        yield from args[:3]
        yield kwargs

    @app.task(name="fail")
    async def fail(*args: Any, **kwargs: Any) -> None:
        raise ValueError(f"fails on purpose with {len(args)} arguments")


# -- generating bodies ----------------------------------------------------------------

class Missing:
    """A field left out of the body."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING = Missing()
#: Where ``build`` puts a fresh unique id, so that outcomes can be told apart by id.
FRESH_ID = "<fresh id>"
FAR_FUTURE = 1e18


class Raw:
    """A JSON number written as it is: outside what orjson writes (1e400, 2**64 ...).
    Not a dataclass: orjson would write a dataclass as an object."""

    def __init__(self, text: bytes) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text!r})"


#: Values a mutated field takes, besides the junk hypothesis makes for each example.
FIXED_JUNK: tuple[Any, ...] = (
    MISSING, MISSING, None, True, False, 0, -1, 1.5, -0.0, "1", "1.5", "-3", "", "null",
    "true", "task", "\x00", "\u00e9\u6f22", [], {}, [1, "x"], {"a": {"b": [None]}},
    [[[[[]]]]], 2**64 - 1, -(2**63), 1e308, -1e308, 5e-324,
    Raw(b"1e400"), Raw(b"-1e400"), Raw(b"18446744073709551616"),
    Raw(b"-9223372036854775809"), Raw(b"1E-400"), Raw(b"123456789012345678901234567890"),
)

#: The valid values of each field of a task message (docs/protocol.md).
TASK_FIELDS: dict[str, tuple[Any, ...]] = {
    "v": (1,),
    "kind": ("task", MISSING),
    "id": (FRESH_ID,),
    "task": KNOWN + KNOWN + ("no_such_task", "", "ECHO", "echo "),
    "args": ([], [1, 2], ["a", "b"], [[1], {"k": None}], [2**64 - 1, -1.5], [None] * 3),
    "kwargs": ({}, {"a": 1, "b": 2}, {"": None}, {"x": [1]}, {"a": "s", "b": "t"}),
    "queue": ("default", "", "other", "\u00e9"),
    "priority": (0, 9, -5, 2**64 - 1, -(2**63)),
    "created_at": (0.0, 1.7e9, 1, 2**64 - 1, 1e300, -1.0),
    "attempt": (1, 1, 2, 2**64 - 1),
    "max_time": (None, None, 5, 0.001, 0, -1, 1e300),
    "not_before": (None, None, 0, -1e9, 1e9, 1.5, FAR_FUTURE, 2**64 - 1),
    "headers": ({}, {"reply_to": "x"}, {"reply_to": ""}, {"": ""}, {"a": "b", "c": "d"}),
}

#: The valid values of each field of a result event.
EVENT_FIELDS: dict[str, tuple[Any, ...]] = {
    "v": (1,),
    "kind": ("status", "partial", "final"),
    "id": ("0190-a", "", "x"),
    "task": ("count", ""),
    "attempt": (1, 2, 2**64 - 1, -1),
    "seq": (0, 7, -1, 2**64 - 1),
    "value": (None, 1, "v", [1, {"a": None}]),
    "ts": (0.0, 1.7e9, 3),
    "status": ("running", "new", "success", "error", "cancelled", MISSING),
    "returning": (None, [8, 9], {"k": "v"}),
    "error": (None, {"type": "ValueError", "message": "m", "traceback": "t"}, {}),
    "started_at": (None, 1.0),
    "finished_at": (None, 2.0),
    "worker": (None, "host:1:abc"),
    "partials": (0, 5),
    "created_at": (None, 1.0),
    "expires_at": (None, 1e18),
}


@dataclass(frozen=True)
class Pools:
    """What one example's bodies pick from: the fixed values and hypothesis's junk."""

    junk: tuple[Any, ...]


scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) \
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
pools = st.builds(
    lambda junk, numbers: Pools(FIXED_JUNK + tuple(junk) + tuple(numbers)),
    st.lists(json_values, min_size=4, max_size=10),
    # numbers written as strings, as a producer in another language might
    st.lists(st.integers().map(str) | st.floats().map(repr), min_size=1, max_size=3))


@dataclass(frozen=True)
class Recipe:
    """One body: ``shape`` ``object`` (a near-valid message: ``seed`` picks each field's
    valid value, ``mutations`` put junk into fields by index, one past the last field
    adding an unknown one), ``batch`` (for result events: a batch of them), ``bytes``
    (``data`` as it is) or ``json`` (a junk value, mostly not an object); then ``change``,
    a byte cut, inserted or replaced."""

    shape: str
    seed: int = 0
    mutations: tuple[tuple[int, int], ...] = ()
    change: tuple[str, int, int] | None = None
    data: bytes = b""


BYTES = (0xFF, 0xC3, 0xED, 0x00, 0x22, 0x5C, 0x7D, 0x2C, 0x20, 0x31)


@st.composite
def recipes(draw: st.DrawFn, shapes: tuple[str, ...]) -> Recipe:
    """Four in six near-valid objects: half of them with up to three fields mutated, one
    in six with a byte changed."""
    shape = draw(st.sampled_from(shapes * 4 + ("bytes", "json")))
    if shape == "bytes":
        return Recipe(shape, data=draw(st.binary(max_size=40)))
    seed = draw(st.integers(0, 2**32 - 1))
    if shape == "json":
        return Recipe(shape, seed)
    mutations: list[tuple[int, int]] = []
    if draw(st.booleans()):
        mutations = draw(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 255)),
                                  min_size=1, max_size=3))
    change = None
    if draw(st.integers(0, 5)) == 0:
        change = draw(st.tuples(st.sampled_from(["cut", "insert", "replace"]),
                                st.integers(0, 4096), st.sampled_from(BYTES)))
    return Recipe(shape, seed, tuple(mutations), change)


def near_valid(fields: dict[str, tuple[Any, ...]], recipe: Recipe, pool: Pools,
               rng: random.Random) -> dict[str, Any]:
    names = list(fields)
    obj = {name: rng.choice(values) for name, values in fields.items()}
    for field, junk in recipe.mutations:
        name = names[field] if field < len(names) else f"unknown{field}"
        obj[name] = pool.junk[junk % len(pool.junk)]
    return {name: value for name, value in obj.items() if value is not MISSING}


def build(recipe: Recipe, pool: Pools, fields: dict[str, tuple[Any, ...]]) -> bytes:
    """The body of ``recipe``: fresh ids filled in, raw numbers written, bytes changed."""
    rng = random.Random(recipe.seed)
    value: Any
    if recipe.shape == "bytes":
        return recipe.data
    if recipe.shape == "json":
        value = pool.junk[recipe.seed % len(pool.junk)]
    elif recipe.shape == "batch":
        value = {"v": 1, "kind": "batch", "id": None, "task": None, "events": [
            near_valid(fields, Recipe("object"), pool, rng) for _ in range(rng.randrange(4))]}
        if recipe.mutations:
            value["events"].append(near_valid(fields, recipe, pool, rng))
        if rng.random() < 0.2:
            value = near_valid({name: (v,) for name, v in value.items()}, recipe, pool, rng)
    else:
        value = near_valid(fields, recipe, pool, rng)
    if isinstance(value, dict) and value.get("id") == FRESH_ID:
        value["id"] = uuid7()
    raws: list[bytes] = []

    def default(raw: Any) -> str:
        if not isinstance(raw, Raw):
            raise TypeError(type(raw).__name__)
        raws.append(raw.text)
        return f"@@raw{len(raws) - 1}@@"

    body = orjson.dumps(None if value is MISSING else value, default=default)
    for index, text in enumerate(raws):
        body = body.replace(b'"@@raw%d@@"' % index, text)
    if recipe.change is not None:
        operation, position, byte = recipe.change
        at = position % (len(body) + 1)
        tail = body[at + 1:] if operation == "replace" else body[at:]
        body = body[:at] + (b"" if operation == "cut" else bytes([byte])) + tail
    return body


@dataclass(frozen=True)
class Signing:
    """How a body is signed before it is published: by the key, by another key, not at
    all, signed then one byte altered, or with a made-up signature."""

    how: str
    position: int = 0


signings = st.builds(Signing, st.sampled_from(["key", "key", "key", "other", "none",
                                               "altered", "made up"]), st.integers(0, 4096))


def sign(body: bytes, how: Signing) -> bytes:
    try:
        if how.how == "key":
            return Signer(KEY).sign(body)
        if how.how == "other":
            return Signer("not the key").sign(body)
        if how.how == "altered":
            signed = Signer(KEY).sign(body)
            at = how.position % len(signed)
            return signed[:at] + bytes([signed[at] ^ 0x01]) + signed[at + 1:]
        if how.how == "made up":
            return Signer(KEY).sign(body)[:-66] + b"0" * 64 + b'"}'
    except (ValueError, QTasksError):  # only a non-empty JSON object can be signed
        pass
    return body


def signed_as_meant(pool: Pools, batch: list[Recipe], how: list[Signing]) -> list[bytes]:
    """The bodies of ``batch`` signed as ``how`` says; checked apart from the worker, so
    that a check that passed anything would not pass here: only a body the key signed
    verifies."""
    bodies = []
    for recipe, signing in zip(batch, how, strict=False):
        body = build(recipe, pool, TASK_FIELDS)
        signed = sign(body, signing)
        refused = Signer(KEY).verify(signed)
        if signing.how == "key" and signed != body:
            assert refused is None, (signed, refused)
        else:
            assert refused is not None, (signed, signing)
        bodies.append(signed)
    return bodies


# -- the worker's outcomes ------------------------------------------------------------

class ErrorLog(logging.Handler):
    """ERROR records of QTasks and asyncio while a batch runs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("qtasks", "asyncio")):
            self.records.append(record)


@dataclass(frozen=True)
class Expected:
    """What must become of one body: ``ran``, ``dead`` (with a reason that starts so) or
    ``waits`` (a ``not_before`` from a minute ago on: the broker may hold it)."""

    outcome: str
    reason: str = ""
    task_id: str | None = None


def expected(body: bytes, signer: Signer | None) -> Expected:
    if signer is not None and (refused := signer.verify(body)):
        return Expected("dead", refused)
    try:
        message = decode_task(body)
    except MessageDecodeError:
        return Expected("dead", "undecodable: ")
    if message.task not in KNOWN:
        return Expected("dead", f"unknown task: {message.task!r}", message.id)
    if message.not_before is not None and message.not_before > time.time() - 60:
        return Expected("waits", task_id=message.id)
    return Expected("ran", task_id=message.id)


async def run_batch(bodies: list[bytes], signing_key: str | None = None) -> Counter[str]:
    """Publish ``bodies`` raw to a worker of a fresh namespace; check each one's outcome;
    how many ran, were dead-lettered, wait."""
    url = f"memory://fuzz-{uuid.uuid4().hex}"
    app = QueueTasks(broker=MemoryBroker(url), results=MemoryResultStore(url),
                     embedded_worker=False, signing_key=signing_key)
    register_fuzz_tasks(app)
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    try:
        async with running_worker(app) as worker:
            for body in bodies:
                await broker.hub.put("default", body, 0, None)
            await settled(worker, len(bodies))
            # Still alive and consuming: a valid task sent after the batch runs.
            after = await app.add_task("add", 1, 2, timeout=DEADLINE)
            assert after.returning == 3, "the worker stopped consuming"
            await settled(worker, len(bodies) + 1)
            letters = await broker.dead_letters(limit=len(bodies) + 1)
            waiting = Counter(entry.body for entry in broker.hub.delayed.get("default", []))
            outcomes = [expected(body, app.signer) for body in bodies]
            ids = Counter(o.task_id for o in outcomes if o.task_id is not None)
            for body, outcome in zip(bodies, outcomes, strict=True):
                await check_outcome(app, body, outcome, letters, waiting, ids)
            assert Counter(letter.body for letter in letters) \
                == Counter(b for b, o in zip(bodies, outcomes, strict=True) if o.outcome == "dead")
            assert worker.processed == len(bodies) + 1
            assert not broker.hub.ready.get("default") and not broker.unsettled
    finally:
        logging.getLogger().removeHandler(errors)
        await app.close()
    escaped = [r for r in errors.records if r.exc_info or r.name.startswith("asyncio")
               or "internal error" in r.getMessage()]
    assert not escaped, [r.getMessage() for r in escaped]
    # One ERROR line a dead letter at most: nothing else went wrong.
    assert len(errors.records) <= len(letters), [r.getMessage() for r in errors.records]
    return Counter(outcome.outcome for outcome in outcomes)


async def check_outcome(app: QueueTasks, body: bytes, outcome: Expected,
                        letters: list[DeadLetter], waiting: Counter[bytes],
                        ids: Counter[str]) -> None:
    kept = [letter.reason for letter in letters if letter.body == body]
    assert all(reason.strip() for reason in kept), (body, kept)
    if outcome.outcome == "dead":
        assert any(reason.startswith(outcome.reason) for reason in kept), (body, outcome, kept)
        return
    assert not kept, f"{body!r} should have {outcome.outcome}, but was dead-lettered: {kept}"
    assert outcome.task_id is not None
    task = await app.get(outcome.task_id)
    if outcome.outcome == "waits" and waiting[body]:
        return
    assert task is not None, f"{body!r} was neither run nor dead-lettered"
    assert task.status in (TaskStatus.SUCCESS, TaskStatus.ERROR, TaskStatus.CANCELLED), body
    if ids[outcome.task_id] == 1:  # an id shared in the batch may show another's outcome
        assert task.error is None or task.error.type != "UnknownTaskError", (body, task.error)


def check_batch(bodies: list[bytes], signing_key: str | None = None) -> Counter[str]:
    """``run_batch``; if it fails, the first body that fails alone is named."""
    try:
        return asyncio.run(run_batch(bodies, signing_key))
    except Exception:
        for body in bodies:
            try:
                asyncio.run(run_batch([body], signing_key))
            except Exception as alone:
                raise AssertionError(f"this body fails alone: {body!r}") from alone
        raise


# -- the tests ------------------------------------------------------------------------

task_recipes = st.lists(recipes(("object",)), min_size=BATCH[0], max_size=BATCH[1])


@WORKER_FUZZ
@given(pools, task_recipes)
def fuzz_task_bodies(pool: Pools, batch: list[Recipe]) -> None:
    bodies = [build(recipe, pool, TASK_FIELDS) for recipe in batch]
    OUTCOMES["worker"] += check_batch(bodies)
    TRIED["worker"] += len(bodies)


@settings(WORKER_FUZZ, max_examples=SIGNED_EXAMPLES)
@given(pools, task_recipes, st.lists(signings, min_size=BATCH[1], max_size=BATCH[1]))
def fuzz_signed_task_bodies(pool: Pools, batch: list[Recipe], how: list[Signing]) -> None:
    bodies = signed_as_meant(pool, batch, how)
    OUTCOMES["signed"] += check_batch(bodies, signing_key=KEY)
    TRIED["signed"] += len(bodies)


@settings(FUZZ, max_examples=READER_EXAMPLES)
@given(pools, task_recipes, st.lists(signings, min_size=BATCH[1], max_size=BATCH[1]),
       st.lists(st.binary(max_size=300), max_size=20))
def fuzz_signature_check(pool: Pools, batch: list[Recipe], how: list[Signing],
                         raw: list[bytes]) -> None:
    signer = Signer(KEY)
    bodies = signed_as_meant(pool, batch, how) + raw
    for body in bodies:
        refused = signer.verify(body)
        assert refused is None or refused == "unsigned message" \
            or refused.startswith("forged message: "), (body, refused)
    TRIED["signature"] += len(bodies)


@settings(FUZZ, max_examples=READER_EXAMPLES)
@given(pools, st.lists(recipes(("object", "batch")), min_size=BATCH[0], max_size=BATCH[1]))
def fuzz_result_reader(pool: Pools, batch: list[Recipe]) -> None:
    for recipe in batch:
        body = build(recipe, pool, EVENT_FIELDS)
        try:
            events = decode_results(body)
        except MessageDecodeError:
            events = []
        assert all(isinstance(event, ResultEvent) for event in events), body
        assert read_results(body, "fuzz") == events, body
    TRIED["results"] += len(batch)


def tried(name: str, fuzz: Callable[[], None], floor: int) -> None:
    """Run ``fuzz``; its count of bodies tried, printed and held to ``floor``."""
    before, began = TRIED[name], time.perf_counter()
    fuzz()
    count = TRIED[name] - before
    outcomes = OUTCOMES.get(name)
    print(f"\nfuzz {name}: {count} bodies tried in {time.perf_counter() - began:.1f} s"
          f"{f' ({dict(outcomes)})' if outcomes else ''}")
    assert count >= floor


def test_every_task_body_runs_or_is_dead_lettered() -> None:
    tried("worker", fuzz_task_bodies, 10_000)


def test_with_a_key_only_signed_bodies_run() -> None:
    tried("signed", fuzz_signed_task_bodies, SIGNED_EXAMPLES * BATCH[0])


def test_the_signature_check_never_raises() -> None:
    tried("signature", fuzz_signature_check, READER_EXAMPLES * BATCH[0])


def test_the_result_reader_returns_events_or_a_decode_error() -> None:
    tried("results", fuzz_result_reader, READER_EXAMPLES * BATCH[0])


@settings(FUZZ, max_examples=200)
@given(st.sampled_from([True, 1.0, "1", 2, 0, None]) | json_values)
def test_a_version_other_than_the_integer_1_is_refused(version: Any) -> None:
    """docs/protocol.md: ``v`` is the int 1; a message with another is refused (a task)
    or skipped (a result), and a bool or a float is not an int."""
    if type(version) is int and version == 1:
        return
    for kind, decode in (("task", decode_task), ("final", decode_results)):
        body = orjson.dumps({"v": version, "kind": kind, "id": "i", "task": "echo"})
        with pytest.raises(MessageDecodeError, match="version"):
            decode(body)
