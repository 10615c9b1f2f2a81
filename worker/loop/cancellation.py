"""Watching `<prefix>:cancel`: which request ids clients have cancelled.

Every worker polls the broadcast stream (non-blocking XREAD from its cursor, at most
once per `cancel_poll_interval_ms`), so the loop stays cheap while a cancel still stops
a running generation within one engine step. Recently cancelled ids are remembered
(bounded, oldest forgotten first) so that a request read after its cancel is not
started. The client also takes the final-reply guard when it cancels (see
`producer/wire/final_guard.py`), which is what makes a later read skip the request for good.

With tenants, each tenant has its own cancel stream `<prefix>:t:{<tenant>}:cancel`, which
only that tenant (and the workers) may write; all are read in one XREAD, and an id counts
only for the tenant whose stream named it (`seq_id_of`). A tenant's client may not take the
guard itself, so its cancel entry also says how to answer (`ct`, `reply_to`): the worker
writes the `cancelled` reply (see `Consumer._cancel`). A tenant with shards has a cancel stream
per shard namespace `<prefix>:t:{<tenant>.<n>}:cancel`; its client cancels in the shard it sent
the request to, and the worker answers there (`Cancel.lane`), so the guard and the reply stream
stay in the slot of the request.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from producer.wire.codec import ContentType
from producer.wire.keys import StreamNames
from producer.wire.redis_factory import by_slot, is_cluster
from producer.wire.redis_types import range_entries, read_entries
from worker.loop.inflight import seq_id_of
from worker.loop.keyed_errors import about


@dataclass(frozen=True)
class Cancel:
    """One cancel entry: whose request (tenant, id), and for a tenant's, how to answer it."""

    tenant: str | None
    request_id: str
    content_type: ContentType = "json"
    reply_to: str | None = None
    shard: int | None = None  # the shard namespace of the cancel stream it was read from

    @property
    def seq_id(self) -> str:
        return seq_id_of(self.tenant, self.request_id)

    @property
    def lane(self) -> tuple[str | None, int | None]:
        """The cancel stream's namespace, as `StreamNames.lane`: where a tenant's cancel is answered."""
        return (self.tenant, self.shard)


class CancelWatch:
    """Cursors over the cancel streams plus a bounded memory of cancelled requests (by `seq_id`)."""

    def __init__(
        self,
        client: redis.Redis,
        names: StreamNames | Sequence[StreamNames],
        poll_interval_ms: float,
        remember_requests: int,
    ):
        self.client = client
        spaces = [names] if isinstance(names, StreamNames) else list(names)
        self.tenants = {n.cancel: n.lane for n in spaces}  # cancel stream -> its (tenant, shard)
        self.key = spaces[0].cancel
        self.poll_interval_s = poll_interval_ms / 1000
        self.remember_requests = remember_requests
        self._cursors: dict[str, str] | None = None
        self._last_s = float("-inf")
        self._recent: OrderedDict[str, None] = OrderedDict()

    def start(self) -> None:
        """Begin after the newest existing entries (older cancels are covered by the final-reply guard)."""
        pipe = self.client.pipeline(transaction=False)
        for key in self.tenants:
            pipe.xrevrange(key, count=1)
        with about(self.key):
            newest = [range_entries(r) for r in pipe.execute()]
        self._cursors = {
            key: n[0][0].decode() if n else "0-0" for key, n in zip(self.tenants, newest, strict=True)
        }

    def poll(self) -> list[Cancel]:
        """Cancels read since the last poll (empty when polled again too soon)."""
        now = time.monotonic()
        if now - self._last_s < self.poll_interval_s:
            return []
        self._last_s = now
        if self._cursors is None:
            self.start()
        assert self._cursors is not None
        # A cluster serves one XREAD from one hash slot: one call per slot there (shards are in several).
        groups = by_slot(self._cursors) if is_cluster(self.client) else [list(self._cursors)]
        got = []
        for keys in groups:
            with about(keys[0]):
                cursors = {k: self._cursors[k] for k in keys}
                got += read_entries(self.client.xread(cursors, count=1000))  # type: ignore[arg-type]
        found: list[Cancel] = []
        for raw_key, entries in got:
            key = raw_key.decode()
            tenant, shard = self.tenants[key]
            for entry_id, fields in entries:
                self._cursors[key] = entry_id.decode()
                raw_id = fields.get(b"id")
                if raw_id:
                    found.append(_cancel(tenant, shard, raw_id, fields))
        for c in found:
            self._recent[c.seq_id] = None
            self._recent.move_to_end(c.seq_id)
        while len(self._recent) > self.remember_requests:
            self._recent.popitem(last=False)
        return found

    def is_cancelled(self, seq_id: str) -> bool:
        """Whether the request known as `seq_id` was cancelled lately."""
        return seq_id in self._recent


def _cancel(tenant: str | None, shard: int | None, raw_id: bytes, fields: dict[bytes, bytes]) -> Cancel:
    """The cancel of one entry; `ct` and `reply_to` count only on a tenant's stream (length-capped)."""
    request_id = raw_id.decode("utf-8", "replace")[:128]
    if tenant is None:
        return Cancel(None, request_id, shard=shard)
    ct: ContentType = "msgpack" if fields.get(b"ct") == b"msgpack" else "json"
    reply_to = fields.get(b"reply_to")
    text = reply_to.decode("utf-8", "replace")[:256] if reply_to else None
    return Cancel(tenant, request_id, ct, text, shard)
