"""The worker's reply shapes and timing arithmetic, in process (pure functions of `worker.loop.publisher`)."""

from __future__ import annotations

import pytest

from producer.wire.models import ChatRequest, DoneEvent, ErrorCode, ErrorEvent, TokenEvent
from worker.engine.base import SequenceOutput
from worker.loop.inflight import InFlight, entry_epoch_ms
from worker.loop.publisher import (
    add_to_batch,
    batch_done_fields,
    final_event,
    request_timings,
    token_event,
)
from worker.observability.counters import Microbatch


def inflight(stream: bool = True, **kw: object) -> InFlight:
    request = ChatRequest(id="r1", prompt="hello there", stream=stream)
    fields: dict = dict(
        entry_id=b"1000-0", request=request, content_type="json", reply_key="llm:reply:r1",
        prompt_token_ids=[1, 2, 3], enqueued_epoch_ms=1000, read_s=50.0, deadline_s=None,
    )  # fmt: skip
    fields.update(kw)
    return InFlight(**fields)  # type: ignore[arg-type]


def test_entry_epoch_ms_is_the_xadd_time() -> None:
    assert entry_epoch_ms(b"1700000000123-7") == 1700000000123


def test_timings_split_queue_and_generation() -> None:
    # XADDed at epoch 1000 ms; started at monotonic 50.2; first token at 50.3; now 51.2 (epoch 2400 ms).
    f = inflight(admitted_s=50.2, first_token_s=50.3)
    t = request_timings(f, completion_tokens=11, now_s=51.2, now_epoch_ms=2400.0, worker="w")
    # Total 1400 ms, of which 1000 ms since the start: 400 ms queued.
    assert t.queue_ms == pytest.approx(400.0) and t.total_ms == pytest.approx(1400.0)
    assert t.ttft_ms == pytest.approx(500.0)
    assert t.tpot_ms == pytest.approx(90.0)  # (51.2 - 50.3) s over 10 tokens after the first
    assert t.worker == "w"


def test_timings_of_a_request_that_never_started() -> None:
    t = request_timings(inflight(), completion_tokens=0, now_s=60.0, now_epoch_ms=1250.0, worker="w")
    assert t.queue_ms == pytest.approx(250.0) and t.total_ms == pytest.approx(250.0)
    assert t.ttft_ms is None and t.tpot_ms is None


def test_token_events_only_for_streaming_requests_with_news() -> None:
    out = SequenceOutput("r1", [42], " hi")
    body = token_event(inflight(tokens_sent=3), out, "w:1")
    assert body is not None
    event = TokenEvent.model_validate(body)  # the wire's model accepts it as is
    assert (event.index, event.text, event.token_ids, event.attempt) == (3, " hi", [42], "w:1")
    assert token_event(inflight(stream=False), out, "w:1") is None
    assert token_event(inflight(), SequenceOutput("r1", [], ""), "w:1") is None


def test_final_event_done_or_error_code() -> None:
    f = inflight()
    t = request_timings(f, 2, 51.0, 2000.0, "w")
    out = SequenceOutput(
        "r1",
        [],
        "",
        True,
        "length",
        3,
        2,
        1,
        text="a b",
        kv_dtype="int8",
        kv_peak_tokens=4,
        kv_evicted_tokens=16,
    )
    done = final_event(f, out, t, "w:1")
    assert isinstance(done, DoneEvent) and done.text == "a b" and done.finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.cached_tokens) == (3, 2, 1)
    assert (done.usage.kv_dtype, done.usage.kv_peak_tokens, done.usage.kv_evicted_tokens) == ("int8", 4, 16)
    expected = {
        "deadline_exceeded": ErrorCode.DEADLINE_EXCEEDED,
        "cancelled": ErrorCode.CANCELLED,
        "too_long": ErrorCode.TOO_LONG,
        "error": ErrorCode.INTERNAL,
    }
    for reason, code in expected.items():
        event = final_event(f, SequenceOutput("r1", [], "", True, reason), t, "w:1")  # type: ignore[arg-type]
        assert isinstance(event, ErrorEvent) and event.code == code and event.id == "r1"


def test_microbatch_ends_with_its_last_member() -> None:
    batch = Microbatch(size=2, admitted_s=10.0, wait_ms=3.0, remaining=2)
    assert not add_to_batch(batch, prompt=100, completion=10, cached=50, kv_peak=109)
    assert add_to_batch(batch, prompt=100, completion=20, cached=0, kv_peak=64)
    fields = batch_done_fields(7, batch, now_s=10.5)
    assert fields == {
        "batch": 7, "size": 2, "tokens": 230, "cached_tokens": 50, "prefix_hit_rate": 0.25,
        "kv_peak_tokens": 173, "wait_ms": 3.0, "duration_ms": 500.0,
    }  # fmt: skip
