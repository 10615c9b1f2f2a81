"""The request digest: what binds a reply event to the request entry it answers.

A request id is chosen by its sender, so two entries can carry one id (a client's retry of the same
bytes, or another producer's entry reusing the id). The workers tell them apart by a digest of the
entry's bytes, and write it into every reply event they sign as the body field `rd`, so a client
knows the event answers the entry it sent, not another entry under its id:

    rd = lowercase hex of BLAKE2b (16-byte digest, no key, no salt or personalisation) over
         ct || "\\n" || body

`ct` is the request entry's `ct` field (`msgpack` or `json`, as sent) and `body` the exact bytes of
its `body` field; 32 hex characters. A retry of the same bytes has the same digest. The claim of a
request id (`<root>:claim:<id>`, docs/security.md) names the same digest.
"""

from __future__ import annotations

import hashlib

REQUEST_DIGEST_FIELD = "rd"
DIGEST_BYTES = 16  # 128 bits: 32 hex characters


def request_digest(content_type: str | bytes, body: bytes) -> str:
    """The digest of a request entry with these `ct` and `body` fields (see the module docstring)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    h.update(content_type.encode() if isinstance(content_type, str) else content_type)
    h.update(b"\n")
    h.update(body)
    return h.hexdigest()


def entry_digest(fields: dict[bytes, bytes]) -> str:
    """`request_digest` of a raw request entry (a missing field counts as empty)."""
    return request_digest(fields.get(b"ct", b""), fields.get(b"body", b""))
