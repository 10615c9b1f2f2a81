"""Watching `<prefix>:cancel`: which request ids clients have cancelled.

Every worker polls the broadcast stream (at most once per `cancel_poll_interval_ms`), so the
loop stays cheap while a cancel still stops a running generation within one engine step.
Cancelled ids are remembered, per tenant (`cancel_memory_requests` each, oldest forgotten
first), so that a request read after its cancel is not started: it is answered `cancelled`
instead, with the short `refusal_ttl_s` of a refusal. A worker that starts replays the cancels
of the last `cancel_replay_s` first, so a request cancelled while it was queued is not served by
a worker started after the cancel either, whether or not a final-reply guard still exists.

Reads are bounded in bytes, whoever wrote the stream: a script reads at most `cancel_read_count`
entries per stream and poll, one at a time inside Redis, and hands back only those of at most
`cancel_max_entry_bytes` (a real cancel is a few dozen bytes); the others are skipped with one
`cancels_dropped` line per poll. So a tenant that appends huge entries to its own cancel stream
costs a worker's memory nothing.

A shared client also takes the final-reply guard when it cancels and writes the `cancelled` reply
itself (see `producer/wire/final_guard.py`). With tenants, each tenant has its own cancel stream
`<prefix>:t:{<tenant>}:cancel`, which only that tenant (and the workers) may write; an id counts
only for the tenant whose stream named it (`seq_id_of`). A tenant's client may not take the guard,
so the worker answers its cancel: at once when it holds the request (`Consumer._cancel`), else
when a worker reads the request (the remembered cancel). A cancel of an id that is never sent
costs its own entry and nothing else. A tenant with shards has a cancel stream per shard namespace
`<prefix>:t:{<tenant>.<n>}:cancel`; its client cancels in the shard it sent the request to, and the
worker answers there (`Cancel.lane`), so the guard and the reply stream stay in the slot of the
request.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from producer.wire.codec import ContentType
from producer.wire.keys import StreamNames
from producer.wire.redis_factory import by_slot, is_cluster, register_script
from worker.loop.inflight import seq_id_of
from worker.loop.keyed_errors import about

log = structlog.get_logger("worker")

# A cancel entry has `id`, and on a tenant's stream `ct` and `reply_to`: more fields than this is not one.
MAX_CANCEL_FIELDS = 8

# KEYS: cancel streams (of one hash slot). ARGV[1] most entries to read per stream, ARGV[2] most bytes
# of an entry (its field names and values together), ARGV[3] most fields, then each stream's cursor
# (read after it). Entries are read one at a time, so the script holds one entry at most (plus
# garbage), and only the small ones leave Redis. Returns per stream {cursor, {id, fields, id, fields...}
# of the entries kept, how many were skipped, 1 if the stream may hold more after the cursor}.
READ_SCRIPT = """\
local n, limit, most_fields = tonumber(ARGV[1]), tonumber(ARGV[2]), 2 * tonumber(ARGV[3])
local out = {}
for k = 1, #KEYS do
  local cursor, kept, dropped, more = ARGV[3 + k], {}, 0, 1
  for _ = 1, n do
    local got = redis.call('XRANGE', KEYS[k], '(' .. cursor, '+', 'COUNT', 1)
    if #got == 0 then more = 0 break end
    cursor = got[1][1]
    local fields = got[1][2]
    local size = limit + 1
    if #fields <= most_fields then
      size = 0
      for j = 1, #fields do size = size + #fields[j] end
    end
    if size <= limit then
      kept[#kept + 1] = cursor
      kept[#kept + 1] = fields
    else
      dropped = dropped + 1
    end
    got, fields = nil, nil
  end
  out[k] = {cursor, kept, dropped, more}
end
return out
"""


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
    """Cursors over the cancel streams plus a bounded memory, per tenant, of cancelled requests."""

    def __init__(
        self,
        client: redis.Redis,
        names: StreamNames | Sequence[StreamNames],
        poll_interval_ms: float,
        remember_requests: int,
        *,
        replay_s: float = 3600.0,
        read_count: int = 100,
        max_entry_bytes: int = 1024,
    ):
        self.client = client
        spaces = [names] if isinstance(names, StreamNames) else list(names)
        self.tenants = {n.cancel: n.lane for n in spaces}  # cancel stream -> its (tenant, shard)
        self.key = spaces[0].cancel
        self.poll_interval_s = poll_interval_ms / 1000
        self.remember_requests = remember_requests
        self.replay_ms = int(replay_s * 1000)
        self.read_count = read_count
        self.max_entry_bytes = max_entry_bytes
        self._read = register_script(client, READ_SCRIPT)
        self._cursors: dict[str, str] | None = None
        self._last_s = float("-inf")
        self._recent: dict[str | None, OrderedDict[str, None]] = {}  # tenant -> its cancelled seq_ids

    def start(self) -> None:
        """Replay the cancels of the last `replay_s` (up to `remember_requests` per stream), then watch."""
        server_s, micros = self.client.time()
        since_ms = max(0, int(server_s) * 1000 + int(micros) // 1000 - self.replay_ms)
        self._cursors = {key: f"{since_ms}-0" for key in self.tenants}
        pending = set(self.tenants)
        rounds = -(-self.remember_requests // self.read_count)  # the rest, if any, is read by `poll`
        for _ in range(max(1, rounds)):
            more: set[str] = set()
            self._remember(self._read_some(pending, more))
            pending = more
            if not pending:
                break

    def poll(self) -> list[Cancel]:
        """Cancels read since the last poll (empty when polled again too soon)."""
        now = time.monotonic()
        if now - self._last_s < self.poll_interval_s:
            return []
        self._last_s = now
        if self._cursors is None:
            self.start()
        found = self._read_some(set(self.tenants), set())
        self._remember(found)
        return found

    def is_cancelled(self, seq_id: str) -> bool:
        """Whether the request known as `seq_id` was cancelled lately."""
        tenant = seq_id.partition("/")[0] if "/" in seq_id else None
        recent = self._recent.get(tenant)
        return recent is not None and seq_id in recent

    def _read_some(self, keys: set[str], more: set[str]) -> list[Cancel]:
        """One bounded read of each stream in `keys` (one script call per hash slot, in one pipeline);
        those with more to read go to `more`."""
        assert self._cursors is not None
        order = [k for k in self.tenants if k in keys]
        groups = by_slot(order) if is_cluster(self.client) else [order]
        pipe = self.client.pipeline(transaction=False)
        for group in groups:
            limits = [self.read_count, self.max_entry_bytes, MAX_CANCEL_FIELDS]
            args = limits + [self._cursors[k] for k in group]
            self._read(keys=group, args=args, client=pipe)
        with about(self.key):
            replies = [r for group_reply in pipe.execute() for r in group_reply]
        found: list[Cancel] = []
        dropped: dict[str, int] = {}
        for key, reply in zip([k for g in groups for k in g], replies, strict=True):
            cursor, kept, skipped, has_more = _read_reply(reply)
            self._cursors[key] = cursor
            if has_more:
                more.add(key)
            if skipped:
                dropped[key] = skipped
            tenant, shard = self.tenants[key]
            for fields in kept:
                raw_id = fields.get(b"id")
                if raw_id:
                    found.append(_cancel(tenant, shard, raw_id, fields))
        if dropped:
            log.warning(
                "cancels_dropped",
                entries=sum(dropped.values()),
                streams=len(dropped),
                stream=next(iter(dropped)),
                max_entry_bytes=self.max_entry_bytes,
            )
        return found

    def _remember(self, found: list[Cancel]) -> None:
        for c in found:
            recent = self._recent.setdefault(c.tenant, OrderedDict())
            recent[c.seq_id] = None
            recent.move_to_end(c.seq_id)
            while len(recent) > self.remember_requests:
                recent.popitem(last=False)


def _read_reply(reply: Any) -> tuple[str, list[dict[bytes, bytes]], int, bool]:
    """READ_SCRIPT's reply as (cursor, fields of each entry kept, entries skipped, more to read)."""
    cursor, flat, dropped, more = reply
    entries = []
    for i in range(1, len(flat), 2):
        pairs = flat[i]
        entries.append(dict(zip(pairs[::2], pairs[1::2], strict=False)))
    raw = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
    return raw, entries, int(dropped), bool(more)


def _cancel(tenant: str | None, shard: int | None, raw_id: bytes, fields: dict[bytes, bytes]) -> Cancel:
    """The cancel of one entry; `ct` and `reply_to` count only on a tenant's stream (length-capped)."""
    request_id = raw_id.decode("utf-8", "replace")[:128]
    if tenant is None:
        return Cancel(None, request_id, shard=shard)
    ct: ContentType = "msgpack" if fields.get(b"ct") == b"msgpack" else "json"
    reply_to = fields.get(b"reply_to")
    text = reply_to.decode("utf-8", "replace")[:256] if reply_to else None
    return Cancel(tenant, request_id, ct, text, shard)
