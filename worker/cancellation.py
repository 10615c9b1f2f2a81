"""Watching `<prefix>:cancel`: which request ids clients have cancelled.

Every worker polls the broadcast stream (non-blocking XREAD from its cursor, at most
once per `cancel_poll_interval_ms`), so the loop stays cheap while a cancel still stops
a running generation within one engine step. Recently cancelled ids are remembered
(bounded, oldest forgotten first) so that a request read after its cancel is not
started. The client also takes the final-reply guard when it cancels (see
`producer/wire/final_guard.py`), which is what makes a later read skip the request for good.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import redis

from producer.wire.keys import StreamNames
from producer.wire.redis_types import range_entries, read_entries
from worker.keyed_errors import about


class CancelWatch:
    """Cursor over the cancel stream plus a bounded memory of cancelled ids."""

    def __init__(
        self, client: redis.Redis, names: StreamNames, poll_interval_ms: float, remember_requests: int
    ):
        self.client = client
        self.key = names.cancel
        self.poll_interval_s = poll_interval_ms / 1000
        self.remember_requests = remember_requests
        self._cursor: str | None = None
        self._last_s = float("-inf")
        self._recent: OrderedDict[str, None] = OrderedDict()

    def start(self) -> None:
        """Begin after the newest existing entry (older cancels are covered by the final-reply guard)."""
        with about(self.key):
            newest = range_entries(self.client.xrevrange(self.key, count=1))
        self._cursor = newest[0][0].decode() if newest else "0-0"

    def poll(self) -> list[str]:
        """Ids cancelled since the last poll (empty when polled again too soon)."""
        now = time.monotonic()
        if now - self._last_s < self.poll_interval_s:
            return []
        self._last_s = now
        if self._cursor is None:
            self.start()
        with about(self.key):
            got = read_entries(self.client.xread({self.key: self._cursor or "0-0"}, count=1000))
        ids: list[str] = []
        for _, entries in got:
            for entry_id, fields in entries:
                self._cursor = entry_id.decode()
                raw_id = fields.get(b"id")
                if raw_id:
                    ids.append(raw_id.decode("utf-8", "replace"))
        for rid in ids:
            self._recent[rid] = None
            self._recent.move_to_end(rid)
        while len(self._recent) > self.remember_requests:
            self._recent.popitem(last=False)
        return ids

    def is_cancelled(self, request_id: str) -> bool:
        return request_id in self._recent
