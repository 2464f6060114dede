"""Signing: what verifies, and what each kind of tampering is called."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qtasks.errors import ConfigurationError, MessageEncodeError
from qtasks.protocol import TaskMessage, decode_task, encode
from qtasks.signing import Signer


@given(args=st.lists(st.text() | st.integers(-(2**60), 2**60), max_size=5))
def test_signed_body_verifies_and_still_decodes(args: list[object]) -> None:
    message = TaskMessage(id="i", task="t", args=args, headers={"h": "v"})
    signed = Signer("key").sign(encode(message))
    assert Signer("key").verify(signed) is None
    assert decode_task(signed) == message
    assert len(orjson.loads(signed)["sig"]) == 64


def test_every_tampering_is_refused() -> None:
    body = encode(TaskMessage(id="i", task="t", args=[1, 2]))
    signed = Signer("key").sign(body)
    assert Signer("other").verify(signed) == "forged message: the signature does not match"
    assert Signer("key").verify(body) == "unsigned message"
    assert Signer("key").verify(signed.replace(b"[1,2]", b"[1,3]")) is not None
    assert Signer("key").verify(signed.replace(b'"t"', b'"u"')) is not None
    with pytest.raises(ConfigurationError, match="must not be empty"):
        Signer("")
    with pytest.raises(MessageEncodeError, match="non-empty JSON object"):
        Signer("key").sign(b"[1]")
