"""Soft ownership of the shard streams: a worker reads its own shards first, others only when they wait.

Why: a client sends a conversation's turns to one shard (its affinity key, docs/protocol.md), and each
turn resends the whole history. If any worker may read any shard first, the turns land on random
workers, and each of their prefix caches computes the history again. When one worker reads a shard,
the history is computed once and the next turns find it cached.

Owners: rendezvous (highest random weight) hashing with bounded loads. Each (worker, shard stream)
pair gets a weight, the first 8 bytes of BLAKE2b over both names; going down the pairs by weight, a
stream goes to the first worker of the pair whose share is not yet full, a share being at most
ceil(streams / workers). Plain rendezvous (each stream to its top worker) lets the busiest of 4
workers own 6-10 of 16 streams in 3 of 4 random fleets, and so about 1.5x the mean load of
conversations (median of 500 fleets, `loadtest/shard_balance.py`); the bound keeps it at 4 and 1.2x.
Every worker computes the same owners from the same live set, with no coordination and nothing
stored; a worker that joins takes about 1/W of the streams (W workers), and one that leaves hands
over its own, and the shares that the bound now lets grow take a few more (the script measures how
many move). The live set: the consumers of the first stream whose
heartbeat key says `alive` (`heartbeat.live_workers`; every worker reads every stream at start,
which makes it a consumer of each), re-read every `REFRESH_S`, so a dead worker's streams move once
its key expires (`LLM_HEARTBEAT_TTL_S`) and a draining one's at once. A worker missing from that
list (its key lapsed while it stalled, and a reclaimer removed it) reads every stream once, which
adds it back.

Reading (`streams_to_read`): the owned streams on every read. Another stream only while the worker
has room (nothing waits in its engine) and that stream's oldest entry no worker has read has waited
`LLM_STEAL_AFTER_MS`, or twice the longest of this worker's last `STEP_WINDOW` engine steps when
that is longer: then the worker reads it too until the next check. An owner reads its streams
between two steps, so an entry younger than a step or two is one its owner will still read: a
busy owner's steps (a CPU engine's take a second or more) would otherwise let every other worker
take its entries, and the conversations' caches with them. Workers of one deployment step alike, so
a worker's own steps stand for the owner's. The age comes from one
read-only script per other stream (`OLDEST_UNREAD_SCRIPT`: XINFO GROUPS for the group's
last-delivered id and lag, one XRANGE COUNT 1 after that id, the server's TIME), in one pipeline,
at most every `steal_after_ms / 4`; an idle worker's blocking read ends by the next check. So a
stalled or dead owner delays the entries it has not read by about that threshold at most; entries a
busy owner has read wait in its engine queue, like any worker's. A worker that owns no stream (more
workers than streams) reads every stream, as without ownership: it has nothing to prefer, and making
it wait for steals would only delay entries; so ownership pays off with at least as many shard
streams as workers.

A preference, never a lock: reads are the same XREADGROUP of the same group, and any worker may
read any entry. Delivery guarantees do not depend on it (docs/reliability.md): pending entries,
heartbeats, reclaim, the final-reply guard and acks are unchanged. Views that differ for a moment
(a worker that sees another join before a third does) make two workers read a stream, or none
until the steal; never a lost entry. With one shard (`LLM_STREAM_SHARDS=1`) or
`LLM_STEAL_AFTER_MS=0` it is off: every worker reads every stream, as before it existed.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence

import redis
import structlog

from producer.wire.keys import StreamNames
from producer.wire.redis_factory import register_script
from worker.loop.heartbeat import live_workers
from worker.settings import WorkerSettings

log = structlog.get_logger("worker")

# How often the live workers are read again (the heartbeat interval when that is shorter).
REFRESH_S = 1.0
# The least time between two measurements of the other streams' oldest unread entries.
MIN_CHECK_S = 0.005
# Steals wait at least STEP_FACTOR x the longest of the last STEP_WINDOW engine steps (an owner comes back
# to its streams after the step it is in, and the loop's own work around it).
STEP_FACTOR = 2.0
STEP_WINDOW = 32

# KEYS: request stream. ARGV: group. The age in ms (server clock) of the oldest entry the group has not
# delivered to any consumer; -1 when there is none (or no such stream or group). Read-only.
OLDEST_UNREAD_SCRIPT = """\
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local last, lag
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  if info['name'] == ARGV[1] then last, lag = info['last-delivered-id'], info['lag'] end
end
if not last or lag == 0 then return -1 end
local first = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
if #first == 0 then return -1 end
local now = redis.call('TIME')
return now[1] * 1000 + math.floor(now[2] / 1000) - tonumber(string.match(first[1][1], '^%d+'))
"""


def weight(worker: str, stream: str) -> int:
    """The rendezvous weight of `worker` for `stream`: BLAKE2b of `<worker> NUL <stream>`, 8 bytes, big-endian
    (a stable hash: Python's own `hash` differs between processes)."""
    digest = hashlib.blake2b(f"{worker}\0{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owners(streams: Sequence[str], workers: Iterable[str]) -> dict[str, str]:
    """Every stream's owner among `workers` (which must not be empty): rendezvous with bounded loads.

    The (worker, stream) pairs by descending weight (ties, which need a 64-bit collision, by the larger
    names); a pair's stream goes to its worker unless the stream has an owner or the worker already owns
    ceil(len(streams) / len(workers)). Each stream's top pair wins unless its worker is full, so the
    result is plain rendezvous but for the streams a full worker turns away (to their next worker).
    """
    pool = sorted(set(workers))
    if not pool:
        raise ValueError("no workers to own the streams")
    unique = list(dict.fromkeys(streams))
    cap = -(-len(unique) // len(pool))
    pairs = sorted(((weight(w, s), w, s) for s in unique for w in pool), reverse=True)
    found: dict[str, str] = {}
    load = dict.fromkeys(pool, 0)
    for _, w, s in pairs:
        if s not in found and load[w] < cap:
            found[s] = w
            load[w] += 1
            if len(found) == len(unique):
                break
    return {s: found[s] for s in streams}


def owned_by(me: str, streams: Sequence[str], workers: Iterable[str]) -> list[str]:
    """The streams `me` owns among `workers` (and `me`, which is alive if it asks), in `streams`' order."""
    found = owners(streams, {*workers, me})
    return [s for s in streams if found[s] == me]


def shard_label(names: StreamNames) -> str:
    """How logs name a shard: `<n>`, or `<tenant>.<n>` within a tenant."""
    return f"{names.tenant}.{names.shard}" if names.tenant is not None else str(names.shard)


class ShardOwnership:
    """This worker's owned streams (re-read every `REFRESH_S`) and the others due a steal."""

    def __init__(self, client: redis.Redis, settings: WorkerSettings, spaces: Sequence[StreamNames]):
        s = settings
        self.client = client
        self.me = s.consumer_name
        self.group = s.group
        self.roster = spaces[0]  # whose consumers and heartbeats say who is alive
        self.streams = [n.requests for n in spaces]
        self.labels = {n.requests: shard_label(n) for n in spaces}
        self.active = s.steal_after_ms > 0 and s.stream_shards > 1 and len(spaces) > 1
        self.steal_after_ms = s.steal_after_ms
        self.refresh_s = min(REFRESH_S, s.heartbeat_interval_s)
        self.check_s = max(MIN_CHECK_S, s.steal_after_ms / 4000)
        self.workers: tuple[str, ...] = ()
        self.owned: frozenset[str] = frozenset(self.streams)
        self._due: frozenset[str] = frozenset()
        self._refreshed_s = float("-inf")
        self._next_check_s = 0.0  # monotonic time of the next steal check (0: at once)
        self._rejoin = False
        self._age = register_script(client, OLDEST_UNREAD_SCRIPT)
        self._steps_s: deque[float] = deque(maxlen=STEP_WINDOW)

    def note_steps(self, seconds: Iterable[float]) -> None:
        """Engine steps' wall times, which set how long an entry waits before it is due a steal."""
        self._steps_s.extend(seconds)

    def steal_threshold_ms(self) -> float:
        """How long another stream's oldest unread entry must have waited to be taken from its owner:
        `LLM_STEAL_AFTER_MS`, or `STEP_FACTOR` x the longest recent step when that is longer."""
        return max(float(self.steal_after_ms), STEP_FACTOR * 1000 * max(self._steps_s, default=0.0))

    def refresh(self, force: bool = False) -> bool:
        """Read the live workers (at most every `refresh_s`) and recompute the owned streams; returns whether
        they or the live workers changed (logged as `shards_owned`)."""
        now = time.monotonic()
        if not self.active or (not force and now - self._refreshed_s < self.refresh_s):
            return False
        self._refreshed_s = now
        live = live_workers(self.client, self.roster, self.group)
        self._rejoin = self.me not in live
        workers = tuple(sorted({*live, self.me}))
        if workers == self.workers:
            return False  # the same live set: the same owners
        owned = frozenset(owned_by(self.me, self.streams, workers))
        self.workers, self.owned = workers, owned
        shards = [self.labels[s] for s in self.streams if s in owned]
        log.info("shards_owned", owned=len(shards), shards=shards, workers=len(workers))
        return True

    def streams_to_read(self, room: bool) -> frozenset[str]:
        """The streams the next read takes: every one while off, while it owns none, or once to rejoin;
        else the owned ones, and while the worker has `room` those whose oldest unread entry waited
        `steal_after_ms`."""
        if not self.active or self._rejoin or not self.owned:
            self._rejoin = False
            return frozenset(self.streams)
        if not room:
            return self.owned
        now = time.monotonic()
        if now >= self._next_check_s:
            self._next_check_s = now + self.check_s
            self._due = self._waiting_too_long()
        return self.owned | self._due

    def block_ms(self, block_ms: int | None) -> int | None:
        """How long a blocking read may wait: no later than the next steal check (only an idle worker
        blocks, and an idle worker has room)."""
        if not self.active or block_ms is None:
            return block_ms
        return max(1, min(block_ms, math.ceil((self._next_check_s - time.monotonic()) * 1000)))

    def _waiting_too_long(self) -> frozenset[str]:
        others = [s for s in self.streams if s not in self.owned]
        if not others:
            return frozenset()
        pipe = self.client.pipeline(transaction=False)
        for stream in others:
            self._age(keys=[stream], args=[self.group], client=pipe)
        ages = pipe.execute()
        threshold = self.steal_threshold_ms()
        return frozenset(s for s, age in zip(others, ages, strict=True) if int(age) >= threshold)
