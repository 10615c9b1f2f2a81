"""Backpressure: measure the backlog, shed what is over the limit, trim only what is acknowledged.

- Backlog = the group's `lag` (entries no worker has read) + `pending` (read, not yet
  acknowledged), from XINFO GROUPS; the stream length stands in when lag is unknown.
  The rule is `producer/wire/backlog.py`'s, measured with its read-only script, so the
  worker counts exactly what producers count when they refuse before XADD; producers
  that skip that check (a raw `redis-cli XADD`) are caught here: while the backlog is
  over `max_backlog_requests`, the worker reads the excess and answers it `overloaded`.
- Trimming never removes an unread or pending entry: the stream is cut with XTRIM MINID
  at the oldest id any group still needs (its oldest pending entry, or its last
  delivered id when nothing is pending), so only entries every group acknowledged go.
- GPU/KV memory is never the thing that fails: the loop holds at most
  `max_waiting_requests` validated requests, and the scheduler admits a request into the
  engine only when its KV blocks fit (`EngineCapacity.free_kv_tokens`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from producer.wire.backlog import BACKLOG_SCRIPT
from producer.wire.keys import StreamNames
from producer.wire.redis_factory import register_script


@dataclass(frozen=True)
class GroupState:
    """What trimming needs of one consumer group (the backlog is measured by the wire script)."""

    name: str
    last_delivered_id: str


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def group_states(client: redis.Redis, stream: str) -> list[GroupState]:
    """The stream's consumer groups (empty if the stream does not exist)."""
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:
        return []
    return [GroupState(_text(g["name"]), _text(g["last-delivered-id"])) for g in groups]


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Backpressure:
    """Periodic backlog measurement (shedding) and safe trimming of the request stream."""

    def __init__(
        self,
        client: redis.Redis,
        names: StreamNames,
        group: str,
        max_backlog_requests: int,
        check_interval_ms: float,
        trim_interval_s: float,
    ):
        self.client = client
        self.stream = names.requests
        self.group = group
        self.limit = max_backlog_requests
        self.check_interval_s = check_interval_ms / 1000
        self.trim_interval_s = trim_interval_s
        self.backlog = 0
        self._checked_s = float("-inf")
        self._trimmed_s = float("-inf")
        self._measure = register_script(client, BACKLOG_SCRIPT)

    def excess(self) -> int:
        """How many requests over the limit the backlog was at the last check (0 when disabled)."""
        if self.limit <= 0:
            return 0
        now = time.monotonic()
        if now - self._checked_s >= self.check_interval_s:
            self._checked_s = now
            self.backlog = self.measure()
        return max(0, self.backlog - self.limit)

    def shed(self, count: int) -> None:
        """Record that `count` entries were read for shedding (until the next measurement)."""
        self.backlog = max(0, self.backlog - count)

    def measure(self) -> int:
        """Current lag + pending of our group (one read-only script call)."""
        return int(self._measure(keys=[self.stream], args=[self.group]))

    def trim_due(self) -> bool:
        return time.monotonic() - self._trimmed_s >= self.trim_interval_s

    def trim(self) -> int:
        """Delete entries every group has acknowledged; returns how many were removed."""
        self._trimmed_s = time.monotonic()
        keep_from = self.safe_min_id()
        if keep_from is None:
            return 0
        return int(self.client.xtrim(self.stream, minid=keep_from, approximate=False))

    def safe_min_id(self) -> str | None:
        """The oldest id any group may still need; entries below it are acknowledged by all groups."""
        groups = group_states(self.client, self.stream)
        if not groups:
            return None
        pipe = self.client.pipeline(transaction=False)
        for g in groups:
            pipe.xpending(self.stream, g.name)
        needed: list[str] = []
        for g, summary in zip(groups, pipe.execute(), strict=True):
            needed.append(g.last_delivered_id)
            if summary["pending"]:
                needed.append(_text(summary["min"]))
        oldest = min(needed, key=_id_key)
        return None if oldest == "0-0" else oldest
