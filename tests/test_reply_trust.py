"""Clients trust only replies to their own request from the workers; refusals expire quickly.

A reply stream is a plain Redis key: anyone allowed to XADD to it could append a fake `done`.
Clients accept an event only when it names their request id and, with `LLM_REPLY_SIGNING_KEY`,
carries the workers' HMAC; anything else is skipped and the client waits for the real answer.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from producer.client import AsyncChatClient, ChatClient, ChatError, ChatTimeout
from producer.wire.codec import encode_body, encode_event, encode_request
from producer.wire.keys import StreamNames
from producer.wire.models import ChatRequest, DoneEvent, ErrorCode, ErrorEvent, Timings, TokenEvent, Usage
from producer.wire.signing import sign, signing_input, verify
from worker.observability.counters import LoopCounters
from worker.replies.refusals import Refusals
from worker.replies.writer import FinalWrite, ReplyWriter
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(120)

KEY = "k" * 32
CHAT = [{"role": "user", "content": "one two three four five six"}]
REAL = "one two three four five six"


def forged_done(request_id: str, text: str = "FORGED") -> DoneEvent:
    return DoneEvent(
        id=request_id, text=text, finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1),
        timings=Timings(queue_ms=0, ttft_ms=0, tpot_ms=0, total_ms=0, worker="evil"), attempt="evil",
    )  # fmt: skip


def forge(r: redis.Redis, key: str, event: DoneEvent | ErrorEvent | TokenEvent, secret: bytes | None) -> None:
    """What an attacker with write access to the victim's reply stream appends (signed with `secret`)."""
    r.xadd(key, encode_event(event, "msgpack", key, secret))  # type: ignore[arg-type]


# -- the signature itself ---------------------------------------------------------------------------------
def test_signature_binds_body_reply_key_and_content_type() -> None:
    secret, body = b"s" * 16, encode_body({"type": "done", "id": "a"}, "json")
    fields = {b"ct": b"json", b"body": body, b"sig": sign(secret, "llm:reply:a", "json", body).encode()}
    assert verify(secret, "llm:reply:a", fields)
    assert not verify(secret, "llm:reply:b", fields)  # replayed into another stream
    assert not verify(b"t" * 16, "llm:reply:a", fields)  # another key
    assert not verify(secret, "llm:reply:a", {**fields, b"body": body + b" "})
    assert not verify(secret, "llm:reply:a", {**fields, b"ct": b"msgpack"})
    assert not verify(secret, "llm:reply:a", {b"ct": b"json", b"body": body})  # unsigned
    # The reply key is length-prefixed: no key/body split gives the same signed bytes.
    assert signing_input("llm:reply:a", "json", b"xy") != signing_input("llm:reply:ajson", "", b"xy")
    assert signing_input("k", "json", b"x").startswith(b"llm-reply-v1\n1:kjson\n")


# -- forged events end to end -----------------------------------------------------------------------------
def test_forged_done_with_another_id_is_skipped(start_worker, redis_client, prefix) -> None:
    client = ChatClient(client=redis_client, prefix=prefix, timeout_s=60)
    rid = client.submit(CHAT, max_tokens=16)  # queued before any worker runs: the forgery lands first
    key = StreamNames.for_prefix(prefix).reply(rid)
    forge(redis_client, key, forged_done("someone-else"), None)
    forge(
        redis_client, key, TokenEvent(id="someone-else", index=0, text="X", token_ids=[1], attempt="e"), None
    )
    redis_client.xadd(key, {"ct": "msgpack", "body": b"\xc1garbage"})  # malformed: skipped too
    start_worker(echo_token_delay_ms=20)
    stream = client.events(rid)
    events = list(stream)
    assert all(e.id == rid for e in events)
    assert isinstance(events[-1], DoneEvent) and events[-1].text == REAL
    assert all(e.text != "X" for e in events if isinstance(e, TokenEvent))
    assert client.rejected_events == 3


def test_signed_replies_end_to_end_and_unsigned_forgery_is_skipped(
    start_worker, redis_client, prefix
) -> None:
    client = ChatClient(client=redis_client, prefix=prefix, timeout_s=60, reply_signing_key=KEY)
    rid = client.submit(CHAT, max_tokens=16)
    key = StreamNames.for_prefix(prefix).reply(rid)
    forge(redis_client, key, forged_done(rid), None)  # the right id, no signature
    forge(redis_client, key, forged_done(rid), b"w" * 32)  # the right id, signed with a wrong key
    forge(redis_client, key, ErrorEvent(id=rid, code=ErrorCode.CANCELLED, message="x"), None)
    start_worker(reply_signing_key=KEY, echo_token_delay_ms=10)
    stream = client.stream(CHAT, max_tokens=16)  # a second request, streamed: tokens are signed too
    tokens = [t.text for t in stream]
    assert stream.reply is not None and stream.reply.text == REAL and "".join(tokens).strip() == REAL
    reply = client.result(rid)
    assert reply.text == REAL and reply.attempt != "evil"
    assert client.rejected_events == 3
    # Every entry the worker wrote is signed for its stream: all but the three forgeries verify.
    entries = redis_client.xrange(key)
    assert sum(verify(KEY.encode(), key, f) for _, f in entries) == len(entries) - 3
    # The client's own cancel is signed with the same key, so the client accepts it.
    slow = client.submit(CHAT, max_tokens=16)
    assert client.cancel(slow)
    with pytest.raises(ChatError) as err:
        client.result(slow)
    assert err.value.code == ErrorCode.CANCELLED


def test_unsigned_deployment_still_works_and_tokens_name_their_request(start_worker, chat_client) -> None:
    start_worker()
    stream = chat_client.stream(CHAT, max_tokens=16)
    tokens = list(stream)
    assert tokens and all(t.id == stream.id for t in tokens)
    assert stream.reply is not None and stream.reply.text == REAL
    assert chat_client.rejected_events == 0


def test_client_with_a_key_rejects_an_unsigned_worker(start_worker, redis_client, prefix) -> None:
    start_worker()  # signs nothing
    client = ChatClient(client=redis_client, prefix=prefix, reply_signing_key=KEY, cancel_on_timeout=False)
    with pytest.raises(ChatTimeout):
        client.chat(CHAT, max_tokens=4, timeout_s=3)
    assert client.rejected_events >= 1


def test_async_client_skips_forgeries(start_worker, redis_url, redis_client, prefix) -> None:
    async def main() -> tuple[str, int]:
        async with AsyncChatClient(redis_url, prefix=prefix, timeout_s=60, reply_signing_key=KEY) as client:
            rid = await client.submit(CHAT, max_tokens=16)
            key = StreamNames.for_prefix(prefix).reply(rid)
            forge(redis_client, key, forged_done(rid), None)
            forge(redis_client, key, forged_done("other"), KEY.encode())  # signed, but not ours
            start_worker(reply_signing_key=KEY)
            reply = await client.result(rid)
            return reply.text, client.rejected_events

    text, rejected = asyncio.run(main())
    assert text == REAL and rejected == 2


def test_results_skips_forgeries(start_worker, redis_client, prefix) -> None:
    client = ChatClient(client=redis_client, prefix=prefix, timeout_s=60, reply_signing_key=KEY)
    ids = [client.submit(CHAT, max_tokens=8) for _ in range(3)]
    for rid in ids:
        forge(redis_client, StreamNames.for_prefix(prefix).reply(rid), forged_done(rid), None)
    start_worker(reply_signing_key=KEY)
    out = client.results(ids)
    assert all(not isinstance(r, ChatError) and r.text == "one two three four five six"[: len(r.text)]
               and r.attempt != "evil" for r in out.values())  # fmt: skip


# -- refusals: short TTL ----------------------------------------------------------------------------------
def _writer(r: redis.Redis, prefix: str, **settings: object) -> tuple[ReplyWriter, Refusals, WorkerSettings]:
    s = WorkerSettings(prefix=prefix, **settings)  # type: ignore[arg-type]
    names = StreamNames.for_prefix(prefix)
    r.xgroup_create(names.requests, s.group, id="0", mkstream=True)
    writer = ReplyWriter(r, names, s.group, "w:1", s.reply_ttl_s, signing_key=s.signing_key())
    return writer, Refusals(writer, s, LoopCounters()), s


def test_refusals_use_the_short_ttl_and_served_finals_the_long_one(redis_client, prefix) -> None:
    writer, refusals, s = _writer(redis_client, prefix, refusal_ttl_s=60)
    names = StreamNames.for_prefix(prefix)
    refused, served = ChatRequest(prompt="hi"), ChatRequest(prompt="hi")
    entry = redis_client.xadd(names.requests, encode_request(refused))  # type: ignore[arg-type]
    fields = {
        k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in encode_request(refused).items()
    }
    refusals.refuse(entry, fields, ErrorCode.OVERLOADED, "busy")
    writer.final(FinalWrite(served.id, names.reply(served.id), forged_done(served.id), "msgpack", None))
    assert writer.flush() == []
    for rid, low, high in ((refused.id, 1, 60), (served.id, 3500, 3600)):
        assert low <= redis_client.ttl(names.reply(rid)) <= high
        assert low <= redis_client.ttl(names.final_guard(rid)) <= high
    # Bytes one refused request leaves in Redis (reply stream + guard), recorded in docs/reliability.md.
    size = redis_client.memory_usage(names.reply(refused.id)) + redis_client.memory_usage(
        names.final_guard(refused.id)
    )
    print(f"refused request: {size} bytes for {redis_client.ttl(names.reply(refused.id))} s")
    assert size < 8192


def test_refusal_expires(redis_client, prefix) -> None:
    writer, refusals, _ = _writer(redis_client, prefix, refusal_ttl_s=1)
    request = ChatRequest(prompt="hi", reply_to=f"{prefix}:reply:custom")
    refusals.fail(b"0-1", request, "json", request.reply_key(prefix), ErrorCode.TOO_LONG, "too long")
    writer.flush()
    names = StreamNames.for_prefix(prefix)
    assert redis_client.exists(request.reply_key(prefix), names.final_guard(request.id)) == 2
    time.sleep(2.2)
    assert redis_client.exists(request.reply_key(prefix), names.final_guard(request.id)) == 0


def test_reply_to_outside_the_namespace_is_refused_with_the_short_ttl(
    start_worker, redis_client, prefix
) -> None:
    start_worker(refusal_ttl_s=30)
    client = ChatClient(client=redis_client, prefix=prefix, timeout_s=30)
    request = ChatRequest(prompt="hi", reply_to="elsewhere:victim")
    redis_client.xadd(StreamNames.for_prefix(prefix).requests, encode_request(request))  # type: ignore[arg-type]
    with pytest.raises(ChatError) as err:
        client.result(request.id)
    assert err.value.code == ErrorCode.INVALID_REQUEST
    assert redis_client.exists("elsewhere:victim") == 0
    assert 0 < redis_client.ttl(StreamNames.for_prefix(prefix).reply(request.id)) <= 30
