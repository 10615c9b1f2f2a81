"""Clients trust only replies to their own request from the workers; refusals expire quickly.

A reply stream is a plain Redis key: anyone allowed to XADD to it could append a fake `done`.
Clients accept an event only when it names their request id and, with `LLM_REPLY_SIGNING_KEY`,
carries the workers' HMAC; anything else is skipped and the client waits for the real answer.
An event also names the request entry it answers (`rd`, its digest): the client that sent the
entry skips another entry's events, and ends its wait with `invalid_request` (`param` `id`) at
another entry's final.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from producer.client import AsyncChatClient, ChatClient, ChatError, ChatTimeout
from producer.wire.codec import decode_event, encode_body, encode_event, encode_request
from producer.wire.keys import StreamNames
from producer.wire.models import ChatRequest, DoneEvent, ErrorCode, ErrorEvent, Timings, TokenEvent, Usage
from producer.wire.request_digest import entry_digest, request_digest
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


# -- binding: the entry a reply answers (`rd`) --------------------------------------------------------------
@given(ct=st.sampled_from([b"json", b"msgpack", b"", b"x\n"]), body=st.binary(max_size=300))
def test_the_client_and_the_worker_compute_the_same_digest(ct: bytes, body: bytes) -> None:
    fields = {b"v": b"1", b"ct": ct, b"body": body}
    digest = request_digest(ct, body)
    assert digest == entry_digest(fields) == request_digest(ct.decode("latin-1"), body)
    assert len(digest) == 32 and int(digest, 16) >= 0
    # Documented for other languages: BLAKE2b, 16-byte digest, over ct, a newline, then the body.
    assert digest == hashlib.blake2b(ct + b"\n" + body, digest_size=16).hexdigest()


def _event(kind: str, rid: str, rd: str | None) -> DoneEvent | ErrorEvent | TokenEvent:
    if kind == "token":
        return TokenEvent(id=rid, index=0, text="t", token_ids=[1], attempt="w", rd=rd)
    if kind == "done":
        return forged_done(rid).model_copy(update={"rd": rd})
    code = ErrorCode.CANCELLED if kind == "cancelled" else ErrorCode.INTERNAL
    return ErrorEvent(id=rid, code=code, message="m", attempt="w", rd=rd)


def test_a_reply_must_name_the_entry_the_client_sent(redis_client, prefix) -> None:
    """Every combination of signing, the event's `rd` (none, the entry sent, another) and its kind: what
    `check_event` (the client's reads and the gateway's) makes of it."""
    for signed, rd, kind, ct in itertools.product(
        (False, True), ("none", "own", "other"), ("token", "done", "error", "cancelled"), ("json", "msgpack")
    ):
        secret = KEY.encode() if signed else None
        client = ChatClient(client=redis_client, prefix=prefix, reply_signing_key=KEY if signed else None)
        prepared = client.prepare(CHAT, max_tokens=4, content_type=ct)
        client._record(prepared.request, prepared.content_type, prepared.names, prepared.digest)
        digest = {"none": None, "own": prepared.digest, "other": "0" * 32}[rd]
        event = _event(kind, prepared.id, digest)
        fields = {
            k.encode(): v if isinstance(v, bytes) else v.encode()
            for k, v in encode_event(event, ct, prepared.reply_key, secret).items()
        }
        got = client.check_event(prepared.id, prepared.reply_key, b"1-1", fields)
        case = (signed, rd, kind, ct)
        if rd == "own" or (rd == "none" and (not signed or kind == "cancelled")):
            assert got == decode_event(fields), case  # an answer to the entry sent (or an unbound cancel)
            assert client.rejected_events == 0, case
        elif rd == "other" and kind != "token":
            # Another entry's final: the id has its one final, so the wait ends, without that entry's text.
            assert isinstance(got, ErrorEvent) and got.code == ErrorCode.INVALID_REQUEST, case
            assert got.param == "id" and got.id == prepared.id and client.rejected_events == 1, case
        else:
            assert got is None and client.rejected_events == 1, case  # skipped; the wait goes on
        # A request this client did not send (its digest unknown) is not checked against one.
        client.forget(prepared.id)
        unknown = client.check_event(prepared.id, prepared.reply_key, b"1-1", fields)
        assert unknown == decode_event(fields), case


def test_every_event_names_the_entry_it_answers(start_worker, redis_client, prefix) -> None:
    """A signing worker's tokens, `done`, refusals and the client's own cancel all carry the digest of the
    entry sent; an old worker's (signed, no `rd`) and another entry's events are skipped."""
    client = ChatClient(client=redis_client, prefix=prefix, timeout_s=60, reply_signing_key=KEY)
    names = StreamNames.for_prefix(prefix)
    rid = client.submit(CHAT, max_tokens=16, content_type="json")
    digests = {rid: client._sent[rid][3]}
    key = names.reply(rid)
    forge(redis_client, key, forged_done(rid), KEY.encode())  # signed, no `rd`: a worker older than it
    other = TokenEvent(id=rid, index=0, text="OTHER", token_ids=[1], attempt="w", rd="0" * 32)
    forge(redis_client, key, other, KEY.encode())  # signed, another entry's
    start_worker(reply_signing_key=KEY, echo_token_delay_ms=5, refusal_ttl_s=30)
    stream = client.stream(CHAT, max_tokens=16)
    digests[stream.id] = client._sent[stream.id][3]
    tokens = [t.text for t in stream]
    assert stream.reply is not None and stream.reply.text == REAL and "OTHER" not in tokens
    assert client.result(rid).text == REAL and client.rejected_events == 2
    refused = client.submit(prompt="x", max_tokens=4, kv_budget_tokens=1)  # refused: below the sink tokens
    digests[refused] = client._sent[refused][3]
    with pytest.raises(ChatError) as err:
        client.result(refused)
    assert err.value.code == ErrorCode.INVALID_REQUEST and err.value.param == "kv_budget_tokens"
    slow = client.submit(CHAT, max_tokens=4000)
    digests[slow] = client._sent[slow][3]
    assert client.cancel(slow)
    with pytest.raises(ChatError):
        client.result(slow)
    assert len(set(digests.values())) == 4
    for request_id, digest in digests.items():
        events = [decode_event(f) for _, f in redis_client.xrange(names.reply(request_id))]
        ours = [e for e in events if e.attempt not in ("evil", "w")]
        assert ours and all(e.rd == digest for e in ours), (request_id, ours)
    assert client.rejected_events == 2


def test_another_entrys_final_ends_the_wait_with_a_clear_error(
    start_worker, redis_client, redis_url, prefix
) -> None:
    """A signed final of another entry under the client's id (the id taken first): `result`, `results` and
    the async client end at once with `invalid_request` naming `id`, never with that final's text."""
    start_worker(reply_signing_key=KEY)
    names = StreamNames.for_prefix(prefix)
    client = ChatClient(client=redis_client, prefix=prefix, timeout_s=60, reply_signing_key=KEY)
    taken = [f"taken-{i}-{prefix}" for i in range(3)]
    for rid in taken:  # the other entry's answer, already in the reply stream
        forge(redis_client, names.reply(rid), forged_done(rid, "THEIRS").model_copy(update={"rd": "1" * 32}),
              KEY.encode())  # fmt: skip
    began = time.monotonic()
    with pytest.raises(ChatError) as err:
        client.chat(CHAT, id=taken[0], max_tokens=4)
    assert err.value.code == ErrorCode.INVALID_REQUEST and err.value.param == "id"
    assert "THEIRS" not in str(err.value)
    out = client.results([client.submit(CHAT, id=taken[1], max_tokens=4), client.submit(CHAT, max_tokens=16)])
    assert isinstance(out[taken[1]], ChatError) and out[taken[1]].param == "id"
    assert [r.text for r in out.values() if not isinstance(r, ChatError)] == [REAL]

    async def main() -> ChatError:
        async with AsyncChatClient(redis_url, prefix=prefix, timeout_s=60, reply_signing_key=KEY) as aclient:
            with pytest.raises(ChatError) as aerr:
                await aclient.chat(CHAT, id=taken[2], max_tokens=4)
            return aerr.value

    aerr = asyncio.run(main())
    assert aerr.code == ErrorCode.INVALID_REQUEST and aerr.param == "id"
    assert time.monotonic() - began < 30  # at once, not at a timeout


def test_the_documented_shell_digest_is_the_clients() -> None:
    """docs/protocol.md's `b2sum` line, over the body of its redis-cli example, gives `request_digest`."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    body = re.search(r"^body='(.+)'$", doc, flags=re.M)
    example = re.search(r"^redis-cli XADD llm:requests '\*' v 1 ct json body '(.+)'$", doc, flags=re.M)
    assert body and example and body.group(1) == example.group(1)
    if shutil.which("b2sum") is None:
        pytest.skip("no b2sum")
    line = re.search(r"^(printf .+ \| b2sum -l 128)", doc, flags=re.M)
    assert line
    out = subprocess.run(
        ["bash", "-c", f"body='{body.group(1)}'; {line.group(1)}"], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    assert out == request_digest("json", body.group(1).encode())
