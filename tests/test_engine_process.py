"""The engine in its own process (`LLM_ENGINE_PROCESS=separate`): same replies, same guarantees.

On CUDA the paged engine runs in a child process by default; these tests force it on CPU, with
the echo engine for the queue path and with the real model for its replies. A worker whose engine
process dies exits, and what it held is served by another worker: nothing lost, nothing twice.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import fields

import pytest
import redis

from producer.client import ChatClient
from worker.engine.base import SequenceOutput
from worker.engine_process.child import pack_output, unpack_output

pytestmark = pytest.mark.timeout(300)

FAST = dict(
    heartbeat_interval_s=0.3,
    heartbeat_ttl_s=1.0,
    reclaim_interval_s=0.3,
    reclaim_min_idle_ms=1000,
    read_block_ms=200,
)


def words(i: int, n: int) -> str:
    return " ".join(f"p{i}w{j}" for j in range(n))


def test_echo_engine_in_its_own_process_serves_and_streams(start_worker, chat_client: ChatClient) -> None:
    worker = start_worker("echo", engine_process="separate")
    ids = chat_client.submit_many(
        [{"messages": [{"role": "user", "content": words(i, 12)}], "max_tokens": 64} for i in range(40)]
    )
    for i, rid in enumerate(ids):
        events = list(chat_client.events(rid, timeout_s=60))
        tokens = [e for e in events if e.type == "token"]
        assert [e.index for e in tokens] == list(range(12))
        assert "".join(e.text for e in tokens) == events[-1].text == words(i, 12)
    started = worker.events("engine_process_started")
    assert len(started) == 1 and started[0]["pid"] != worker.proc.pid
    assert sum(e["size"] for e in worker.events("batch_done")) == 40


def test_cancel_and_warm_shutdown_reach_the_engine_process(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    worker = start_worker(
        "echo", engine_process="separate", echo_token_delay_ms=50, drain_timeout_s=60, **FAST
    )
    long_id = chat_client.submit([{"role": "user", "content": words(0, 400)}], max_tokens=400)
    first = next(iter(chat_client.events(long_id, timeout_s=30)))
    assert first.type == "token"
    chat_client.cancel(long_id)
    events = list(chat_client.events(long_id, timeout_s=30))
    assert events[-1].type == "error" and events[-1].code == "cancelled"
    ids = [chat_client.submit([{"role": "user", "content": words(i, 10)}], max_tokens=64) for i in range(6)]
    while not redis_client.exists(f"{prefix}:reply:{ids[-1]}"):
        time.sleep(0.02)
    assert worker.stop(signal.SIGTERM) == 0
    for i, rid in enumerate(ids):
        assert chat_client.result(rid, timeout_s=5).text == words(i, 10)
    assert worker.events("engine_process_stopped")
    assert redis_client.xpending(f"{prefix}:requests", "workers")["pending"] == 0


def test_a_dead_engine_process_ends_the_worker_and_nothing_is_lost(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    dying = start_worker("echo", engine_process="separate", echo_token_delay_ms=100, **FAST)
    ids = [chat_client.submit([{"role": "user", "content": words(i, 30)}], max_tokens=64) for i in range(8)]
    while not redis_client.exists(f"{prefix}:reply:{ids[0]}"):
        time.sleep(0.02)
    os.kill(dying.events("engine_process_started")[0]["pid"], signal.SIGKILL)
    assert dying.proc.wait(timeout=30) == 1
    assert dying.events("engine_process_died") and dying.events("worker_exiting")
    staying = start_worker("echo", **FAST)
    for i, rid in enumerate(ids):
        events = list(chat_client.events(rid, timeout_s=60))
        finals = [e for e in events if e.type != "token"]
        assert len(finals) == 1 and finals[0].type == "done" and finals[0].text == words(i, 30)
    assert staying.events("entries_reclaimed")
    assert redis_client.xpending(f"{prefix}:requests", "workers")["pending"] == 0


@pytest.mark.model
@pytest.mark.timeout(900)
def test_model_replies_are_the_same_in_its_own_process(start_worker, chat_client: ChatClient) -> None:
    """Greedy replies of the real model do not depend on where its engine runs, nor on which process
    turns its tokens into text (the worker's, for requests without stop strings; the engine's, with)."""
    requests = [
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16},
        {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 16},
        {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 16, "stop": [","]},
    ]
    texts, streamed = {}, {}
    for mode in ("inline", "separate"):
        worker = start_worker("paged", engine_process=mode, max_wait_ms=50, max_num_seqs=8)
        ids = chat_client.submit_many(requests)
        texts[mode] = [chat_client.result(rid, timeout_s=600).text for rid in ids]
        stream = chat_client.stream(requests[1]["messages"], max_tokens=16, timeout_s=600)
        streamed[mode] = ("".join(event.text for event in stream), stream.reply)
        assert bool(worker.events("engine_process_started")) == (mode == "separate")
        assert worker.stop(signal.SIGTERM) == 0
    assert texts["separate"] == texts["inline"]
    assert "Paris" in texts["separate"][0]
    assert "," not in texts["separate"][2] and texts["separate"][1].startswith(texts["separate"][2])
    for mode in ("inline", "separate"):
        joined, reply = streamed[mode]
        assert reply is not None and joined == reply.text == texts[mode][1]


def test_output_rows_carry_every_field() -> None:
    out = SequenceOutput("r1", [5, 6], "ab", True, "stop", 3, 2, 1, "xab")
    assert unpack_output(pack_output(out)) == out
    assert len(pack_output(out)) == len(fields(SequenceOutput))
