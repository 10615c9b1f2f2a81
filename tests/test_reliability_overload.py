"""Backpressure: explicit `overloaded` refusals, bounded worker memory, safe trimming, full drain."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from producer.client import ChatClient, ChatError
from producer.wire.backlog import ADMIT_SCRIPT
from producer.wire.keys import StreamNames
from producer.wire.models import ErrorCode
from worker.loop.backpressure import Backpressure

pytestmark = pytest.mark.timeout(240)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def backlog(r: redis.Redis, stream: str) -> int:
    g = r.xinfo_groups(stream)[0]
    return int(g["lag"] or 0) + int(g["pending"])


def test_trim_removes_only_acknowledged_entries(redis_client: redis.Redis, prefix: str) -> None:
    stream = f"{prefix}:requests"
    redis_client.xgroup_create(stream, "workers", id="0", mkstream=True)
    redis_client.xgroup_create(stream, "slow-group", id="0")
    ids = [redis_client.xadd(stream, {"n": i}) for i in range(10)]
    redis_client.xreadgroup("workers", "c", {stream: ">"}, count=6)
    redis_client.xack(stream, "workers", ids[0], ids[1], ids[3])  # ids[2], ids[4], ids[5] stay pending
    redis_client.xreadgroup("slow-group", "c", {stream: ">"}, count=8)
    redis_client.xack(stream, "slow-group", *ids[:8])
    bp = Backpressure(redis_client, StreamNames.for_prefix(prefix), "workers", 0, 100, 1)
    assert bp.trim() == 2
    assert [e[0] for e in redis_client.xrange(stream)] == ids[2:]
    redis_client.xack(stream, "workers", ids[2], ids[4], ids[5])
    assert bp.trim() == 3  # ids[2..4] acked by both groups; ids[5] is the last delivered one, kept
    assert [e[0] for e in redis_client.xrange(stream)] == ids[5:]


def test_worker_and_producer_count_the_same_backlog(redis_client: redis.Redis, prefix: str) -> None:
    names = StreamNames.for_prefix(prefix)
    measured = Backpressure(redis_client, names, "workers", 1, 0, 1).measure
    admit = redis_client.register_script(ADMIT_SCRIPT)
    assert measured() == 0  # no stream yet
    ids = [admit(keys=[names.requests], args=["workers", 10, "n", i])[1] for i in range(5)]
    assert measured() == 5  # no group yet: the stream length
    redis_client.xgroup_create(names.requests, "workers", id="0")
    redis_client.xreadgroup("workers", "c", {names.requests: ">"}, count=2)
    redis_client.xack(names.requests, "workers", ids[0])
    assert measured() == 4  # lag 3 + pending 1
    assert admit(keys=[names.requests], args=["workers", 4, "n", "x"]) == [0, 4]
    assert admit(keys=[names.requests], args=["workers", 5, "n", "x"])[0] == 1
    assert measured() == 5


@pytest.mark.slow
def test_overload_is_refused_explicitly_and_the_queue_drains(
    start_worker, redis_client: redis.Redis, redis_url: str, prefix: str
) -> None:
    stream = f"{prefix}:requests"
    worker = start_worker(
        "echo",
        echo_token_delay_ms=10,
        max_num_seqs=8,
        max_waiting_requests=16,
        max_backlog_requests=60,
        backlog_check_interval_ms=50,
        trim_interval_s=0.5,
    )
    client = ChatClient(redis_url, prefix=prefix, max_backlog_requests=40, content_type="json")
    rss_start = rss_kib(worker.proc.pid)
    rss_peak = rss_start
    accepted: list[str] = []
    refused_at_client = 0
    raw = 0
    peak_backlog = 0
    for i in range(3000):
        try:
            accepted.append(client.submit([{"role": "user", "content": f"load {i} a b c"}], max_tokens=8))
        except ChatError as exc:
            assert exc.code == ErrorCode.OVERLOADED
            refused_at_client += 1
        if i % 10 == 0:
            # A backend that skips the client's check: raw XADDs the worker must shed itself.
            body = {"id": f"raw-{raw}", "prompt": "raw a b", "max_tokens": 4}
            redis_client.xadd(stream, {"v": "1", "ct": "json", "body": json.dumps(body)})
            accepted.append(f"raw-{raw}")
            raw += 1
        if i % 100 == 0:
            rss_peak = max(rss_peak, rss_kib(worker.proc.pid))
            peak_backlog = max(peak_backlog, backlog(redis_client, stream))
    # Load stops: the queue drains to zero, and trimming then empties the stream of acknowledged entries.
    deadline = time.monotonic() + 120
    while backlog(redis_client, stream) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert backlog(redis_client, stream) == 0
    outcomes = {"done": 0, "overloaded": 0}
    for rid in accepted:
        events = list(client.events(rid, timeout_s=30))
        assert sum(e.type != "token" for e in events) == 1
        final = events[-1]
        outcomes["done" if final.type == "done" else final.code.value] += 1
    deadline = time.monotonic() + 30
    while (
        redis_client.xlen(stream) > 1 and time.monotonic() < deadline
    ):  # trimming runs every trim_interval_s
        time.sleep(0.2)
    shed = sum(e["count"] for e in worker.events("requests_shed"))
    print(
        f"\nOVERLOAD offered={3000 + raw} refused_at_client={refused_at_client} accepted={len(accepted)} "
        f"done={outcomes['done']} overloaded_by_worker={outcomes['overloaded']} shed={shed} "
        f"peak_backlog={peak_backlog} rss_start_mib={rss_start / 1024:.0f} "
        f"rss_peak_mib={rss_peak / 1024:.0f} "
        f"stream_len_after={redis_client.xlen(stream)}"
    )
    assert refused_at_client > 0 and outcomes["overloaded"] > 0 and outcomes["done"] > 0
    assert outcomes["overloaded"] == shed
    assert redis_client.xlen(stream) <= 1  # only the last delivered entry may remain
    assert rss_peak - rss_start < 64 * 1024, "worker memory grew with the offered load"
    client.close()
