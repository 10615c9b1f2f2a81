"""The dead-letter stream `<prefix>:dead`: entries no worker can serve, kept with the reason.

An entry lands here when it has no usable request id (nobody to send an error to), or
when it was delivered more than `max_deliveries` times (a poison entry that keeps
killing workers; its sender, if known, also gets an `internal` error). The original
fields are copied, each cut to `dead_letter_max_field_bytes`, so that one hostile entry
cannot make the dead-letter stream huge; the stream itself is capped with MAXLEN ~.
Parking and acknowledging go in the same pipeline as the step's other writes.
"""

from __future__ import annotations

from producer.wire.models import now_ms

MAX_FIELDS_COPIED = 32
MAX_FIELD_NAME_BYTES = 64


def dead_letter_fields(
    entry_id: bytes,
    fields: dict[bytes, bytes],
    reason: str,
    deliveries: int,
    consumer: str,
    max_field_bytes: int,
) -> dict[bytes, bytes]:
    """Fields of the dead-letter entry for one request entry (`entry`, `reason`, ..., then `f:<name>`)."""
    out: dict[bytes, bytes] = {
        b"entry": entry_id,
        b"reason": reason.encode("utf-8", "replace")[:1000],
        b"deliveries": str(deliveries).encode(),
        b"consumer": consumer.encode(),
        b"at_ms": str(now_ms()).encode(),
        b"fields": str(len(fields)).encode(),
    }
    truncated = False
    for name, value in list(fields.items())[:MAX_FIELDS_COPIED]:
        if len(value) > max_field_bytes or len(name) > MAX_FIELD_NAME_BYTES:
            truncated = True
        out[b"f:" + name[:MAX_FIELD_NAME_BYTES]] = value[:max_field_bytes]
    out[b"truncated"] = b"1" if truncated or len(fields) > MAX_FIELDS_COPIED else b"0"
    return out
