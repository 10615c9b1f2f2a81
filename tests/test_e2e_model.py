"""End to end with the real default model (SmolLM2-135M-Instruct) behind a real worker process."""

from __future__ import annotations

import json
import time

import pytest
import redis

from producer.client import ChatClient

pytestmark = [pytest.mark.model, pytest.mark.timeout(900)]

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture()
def model_worker(start_worker, request):
    engine = getattr(request, "param", "paged")
    return start_worker(engine, max_wait_ms=200, max_num_seqs=16)


@pytest.mark.parametrize("model_worker", ["paged", "static"], indirect=True)
def test_capital_of_france_names_paris(model_worker, chat_client: ChatClient) -> None:
    reply = chat_client.chat(CAPITAL, max_tokens=24)
    assert "Paris" in reply.text
    assert reply.usage.prompt_tokens > 5 and reply.usage.completion_tokens > 0
    assert reply.timings.ttft_ms is not None and reply.timings.ttft_ms <= reply.timings.total_ms


def test_raw_redis_json_request_gets_json_reply(model_worker, redis_client: redis.Redis, prefix: str) -> None:
    body = {"id": "raw-json-1", "messages": CAPITAL, "max_tokens": 24, "stream": False}
    redis_client.xadd(f"{prefix}:requests", {"v": "1", "ct": "json", "body": json.dumps(body)})
    # Short blocks in a loop: one long BLOCK would outlast the client's socket timeout.
    deadline = time.monotonic() + 300
    got = None
    while not got and time.monotonic() < deadline:
        got = redis_client.xread({f"{prefix}:reply:raw-json-1": "0"}, block=1000)
    assert got, "no reply within the timeout"
    entries = got[0][1]
    assert len(entries) == 1  # stream=false: only the final event
    fields = entries[0][1]
    assert fields[b"ct"] == b"json"
    final = json.loads(fields[b"body"])
    assert final["type"] == "done" and "Paris" in final["text"]
    assert redis_client.ttl(f"{prefix}:reply:raw-json-1") > 0


def test_streamed_tokens_arrive_in_order_and_concatenate(model_worker, chat_client: ChatClient) -> None:
    stream = chat_client.stream(
        [{"role": "user", "content": "Write a short sentence about cats."}], max_tokens=32
    )
    tokens = list(stream)
    assert stream.reply is not None
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert len(tokens) >= 2
    assert "".join(t.text for t in tokens) == stream.reply.text


def test_sixteen_concurrent_requests_are_answered_and_batched(model_worker, chat_client: ChatClient) -> None:
    questions = [f"What is {i} plus {i}?" for i in range(16)]
    ids = [chat_client.submit([{"role": "user", "content": q}], max_tokens=12) for q in questions]
    replies = [chat_client.result(i) for i in ids]
    assert all(r.usage.completion_tokens > 0 and r.text.strip() for r in replies)
    time.sleep(0.5)
    sizes = [e["size"] for e in model_worker.events("batch_done")]
    assert sum(sizes) == 16 and max(sizes) > 1, sizes
    done = model_worker.events("request_done")
    assert {e["id"] for e in done} == set(ids)
    for e in done:
        expected = {"queue_ms", "ttft_ms", "total_ms", "prompt_tokens", "completion_tokens", "finish_reason"}
        assert expected <= e.keys()


def test_shared_system_prompt_is_served_from_the_prefix_cache(model_worker, chat_client: ChatClient) -> None:
    rules = " ".join(f"Rule {i}: answer briefly and politely." for i in range(30))
    system = {"role": "system", "content": rules}
    first = chat_client.chat([system, {"role": "user", "content": "Say hi."}], max_tokens=4)
    assert first.usage.prompt_tokens > 220 and first.usage.cached_tokens == 0
    second = chat_client.chat([system, {"role": "user", "content": "Say bye."}], max_tokens=4)
    # The shared system prompt (over 200 tokens) is served from cached 16-token blocks.
    assert second.usage.cached_tokens >= 192
    time.sleep(0.3)
    batches = model_worker.events("batch_done")
    assert batches[-1]["cached_tokens"] == second.usage.cached_tokens
    assert 0 < batches[-1]["prefix_hit_rate"] <= 1


def test_worker_with_async_output_streams_stops_and_cancels(
    start_worker, chat_client: ChatClient, redis_client: redis.Redis, prefix: str
) -> None:
    """The GPU default (tokens streamed one step late) through the real worker loop, here on CPU."""
    start_worker("paged", max_wait_ms=50, max_num_seqs=8, async_output="true")
    cats = [{"role": "user", "content": "Write a short sentence about cats."}]
    stream = chat_client.stream(cats, max_tokens=24)
    tokens = list(stream)
    assert stream.reply is not None and len(tokens) >= 2
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert "".join(t.text for t in tokens) == stream.reply.text
    # A stop string found one step late still ends the reply before it.
    word = stream.reply.text.split()[2]
    stopped = chat_client.chat(cats, max_tokens=24, stop=[word])
    assert stopped.finish_reason == "stop" and word not in stopped.text
    assert stream.reply.text.startswith(stopped.text)
    # Cancelled mid-stream: the worker stops the sequence, and no token follows the final.
    rid = chat_client.submit(
        [{"role": "user", "content": "Count from one to fifty, in words."}],
        max_tokens=200,
        content_type="json",
    )
    key = f"{prefix}:reply:{rid}"
    while redis_client.xlen(key) < 3:
        time.sleep(0.02)
    assert chat_client.cancel(rid) is True
    time.sleep(1.0)
    length = redis_client.xlen(key)
    time.sleep(0.5)
    assert redis_client.xlen(key) == length, "tokens kept coming after the cancel"
    bodies = [json.loads(f[b"body"]) for _, f in redis_client.xrange(key)]
    assert sum(b["type"] != "token" for b in bodies) == 1 and bodies[-1]["type"] == "error"
