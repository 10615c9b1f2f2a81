"""Typed views of redis-py's stream replies, taken once where a reply comes back from Redis.

redis-py annotates XREAD, XREADGROUP, XRANGE and XPENDING replies with unions that also
cover RESP3 and `decode_responses=True`. Our clients speak RESP2 and keep bytes, so each
reply has one shape; these functions state it (a `cast`, no copy) instead of every caller
narrowing the union. Like `models.py` and `codec.py`, this module imports no Redis client.
"""

from __future__ import annotations

from typing import TypedDict, cast

Fields = dict[bytes, bytes]
# A stream entry: its id and its fields (empty for a pending entry since deleted from the stream).
Entry = tuple[bytes, Fields]
# XREAD/XREADGROUP: one (stream key, entries) pair per stream that had entries.
StreamEntries = list[tuple[bytes, list[Entry]]]


class PendingRow(TypedDict):
    """One row of XPENDING's extended form, as redis-py names its fields."""

    message_id: bytes
    consumer: bytes
    time_since_delivered: int
    times_delivered: int


def read_entries(reply: object) -> StreamEntries:
    """An XREAD/XREADGROUP reply as (stream key, entries) pairs; [] when nothing was read."""
    return cast(StreamEntries, reply or [])


def range_entries(reply: object) -> list[Entry]:
    """An XRANGE/XREVRANGE reply as a list of entries; [] when the range is empty."""
    return cast(list[Entry], reply or [])


def pending_rows(reply: object) -> list[PendingRow]:
    """An XPENDING reply in its extended form (redis-py's `xpending_range`)."""
    return cast(list[PendingRow], reply)
