"""The dead-letter stream `<prefix>:dead`: entries no worker can serve, kept with the reason.

An entry lands here when it has no usable request id (nobody to send an error to), or
when it was delivered more than `max_deliveries` times (a poison entry that keeps
killing workers; its sender, if known, also gets an `internal` error). Parking and
acknowledging go in the same pipeline as the step's other writes.

Bounded in bytes, whatever the entry holds: a dead letter's field names and values together
stay within `dead_letter_max_bytes`, and the stream is capped with MAXLEN ~
`dead_letter_max_entries`, so a stream holds about their product at most. The original
fields are copied in order as `f:<name>` (names cut to 64 bytes, at most 32 fields), each
whole while it fits both `dead_letter_max_field_bytes` and what is left of the budget. A
field that does not fit keeps a prefix, with its sha256 (`h:<name>`, hex) and original length
(`n:<name>`); once not even that fits, the remaining fields are left out. The whole entry's
size (`entry_bytes`) and sha256 (`entry_sha256`, over each name and value in order, each
preceded by its length as 8 bytes big-endian) are always kept, so an operator can still match
a dead letter to what was sent (`truncated` = 1 when anything was cut or left out).
"""

from __future__ import annotations

import hashlib

from producer.wire.models import now_ms

MAX_FIELDS_COPIED = 32
MAX_FIELD_NAME_BYTES = 64
_DIGEST_HEX = 64  # sha256 in hex


def entry_digest(fields: dict[bytes, bytes]) -> tuple[int, str]:
    """(bytes of the entry's names and values, sha256 hex over them as `entry_sha256` defines)."""
    h = hashlib.sha256()
    size = 0
    for name, value in fields.items():
        for part in (name, value):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
            size += len(part)
    return size, h.hexdigest()


def stored_bytes(fields: dict[bytes, bytes]) -> int:
    """What a dead letter's `dead_letter_max_bytes` counts: its field names and values together."""
    return sum(len(k) + len(v) for k, v in fields.items())


def dead_letter_fields(
    entry_id: bytes,
    fields: dict[bytes, bytes],
    reason: str,
    deliveries: int,
    consumer: str,
    max_field_bytes: int,
    max_bytes: int = 8192,
) -> dict[bytes, bytes]:
    """Fields of the dead-letter entry for one request entry (`entry`, `reason`, ..., then `f:<name>`)."""
    size, digest = entry_digest(fields)
    out: dict[bytes, bytes] = {
        b"entry": entry_id[:64],
        b"reason": reason.encode("utf-8", "replace")[:1000],
        b"deliveries": str(deliveries).encode(),
        b"consumer": consumer.encode()[:200],
        b"at_ms": str(now_ms()).encode(),
        b"fields": str(len(fields)).encode(),
        b"entry_bytes": str(size).encode(),
        b"entry_sha256": digest.encode(),
        b"truncated": b"0",
    }
    left = max_bytes - stored_bytes(out)
    truncated = len(fields) > MAX_FIELDS_COPIED
    for name, value in list(fields.items())[:MAX_FIELDS_COPIED]:
        short = name[:MAX_FIELD_NAME_BYTES]
        truncated = truncated or short != name
        key = b"f:" + short
        if key in out:  # a name that differs only past its first 64 bytes: the first one is kept
            truncated = True
            continue
        if len(value) <= max_field_bytes and len(key) + len(value) <= left:
            out[key] = value
            left -= len(key) + len(value)
            continue
        # A prefix, with the field's hash and length: what fits of it once those are counted.
        length = str(len(value)).encode()
        extra = 2 * (2 + len(short)) + _DIGEST_HEX + len(length)
        room = min(max_field_bytes, len(value), left - len(key) - extra)
        truncated = True
        if room < 0:
            break
        out[key] = value[:room]
        out[b"h:" + short] = hashlib.sha256(value).hexdigest().encode()
        out[b"n:" + short] = length
        left -= len(key) + room + extra
    out[b"truncated"] = b"1" if truncated else b"0"
    return out
