"""Deadlines, timeouts and cancellation: stopped at the next step, resources freed, one final reply."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis

from producer.client import AsyncChatClient, ChatClient, ChatError, ChatTimeout
from producer.wire.models import ErrorCode

pytestmark = pytest.mark.timeout(120)


def words(n: int) -> str:
    return " ".join(f"c{j}" for j in range(n))


def finals(r: redis.Redis, key: str) -> int:
    return sum(json.loads(f[b"body"])["type"] != "token" for _, f in r.xrange(key))


def test_cancel_stops_a_running_generation(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    worker = start_worker("echo", echo_token_delay_ms=100, max_num_seqs=1)
    rid = chat_client.submit([{"role": "user", "content": words(200)}], max_tokens=400, content_type="json")
    key = f"{prefix}:reply:{rid}"
    while redis_client.xlen(key) < 2:
        time.sleep(0.02)
    assert chat_client.cancel(rid) is True
    with pytest.raises(ChatError) as info:
        chat_client.result(rid, timeout_s=10)
    assert info.value.code == ErrorCode.CANCELLED
    # The sequence is freed: with one slot, the next request runs at once.
    assert (
        chat_client.chat([{"role": "user", "content": "next one"}], max_tokens=4, timeout_s=30).text
        == "next one"
    )
    assert [e["id"] for e in worker.events("request_cancelled")] == [rid]
    length = redis_client.xlen(key)
    time.sleep(0.5)
    assert redis_client.xlen(key) == length, "tokens kept coming after the cancel"
    assert finals(redis_client, key) == 1
    last = redis_client.xrevrange(key, count=1)[0][1]
    assert json.loads(last[b"body"])["type"] == "error", "a token event followed the cancelled final"
    assert chat_client.cancel(rid) is False  # already final: nothing more is written


def test_async_cancel(start_worker, redis_url: str, prefix: str) -> None:
    start_worker("echo", echo_token_delay_ms=100)

    async def scenario() -> ErrorCode:
        async with AsyncChatClient(redis_url, prefix=prefix) as client:
            rid = await client.submit([{"role": "user", "content": words(100)}], max_tokens=200)
            async for _ in client.events(rid, timeout_s=30):
                break
            assert await client.cancel(rid)
            try:
                await client.result(rid, timeout_s=10)
            except ChatError as exc:
                return exc.code
        raise AssertionError("no cancelled error")

    assert asyncio.run(scenario()) == ErrorCode.CANCELLED


def test_client_timeout_cancels_the_request(start_worker, chat_client: ChatClient) -> None:
    worker = start_worker("echo", echo_token_delay_ms=100)
    with pytest.raises(ChatTimeout) as info:
        chat_client.chat([{"role": "user", "content": words(200)}], max_tokens=400, timeout_s=1.0)
    deadline = time.monotonic() + 10
    while not worker.events("request_cancelled") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["id"] for e in worker.events("request_cancelled")] == [info.value.request_id]


def test_deadline_expiring_while_running_stops_it(start_worker, chat_client: ChatClient) -> None:
    worker = start_worker("echo", echo_token_delay_ms=100)
    with pytest.raises(ChatError) as info:
        chat_client.chat([{"role": "user", "content": words(200)}], max_tokens=400, timeout_ms=700)
    assert info.value.code == ErrorCode.DEADLINE_EXCEEDED
    assert worker.events("request_done")[0]["completion_tokens"] < 200


def test_cancel_before_any_worker_reads_it(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    rid = chat_client.submit([{"role": "user", "content": "never run"}], max_tokens=4, content_type="json")
    assert chat_client.cancel(rid) is True
    worker = start_worker("echo")
    after = chat_client.chat([{"role": "user", "content": "runs"}], max_tokens=4, timeout_s=30)
    assert after.text == "runs"
    with pytest.raises(ChatError) as info:
        chat_client.result(rid, timeout_s=5)
    assert info.value.code == ErrorCode.CANCELLED
    assert not [e for e in worker.events("request_done") if e["id"] == rid]
    assert redis_client.xpending(f"{prefix}:requests", "workers")["pending"] == 0
