"""`n` > 1 through a real worker and the default model: one final reply holds every choice, each choice's
tokens stream under its index, and a cancel stops all of them."""

from __future__ import annotations

import time

import pytest
import redis

from producer.client import ChatClient, ChatError
from producer.wire.models import ErrorCode

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

ASK = [{"role": "user", "content": "Name a fruit."}]


def test_one_final_holds_every_choice_and_a_cancel_stops_them_all(
    start_worker, chat_client: ChatClient, redis_client: redis.Redis
) -> None:
    worker = start_worker("paged", max_wait_ms=0, stats_interval_s=0.2)
    reply = chat_client.chat(ASK, max_tokens=6, temperature=1.0, seed=9, n=3, timeout_s=120)
    assert reply.choices is not None and [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.text == reply.choices[0].text
    assert reply.usage.completion_tokens == sum(c.completion_tokens for c in reply.choices)
    streamed = chat_client.stream(ASK, max_tokens=6, temperature=1.0, seed=9, n=3, timeout_s=120)
    by_choice: dict[int, str] = {0: "", 1: "", 2: ""}
    for event in streamed:
        by_choice[event.choice] += event.text
    assert [by_choice[i] for i in range(3)] == [c.text for c in reply.choices]

    rid = chat_client.submit(ASK, max_tokens=400, ignore_eos=True, n=3)
    key = chat_client.reply_key(rid)
    deadline = time.monotonic() + 120
    while redis_client.xlen(key) < 6 and time.monotonic() < deadline:  # every choice is generating
        time.sleep(0.05)
    assert chat_client.cancel(rid)
    with pytest.raises(ChatError) as info:
        chat_client.result(rid, timeout_s=60)
    assert info.value.code == ErrorCode.CANCELLED
    length = redis_client.xlen(key)
    time.sleep(1.0)
    assert redis_client.xlen(key) == length, "tokens kept coming after the cancel"
    # The engine holds none of the three choices any more: the worker's next stats say so.
    seen = time.monotonic()
    while time.monotonic() < seen + 3:
        stats = worker.events("worker_stats")
        if stats and stats[-1]["running"] == 0 and stats[-1]["waiting"] == 0:
            break
        time.sleep(0.2)
    assert stats[-1]["running"] == 0 and stats[-1]["waiting"] == 0, stats[-1]
