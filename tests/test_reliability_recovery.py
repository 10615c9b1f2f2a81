"""Crash recovery with real processes: kill -9, reclaim, replay, no stealing, poison entries."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request

import msgpack
import pytest
import redis

from producer.client import ChatClient, ChatError, build_request
from producer.wire.codec import encode_request
from producer.wire.models import ErrorCode
from worker.local_redis.server import free_port

pytestmark = pytest.mark.timeout(300)

# Short liveness timings so that recovery happens within seconds in tests.
FAST = dict(
    heartbeat_interval_s=0.3,
    heartbeat_ttl_s=1.0,
    reclaim_interval_s=0.3,
    reclaim_min_idle_ms=1000,
    read_block_ms=200,
)


def decode(fields: dict[bytes, bytes]) -> dict:
    body = fields[b"body"]
    return msgpack.unpackb(body) if fields[b"ct"] == b"msgpack" else json.loads(body)


def reply_events(r: redis.Redis, keys: list[str]) -> dict[str, list[dict]]:
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.xrange(key)
    return {key: [decode(f) for _, f in entries] for key, entries in zip(keys, pipe.execute(), strict=True)}


def wait_finals(r: redis.Redis, keys: list[str], timeout_s: float) -> dict[str, list[dict]]:
    deadline = time.monotonic() + timeout_s
    while True:
        events = reply_events(r, keys)
        if all(any(e["type"] != "token" for e in evs) for evs in events.values()):
            return events
        if time.monotonic() > deadline:
            return events
        time.sleep(0.2)


def count_finals(events: dict[str, list[dict]]) -> tuple[int, int]:
    """(lost, duplicates): requests without a final reply, and with more than one."""
    finals = [sum(e["type"] != "token" for e in evs) for evs in events.values()]
    return sum(n == 0 for n in finals), sum(n > 1 for n in finals)


def attempt_of(worker) -> str:
    return worker.events("worker_started")[0]["attempt"]


def consumers(r: redis.Redis, prefix: str) -> dict[str, int]:
    return {c["name"].decode(): int(c["pending"]) for c in r.xinfo_consumers(f"{prefix}:requests", "workers")}


def words(i: int, n: int) -> str:
    return " ".join(f"w{i}x{j}" for j in range(n))


@pytest.mark.slow
def test_chaos_kill9_one_of_two_workers(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    """500 requests, 2 workers, kill -9 one mid-run: nothing lost, no duplicate final, tokens attributable."""
    settings = dict(echo_token_delay_ms=20, max_num_seqs=32, **FAST)
    victim = start_worker("echo", **settings)
    survivor = start_worker("echo", **settings)
    n = 500
    texts = {
        chat_client.submit([{"role": "user", "content": words(i, 10 + i % 15)}], max_tokens=64): words(
            i, 10 + i % 15
        )
        for i in range(n)
    }
    keys = {rid: f"{prefix}:reply:{rid}" for rid in texts}
    while len(victim.events("request_done")) < 40:
        time.sleep(0.05)
    in_flight = consumers(redis_client, prefix).get(victim.name, 0)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    killed_at = time.monotonic()
    reclaimed_after = None
    while reclaimed_after is None and time.monotonic() - killed_at < 60:
        if consumers(redis_client, prefix).get(victim.name, 0) == 0:
            reclaimed_after = time.monotonic() - killed_at
        time.sleep(0.05)
    events = wait_finals(redis_client, list(keys.values()), timeout_s=120)
    answered_after = time.monotonic() - killed_at
    time.sleep(1.0)  # let any late duplicate land before counting
    events = reply_events(redis_client, list(keys.values()))
    lost, duplicates = count_finals(events)
    print(
        f"\nCHAOS requests={n} in_flight_on_killed_worker={in_flight} lost={lost} duplicates={duplicates} "
        f"reclaim_s={reclaimed_after:.2f} all_answered_s={answered_after:.2f} "
        f"reclaimed_entries={sum(e['count'] for e in survivor.events('entries_reclaimed'))}"
    )
    assert in_flight > 0, "the kill happened with nothing in flight; the test proved nothing"
    assert (lost, duplicates) == (0, 0)
    for rid, text in texts.items():
        evs = events[keys[rid]]
        final = next(e for e in evs if e["type"] != "token")
        assert final["type"] == "done" and final["text"] == text, final
        # A client follows the attempt of the final reply: its tokens are gap-free and spell the text.
        tokens = [e for e in evs if e["type"] == "token" and e["attempt"] == final["attempt"]]
        assert [t["index"] for t in tokens] == list(range(len(tokens)))
        assert "".join(t["text"] for t in tokens) == text
    # The dead consumer leaves the group once its pending list is empty.
    deadline = time.monotonic() + 10
    while victim.name in consumers(redis_client, prefix) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert victim.name not in consumers(redis_client, prefix)
    assert survivor.proc.poll() is None


def test_restart_replays_own_pending_first(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    first = start_worker("echo", consumer_name="replayer", echo_token_delay_ms=100, **FAST)
    ids = [chat_client.submit([{"role": "user", "content": words(i, 20)}], max_tokens=64) for i in range(6)]
    while not redis_client.xpending(f"{prefix}:requests", "workers")["pending"]:
        time.sleep(0.05)
    time.sleep(0.3)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    pending = consumers(redis_client, prefix)["replayer"]
    later = chat_client.submit([{"role": "user", "content": "new after restart"}], max_tokens=8)
    second = start_worker("echo", consumer_name="replayer", **FAST)
    for i, rid in enumerate(ids):
        assert chat_client.result(rid, timeout_s=60).text == words(i, 20)
    assert chat_client.result(later, timeout_s=60).text == "new after restart"
    replayed = second.events("pending_replayed")
    assert replayed and sum(e["count"] for e in replayed) == pending
    # Replay comes before the new entry is served.
    log = [(e["event"], e.get("id")) for e in second.events()]
    assert log.index(("pending_replayed", None)) < log.index(("request_done", later))


def test_live_long_generation_is_not_stolen(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    """A reclaimer running XAUTOCLAIM (a dead consumer exists) must not take a live worker's entry."""
    stream = f"{prefix}:requests"
    long_text = words(0, 25)
    owner = start_worker("echo", echo_token_delay_ms=200, max_num_seqs=1, reclaim_count=1, **FAST)
    long_id = chat_client.submit([{"role": "user", "content": long_text}], max_tokens=64)
    while not consumers(redis_client, prefix).get(owner.name):
        time.sleep(0.02)
    # A dead consumer ("ghost") holding entries keeps every reclaimer's XAUTOCLAIM running.
    ghost_ids = [
        chat_client.submit([{"role": "user", "content": f"ghost {i}"}], max_tokens=4) for i in range(30)
    ]
    redis_client.xreadgroup("workers", "ghost", {stream: ">"}, count=100)
    assert consumers(redis_client, prefix).get("ghost", 0) > 0
    thief = start_worker("echo", reclaim_count=1, **FAST)
    events = list(chat_client.events(long_id, timeout_s=60))
    final = events[-1]
    assert final.type == "done" and final.text == long_text
    assert {e.attempt for e in events} == {attempt_of(owner)}, (
        "another worker generated the live worker's request"
    )
    assert thief.events("entries_reclaimed"), "the reclaimer never ran XAUTOCLAIM; the test proved nothing"
    for i, rid in enumerate(ghost_ids):
        assert chat_client.result(rid, timeout_s=60).text == f"ghost {i}"


def test_a_step_longer_than_the_ttl_keeps_its_entries(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    """An inline engine step that outlasts the heartbeat's TTL (4 s echo steps, a 1 s TTL): the worker beats
    while it runs (`worker/loop/step_cover.py`), so no reclaimer takes it for dead, and `/health` stays up."""
    stream = f"{prefix}:requests"
    port = free_port()
    # A dead consumer ("ghost") holding an entry keeps the other worker's reclaim (XAUTOCLAIM) running.
    redis_client.xgroup_create(stream, "workers", id="0", mkstream=True)
    ghost_id = chat_client.submit([{"role": "user", "content": "ghost"}], max_tokens=2)
    assert redis_client.xreadgroup("workers", "ghost", {stream: ">"}, count=10)
    # The owner never reclaims (its idle threshold is 10 minutes): the ghost's entry is the other worker's.
    owner = start_worker(
        "echo", echo_token_delay_ms=4000, metrics_port=port, **{**FAST, "reclaim_min_idle_ms": 600_000}
    )
    slow_id = chat_client.submit([{"role": "user", "content": "three slow steps"}], max_tokens=3)
    while not consumers(redis_client, prefix).get(owner.name):
        time.sleep(0.02)
    # From now until the reply is done (three 4 s steps): the owner's /health and heartbeat key every 0.2 s.
    seen: list[tuple[int, bytes | None]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    status = resp.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            seen.append((status, redis_client.get(f"{prefix}:hb:{owner.name}")))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        thief = start_worker("echo", **FAST)
        assert chat_client.result(ghost_id, timeout_s=60).text == "ghost"
        ghost_s = time.monotonic()
        events = list(chat_client.events(slow_id, timeout_s=60))
        slow_s = time.monotonic()
    finally:
        done.set()
        watcher.join()
    assert events[-1].type == "done" and events[-1].text == "three slow steps"
    assert {e.attempt for e in events} == {attempt_of(owner)}, (
        "another worker generated the busy worker's request"
    )
    assert not owner.events("entry_lost")
    assert thief.events("entries_reclaimed")
    # The reclaimer ran while the owner was still stepping, else the test proved nothing.
    assert slow_s - ghost_s > 1.0, "the ghost's entry was reclaimed only after the slow reply was done"
    assert len(seen) >= 20 and set(seen) == {(200, b"alive")}, seen


def test_startup_reclaim_counts_one_delivery(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    """A fresh worker's first reclaim is one delivery: its startup replay must not read the entry again.

    The entry was read by one worker and reclaimed by another (2 deliveries); both died. A new
    worker's reclaim is the 3rd delivery, within max_deliveries=3, so the request is served.
    """
    stream = f"{prefix}:requests"
    redis_client.xgroup_create(stream, "workers", id="0", mkstream=True)
    request = build_request([{"role": "user", "content": "third time lucky"}], None, {"id": "third-1"})
    entry = redis_client.xadd(stream, encode_request(request, "json"))
    redis_client.xreadgroup("workers", "crashed", {stream: ">"}, count=1)
    # Already reclaimed once, and idle past reclaim_min_idle_ms: the new worker's first round takes it.
    redis_client.xclaim(stream, "workers", "crashed", 0, [entry], idle=60_000, retrycount=2)
    worker = start_worker("echo", max_deliveries=3, **FAST)
    assert chat_client.result("third-1", timeout_s=30).text == "third time lucky"
    assert redis_client.xlen(f"{prefix}:dead") == 0
    assert sum(e["count"] for e in worker.events("entries_reclaimed")) == 1
    assert not worker.events("pending_replayed"), "a new consumer has no pending entries of its own"


def test_poison_entry_goes_to_dead_letter(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    stream = f"{prefix}:requests"
    redis_client.xgroup_create(stream, "workers", id="0", mkstream=True)
    poison = build_request([{"role": "user", "content": "kills workers"}], None, {"id": "poison-1"})
    healthy = build_request([{"role": "user", "content": "fine again"}], None, {"id": "healthy-1"})
    poison_entry = redis_client.xadd(stream, encode_request(poison, "json"))
    healthy_entry = redis_client.xadd(stream, encode_request(healthy, "json"))
    nameless_entry = redis_client.xadd(stream, {"v": "1", "ct": "json", "body": '{"prompt": 5}'})
    redis_client.xreadgroup("workers", "crashed", {stream: ">"}, count=10)
    # Three workers died holding these: each delivery was counted.
    redis_client.xclaim(stream, "workers", "crashed", 0, [poison_entry, nameless_entry], retrycount=3)
    redis_client.xclaim(stream, "workers", "crashed", 0, [healthy_entry], retrycount=1)
    start_worker("echo", max_deliveries=3, **FAST)
    with pytest.raises(ChatError) as info:
        chat_client.result("poison-1", timeout_s=30)
    assert info.value.code == ErrorCode.INTERNAL
    assert chat_client.result("healthy-1", timeout_s=30).text == "fine again"
    deadline = time.monotonic() + 10
    while redis_client.xlen(f"{prefix}:dead") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    dead = {f[b"entry"]: f for _, f in redis_client.xrange(f"{prefix}:dead")}
    assert set(dead) == {poison_entry, nameless_entry}
    assert b"delivered 4 times" in dead[poison_entry][b"reason"]
    assert dead[poison_entry][b"f:body"] == encode_request(poison, "json")["body"]
    info_pending = redis_client.xpending(stream, "workers")
    assert info_pending["pending"] == 0
    deadline = time.monotonic() + 10
    while "crashed" in consumers(redis_client, prefix) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "crashed" not in consumers(redis_client, prefix)
