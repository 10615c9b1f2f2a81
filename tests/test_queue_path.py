"""Queue path with the deterministic echo engine: contract, errors, streaming, batching."""

from __future__ import annotations

import json
import time

import msgpack
import pytest
import redis

from producer.client import ChatClient, ChatError, Reply
from producer.wire.models import ErrorCode

pytestmark = pytest.mark.timeout(120)


def _read_final(r: redis.Redis, key: str, timeout_s: float = 30.0) -> tuple[list[dict], dict]:
    """All events of a reply stream until its final one, decoded from JSON."""
    events: list[dict] = []
    last = "0"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for _, entries in r.xread({key: last}, block=500) or []:
            for entry_id, fields in entries:
                last = entry_id
                assert fields[b"ct"] == b"json"
                body = json.loads(fields[b"body"])
                events.append(body)
                if body["type"] in ("done", "error"):
                    return events, body
    raise AssertionError(f"no final reply on {key}")


def test_echo_chat_roundtrip(start_worker, chat_client: ChatClient) -> None:
    start_worker("echo")
    reply = chat_client.chat([{"role": "user", "content": "alpha beta gamma"}], max_tokens=8)
    assert reply.text == "alpha beta gamma"
    assert reply.finish_reason == "stop"
    assert reply.usage.completion_tokens == 3
    assert reply.timings.total_ms >= reply.timings.queue_ms >= 0


def test_max_tokens_cuts_with_length(start_worker, chat_client: ChatClient) -> None:
    start_worker("echo")
    reply = chat_client.chat([{"role": "user", "content": "one two three four five"}], max_tokens=2)
    assert (reply.text, reply.finish_reason) == ("one two", "length")


def test_raw_json_request_gets_json_reply(start_worker, redis_client: redis.Redis, prefix: str) -> None:
    start_worker("echo")
    body = {"id": "raw-1", "messages": [{"role": "user", "content": "ping pong"}], "max_tokens": 4}
    redis_client.xadd(f"{prefix}:requests", {"v": "1", "ct": "json", "body": json.dumps(body)})
    events, final = _read_final(redis_client, f"{prefix}:reply:raw-1")
    assert final["type"] == "done" and final["text"] == "ping pong"
    assert [e["index"] for e in events if e["type"] == "token"] == [0, 1]


def test_stream_events_concatenate_to_final_text(start_worker, chat_client: ChatClient) -> None:
    start_worker("echo")
    stream = chat_client.stream([{"role": "user", "content": "a b c d e f g"}], max_tokens=32)
    tokens = list(stream)
    assert [t.index for t in tokens] == list(range(7))
    assert stream.reply is not None
    assert "".join(t.text for t in tokens) == stream.reply.text == "a b c d e f g"


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"v": "1", "ct": "json", "body": b"{not json"}, ErrorCode.INVALID_REQUEST),
        ({"v": "1", "ct": "json", "body": json.dumps({"id": "{rid}"})}, ErrorCode.INVALID_REQUEST),
        ({"v": "9", "ct": "json", "body": json.dumps({"id": "{rid}", "prompt": "x"})},
         ErrorCode.INVALID_REQUEST),
        ({"v": "1", "ct": "json", "body": json.dumps({"id": "{rid}", "prompt": "x" * 300_000})},
         ErrorCode.TOO_LONG),
        ({"v": "1", "ct": "json", "body": json.dumps({"id": "{rid}", "prompt": "x", "max_tokens": -5})},
         ErrorCode.INVALID_REQUEST),
        ({"v": "1", "ct": "msgpack", "body": msgpack.packb({"id": "{rid}", "prompt": "x", "temperature": 9})},
         ErrorCode.INVALID_REQUEST),
    ],
    ids=["bad-json", "missing-messages", "unknown-version", "oversized-body", "negative-max-tokens",
         "temperature-out-of-range"],
)
def test_invalid_requests_get_error_codes_and_worker_keeps_serving(
    start_worker,
    redis_client: redis.Redis,
    chat_client: ChatClient,
    prefix: str,
    fields: dict,
    code: ErrorCode,
) -> None:
    start_worker("echo")
    rid = f"bad-{code.value}"
    raw = {k: (v.replace("{rid}", rid) if isinstance(v, str) else v) for k, v in fields.items()}
    if fields["ct"] == "msgpack":
        raw["body"] = msgpack.packb({**msgpack.unpackb(fields["body"]), "id": rid})
    good_before = chat_client.submit([{"role": "user", "content": "before"}], max_tokens=4)
    redis_client.xadd(f"{prefix}:requests", raw)
    good_after = chat_client.submit([{"role": "user", "content": "after"}], max_tokens=4)
    if fields["body"] != b"{not json":
        key = f"{prefix}:reply:{rid}"
        if fields["ct"] == "msgpack":
            got = redis_client.xread({key: "0"}, block=10_000)
            assert got, "no error reply"
            body = msgpack.unpackb(got[0][1][0][1][b"body"])
        else:
            _, body = _read_final(redis_client, key)
        assert body["type"] == "error" and body["code"] == code.value, body
    assert chat_client.result(good_before).text == "before"
    assert chat_client.result(good_after).text == "after"
    pending = redis_client.xpending(f"{prefix}:requests", "workers")
    assert pending["pending"] == 0


def test_client_validates_before_sending(chat_client: ChatClient) -> None:
    with pytest.raises(ValueError):
        chat_client.submit([{"role": "user", "content": "x"}], max_tokens=0)


def test_deadline_in_the_past_is_refused(start_worker, chat_client: ChatClient) -> None:
    start_worker("echo")
    with pytest.raises(ChatError) as info:
        chat_client.chat([{"role": "user", "content": "late"}], deadline_ms=1)
    assert info.value.code == ErrorCode.DEADLINE_EXCEEDED


def test_concurrent_requests_are_microbatched(start_worker, chat_client: ChatClient) -> None:
    worker = start_worker("echo", max_wait_ms=50)
    ids = [chat_client.submit([{"role": "user", "content": f"request number {i}"}], max_tokens=8)
           for i in range(16)]
    replies = [chat_client.result(i) for i in ids]
    assert [r.text for r in replies] == [f"request number {i}" for i in range(16)]
    time.sleep(0.2)
    sizes = [e["size"] for e in worker.events("batch_done")]
    assert sum(sizes) == 16 and max(sizes) > 1, sizes


def test_submit_many_and_results_round_trip(start_worker, chat_client: ChatClient) -> None:
    start_worker("echo")
    batch = [{"prompt": f"doc {i} body", "max_tokens": 8, "stream": i % 2 == 0} for i in range(40)]
    batch.append({"messages": [{"role": "user", "content": "last one"}], "max_tokens": 1})
    ids = [i for i in chat_client.submit_many(batch) if isinstance(i, str)]
    assert len(set(ids)) == len(batch)
    replies = chat_client.results(ids)
    texts = [r.text if isinstance(r, Reply) else r for r in (replies[i] for i in ids)]
    assert texts == [f"doc {i} body" for i in range(40)] + ["last"]
    last = replies[ids[-1]]
    assert isinstance(last, Reply) and last.finish_reason == "length"


def test_submit_many_reports_errors_per_request(start_worker, chat_client: ChatClient) -> None:
    start_worker("echo")
    ids = [i for i in chat_client.submit_many([{"prompt": "fine"}, {"prompt": "late", "deadline_ms": 1}])
           if isinstance(i, str)]
    replies = chat_client.results(ids)
    first, second = (replies[i] for i in ids)
    assert isinstance(first, Reply) and first.text == "fine"
    assert isinstance(second, ChatError) and second.code == ErrorCode.DEADLINE_EXCEEDED


def test_request_done_log_matches_the_reply(start_worker, chat_client: ChatClient) -> None:
    worker = start_worker("echo")
    reply = chat_client.chat([{"role": "user", "content": "log me"}], max_tokens=4)
    time.sleep(0.2)
    (logged,) = [e for e in worker.events("request_done") if e["id"] == reply.id]
    assert (logged["queue_ms"], logged["ttft_ms"], logged["total_ms"]) == (
        reply.timings.queue_ms, reply.timings.ttft_ms, reply.timings.total_ms)
    assert (logged["prompt_tokens"], logged["completion_tokens"], logged["finish_reason"]) == (
        reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.finish_reason)


def test_waiting_requests_never_wait_for_the_idle_read_block(start_worker, chat_client: ChatClient) -> None:
    # 96 requests, 8 at a time: each time the engine drains, the rest are runnable at once. A worker
    # that blocked on Redis with requests waiting would sit 5 s per drain (12 drains) and time out.
    start_worker("echo", max_num_seqs=8, read_block_ms=5_000, max_wait_ms=5)
    ids = chat_client.submit_many(
        [{"messages": [{"role": "user", "content": f"m{i}"}], "max_tokens": 3} for i in range(96)]
    )
    assert all(isinstance(i, str) for i in ids)
    replies = chat_client.results([str(i) for i in ids], timeout_s=30)
    assert sorted(r.text for r in replies.values() if not isinstance(r, Exception)) == sorted(
        f"m{i}" for i in range(96)
    )
