"""A request id reused with another body: the entry that claimed the id first owns it.

A producer that can read the request stream (every backend, without tenants) sees a victim's request id
and appends an entry of its own with that id and another prompt. With two signing workers, the victim's
`ChatClient.result()` must return the victim's own text (or a clear error), never the injected one, in
every order and timing the attacker can produce; the injected entry is refused on its own terms (no
reply: its reply stream is the victim's), logged `request_duplicate_id`, dead-lettered and acknowledged.
Where the injected entry comes first (an id known in advance) it owns the id and is answered; the
victim's client tells that answer from its own by the entry digest every signed event names (`rd`) and
ends with `invalid_request` naming the `id`, never returning or streaming the injected text.
The same body again (a client's retry) keeps today's exactly-once answer.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable

import pytest
import redis
from redis.crc import key_slot

from producer.client import AsyncChatClient, ChatClient, ChatError, Reply
from producer.wire.codec import decode_event, decode_request
from producer.wire.keys import StreamNames
from producer.wire.models import DoneEvent, ErrorCode, ErrorEvent, TokenEvent, new_request_id
from producer.wire.request_digest import entry_digest

SIGNING_KEY = "duplicate-id-test-signing-key"
VICTIM_PROMPT = "victim words one two three four five"
INJECTED = "INJECTED"
TRIALS = 5


def attack_fields(request_id: str, reply_to: str | None = None) -> dict[str, str]:
    """A raw request entry reusing `request_id` with the attacker's prompt (short: it would finish first)."""
    body: dict[str, object] = {"id": request_id, "prompt": f"{INJECTED} {request_id[:6]}", "max_tokens": 4}
    if reply_to is not None:
        body["reply_to"] = reply_to
    return {"v": "1", "ct": "json", "body": json.dumps(body)}


def finals(client: redis.Redis, names: StreamNames, request_id: str) -> list[DoneEvent | ErrorEvent]:
    events = [decode_event(fields) for _, fields in client.xrange(names.reply(request_id))]
    return [e for e in events if isinstance(e, DoneEvent | ErrorEvent)]


def victim_outcome(reply: Reply | ChatError) -> str:
    """The victim's own text, `id_taken` (the id answered another entry), or an error code; anything
    else (the injected text) fails the test."""
    if isinstance(reply, ChatError):
        assert INJECTED not in reply.message, reply.message
        if reply.code == ErrorCode.INVALID_REQUEST and reply.param == "id":
            return "id_taken"
        return f"error:{reply.code.value}"
    assert INJECTED not in reply.text, reply.text
    assert reply.text == VICTIM_PROMPT, reply.text
    return "own"


Attack = Callable[[ChatClient, redis.Redis, StreamNames], str]


def victim_first(chat: ChatClient, r: redis.Redis, names: StreamNames) -> str:
    rid = chat.submit(prompt=VICTIM_PROMPT, max_tokens=8, stream=False)
    r.xadd(names.requests, attack_fields(rid))  # type: ignore[arg-type]
    return rid


def read_then_resend(chat: ChatClient, r: redis.Redis, names: StreamNames) -> str:
    """The realistic attacker: waits on the request stream, reads the victim's entry, re-sends its id."""
    last = (r.xinfo_stream(names.requests)["last-generated-id"] or b"0-0").decode()
    seen: list[str] = []

    def watch() -> None:
        got = r.xread({names.requests: last}, count=1, block=5000)
        seen.append(decode_request(got[0][1][0][1], names.root)[0].id if got else "")
        r.xadd(names.requests, attack_fields(seen[0]))  # type: ignore[arg-type]

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.01)
    rid = chat.submit(prompt=VICTIM_PROMPT, max_tokens=8, stream=False)
    watcher.join()
    assert seen == [rid]
    return rid


def concurrent(chat: ChatClient, r: redis.Redis, names: StreamNames) -> str:
    """Both entries at once, from two connections: either may land first in the stream (the attacker
    first only because the test gives it the id in advance)."""
    rid = new_request_id()
    barrier = threading.Barrier(2)

    def attack() -> None:
        barrier.wait()
        r.xadd(names.requests, attack_fields(rid))  # type: ignore[arg-type]

    attacker = threading.Thread(target=attack)
    attacker.start()
    barrier.wait()
    chat.submit(prompt=VICTIM_PROMPT, max_tokens=8, stream=False, id=rid)
    attacker.join()
    return rid


def attacker_first(chat: ChatClient, r: redis.Redis, names: StreamNames) -> str:
    """The id known in advance (128 random bits: not from reading the stream): the injected entry is first."""
    rid = new_request_id()
    r.xadd(names.requests, attack_fields(rid))  # type: ignore[arg-type]
    chat.submit(prompt=VICTIM_PROMPT, max_tokens=8, stream=False, id=rid)
    return rid


def attack_came_first(r: redis.Redis, names: StreamNames, rid: str) -> bool:
    """Whether the injected entry of `rid` is before the victim's in the stream (read before any trim)."""
    order = [decode_request(f, names.root)[0].prompt for _, f in r.xrange(names.requests)
             if decode_request(f, names.root)[0].id == rid]  # fmt: skip
    return bool(order) and INJECTED in (order[0] or "")


def while_generating(chat: ChatClient, r: redis.Redis, names: StreamNames) -> str:
    rid = chat.submit(prompt=VICTIM_PROMPT, max_tokens=8, stream=False)
    time.sleep(0.03)  # the victim is running on one worker; the other reads the attack
    r.xadd(names.requests, attack_fields(rid))  # type: ignore[arg-type]
    return rid


def after_answer(chat: ChatClient, r: redis.Redis, names: StreamNames) -> str:
    rid = chat.submit(prompt=VICTIM_PROMPT, max_tokens=8, stream=False)
    chat.result(rid, timeout_s=30)
    r.xadd(names.requests, attack_fields(rid))  # type: ignore[arg-type]
    return rid


def with_own_reply_to(chat: ChatClient, r: redis.Redis, names: StreamNames) -> str:
    """The attack names another reply stream: its refusal must still not answer the victim's id."""
    rid = chat.submit(prompt=VICTIM_PROMPT, max_tokens=8, stream=False)
    r.xadd(names.requests, attack_fields(rid, reply_to=names.reply(f"{rid}-attacker")))  # type: ignore[arg-type]
    return rid


def retried_same_body(chat: ChatClient, r: redis.Redis, names: StreamNames) -> str:
    """Not an attack: the victim's own entry sent again, byte for byte (a client's retry)."""
    rid = chat.submit(prompt=VICTIM_PROMPT, max_tokens=8, stream=False)
    entries = r.xrevrange(names.requests, count=20)
    fields = next(f for _, f in entries if decode_request(f, names.root)[0].id == rid)
    r.xadd(names.requests, fields)  # type: ignore[arg-type]
    return rid


ATTACKS: dict[str, Attack] = {
    "victim_first": victim_first,
    "read_then_resend": read_then_resend,
    "concurrent": concurrent,
    "attacker_first": attacker_first,
    "while_generating": while_generating,
    "after_answer": after_answer,
    "with_own_reply_to": with_own_reply_to,
}


def test_a_reused_id_never_answers_the_victim_with_the_injected_text(
    start_worker, redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    workers = [
        start_worker("echo", echo_token_delay_ms=5, reply_signing_key=SIGNING_KEY, max_wait_ms=1)
        for _ in range(2)
    ]
    names = StreamNames.for_prefix(prefix)
    chat = ChatClient(redis_url, prefix=prefix, timeout_s=60, reply_signing_key=SIGNING_KEY)
    try:
        ids: dict[str, str] = {}
        first: set[str] = set()  # ids whose injected entry came first in the stream (known in advance)
        for trial in range(TRIALS):
            for name, attack in ATTACKS.items():
                rid = attack(chat, redis_client, names)
                ids[rid] = f"{name}#{trial}"
                if name in ("concurrent", "attacker_first") and attack_came_first(redis_client, names, rid):
                    first.add(rid)
        replies = chat.results(list(ids), timeout_s=60)
        outcomes = {rid: victim_outcome(reply) for rid, reply in replies.items()}
        assert len(outcomes) == len(ids)
        # The victim came first (every case where the attacker learnt the id from the stream): own text.
        # The injected entry came first (the id known in advance): the id is taken, and the client says so
        # at once, from the injected entry's signed final, whose `rd` is not the digest of what it sent.
        expected = {rid: "id_taken" if rid in first else "own" for rid in ids}
        assert outcomes == expected, {ids[k]: v for k, v in outcomes.items() if v != expected[k]}
        assert chat.rejected_events >= len(first)
        time.sleep(0.5)  # a late final from the injected entry would show now
        for rid, label in ids.items():
            got = finals(redis_client, names, rid)
            assert len(got) == 1 and isinstance(got[0], DoneEvent), label
            # The first entry owns the id: where the injected one was first, it is the one answered, and its
            # final names the injected entry's digest, which is how the victim's client refused it.
            assert (INJECTED in got[0].text) == (rid in first), label
            assert got[0].rd is not None and (got[0].rd == chat_digest(redis_client, names, rid)) == (
                rid not in first
            ), label
        assert {ids[rid].split("#")[0] for rid in first} >= {"attacker_first"}
        # Every injected entry is acknowledged and none ran to a final; each is logged and dead-lettered.
        assert redis_client.xpending(names.requests, "workers")["pending"] == 0
        events = [e for w in workers for e in w.events()]
        duplicates = [e for e in events if e["event"] == "request_duplicate_id"]
        refused = {e["id"] for e in duplicates if e["stage"] != "taken_over"}
        skipped = {e["id"] for e in events if e["event"] == "request_already_answered"}
        assert all(rid in refused or rid in skipped for rid in ids), "an injected entry went unnoticed"
        dead = [f for _, f in redis_client.xrange(names.dead_letter)]
        for f in dead:  # the later entry of each id, with its body
            match = re.search(rb"duplicate request id '([0-9a-f]+)'", f[b"reason"])
            assert match is not None, f[b"reason"]
            assert (INJECTED.encode() in f[b"f:body"]) == (match.group(1).decode() not in first)
        assert len(dead) == len({e["id"] for e in duplicates if e["stage"] == "read"})
        for rid in ids:  # the attacker's own reply stream (with_own_reply_to) got nothing either
            assert not redis_client.exists(names.reply(f"{rid}-attacker"))
    finally:
        chat.close()


def chat_digest(r: redis.Redis, names: StreamNames, rid: str) -> str:
    """The digest of the victim's entry of `rid` (the one without the injected prompt)."""
    for _, fields in r.xrange(names.requests):
        request = decode_request(fields, names.root)[0]
        if request.id == rid and INJECTED not in (request.prompt or ""):
            return entry_digest(fields)
    raise AssertionError(f"no victim entry of {rid}")


def test_attacker_first_never_reaches_a_streaming_victim(
    start_worker, redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    """The injected entry first with the victim's id, streamed (token events into the victim's reply stream
    before its final): the victim's sync and async streams yield none of its tokens and end with
    `invalid_request` naming the `id`; a victim whose id nobody took streams its own text. Each body shape
    of the table is tried in both content types."""
    start_worker("echo", echo_token_delay_ms=2, reply_signing_key=SIGNING_KEY, max_wait_ms=1)
    names = StreamNames.for_prefix(prefix)
    shapes: list[dict[str, object]] = [
        {"prompt": VICTIM_PROMPT},
        {"messages": [{"role": "user", "content": VICTIM_PROMPT}]},
        {"prompt": VICTIM_PROMPT, "seed": 7, "metadata": {"k": "v"}},
        {"prompt": VICTIM_PROMPT, "stop": ["zz"]},
    ]
    chat = ChatClient(redis_url, prefix=prefix, timeout_s=30, reply_signing_key=SIGNING_KEY)

    try:
        for shape in shapes:
            for ct in ("msgpack", "json"):
                params = {k: v for k, v in shape.items() if k != "messages"}
                messages = shape.get("messages")
                rid = new_request_id()
                redis_client.xadd(names.requests, attack_fields(rid))  # type: ignore[arg-type]
                stream = chat.stream(messages, id=rid, max_tokens=8, content_type=ct, **params)  # type: ignore[arg-type]
                tokens: list[TokenEvent] = []
                with pytest.raises(ChatError) as err:
                    tokens.extend(stream)
                assert err.value.code == ErrorCode.INVALID_REQUEST and err.value.param == "id", err.value
                streamed = "".join(t.text for t in tokens)
                assert INJECTED not in streamed and rid[:6] not in streamed and stream.reply is None
                own = chat.stream(messages, max_tokens=8, content_type=ct, **params)  # type: ignore[arg-type]
                text = "".join(t.text for t in own)
                assert own.reply is not None and own.reply.text == VICTIM_PROMPT
                assert text.strip() == VICTIM_PROMPT

        async def async_victim() -> tuple[list[str], ChatError | None]:
            async with AsyncChatClient(
                redis_url, prefix=prefix, timeout_s=30, reply_signing_key=SIGNING_KEY
            ) as client:
                rid = new_request_id()
                redis_client.xadd(names.requests, attack_fields(rid))  # type: ignore[arg-type]
                seen: list[str] = []
                try:
                    async for token in client.stream(prompt=VICTIM_PROMPT, id=rid, max_tokens=8):
                        seen.append(token.text)
                except ChatError as exc:
                    return seen, exc
                return seen, None

        seen, error = asyncio.run(async_victim())
        assert error is not None and error.code == ErrorCode.INVALID_REQUEST and error.param == "id"
        assert INJECTED not in "".join(seen), seen
        assert chat.rejected_events >= len(shapes) * 2  # at least each injected final
    finally:
        chat.close()


def test_a_retry_of_the_same_body_is_still_answered_once(
    start_worker, redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    start_worker("echo", echo_token_delay_ms=5, max_wait_ms=1)
    start_worker("echo", echo_token_delay_ms=5, max_wait_ms=1)
    names = StreamNames.for_prefix(prefix)
    chat = ChatClient(redis_url, prefix=prefix, timeout_s=60)
    try:
        ids = [retried_same_body(chat, redis_client, names) for _ in range(8)]
        replies = chat.results(ids, timeout_s=60)
        assert all(isinstance(r, Reply) and r.text == VICTIM_PROMPT for r in replies.values())
        time.sleep(0.5)
        for rid in ids:
            assert len(finals(redis_client, names, rid)) == 1
        assert not redis_client.xlen(names.dead_letter)
        assert redis_client.xpending(names.requests, "workers")["pending"] == 0
    finally:
        chat.close()


@pytest.mark.parametrize("shards", [1, 2])
def test_claims_live_in_the_tenants_namespace(
    start_worker, redis_url: str, prefix: str, redis_client: redis.Redis, shards: int
) -> None:
    """With tenants (and shards) the claim sits beside the guard, in the same hash slot; a tenant that
    reuses its own in-flight id with another body is refused the same way."""
    start_worker("echo", echo_token_delay_ms=5, tenants="alice", stream_shards=shards, max_wait_ms=1)
    chat = ChatClient(redis_url, prefix=prefix, tenant="alice", stream_shards=shards, timeout_s=60)
    try:
        ids = [chat.submit(prompt=VICTIM_PROMPT, max_tokens=8, stream=False) for _ in range(4)]
        spaces = StreamNames.layout(prefix, ["alice"], shards)
        for rid in ids:
            names = chat._names_for(rid)
            redis_client.xadd(names.requests, attack_fields(rid))  # type: ignore[arg-type]
        replies = chat.results(ids, timeout_s=60)
        assert all(isinstance(r, Reply) and r.text == VICTIM_PROMPT for r in replies.values())
        for rid in ids:
            names = chat._names_for(rid)
            claim = names.claim(rid)
            assert claim.startswith(names.root + ":claim:") and names.root in {s.root for s in spaces}
            assert redis_client.exists(claim)
            assert key_slot(claim.encode()) == key_slot(names.final_guard(rid).encode()) == key_slot(
                names.requests.encode()
            )
            assert len(finals(redis_client, names, rid)) == 1
        assert sum(redis_client.xlen(s.dead_letter) for s in spaces) == len(ids)
    finally:
        chat.close()
