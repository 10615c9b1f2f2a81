"""Shard ownership (worker/loop/shard_ownership.py): rendezvous hashing, the live set, the steal check.

The hashing is pure and checked for its properties: no worker owns more than its share rounded up,
each stream goes to its top worker unless that one is full, and a worker leaving or joining moves its
own share and few others. The rest runs against real Redis in process: who is alive
(consumers with an `alive` heartbeat), the age of a stream's oldest unread entry, and which lanes one
read takes (owned, due a steal, replaying).
"""

from __future__ import annotations

import contextlib
import math
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from prometheus_client import generate_latest

from producer.wire.codec import encode_request
from producer.wire.keys import StreamNames
from producer.wire.models import ChatRequest
from worker.engine.echo_engine import EchoEngine
from worker.loop.cancellation import CancelWatch
from worker.loop.heartbeat import ALIVE, DRAINING, live_workers
from worker.loop.inflight import InFlightTable
from worker.loop.lanes import build_lanes, lanes_to_read, namespaces, read_lanes
from worker.loop.shard_ownership import (
    OLDEST_UNREAD_SCRIPT,
    ShardOwnership,
    owned_by,
    owners,
    weight,
)
from worker.observability.counters import LoopCounters
from worker.observability.metrics import WorkerMetrics
from worker.settings import WorkerSettings
from worker.tools import acl

ROOT = Path(__file__).resolve().parents[1]
STREAMS = [f"llm:s:{{{n}}}:requests" for n in range(64)]
WORKERS = [f"worker-{i}" for i in range(6)]


# -- rendezvous hashing (pure) -------------------------------------------------------------------------
def test_weights_are_a_stable_hash_of_both_names() -> None:
    # Pinned: every worker, in every process and release, must compute the same weights.
    assert weight("w0", "llm:s:{0}:requests") == 0x2BA0659D1F167C6C
    assert weight("w0", "llm:s:{1}:requests") != weight("w1", "llm:s:{0}:requests")
    with pytest.raises(ValueError):
        owners(STREAMS, [])


def test_no_worker_owns_more_than_its_share_rounded_up() -> None:
    for count in (1, 2, 3, 4, 6, 7, 64, 100):
        workers = [f"w{i}" for i in range(count)]
        found = owners(STREAMS, workers)
        assert set(found) == set(STREAMS)  # every stream has exactly one owner, a live worker
        assert set(found.values()) <= set(workers)
        assert max(Counter(found.values()).values()) == math.ceil(len(STREAMS) / count), count
    assert owners(STREAMS[:3], ["a"]) == dict.fromkeys(STREAMS[:3], "a")


def test_owners_are_rendezvous_but_for_what_a_full_worker_turns_away() -> None:
    """Each stream goes to its highest-weight worker unless that worker is full; then down its ranking,
    and only as far as the first worker not yet full."""
    found = owners(STREAMS, WORKERS)
    cap = math.ceil(len(STREAMS) / len(WORKERS))
    share = Counter(found.values())
    turned_away = 0
    for stream in STREAMS:
        ranking = sorted(WORKERS, key=lambda w: weight(w, stream), reverse=True)
        above = ranking[: ranking.index(found[stream])]
        assert all(share[w] == cap for w in above), stream
        turned_away += bool(above)
    assert 0 < turned_away < len(STREAMS) // 2  # plain rendezvous for most streams


def test_a_leaving_worker_hands_over_its_own_streams_and_few_others() -> None:
    before = owners(STREAMS, WORKERS)
    for gone in WORKERS:
        after = owners(STREAMS, [w for w in WORKERS if w != gone])
        moved = {s for s in STREAMS if after[s] != before[s]}
        own = {s for s in STREAMS if before[s] == gone}
        assert own <= moved, gone
        assert len(moved - own) <= 4, (gone, len(moved - own))  # measured here: 1 to 3 of 64


def test_a_joining_worker_takes_about_its_share_and_few_others_move() -> None:
    before = owners(STREAMS, WORKERS)
    for new in ("worker-6", "pod-abc-123", "w"):
        after = owners(STREAMS, [*WORKERS, new])
        moved = [s for s in STREAMS if after[s] != before[s]]
        taken = sum(after[s] == new for s in STREAMS)
        assert 4 <= taken <= math.ceil(64 / 7), (new, taken)  # about 64 / 7 = 9
        assert len(moved) <= 2 * taken, (new, len(moved), taken)  # measured here: 7 to 13 moved


def test_each_worker_owns_what_every_other_computes() -> None:
    shares = [set(owned_by(w, STREAMS, WORKERS)) for w in WORKERS]
    assert set().union(*shares) == set(STREAMS) and sum(map(len, shares)) == len(STREAMS)
    # A worker counts itself alive even before the others see it: it then owns its share of the larger set.
    assert owned_by("worker-6", STREAMS, WORKERS) == owned_by("worker-6", STREAMS, [*WORKERS, "worker-6"])


def test_the_age_script_runs_only_commands_the_worker_acl_grants() -> None:
    commands = {r[1:] for r in acl.worker_rules("pw", "llm") if r.startswith("+")}
    calls = re.findall(r"redis\.call\('([A-Z]+)'(?:, '([A-Z]+)')?", OLDEST_UNREAD_SCRIPT)
    assert {c for c, _ in calls} == {"EXISTS", "XINFO", "XRANGE", "TIME"}
    for command, sub in calls:
        name = f"{command}|{sub}".lower() if sub else command.lower()
        assert name in commands, name


# -- against Redis -------------------------------------------------------------------------------------
def settings(prefix: str, name: str, **extra: object) -> WorkerSettings:
    values: dict[str, object] = {
        "stream_shards": 4,
        "steal_after_ms": 200,
        "heartbeat_interval_s": 0.5,
        **extra,
    }
    return WorkerSettings(prefix=prefix, consumer_name=name, **values)  # type: ignore[arg-type]


def pair(prefix: str) -> tuple[WorkerSettings, WorkerSettings]:
    """Workers `a` and `b<i>`, the first `b<i>` with which each owns two of the prefix's 4 streams."""
    a = settings(prefix, "a")
    streams = [n.requests for n in namespaces(a)]
    b = next(f"b{i}" for i in range(1000) if len(owned_by("a", streams, ["a", f"b{i}"])) == 2)
    return a, settings(prefix, b)


def join(r: redis.Redis, s: WorkerSettings, state: str = ALIVE) -> None:
    """What a starting worker does that ownership reads: its groups, a read of every stream, its heartbeat."""
    spaces = namespaces(s)
    for names in spaces:
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: another worker made it
            r.xgroup_create(names.requests, s.group, id="0", mkstream=True)
    r.xreadgroup(s.group, s.consumer_name, {n.requests: "0" for n in spaces})
    r.set(spaces[0].heartbeat(s.consumer_name), state, px=10_000)


def add(r: redis.Redis, stream: str, request_id: str, age_ms: int | None = None) -> None:
    fields = encode_request(ChatRequest(id=request_id, prompt="x"))
    entry = f"{int(time.time() * 1000) - age_ms}-0" if age_ms is not None else "*"
    r.xadd(stream, fields, id=entry)  # type: ignore[arg-type]


def test_live_workers_are_consumers_with_an_alive_heartbeat(redis_client: redis.Redis, prefix: str) -> None:
    a, b, c = (settings(prefix, name) for name in ("a", "b", "c"))
    join(redis_client, a)
    join(redis_client, b, DRAINING)
    join(redis_client, c)
    redis_client.delete(namespaces(c)[0].heartbeat("c"))  # c died: its key expired
    assert live_workers(redis_client, namespaces(a)[0], a.group) == ["a"]


def test_the_age_of_the_oldest_unread_entry(redis_client: redis.Redis, prefix: str) -> None:
    r, stream = redis_client, StreamNames.for_prefix(prefix, shard=0).requests
    age = r.register_script(OLDEST_UNREAD_SCRIPT)
    assert age(keys=[stream], args=["workers"]) == -1  # no stream
    r.xgroup_create(stream, "workers", id="0", mkstream=True)
    assert age(keys=[stream], args=["workers"]) == -1  # nothing unread
    add(r, stream, "old", age_ms=3000)
    add(r, stream, "new")
    assert 2900 <= age(keys=[stream], args=["workers"]) <= 4000
    assert age(keys=[stream], args=["other-group"]) == -1
    r.xreadgroup("workers", "x", {stream: ">"}, count=1)  # `old` delivered: `new` is the oldest unread
    assert 0 <= age(keys=[stream], args=["workers"]) < 1000
    r.xreadgroup("workers", "x", {stream: ">"}, count=1)
    assert age(keys=[stream], args=["workers"]) == -1


def test_each_worker_reads_its_own_shards_and_steals_what_waits(
    redis_client: redis.Redis, prefix: str
) -> None:
    r = redis_client
    a, b = pair(prefix)
    join(r, a)
    join(r, b)
    mine, theirs = ShardOwnership(r, a, namespaces(a)), ShardOwnership(r, b, namespaces(b))
    assert mine.refresh(force=True) and theirs.refresh(force=True)
    assert not mine.refresh(force=True)  # nothing changed
    assert mine.workers == theirs.workers == ("a", b.consumer_name)
    assert mine.owned | theirs.owned == set(mine.streams) and not mine.owned & theirs.owned
    assert mine.owned == set(owned_by("a", mine.streams, ["a", b.consumer_name]))

    # Fresh entries on b's streams wait for b; an entry b left unread for 0.5 s is due a steal.
    others = [s for s in mine.streams if s not in mine.owned]
    add(r, others[0], "fresh")
    add(r, others[-1], "waited", age_ms=500)
    assert mine.streams_to_read(room=False) == mine.owned  # no room: no steal check at all
    assert mine.streams_to_read(room=True) == mine.owned | {others[-1]}
    assert mine.block_ms(2000) is not None and mine.block_ms(2000) <= 50  # the next check is near
    assert mine.block_ms(None) is None

    # Through the lanes, as the loop reads: the stolen entry comes, the fresh one stays for its owner.
    cancels = CancelWatch(r, namespaces(a), 50, 100)
    lanes = build_lanes(r, a, EchoEngine(), InFlightTable(), LoopCounters(), cancels, "a:1")
    for lane in lanes:
        lane.intake.replay_from = None  # the startup replay is done (`join` read our empty pending lists)
    chosen = lanes_to_read(lanes, mine, room=True)
    assert {lane.stream for lane in chosen} == mine.owned | {others[-1]}
    got = read_lanes(r, a, chosen, 64, None)
    assert [f.request.id for f in got] == ["waited"]
    lanes[0].intake.replay_from = "0"  # a lane replaying our own pending entries is read, owned or not
    assert lanes[0] in lanes_to_read(lanes, mine, room=False)
    assert read_lanes(r, a, [], 64, 30) == []  # nothing to read: waits as a blocking read would


def test_long_steps_raise_the_wait_before_a_steal(redis_client: redis.Redis, prefix: str) -> None:
    """An owner reads its streams between two steps: with 1.5 s steps (a loaded CPU worker) an entry 0.6 s
    old is one its owner will still read, so it is due a steal only after twice the longest step."""
    r = redis_client
    a, b = pair(prefix)
    join(r, a)
    join(r, b)
    mine = ShardOwnership(r, a, namespaces(a))
    mine.refresh(force=True)
    assert mine.steal_threshold_ms() == a.steal_after_ms == 200  # no step yet: the setting
    mine.note_steps([0.2, 1.5, 0.4])
    assert mine.steal_threshold_ms() == 3000
    others = [s for s in mine.streams if s not in mine.owned]
    add(r, others[0], "young", age_ms=600)
    add(r, others[-1], "old", age_ms=3100)
    assert mine.streams_to_read(room=True) == mine.owned | {others[-1]}
    mine.note_steps([0.01] * 32)  # the long steps left the window: back to the setting
    mine._next_check_s = 0.0
    assert mine.steal_threshold_ms() == 200
    assert mine.streams_to_read(room=True) == mine.owned | {others[0], others[-1]}


def test_a_worker_missing_from_the_live_set_reads_every_stream_once(
    redis_client: redis.Redis, prefix: str
) -> None:
    r = redis_client
    a, b = pair(prefix)
    join(r, b)
    for names in namespaces(a):  # a beats, but is no consumer of any stream (removed while it stalled)
        r.set(names.heartbeat("a"), ALIVE, px=10_000)
    mine = ShardOwnership(r, a, namespaces(a))
    assert mine.refresh(force=True)
    assert mine.owned < set(mine.streams)
    assert mine.streams_to_read(room=False) == set(mine.streams)  # the read that adds it back
    assert mine.streams_to_read(room=False) == mine.owned


def test_off_with_one_shard_or_no_steal_delay(redis_client: redis.Redis, prefix: str) -> None:
    for s in (settings(prefix, "a", steal_after_ms=0), settings(prefix, "a", stream_shards=1)):
        ownership = ShardOwnership(redis_client, s, namespaces(s))
        assert not ownership.active and not ownership.refresh(force=True)
        assert ownership.streams_to_read(room=True) == {n.requests for n in namespaces(s)}
        assert ownership.block_ms(2000) == 2000


def test_the_owned_shards_gauge_is_exported() -> None:
    metrics = WorkerMetrics()
    metrics.owned_shards.set(3)
    assert "llm_worker_owned_shards 3.0" in generate_latest(metrics.registry).decode()


def test_with_tenants_every_tenants_shard_is_owned(redis_client: redis.Redis, prefix: str) -> None:
    a = settings(prefix, "a", tenants="alice,bob", stream_shards=2)
    b = settings(prefix, "b", tenants="alice,bob", stream_shards=2)
    join(redis_client, a)
    join(redis_client, b)
    mine, theirs = (ShardOwnership(redis_client, s, namespaces(s)) for s in (a, b))
    assert mine.active and mine.refresh(force=True) and theirs.refresh(force=True)
    assert sorted(mine.labels.values()) == ["alice.0", "alice.1", "bob.0", "bob.1"]
    assert mine.owned | theirs.owned == set(mine.streams) and not mine.owned & theirs.owned


def test_a_worker_that_owns_nothing_reads_every_stream(redis_client: redis.Redis, prefix: str) -> None:
    a = settings(prefix, "a", stream_shards=2)
    streams = [n.requests for n in namespaces(a)]
    # Three workers for two streams: one owns none (each owns at most one).
    others = next(
        (f"b{i}", f"c{i}") for i in range(1000) if not owned_by("a", streams, ["a", f"b{i}", f"c{i}"])
    )
    join(redis_client, a)
    for name in others:
        join(redis_client, settings(prefix, name, stream_shards=2))
    idle = ShardOwnership(redis_client, a, namespaces(a))
    assert idle.refresh(force=True) and not idle.owned
    assert idle.streams_to_read(room=True) == set(streams)  # as without ownership: no wait for steals


def test_the_balance_script_prints_both_ways_of_choosing_owners() -> None:
    """`loadtest/shard_balance.py` (the figures docs/scaling.md quotes) runs and keeps its bounded row
    within the bound, against the plain row of the same fleets."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "loadtest" / "shard_balance.py"), "--fleets", "20"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in out.splitlines()
        if line.startswith("| ")
    }
    assert {"plain", "bounded"} <= set(rows)
    assert rows["bounded"][1] == "4" and rows["bounded"][2] == "4"  # 16 streams over 4 workers, p50 and p90
    assert float(rows["plain"][3]) >= float(rows["bounded"][3]) >= 1.0
