"""Containment: an entry costs only itself, and a Redis error is backed off from, never died of."""

from __future__ import annotations

import json
import time

import msgpack
import pytest
import redis

from producer.client import ChatClient, ChatError
from producer.wire.models import ErrorCode

pytestmark = pytest.mark.timeout(120)


def test_entries_that_stopped_workers_cost_only_themselves(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    worker = start_worker("echo", read_count=64)
    stream = f"{prefix}:requests"
    # Read in the same batch as valid requests: a 320-digit deadline and bytes keys deep in metadata.
    huge = json.dumps({"id": "huge-deadline", "prompt": "x", "deadline_ms": int("9" * 320)})
    nested = msgpack.packb({"id": "bytes-keys", "prompt": "x", "metadata": {"m": {b"k": b"v"}}})
    pipe = redis_client.pipeline()
    pipe.xadd(stream, {b"v": b"1", b"ct": b"json", b"body": huge})
    pipe.xadd(stream, {b"v": b"1", b"ct": b"msgpack", b"body": nested})
    pipe.execute()
    ids = [chat_client.submit([{"role": "user", "content": f"hello {i}"}], max_tokens=4) for i in range(20)]
    assert [chat_client.result(rid, timeout_s=30).text for rid in ids] == [f"hello {i}" for i in range(20)]
    for rid, field in (("huge-deadline", "deadline_ms"), ("bytes-keys", "metadata")):
        with pytest.raises(ChatError) as refused:
            chat_client.result(rid, timeout_s=10)
        assert refused.value.code == ErrorCode.INVALID_REQUEST and field in refused.value.message
    assert worker.proc.poll() is None


def test_a_foreign_value_at_a_service_key_is_backed_off_from_and_served_after(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    worker = start_worker("echo", cancel_poll_interval_ms=10)
    redis_client.delete(f"{prefix}:cancel")
    redis_client.set(f"{prefix}:cancel", "not a stream")  # WRONGTYPE for the worker's cancel poll
    deadline = time.monotonic() + 20
    while not worker.events("redis_error") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.events("redis_error"), "the WRONGTYPE error was not reported"
    assert "WRONGTYPE" in worker.events("redis_error")[0]["error"]
    assert worker.events("redis_error")[0]["key"] == f"{prefix}:cancel"  # the line names the key to fix
    assert worker.proc.poll() is None  # still running
    redis_client.delete(f"{prefix}:cancel")
    assert chat_client.chat([{"role": "user", "content": "back"}], max_tokens=4, timeout_s=30).text == "back"
    assert worker.proc.poll() is None
