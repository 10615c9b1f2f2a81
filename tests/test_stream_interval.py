"""Coalesced token events (`LLM_STREAM_INTERVAL_MS`, `LLM_STREAM_INTERVAL_TOKENS`): the coalescer's rules on
an injected clock, the publisher's events in process (`n` > 1 and logprobs too, which the echo engine does
not honour), and a real echo worker whose reply streams are read as written."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from worker_process import WorkerProcess, spawn_worker

from producer.client import ChatClient, ChatError
from producer.wire.codec import decode_event
from producer.wire.models import ChatRequest, DoneEvent, ErrorCode, ErrorEvent, ReplyEvent, TokenEvent
from worker.engine.base import SequenceOutput, TokenLogprob
from worker.loop.inflight import InFlight, InFlightTable
from worker.loop.publisher import Publisher
from worker.loop.stream_coalescing import StreamCoalescer, stream_coalescer
from worker.observability.counters import LoopCounters

pytestmark = pytest.mark.timeout(120)

WORDS = " ".join(f"w{i}" for i in range(40))  # the echo engine answers one word per step


# -- the coalescer, on an injected clock -----------------------------------------------------------------


def test_off_unless_an_interval_is_set() -> None:
    assert stream_coalescer(0, 0) is None and stream_coalescer(0, 1) is None  # one token per event anyway
    on = stream_coalescer(25, 0)
    assert on is not None and (on.interval_s, on.interval_tokens) == (0.025, 0)
    assert stream_coalescer(0, 4) is not None


def test_first_tokens_go_at_once_then_one_event_per_interval() -> None:
    c = StreamCoalescer(interval_s=0.5)  # times in eighths of a second: exact in binary
    owner = object()
    lp = [{"token_id": i} for i in range(6)]
    first = c.add("r", 0, owner, "a", [0], lp[0:1], now_s=10.0)
    assert first is not None and (first.text, first.token_ids, first.logprobs) == ("a", [0], lp[0:1])
    assert c.add("r", 0, owner, "b", [1], lp[1:2], now_s=10.125) is None
    assert c.add("r", 0, owner, "", [2], lp[2:3], now_s=10.25) is None  # text the engine holds back
    assert c.holding and c.take_due(10.375) == []
    held = c.add("r", 0, owner, "cd", [3], lp[3:4], now_s=10.5)  # the interval since the last event
    assert held is not None and (held.text, held.token_ids, held.logprobs) == ("bcd", [1, 2, 3], lp[1:4])
    assert not c.holding
    # No new token for a while: the held ones go once the interval has passed since the last event.
    assert c.add("r", 0, owner, "e", [4], None, now_s=10.625) is None
    assert c.take_due(10.875) == []
    ((seq_id, choice, whose, due),) = c.take_due(11.0)
    assert (seq_id, choice, whose, due.text, due.token_ids, due.logprobs) == ("r", 0, owner, "e", [4], None)
    assert not c.holding and c.take("r") == [] and len(c) == 0


def test_a_token_bound_releases_every_k_tokens() -> None:
    c = StreamCoalescer(interval_tokens=3)
    owner = object()
    released = [c.add("r", 0, owner, f"t{i}", [i], None, now_s=0.0) for i in range(8)]
    expected = [[0], None, None, [1, 2, 3], None, None, [4, 5, 6], None]
    assert [r.token_ids if r else None for r in released] == expected
    assert c.take_due(1e9) == []  # no time bound
    ((choice, rest),) = c.take("r")
    assert (choice, rest.text, rest.token_ids) == (0, "t7", [7])


def test_choices_are_coalesced_apart_and_taken_together() -> None:
    c = StreamCoalescer(interval_s=1.0)
    owner = object()
    for choice in (0, 1):  # each choice's first tokens go at once
        assert c.add("r", choice, owner, f"{choice}a", [choice], None, now_s=0.0) is not None
    assert c.add("r", 1, owner, "1b", [11], None, now_s=0.1) is None
    assert c.add("r", 0, owner, "0b", [10], None, now_s=0.2) is None
    assert c.add("r", 0, owner, "0c", [20], None, now_s=0.3) is None
    assert [(i, h.text, h.token_ids) for i, h in c.take("r")] == [(0, "0b0c", [10, 20]), (1, "1b", [11])]
    assert not c.holding and len(c) == 0


def test_a_new_request_under_an_old_id_starts_afresh() -> None:
    c = StreamCoalescer(interval_s=1.0)
    old, new = object(), object()
    c.add("r", 0, old, "a", [1], None, now_s=0.0)
    assert c.add("r", 0, old, "b", [2], None, now_s=0.1) is None
    first = c.add("r", 0, new, "x", [9], None, now_s=0.2)  # the old one ended elsewhere: a first token
    assert first is not None and first.token_ids == [9] and not c.holding
    c.keep_only(lambda seq_id, owner: owner is not new)
    assert len(c) == 0


# -- the publisher, in process ---------------------------------------------------------------------------


class _Writer:
    """Records what the publisher queues, in order: ("token", body) and ("final", event)."""

    def __init__(self) -> None:
        self.written: list[tuple[str, Any]] = []

    def token(self, request_id: str, key: str, body: dict[str, Any], ct: str, first: bool) -> None:
        assert first == (body["index"] == 0)  # the reply stream's TTL is set with the first event
        self.written.append(("token", TokenEvent.model_validate(body)))

    def final(self, final: Any) -> None:
        self.written.append(("final", final.event))

    def of(self, lane: Any) -> _Writer:
        return self

    def tokens(self) -> list[TokenEvent]:
        return [e for kind, e in self.written if kind == "token"]


def _publisher(interval_ms: float, interval_tokens: int = 0, **fields: Any) -> tuple[Publisher, _Writer]:
    request = ChatRequest.model_validate({"id": "r1", "prompt": "hi", **fields})
    table = InFlightTable()
    table.add(
        InFlight(b"1000-0", request, "json", "llm:reply:r1", [1, 2, 3], 1000, 50.0, None, admitted_s=50.0)
    )
    writer = _Writer()
    coalescer = stream_coalescer(interval_ms, interval_tokens)
    return Publisher(writer, table, LoopCounters(), "w:1", "w", None, None, coalescer), writer  # type: ignore[arg-type]


def _out(seq_id: str, i: int, finished: bool = False, reason: str = "length", **kw: Any) -> SequenceOutput:
    logprobs = [TokenLogprob(100 + i, -0.1 * i, ())]
    return SequenceOutput(
        seq_id, [100 + i], f"t{i} ", finished, reason if finished else None, logprobs=logprobs, **kw
    )  # type: ignore[arg-type]


def _run(publisher: Publisher, outputs: list[list[SequenceOutput]], step_s: float = 0.01) -> None:
    for step, step_outputs in enumerate(outputs):
        publisher.publish(step_outputs, 51.0 + step * step_s)


def test_the_publisher_writes_the_first_token_alone_and_the_rest_coalesced() -> None:
    text = "".join(f"t{i} " for i in range(10))
    steps = [[_out("r1", i)] for i in range(9)]
    steps.append([_out("r1", 9, True, text=text, completion_tokens=10, prompt_tokens=3)])
    plain, plain_writer = _publisher(0, logprobs=True)
    _run(plain, steps)
    publisher, writer = _publisher(35, logprobs=True)
    _run(publisher, steps)
    # Off: one event per output.
    assert [t.token_ids for t in plain_writer.tokens()] == [[100 + i] for i in range(10)]
    tokens = writer.tokens()
    assert tokens[0].token_ids == [100] and tokens[0].text == "t0 "
    assert [t.index for t in tokens] == list(range(len(tokens)))
    # The first alone; then 35 ms at 10 ms a step; then the rest right before the final.
    assert [len(t.token_ids) for t in tokens] == [1, 4, 4, 1]
    assert "".join(t.text for t in tokens) == text
    assert [i for t in tokens for i in t.token_ids] == [100 + i for i in range(10)]
    kind, done = writer.written[-1]
    assert kind == "final" and isinstance(done, DoneEvent) and done.text == text
    assert [lp for t in tokens for lp in t.logprobs or []] == done.logprobs
    unchanged = plain_writer.written[-1][1]
    assert done.model_dump(exclude={"timings"}) == unchanged.model_dump(exclude={"timings"})
    publisher.publish([], 60.0)
    assert writer.written[-1] == ("final", done)  # nothing after the final


def test_held_tokens_go_out_when_the_interval_expires_without_new_ones() -> None:
    publisher, writer = _publisher(500)
    publisher.publish([_out("r1", 0)], 51.0)
    publisher.publish([_out("r1", 1)], 51.125)
    assert len(writer.tokens()) == 1 and publisher.holds_tokens
    publisher.publish([], 51.375)
    assert len(writer.tokens()) == 1
    publisher.publish([], 51.5)  # what the loop calls each iteration while tokens are held
    assert [t.token_ids for t in writer.tokens()] == [[100], [101]] and not publisher.holds_tokens


def test_an_error_final_comes_right_after_every_choice_s_held_tokens() -> None:
    publisher, writer = _publisher(1000, n=2, logprobs=True)
    steps = [[_out("r1", i), _out("r1#1", 10 + i)] for i in range(4)]
    steps.append([SequenceOutput("r1", [], "", True, "cancelled")])
    _run(publisher, steps)
    kinds = [(kind, e.choice if kind == "token" else None) for kind, e in writer.written]
    assert kinds == [("token", 0), ("token", 1), ("token", 0), ("token", 1), ("final", None)]
    first0, first1, rest0, rest1 = writer.tokens()
    assert (first0.token_ids, first1.token_ids) == ([100], [110])
    assert (rest0.token_ids, rest1.token_ids) == ([101, 102, 103], [111, 112, 113])
    assert [lp.token_id for lp in rest1.logprobs or []] == [111, 112, 113]
    final = writer.written[-1][1]
    assert isinstance(final, ErrorEvent) and final.code == ErrorCode.CANCELLED
    publisher.publish([_out("r1#1", 14)], 60.0)  # a late output of the other choice: dropped as answered
    assert writer.written[-1][1] is final and not publisher.holds_tokens


def test_choices_are_coalesced_apart_with_their_index() -> None:
    publisher, writer = _publisher(0, 2, n=2, logprobs=True)
    steps = [[_out("r1", i), _out("r1#1", 10 + i)] for i in range(4)]
    steps.append([_out("r1#1", 14, True, text="", completion_tokens=5)])
    steps.append([_out("r1", 4, True, text="", completion_tokens=5)])
    _run(publisher, steps)
    got = [(t.index, t.choice, t.token_ids) for t in writer.tokens()]
    assert got == [
        (0, 0, [100]), (1, 1, [110]), (2, 0, [101, 102]), (3, 1, [111, 112]),
        (4, 1, [113, 114]), (5, 0, [103, 104]),  # choice 1 ends a step before choice 0
    ]  # fmt: skip
    kind, done = writer.written[-1]
    assert kind == "final" and len(writer.written) == 7 and done.choices is not None
    for choice in done.choices:
        mine = [t for t in writer.tokens() if t.choice == choice.index]
        assert [lp for t in mine for lp in t.logprobs or []] == choice.logprobs


def test_a_request_ended_without_a_final_here_writes_nothing_more() -> None:
    publisher, writer = _publisher(500)
    publisher.publish([_out("r1", 0)], 51.0)
    publisher.publish([_out("r1", 1)], 51.125)
    publisher.table.end("r1")  # lost to another worker, or handed back at shutdown
    publisher.publish([], 52.0)
    assert len(writer.written) == 1 and not publisher.holds_tokens
    assert publisher.coalescer is not None and len(publisher.coalescer) == 0  # its state is forgotten


# -- real workers ----------------------------------------------------------------------------------------


def _events(client: redis.Redis, key: str) -> list[ReplyEvent]:
    return [decode_event(fields) for _, fields in client.xrange(key)]


def _split(events: list[ReplyEvent]) -> tuple[list[TokenEvent], ReplyEvent]:
    *tokens, final = events
    assert all(isinstance(t, TokenEvent) for t in tokens), "nothing but token events before the final"
    assert [t.index for t in tokens] == list(range(len(tokens)))  # type: ignore[union-attr]
    return tokens, final  # type: ignore[return-value]


@pytest.fixture(scope="module")
def coalescing_worker(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ChatClient, WorkerProcess]]:
    """An echo worker writing held tokens every 100 ms (a word every 5 ms), and a client of its tenant.
    A tenant's client only announces a cancel, so the worker writes `cancelled` itself (another client
    writes it, and the worker's held tokens then find the final there and are dropped)."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    worker = spawn_worker(
        redis_url, prefix, tmp_path_factory.mktemp("coalescing"), "coalescing", tenants="acme",
        echo_token_delay_ms=5, stream_interval_ms=100,
    )  # fmt: skip
    client = ChatClient(redis_url, prefix=prefix, tenant="acme", timeout_s=60)
    yield client, worker
    client.close()
    worker.stop()


def test_a_worker_coalesces_tokens_and_the_final_is_unchanged(
    coalescing_worker: tuple[ChatClient, WorkerProcess], redis_client: redis.Redis
) -> None:
    client, _ = coalescing_worker
    rid = client.submit(prompt=WORDS, max_tokens=64)
    done = client.result(rid, timeout_s=30)
    tokens, final = _split(_events(redis_client, client.reply_key(rid)))
    assert isinstance(final, DoneEvent)
    # The echo's reply, as without coalescing: every word, `stop`, the prompt's bytes.
    assert (final.text, final.finish_reason) == (WORDS, "stop") and done.text == WORDS
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(WORDS.encode()), 40)
    assert len(tokens[0].token_ids) == 1 and tokens[0].text == "w0"  # the first token at once
    assert 1 < len(tokens) < 40  # about one event per 100 ms of a 200 ms reply
    assert "".join(t.text for t in tokens) == WORDS
    assert len([i for t in tokens for i in t.token_ids]) == 40
    time.sleep(0.2)  # past the interval: nothing is written after the final
    assert redis_client.xlen(client.reply_key(rid)) == len(tokens) + 1


def test_a_cancel_or_deadline_writes_the_held_tokens_before_the_error(
    coalescing_worker: tuple[ChatClient, WorkerProcess], redis_client: redis.Redis
) -> None:
    client, worker = coalescing_worker
    long_prompt = " ".join(f"w{i}" for i in range(500))
    cancelled = client.submit(prompt=long_prompt, max_tokens=600)
    late = client.submit(prompt=long_prompt, max_tokens=600, timeout_ms=400)
    deadline = time.monotonic() + 10
    while redis_client.xlen(client.reply_key(cancelled)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # within the interval after an event: tokens are held
    assert client.cancel(cancelled)
    for rid, code in ((cancelled, ErrorCode.CANCELLED), (late, ErrorCode.DEADLINE_EXCEEDED)):
        with pytest.raises(ChatError) as info:
            client.result(rid, timeout_s=30)
        assert info.value.code == code
    time.sleep(0.2)
    done = {e["id"]: e for e in worker.events("request_done")}
    for rid, code in ((cancelled, ErrorCode.CANCELLED), (late, ErrorCode.DEADLINE_EXCEEDED)):
        tokens, final = _split(_events(redis_client, client.reply_key(rid)))
        assert isinstance(final, ErrorEvent) and final.code == code  # the last event: nothing after it
        assert len(tokens[0].token_ids) == 1 and len(tokens) < done[rid]["completion_tokens"]
        # Every token the engine produced was written before the error, none lost with the request.
        produced = done[rid]["completion_tokens"]
        assert sum(len(t.token_ids) for t in tokens) == produced
        assert "".join(t.text for t in tokens) == " ".join(long_prompt.split()[:produced])
