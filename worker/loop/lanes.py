"""Lanes: one request stream per tenant (or per shard), and everything the worker keys by stream.

Shards (`LLM_STREAM_SHARDS`, docs/scaling.md) are lanes too: one per `<prefix>:s:{<n>}`
namespace, keyed like a tenant's but without an ACL user of their own; with tenants, one per
shard of each tenant, `<prefix>:t:{<tenant>.<n>}`, under that tenant's ACL user. A lane is known
by `StreamNames.lane`, (tenant, shard), which `InFlight.lane` repeats for the requests read from it.

A deployment that lists tenants (`LLM_TENANTS=alice,bob`) gives each its own key namespace
`<prefix>:t:{<tenant>}` (`producer/wire/keys.py`): its request stream, reply streams, final-reply
guards, cancel stream and dead letters. Each tenant's ACL user may write only its own request
and cancel streams and read only its own reply streams (`worker/tools/acl.py`, docs/security.md), so
Redis itself keeps tenants apart. The worker learns a request's tenant from the stream it read
the entry from, never from the body, and answers only inside that tenant's namespace.

A `Lane` is one request stream with what is keyed by it: the reply writer (its guards, its
acknowledgements, its dead letters), refusals, intake, heartbeat touches, reclaim, backlog and
trimming. Without tenants there is one lane, the un-namespaced `<prefix>:requests`, and every
command the worker sends is the one it sent before tenants existed.

Fairness: `read_lanes` reads every lane in one XREADGROUP with a COUNT (on Redis Cluster, one
XREADGROUP per hash slot, see `_read_streams`), and Redis applies the
COUNT to each stream, so in each call every tenant with waiting entries gets up to the same
share, whatever the others' backlogs; the engine's scheduler takes it from there. Each tenant's
backlog is measured and shed against `max_backlog_requests` on its own stream, so one tenant's
flood is answered `overloaded` without refusing the others.

Shard ownership (`shard_ownership.py`, `LLM_STEAL_AFTER_MS`): with several shards, the one read takes
only the lanes `lanes_to_read` picks: the worker's own shards, those whose oldest unread entry waited
too long while it has room, and any lane still replaying this worker's own pending entries.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from producer.wire.keys import StreamNames
from producer.wire.redis_factory import by_slot, is_cluster
from producer.wire.redis_types import read_entries
from worker.engine.base import Engine
from worker.loop.backpressure import Backpressure
from worker.loop.cancellation import CancelWatch
from worker.loop.heartbeat import Heartbeat
from worker.loop.inflight import InFlight, InFlightTable
from worker.loop.intake import CHECKS_PER_CANDIDATE, Entries, Intake
from worker.loop.keyed_errors import about
from worker.loop.reclaim import Reclaimer
from worker.loop.shard_ownership import ShardOwnership
from worker.observability.counters import LoopCounters
from worker.replies.refusals import Refusals
from worker.replies.writer import ReplyWriter
from worker.settings import WorkerSettings


@dataclass
class Lane:
    """One request stream the worker serves, with the parts that are keyed by it."""

    names: StreamNames
    replies: ReplyWriter
    refusals: Refusals
    intake: Intake
    heartbeat: Heartbeat
    reclaimer: Reclaimer
    backpressure: Backpressure

    @property
    def tenant(self) -> str | None:
        return self.names.tenant

    @property
    def key(self) -> tuple[str | None, int | None]:
        """What tells this lane from the others (`InFlight.lane`): its tenant and shard."""
        return self.names.lane

    @property
    def stream(self) -> str:
        return self.names.requests


def namespaces(settings: WorkerSettings) -> list[StreamNames]:
    """The key namespaces this worker serves: one per tenant (per shard of each tenant with shards), or
    per shard, or the single bare one."""
    s = settings
    return StreamNames.layout(s.prefix, s.tenant_list(), s.stream_shards, s.redis_cluster)


def build_lanes(
    client: redis.Redis,
    settings: WorkerSettings,
    engine: Engine,
    table: InFlightTable,
    counters: LoopCounters,
    cancels: CancelWatch,
    attempt: str,
) -> list[Lane]:
    """One lane per namespace of `settings`, all sharing the loop's table, counters and cancel watch."""
    s = settings
    lanes = []
    for names in namespaces(s):
        replies = ReplyWriter(
            client, names, s.group, attempt, s.reply_ttl_s, s.dead_letter_max_entries,
            signing_key=s.signing_key(),
        )  # fmt: skip
        refusals = Refusals(replies, s, counters)
        heartbeat = Heartbeat(
            client, names, s.group, s.consumer_name, s.heartbeat_interval_s, s.heartbeat_ttl_s
        )
        reclaimer = Reclaimer(
            client, names, s.group, s.consumer_name, s.reclaim_interval_s, s.reclaim_min_idle_ms,
            s.reclaim_count,
        )  # fmt: skip
        backpressure = Backpressure(
            client, names, s.group, s.max_backlog_requests, s.backlog_check_interval_ms, s.trim_interval_s
        )
        intake = Intake(
            client, s, names.requests, engine, table, replies, refusals, cancels, reclaimer, backpressure,
            counters,
        )  # fmt: skip
        lanes.append(Lane(names, replies, refusals, intake, heartbeat, reclaimer, backpressure))
    return lanes


def lanes_to_read(lanes: Sequence[Lane], ownership: ShardOwnership, room: bool) -> list[Lane]:
    """The lanes the next read takes: those `ownership` picks (all of them while it is off), and every lane
    still replaying this worker's own pending entries, whoever owns it now."""
    wanted = ownership.streams_to_read(room)
    return [lane for lane in lanes if lane.stream in wanted or lane.intake.cursor() != ">"]


def read_lanes(
    client: redis.Redis, settings: WorkerSettings, lanes: Sequence[Lane], room: int, block_ms: int | None
) -> list[InFlight]:
    """One XREADGROUP over every lane's stream (blocking `block_ms`, None = not at all); accept the entries.

    COUNT is per stream, so each lane may bring up to ceil(room / lanes) entries: at most
    `len(lanes) - 1` more than `room` in all, and the same share for every tenant. No lanes to read: wait
    `block_ms` all the same, as a read would.
    """
    if room <= 0:
        return []
    if not lanes:
        time.sleep((block_ms or 0) / 1000)
        return []
    streams = {lane.stream: lane.intake.cursor() for lane in lanes}
    count = max(1, math.ceil(min(room, settings.read_count) / len(lanes)))
    got = _read_streams(client, settings, streams, count, block_ms)
    candidates: list[tuple[Lane, list[InFlight]]] = []
    for lane in lanes:
        entries = got.get(lane.stream)
        if entries is not None or streams[lane.stream] != ">":  # a replaying lane learns it is done
            candidates.append((lane, lane.intake.read_candidates(entries or [])))
    # Whether each already has a final reply, and its id's claim: one pipeline for all streams.
    if not any(found for _, found in candidates):
        return []
    pipe = client.pipeline(transaction=False)
    for lane, found in candidates:
        lane.intake.queue_checks(pipe, found)
    checked = pipe.execute(raise_on_error=False)
    accepted: list[InFlight] = []
    for lane, found in candidates:
        n = CHECKS_PER_CANDIDATE * len(found)
        accepted += lane.intake.tokenize_unanswered(found, checked[:n])
        checked = checked[n:]
    return accepted


# On a cluster, the longest a blocking read waits on one slot's streams while others may get entries.
CLUSTER_BLOCK_SLICE_MS = 20
_turn = itertools.count()


def _read_streams(
    client: redis.Redis, settings: WorkerSettings, streams: dict[str, str], count: int, block_ms: int | None
) -> dict[str, Entries]:
    """XREADGROUP of `streams` (key -> cursor): one call, or on a cluster one per hash slot.

    A cluster serves one XREADGROUP from one slot only. Each slot's streams are read without
    blocking, in turn; only when none had entries does the worker block, on the next slot in
    rotation and for at most `CLUSTER_BLOCK_SLICE_MS`, so that an idle worker still wakes for
    an entry on any shard within that slice.
    """
    groups = by_slot(streams) if is_cluster(client) else [list(streams)]
    if any(cursor != ">" for cursor in streams.values()):
        block_ms = None  # replaying our own pending entries: nothing to wait for
    got: dict[str, Entries] = {}
    for keys in groups:
        wait = block_ms if len(groups) == 1 else None
        got.update(_read_group(client, settings, {k: streams[k] for k in keys}, count, wait))
    if not got and len(groups) > 1 and block_ms is not None:
        keys = groups[next(_turn) % len(groups)]
        wait = min(block_ms, CLUSTER_BLOCK_SLICE_MS)
        got.update(_read_group(client, settings, {k: streams[k] for k in keys}, count, wait))
    return got


def _read_group(
    client: redis.Redis, settings: WorkerSettings, streams: dict[str, str], count: int, block_ms: int | None
) -> dict[str, Entries]:
    with about(next(iter(streams)) if len(streams) == 1 else f"{len(streams)} request streams"):
        reply = read_entries(
            client.xreadgroup(
                settings.group, settings.consumer_name, streams,  # type: ignore[arg-type]
                count=count, block=block_ms,
            )
        )  # fmt: skip
    return {key.decode(): entries for key, entries in reply}
