"""Reply signing: an HMAC-SHA256 that workers put on every reply event, so clients can tell them apart
from entries anyone else with write access to a reply stream appended.

When `LLM_REPLY_SIGNING_KEY` is set (the workers and the clients share it), every reply-stream entry
carries a field `sig` next to `ct` and `body`:

    sig = hex(HMAC-SHA256(key,
              "llm-reply-v1\\n" || len(reply_key) || ":" || reply_key || ct || "\\n" || body))

`reply_key` is the stream the event is appended to (UTF-8), `len` its length in bytes as a decimal
number, `ct` the entry's `ct` field (`msgpack` or `json`) and `body` the exact bytes of the `body`
field. Binding the reply key means a signed event cannot be replayed into another request's stream;
the body carries the request id, which clients check as well. The length prefix keeps the fields
unambiguous whatever a `reply_to` holds.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_FIELD = "sig"
_DOMAIN = b"llm-reply-v1\n"


def signing_input(reply_key: str, content_type: str | bytes, body: bytes) -> bytes:
    """The exact bytes the signature covers (see the module docstring)."""
    key = reply_key.encode()
    ct = content_type.encode() if isinstance(content_type, str) else content_type
    return b"".join((_DOMAIN, str(len(key)).encode(), b":", key, ct, b"\n", body))


def sign(secret: bytes, reply_key: str, content_type: str | bytes, body: bytes) -> str:
    """The `sig` field of one reply event: lowercase hex HMAC-SHA256."""
    return hmac.new(secret, signing_input(reply_key, content_type, body), hashlib.sha256).hexdigest()


def verify(secret: bytes, reply_key: str, fields: dict[bytes, bytes]) -> bool:
    """Whether a raw reply-stream entry carries a valid signature for this reply key (constant time)."""
    sig = fields.get(SIGNATURE_FIELD.encode())
    body = fields.get(b"body")
    ct = fields.get(b"ct")
    if sig is None or body is None or ct not in (b"msgpack", b"json"):
        return False
    expected = sign(secret, reply_key, ct, body).encode()
    return hmac.compare_digest(expected, sig)
