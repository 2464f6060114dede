"""Optional HMAC signing of task messages, so a worker runs only what a key holder sent.

The signature rides inside the JSON body as its last field, ``"sig"``: the HMAC-SHA256
(hex) of the body exactly as it was before the field was appended. Appending is textual
(``{...}`` becomes ``{...,"sig":"<hex>"}``), so a verifier needs no canonical JSON: it cuts
the field off the end and recomputes. The body stays valid JSON for readers that don't
check, the signature covers every field including ``headers``, and no broker has to carry
a transport header for it. Any language can produce it.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from qtasks.errors import ConfigurationError, MessageEncodeError

_SUFFIX = re.compile(rb',"sig":"([0-9a-f]{64})"\}\s*$')


class Signer:
    def __init__(self, key: str | bytes) -> None:
        if not key:
            raise ConfigurationError("the signing key must not be empty")
        self._key = key.encode() if isinstance(key, str) else key

    def _digest(self, body: bytes) -> str:
        return hmac.new(self._key, body, hashlib.sha256).hexdigest()

    def sign(self, body: bytes) -> bytes:
        body = body.rstrip()
        if not body.endswith(b"}") or body == b"{}":
            raise MessageEncodeError("only a non-empty JSON object can be signed")
        return body[:-1] + b',"sig":"' + self._digest(body).encode() + b'"}'

    def verify(self, signed: bytes) -> str | None:
        """None if ``signed`` carries a valid signature; otherwise why not."""
        match = _SUFFIX.search(signed)
        if match is None:
            return "unsigned message"
        original = signed[: match.start()] + b"}"
        if not hmac.compare_digest(self._digest(original).encode(), match.group(1)):
            return "forged message: the signature does not match"
        return None
