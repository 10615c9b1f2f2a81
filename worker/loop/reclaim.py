"""Crash recovery: finish what dead consumers left pending, then remove them from the group.

Every `reclaim_interval_s` a worker lists the group's consumers. A consumer without a
heartbeat key (or one that is draining) whose pending list is not empty triggers
XAUTOCLAIM of entries idle for at least `reclaim_min_idle_ms`. Live workers touch their
entries at every heartbeat, so only a dead (or hung for that long) worker's entries are
that idle: a live worker's long generation is never stolen. A dead consumer whose
pending list is empty is deleted with XGROUP DELCONSUMER, checked and done in one script
so that no entry it might still own is dropped.

XAUTOCLAIM counts a delivery; the counts of the claimed entries are read with XPENDING
so that the caller can park poison entries (see `worker/replies/dead_letter.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
import structlog

from producer.wire.keys import StreamNames
from producer.wire.redis_factory import register_script
from producer.wire.redis_types import Entry
from worker.loop.heartbeat import DRAINING

log = structlog.get_logger("worker")

# KEYS: request stream, heartbeat key of the consumer. ARGV: group, consumer.
_DELETE_IF_EMPTY_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


@dataclass(frozen=True)
class Claimed:
    """Entries taken over from dead consumers, with their delivery counts."""

    entries: list[Entry]
    deliveries: dict[bytes, int]
    deleted: list[bytes]


def delivery_counts(client: redis.Redis, stream: str, group: str, ids: list[bytes]) -> dict[bytes, int]:
    """How many times each pending entry has been delivered (XPENDING, one pipeline)."""
    if not ids:
        return {}
    pipe = client.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
    counts: dict[bytes, int] = {}
    for entry_id, rows in zip(ids, pipe.execute(), strict=True):
        counts[entry_id] = int(rows[0]["times_delivered"]) if rows else 1
    return counts


class Reclaimer:
    """Periodic XAUTOCLAIM on behalf of dead consumers, and their removal once empty."""

    def __init__(
        self,
        client: redis.Redis,
        names: StreamNames,
        group: str,
        consumer: str,
        interval_s: float,
        min_idle_ms: int,
        count: int,
    ):
        self.client = client
        self.names = names
        self.stream = names.requests
        self.group = group
        self.consumer = consumer
        self.interval_s = interval_s
        self.min_idle_ms = min_idle_ms
        self.count = count
        self._cursor = "0-0"
        self._last_s = float("-inf")
        self._delete = register_script(client, _DELETE_IF_EMPTY_SCRIPT)

    def due(self) -> bool:
        return time.monotonic() - self._last_s >= self.interval_s

    def reclaim(self, room: int) -> Claimed:
        """One round: claim up to `room` entries dead consumers left, delete the dead ones that are empty."""
        self._last_s = time.monotonic()
        consumers = [
            c for c in self.client.xinfo_consumers(self.stream, self.group) if _name(c) != self.consumer
        ]
        if not consumers:
            return Claimed([], {}, [])
        pipe = self.client.pipeline(transaction=False)
        for c in consumers:
            pipe.get(self.names.heartbeat(_name(c)))
        gone = [
            (c, state)
            for c, state in zip(consumers, pipe.execute(), strict=True)
            if state is None or state == DRAINING.encode()
        ]
        claimed = Claimed([], {}, [])
        if room > 0 and any(int(c["pending"]) > 0 for c, _ in gone):
            claimed = self._autoclaim(min(room, self.count))
        for c, state in gone:
            if state is None:  # a draining consumer removes itself when it exits
                self._delete_if_empty(_name(c))
        return claimed

    def _autoclaim(self, count: int) -> Claimed:
        reply = self.client.xautoclaim(
            self.stream, self.group, self.consumer, self.min_idle_ms, start_id=self._cursor, count=count
        )
        cursor, raw_entries = reply[0], reply[1]
        deleted = list(reply[2]) if len(reply) > 2 else []
        self._cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        entries: list[Entry] = []
        for entry_id, fields in raw_entries:
            if fields is None:  # Redis 6.2 reports trimmed entries inline
                deleted.append(entry_id)
                continue
            entries.append((entry_id, fields))
        if entries:
            log.info("entries_reclaimed", count=len(entries), first=entries[0][0].decode())
        return Claimed(
            entries, delivery_counts(self.client, self.stream, self.group, [e[0] for e in entries]), deleted
        )

    def remove_if_empty(self, name: str) -> None:
        """Delete a consumer without a heartbeat whose pending list is empty (atomic check)."""
        self._delete_if_empty(name)

    def _delete_if_empty(self, name: str) -> None:
        removed = self._delete(keys=[self.stream, self.names.heartbeat(name)], args=[self.group, name])
        if int(removed) >= 0:
            log.info("consumer_removed", consumer=name)


def _name(consumer: dict) -> str:
    name = consumer["name"]
    return name.decode() if isinstance(name, bytes) else str(name)
