"""SIGTERM: warm shutdown drains or hands back; a second signal exits at once without loss."""

from __future__ import annotations

import signal
import time

import pytest
import redis

from producer.client import ChatClient

pytestmark = pytest.mark.timeout(180)

FAST = dict(
    heartbeat_interval_s=0.3, heartbeat_ttl_s=1.0, reclaim_interval_s=0.3, reclaim_min_idle_ms=1000,
    read_block_ms=200,
)


def words(i: int, n: int) -> str:
    return " ".join(f"s{i}x{j}" for j in range(n))


def wait_tokens(r: redis.Redis, prefix: str, rid: str) -> None:
    while not r.exists(f"{prefix}:reply:{rid}"):
        time.sleep(0.02)


def consumer_names(r: redis.Redis, prefix: str) -> set[str]:
    return {c["name"].decode() for c in r.xinfo_consumers(f"{prefix}:requests", "workers")}


def test_sigterm_finishes_in_flight_and_exits_0(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    worker = start_worker("echo", echo_token_delay_ms=50, drain_timeout_s=60, **FAST)
    ids = [chat_client.submit([{"role": "user", "content": words(i, 20)}], max_tokens=64) for i in range(10)]
    wait_tokens(redis_client, prefix, ids[-1])
    assert worker.stop(signal.SIGTERM) == 0
    for i, rid in enumerate(ids):
        reply = chat_client.result(rid, timeout_s=5)
        assert reply.text == words(i, 20) and reply.timings.worker == worker.name
    assert worker.events("shutdown_started") and worker.events("worker_stopped")
    assert worker.name not in consumer_names(redis_client, prefix)
    assert redis_client.xpending(f"{prefix}:requests", "workers")["pending"] == 0


def test_sigterm_hands_back_what_cannot_finish(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    """Drain timeout shorter than the generations: the rest is reclaimed and completed by another worker."""
    leaving = start_worker("echo", echo_token_delay_ms=200, max_num_seqs=2, drain_timeout_s=0.5, **FAST)
    ids = [chat_client.submit([{"role": "user", "content": words(i, 20)}], max_tokens=64) for i in range(8)]
    wait_tokens(redis_client, prefix, ids[0])
    staying = start_worker("echo", **FAST)
    started = time.monotonic()
    assert leaving.stop(signal.SIGTERM) == 0
    print(
        f"\nSIGTERM exit after {time.monotonic() - started:.2f} s, "
        f"handed back {leaving.events('worker_stopped')[0]['handed_back']}"
    )
    for i, rid in enumerate(ids):
        events = list(chat_client.events(rid, timeout_s=60))
        finals = [e for e in events if e.type != "token"]
        assert len(finals) == 1 and finals[0].type == "done" and finals[0].text == words(i, 20)
    assert leaving.events("worker_stopped")[0]["handed_back"] > 0
    assert staying.events("entries_reclaimed")


def test_second_signal_exits_at_once_without_losing_entries(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    worker = start_worker("echo", echo_token_delay_ms=200, max_num_seqs=2, drain_timeout_s=120, **FAST)
    ids = [chat_client.submit([{"role": "user", "content": words(i, 20)}], max_tokens=64) for i in range(6)]
    wait_tokens(redis_client, prefix, ids[0])
    worker.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert worker.stop(signal.SIGINT, timeout_s=10) == 128 + signal.SIGINT
    start_worker("echo", **FAST)
    for i, rid in enumerate(ids):
        events = list(chat_client.events(rid, timeout_s=60))
        finals = [e for e in events if e.type != "token"]
        assert len(finals) == 1 and finals[0].type == "done" and finals[0].text == words(i, 20)
