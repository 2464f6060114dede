"""Wire protocol v1: what round-trips, what is refused, and how ids are ordered."""

from __future__ import annotations

import re
import time
import uuid

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qtasks import MessageDecodeError, MessageEncodeError, MessageTooLargeError
from qtasks.control import ControlMessage, decode_control
from qtasks.protocol import (
    ErrorInfo,
    ResultEvent,
    TaskMessage,
    decode_result,
    decode_results,
    decode_task,
    encode,
    encode_batch,
    uuid7,
    uuid7_time,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


@given(args=st.lists(json_values, max_size=4), kwargs=st.dictionaries(st.text(), json_values,
                                                                       max_size=4))
def test_task_message_round_trips(args: list[object], kwargs: dict[str, object]) -> None:
    message = TaskMessage(id=uuid7(), task="t", args=args, kwargs=kwargs, queue="q",
                          priority=3, created_at=1.5, attempt=2, max_time=4.0, not_before=9.0,
                          headers={"reply_to": "r"})
    assert decode_task(encode(message)) == message


@given(value=json_values)
def test_result_events_round_trip(value: object) -> None:
    partial = ResultEvent(kind="partial", id=uuid7(), task="t", attempt=2, seq=7, value=value,
                          ts=1.0)
    assert decode_result(encode(partial)) == partial
    final = ResultEvent(kind="final", id=uuid7(), task="t", status="error", returning=value,
                        error=ErrorInfo("E", "m", "tb"), started_at=1.0, finished_at=2.0,
                        worker="w", partials=3, ts=2.0)
    assert decode_result(encode(final)) == final


def test_partial_carries_only_its_fields() -> None:
    event = ResultEvent(kind="partial", id="i", task="t", seq=0, value=1)
    assert set(orjson.loads(encode(event))) == {"v", "kind", "id", "task", "attempt", "ts",
                                                 "seq", "value"}


def test_unencodable_arguments_are_refused_with_the_task_named() -> None:
    message = TaskMessage(id="abc", task="t", args=[object()])
    with pytest.raises(MessageEncodeError, match="task 't' id abc"):
        encode(message)


def test_size_limit() -> None:
    message = TaskMessage(id="abc", task="t", args=["x" * 100])
    assert encode(message, max_size=1000)
    with pytest.raises(MessageTooLargeError, match="over the limit of 50 bytes"):
        encode(message, max_size=50)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\x00", "not JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"v": 2, "id": "a", "task": "t"}', "version"),
        (b'{"v": 1, "task": "t"}', "'id'"),
        (b'{"v": 1, "id": "a", "task": 5}', "'task'"),
        (b'{"v": 1, "id": "a", "task": "t", "args": {}}', "'args'"),
        (b'{"v": 1, "kind": "final", "id": "a", "task": "t"}', "kind"),
    ],
)
def test_decode_says_what_is_wrong(body: bytes, reason: str) -> None:
    with pytest.raises(MessageDecodeError, match=reason):
        decode_task(body)


def test_uuid7_is_time_ordered_and_valid() -> None:
    ids = [uuid7() for _ in range(1000)]
    parsed = [uuid.UUID(i) for i in ids]
    assert all(p.version == 7 and p.variant == uuid.RFC_4122 for p in parsed)
    assert len(set(ids)) == 1000
    stamp = uuid7_time(ids[0])
    assert stamp is not None and abs(stamp - time.time()) < 5
    # Ordered by millisecond: the timestamp prefix never goes backwards.
    prefixes = [i[:13] for i in ids]
    assert prefixes == sorted(prefixes)
    assert uuid7_time(str(uuid.uuid4())) is None
    assert uuid7_time("not-a-uuid") is None


@pytest.mark.parametrize(("field", "value", "says"), [
    ("priority", '"high"', "'priority' must be an integer, not a string 'high'"),
    ("attempt", '"1"', "'attempt' must be an integer, not a string '1'"),
    ("attempt", "1.0", "'attempt' must be an integer, not a number 1.0"),
    ("attempt", "0", "'attempt' must be 1 or more"),
    ("max_time", '"5"', "'max_time' must be a number or null, not a string '5'"),
    ("not_before", "true", "'not_before' must be a number or null, not a boolean True"),
    ("created_at", '"now"', "'created_at' must be a number, not a string"),
    ("queue", "7", "'queue' must be a string, not an integer 7"),
    ("args", '{"a": 1}', "'args' must be an array"),
    ("kwargs", "[1]", "'kwargs' must be an object"),
    ("headers", '{"reply_to": 5}', "header 'reply_to' must be a string"),
    ("id", "5", "'id' must be a string"),
])
def test_a_task_field_of_the_wrong_type_is_refused_not_coerced(
        field: str, value: str, says: str) -> None:
    fields = {"v": "1", "id": '"a"', "task": '"t"', field: value}
    body = ("{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}").encode()
    with pytest.raises(MessageDecodeError, match=re.escape(says)):
        decode_task(body)


def test_numbers_of_the_right_type_are_taken_as_they_are() -> None:
    task = decode_task(b'{"v":1,"id":"a","task":"t","max_time":5,"created_at":1,'
                       b'"not_before":null,"attempt":2,"priority":3,"queue":null}')
    assert (task.max_time, task.created_at, task.not_before) == (5.0, 1.0, None)
    assert (task.attempt, task.priority, task.queue) == (2, 3, "default")


def test_a_result_field_of_the_wrong_type_is_refused() -> None:
    for body, says in [
        (b'{"v":1,"kind":"final","id":"a","task":"t","error":3}', "'error' must be an object"),
        (b'{"v":1,"kind":"partial","id":"a","task":"t","seq":"2"}', "'seq' must be an integer"),
        (b'{"v":1,"kind":"final","id":"a","task":"t","status":1}', "'status' must be a string"),
        (b'{"v":1,"kind":"final","id":"a","task":"t","error":{"type":1}}', "'type' must be"),
    ]:
        with pytest.raises(MessageDecodeError, match=re.escape(says)):
            decode_result(body)


def test_cancel_requests_round_trip_and_bad_ones_say_why() -> None:
    request = ControlMessage(id="t-1", ts=1.5, reason="no longer needed")
    assert decode_control(encode(request)) == request
    for body, reason in [(b'{"v":1,"kind":"pause","id":"x"}', "unknown control kind"),
                         (b'{"v":1,"kind":"cancel"}', "'id'"),
                         (b'{"v":1,"kind":"cancel","id":"x","ts":"soon"}', "'ts' must be a number"),
                         (b"[]", "not an object")]:
        with pytest.raises(MessageDecodeError, match=reason):
            decode_control(body)


def test_a_batch_carries_partials_in_order_and_bad_ones_say_why() -> None:
    partials = [ResultEvent(kind="partial", id="t-1", task="t", seq=i, value={"i": i})
                for i in range(3)]
    batch = encode_batch("t-1", "t", [encode(p) for p in partials])
    assert orjson.loads(batch)["kind"] == "batch"
    assert decode_results(batch) == partials
    single = encode(partials[0])
    assert decode_results(single) == [partials[0]]
    with pytest.raises(MessageDecodeError, match="list of objects"):
        decode_results(b'{"v":1,"kind":"batch","id":"t-1","task":"t","events":[1]}')
    with pytest.raises(MessageDecodeError, match="unknown result kind"):
        decode_results(b'{"v":1,"kind":"batch","id":"t-1","task":"t","events":[{"kind":"x"}]}')
