"""From engine outputs to reply events, timings and log events.

The functions at the top are pure (the caller passes the clocks), so the shape of every reply
and the arithmetic of every timing are unit-tested in process. `Publisher` applies them to a
step's outputs: it hands the events to the lanes' `ReplyWriters` (the one place that writes reply
streams), ends finished requests in the `InFlightTable`, and logs `request_done` and `batch_done`.
"""

from __future__ import annotations

from typing import Any

import structlog

from producer.wire.models import (
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    ReplyEvent,
    Timings,
    Usage,
    now_ms,
)
from worker.engine.base import SequenceOutput
from worker.loop.inflight import InFlight, InFlightTable
from worker.observability.counters import LoopCounters, Microbatch
from worker.replies.writer import FinalWrite, ReplyWriters

log = structlog.get_logger("worker")

# Finish reasons that end a request with an `error` reply instead of `done`.
FINISH_ERRORS = {
    "deadline_exceeded": ErrorCode.DEADLINE_EXCEEDED,
    "cancelled": ErrorCode.CANCELLED,
    "too_long": ErrorCode.TOO_LONG,
    "error": ErrorCode.INTERNAL,
}
_ERROR_MESSAGES = {
    "too_long": "prompt plus max_tokens exceeds this worker's KV cache",
}


def token_event(f: InFlight, out: SequenceOutput, attempt: str) -> dict[str, Any] | None:
    """The streamed delta of one output as a `TokenEvent` body, or None when the request does not stream
    or nothing is new. A plain dict: a model instance per token costs more than the rest of publishing
    (`test_publishing` checks it validates as a `TokenEvent`)."""
    if not f.request.stream or not (out.new_text or out.new_token_ids):
        return None
    return {
        "type": "token", "id": f.request.id, "index": f.tokens_sent, "text": out.new_text,
        "token_ids": out.new_token_ids, "attempt": attempt,
    }  # fmt: skip


def prompt_tokens(f: InFlight, out: SequenceOutput) -> int:
    return out.prompt_tokens or len(f.prompt_token_ids)


def final_event(f: InFlight, out: SequenceOutput, timings: Timings, attempt: str) -> ReplyEvent:
    """`done` with text, usage and timings, or `error` with the code of an abnormal finish."""
    reason = out.finish_reason or "stop"
    if reason in FINISH_ERRORS:
        return ErrorEvent(
            id=f.request.id,
            code=FINISH_ERRORS[reason],
            message=_ERROR_MESSAGES.get(reason, f"request ended: {reason}"),
            attempt=attempt,
        )
    return DoneEvent(
        id=f.request.id,
        text=out.text,
        finish_reason=reason,
        usage=Usage(
            prompt_tokens=prompt_tokens(f, out),
            completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens,
            kv_dtype=out.kv_dtype,
            kv_peak_tokens=out.kv_peak_tokens,
            kv_evicted_tokens=out.kv_evicted_tokens,
        ),
        timings=timings,
        attempt=attempt,
    )


def request_timings(
    f: InFlight, completion_tokens: int, now_s: float, now_epoch_ms: float, worker: str
) -> Timings:
    """Queue, first-token, per-token and total times of a request ending now (ms).

    Queue time spans the Redis backlog (from the entry id's server time) and the wait in the engine
    before it started; a request that never started spent all its time queued.
    """
    admitted = f.admitted_s if f.admitted_s is not None else now_s
    queue_ms = max(0.0, now_epoch_ms - f.enqueued_epoch_ms - (now_s - admitted) * 1000)
    ttft_ms = None if f.first_token_s is None else queue_ms + (f.first_token_s - admitted) * 1000
    total_ms = queue_ms + (now_s - admitted) * 1000
    tpot_ms = None
    if f.first_token_s is not None and completion_tokens > 1:
        tpot_ms = (now_s - f.first_token_s) * 1000 / (completion_tokens - 1)
    return Timings(
        queue_ms=round(queue_ms, 2),
        ttft_ms=None if ttft_ms is None else round(ttft_ms, 2),
        tpot_ms=None if tpot_ms is None else round(tpot_ms, 3),
        total_ms=round(total_ms, 2),
        worker=worker,
    )


def add_to_batch(batch: Microbatch, prompt: int, completion: int, cached: int, kv_peak: int = 0) -> bool:
    """Count one finished member; True when it was the last one."""
    batch.remaining -= 1
    batch.kv_peak_tokens += kv_peak
    batch.prompt_tokens += prompt
    batch.tokens += prompt + completion
    batch.cached_tokens += cached
    return batch.remaining == 0


def batch_done_fields(batch_id: int, batch: Microbatch, now_s: float) -> dict[str, float | int]:
    return {
        "batch": batch_id,
        "size": batch.size,
        "tokens": batch.tokens,
        "cached_tokens": batch.cached_tokens,
        "prefix_hit_rate": round(batch.cached_tokens / max(batch.prompt_tokens, 1), 4),
        "kv_peak_tokens": batch.kv_peak_tokens,
        "wait_ms": round(batch.wait_ms, 2),
        "duration_ms": round((now_s - batch.admitted_s) * 1000, 2),
    }


class Publisher:
    """Turns a step's outputs into reply writes and log events; ends finished requests in the table."""

    def __init__(
        self, writers: ReplyWriters, table: InFlightTable, counters: LoopCounters, attempt: str, worker: str
    ):
        self.writers = writers
        self.table = table
        self.counters = counters
        self.attempt = attempt
        self.worker = worker

    def publish(self, outputs: list[SequenceOutput], now_s: float) -> None:
        epoch_ms = now_ms()
        for out in outputs:
            f = self.table.get(out.seq_id)
            if f is None:
                continue  # already answered (cancelled, lost): nothing may follow a final
            self.counters.tokens += len(out.new_token_ids)
            if out.new_token_ids and f.first_token_s is None:
                f.first_token_s = now_s
            replies = self.writers.of(f.lane)
            event = token_event(f, out, self.attempt)
            if event is not None:
                replies.token(f.request.id, f.reply_key, event, f.content_type, f.tokens_sent == 0)
                f.tokens_sent += 1
            if out.finished:
                timings = request_timings(f, out.completion_tokens, now_s, epoch_ms, self.worker)
                replies.final(
                    FinalWrite(
                        f.request.id, f.reply_key, final_event(f, out, timings, self.attempt),
                        f.content_type, f.entry_id,
                    )
                )  # fmt: skip
                self.table.end(out.seq_id)
                self._log_done(f, out, timings, now_s)

    def _log_done(self, f: InFlight, out: SequenceOutput, t: Timings, now_s: float) -> None:
        self.counters.done += 1
        self.counters.prompt_tokens += prompt_tokens(f, out)
        self.counters.cached_tokens += out.cached_tokens
        log.info(
            "request_done",
            id=f.request.id,
            tenant=f.tenant or f.request.tenant,
            queue_ms=t.queue_ms,
            ttft_ms=t.ttft_ms,
            tpot_ms=t.tpot_ms,
            total_ms=t.total_ms,
            prompt_tokens=prompt_tokens(f, out),
            completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens,
            finish_reason=out.finish_reason,
            kv_dtype=out.kv_dtype,
            kv_peak_tokens=out.kv_peak_tokens,
            kv_evicted_tokens=out.kv_evicted_tokens,
        )
        batch = self.counters.batches.get(f.batch_id)
        if batch is not None and add_to_batch(
            batch, prompt_tokens(f, out), out.completion_tokens, out.cached_tokens, out.kv_peak_tokens
        ):
            del self.counters.batches[f.batch_id]
            log.info("batch_done", **batch_done_fields(f.batch_id, batch, now_s))
