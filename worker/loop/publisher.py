"""From engine outputs to reply events, timings and log events.

The functions at the top are pure (the caller passes the clocks), so the shape of every reply
and the arithmetic of every timing are unit-tested in process. `Publisher` applies them to a
step's outputs: it hands the events to the lanes' `ReplyWriters` (the one place that writes reply
streams), ends finished requests in the `InFlightTable`, and logs `request_done` and `batch_done`.
With a `StreamCoalescer` (`LLM_STREAM_INTERVAL_MS`, `LLM_STREAM_INTERVAL_TOKENS`) it writes a
choice's tokens after its first as fewer, longer token events, each request's held tokens right
before its final; without one, every output with something new is its own event.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import structlog

from producer.wire.models import (
    Choice,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Logprob,
    ReplyEvent,
    Timings,
    Usage,
    now_ms,
)
from worker.engine.base import Engine, SequenceOutput, TokenLogprob
from worker.loop.inflight import InFlight, InFlightTable, split_choice
from worker.loop.stream_coalescing import Held, StreamCoalescer
from worker.observability.counters import LoopCounters, Microbatch
from worker.observability.metrics import WorkerMetrics
from worker.replies.writer import FinalWrite, ReplyWriters

log = structlog.get_logger("worker")

# Finish reasons that end a request with an `error` reply instead of `done`.
FINISH_ERRORS = {
    "deadline_exceeded": ErrorCode.DEADLINE_EXCEEDED,
    "cancelled": ErrorCode.CANCELLED,
    "too_long": ErrorCode.TOO_LONG,
    "invalid_request": ErrorCode.INVALID_REQUEST,
    "error": ErrorCode.INTERNAL,
}
_ERROR_MESSAGES = {
    "too_long": "prompt plus max_tokens exceeds this worker's KV cache",
}


# A token's text, for the `token` of logprobs (None: they carry token ids only).
TokenText = Callable[[int], str]
# The log-probability written for -inf (a token masked out) and NaN, as OpenAI writes it: JSON has no -inf.
MIN_LOGPROB = -9999.0


def _logprob(value: float) -> float:
    return value if value > MIN_LOGPROB else MIN_LOGPROB  # NaN too


def logprob_bodies(logprobs: list[TokenLogprob], token_text: TokenText | None = None) -> list[dict[str, Any]]:
    """The engine's logprobs of some tokens as `Logprob` bodies (plain dicts, as token events are)."""
    if token_text is None:
        return [
            {"token_id": lp.token_id, "logprob": _logprob(lp.logprob),
             "top": [{"token_id": t, "logprob": _logprob(v)} for t, v in lp.top]}
            for lp in logprobs
        ]  # fmt: skip
    return [
        {"token_id": lp.token_id, "token": token_text(lp.token_id), "logprob": _logprob(lp.logprob),
         "top": [{"token_id": t, "token": token_text(t), "logprob": _logprob(v)} for t, v in lp.top]}
        for lp in logprobs
    ]  # fmt: skip


def token_event(
    f: InFlight,
    out: SequenceOutput,
    attempt: str,
    choice: int | None = None,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """The streamed delta of one output as a `TokenEvent` body, or None when the request does not stream
    or nothing is new; with `choice` (requests with `n` > 1) and `logprobs` (`logprob_bodies`) when given,
    and the entry's digest (`rd`) when known.
    A plain dict: a model instance per token costs more than the rest of publishing (`test_publishing`
    checks it validates as a `TokenEvent`)."""
    if not f.request.stream or not (out.new_text or out.new_token_ids):
        return None
    return token_body(f, out.new_text, out.new_token_ids, attempt, choice, logprobs)


def token_body(
    f: InFlight,
    text: str,
    token_ids: list[int],
    attempt: str,
    choice: int | None = None,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The `TokenEvent` body of some tokens of `f`: the next `index`, their text, ids and logprobs."""
    body = {
        "type": "token", "id": f.request.id, "index": f.tokens_sent, "text": text,
        "token_ids": token_ids, "attempt": attempt,
    }  # fmt: skip
    if logprobs is not None:
        body["logprobs"] = logprobs
    if choice is not None:
        body["choice"] = choice
    if f.digest:
        body["rd"] = f.digest  # the entry it answers (`producer/wire/request_digest.py`)
    return body


def prompt_tokens(f: InFlight, out: SequenceOutput) -> int:
    return out.prompt_tokens or len(f.prompt_token_ids)


def merged_choices(choices: dict[int, SequenceOutput]) -> SequenceOutput:
    """One output standing for every choice of a request with `n` > 1 (for its `done`, timings and log):
    choice 0's text and finish reason, the completion tokens of all, the prompt once, and the KV the
    choices held together."""
    first = choices[0]
    outs = choices.values()
    return SequenceOutput(
        first.seq_id, [], "", True, first.finish_reason, first.prompt_tokens,
        sum(o.completion_tokens for o in outs), first.cached_tokens, first.text, first.kv_dtype,
        sum(o.kv_peak_tokens for o in outs), sum(o.kv_evicted_tokens for o in outs),
    )  # fmt: skip


def final_event(
    f: InFlight,
    out: SequenceOutput,
    timings: Timings,
    attempt: str,
    choices: dict[int, SequenceOutput] | None = None,
) -> ReplyEvent:
    """`done` with text, usage and timings, or `error` with the code of an abnormal finish.

    A request that asked for logprobs gets those of its reply (`f.logprobs`); one with `n` > 1 gets every
    choice (`choices`, by index: their final outputs), and `out` is `merged_choices(choices)`.
    """
    reason = out.finish_reason or "stop"
    if reason in FINISH_ERRORS:
        return ErrorEvent(
            id=f.request.id,
            code=FINISH_ERRORS[reason],
            message=out.error or _ERROR_MESSAGES.get(reason, f"request ended: {reason}"),
            attempt=attempt,
            param=out.error_param,
        )
    kept = f.logprobs or {}

    def logprobs_of(choice: int) -> list[Logprob] | None:
        if not f.request.logprobs:
            return None
        return [Logprob.model_validate(body) for body in kept.get(choice, ())]

    listed = None
    if choices is not None:
        listed = [
            Choice(
                index=i, text=c.text, finish_reason=c.finish_reason or "stop",
                completion_tokens=c.completion_tokens, logprobs=logprobs_of(i),
            )
            for i, c in sorted(choices.items())
        ]  # fmt: skip
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
        logprobs=logprobs_of(0),
        choices=listed,
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


def token_text(engine: Engine) -> TokenText | None:
    """The engine's token texts for logprobs (memoised: the same tokens recur), None without an encoder."""
    try:
        encoder = engine.encoder()
    except NotImplementedError:
        return None
    return functools.lru_cache(maxsize=1 << 16)(encoder.token_text)


class Publisher:
    """Turns a step's outputs into reply writes and log events; ends finished requests in the table."""

    def __init__(
        self, writers: ReplyWriters, table: InFlightTable, counters: LoopCounters, attempt: str, worker: str,
        token_text: TokenText | None = None, metrics: WorkerMetrics | None = None,
        coalescer: StreamCoalescer | None = None,
    ):  # fmt: skip
        self.metrics = metrics
        self.writers = writers
        self.table = table
        self.counters = counters
        self.attempt = attempt
        self.worker = worker
        self.token_text = token_text  # the `token` of logprobs; None: token ids only
        self.coalescer = coalescer  # None: one token event per output

    @property
    def holds_tokens(self) -> bool:
        """Tokens are held back that `publish` must write once due, even with no outputs to publish."""
        return self.coalescer is not None and self.coalescer.holding

    def publish(self, outputs: list[SequenceOutput], now_s: float) -> None:
        """Write the events of a step's outputs. The outputs of choice i > 0 of a request with `n` > 1 come
        under `choice_seq_id(seq_id, i)`; its final reply waits for every choice (or the first error).
        Held tokens whose interval has passed are written too (`outputs` may be empty)."""
        epoch_ms = now_ms()
        for out in outputs:
            seq_id, choice = split_choice(out.seq_id)
            f = self.table.get(seq_id)
            if f is None:
                continue  # already answered (cancelled, lost): nothing may follow a final
            self.counters.tokens += len(out.new_token_ids)
            if out.new_token_ids and f.first_token_s is None:
                f.first_token_s = now_s
            logprobs = None
            if out.logprobs is not None and f.request.logprobs:
                logprobs = logprob_bodies(out.logprobs, self.token_text)
                f.logprobs = f.logprobs or {}
                f.logprobs.setdefault(choice, []).extend(logprobs)
            replies = self.writers.of(f.lane)
            if self.coalescer is not None:
                self._coalesce(f, seq_id, choice, out, logprobs, now_s)
            else:
                event = token_event(f, out, self.attempt, choice if f.request.n > 1 else None, logprobs)
                if event is not None:
                    replies.token(f.request.id, f.reply_key, event, f.content_type, f.tokens_sent == 0)
                    f.tokens_sent += 1
            if not out.finished:
                continue
            choices = None
            if f.request.n > 1 and (out.finish_reason or "stop") not in FINISH_ERRORS:
                f.finished_choices = f.finished_choices or {}
                f.finished_choices[choice] = out
                if len(f.finished_choices) < f.request.n:
                    continue
                choices = f.finished_choices
                out = merged_choices(choices)
            timings = request_timings(
                f, max(c.completion_tokens for c in choices.values()) if choices else out.completion_tokens,
                now_s, epoch_ms, self.worker,
            )  # fmt: skip
            if self.coalescer is not None:
                for held_choice, held in self.coalescer.take(seq_id):  # the last tokens go right before it
                    self._write(f, held_choice, held)
            replies.final(
                FinalWrite(
                    f.request.id, f.reply_key, final_event(f, out, timings, self.attempt, choices),
                    f.content_type, f.entry_id, digest=f.digest or None,
                )
            )  # fmt: skip
            self.table.end(seq_id)
            self._log_done(f, out, timings, now_s)
        if self.coalescer is not None:
            self._write_due(now_s)

    def _coalesce(
        self, f: InFlight, seq_id: str, choice: int, out: SequenceOutput,
        logprobs: list[dict[str, Any]] | None, now_s: float,
    ) -> None:  # fmt: skip
        """Hand an output's tokens to the coalescer; write what it releases."""
        assert self.coalescer is not None
        if not f.request.stream or not (out.new_text or out.new_token_ids):
            return
        held = self.coalescer.add(seq_id, choice, f, out.new_text, out.new_token_ids, logprobs, now_s)
        if held is not None:
            self._write(f, choice, held)

    def _write_due(self, now_s: float) -> None:
        """Write the held tokens whose interval has passed; forget requests that ended without a final
        from here (lost to another worker, handed back)."""
        assert self.coalescer is not None
        for seq_id, choice, owner, held in self.coalescer.take_due(now_s):
            f = self.table.get(seq_id)
            if f is not None and f is owner:
                self._write(f, choice, held)
            else:
                self.coalescer.forget(seq_id)
        if len(self.coalescer) > len(self.table):  # every request it keeps is in the table, unless ended so
            self.coalescer.keep_only(lambda seq_id, owner: self.table.get(seq_id) is owner)

    def _write(self, f: InFlight, choice: int, held: Held) -> None:
        """One token event of `f` carrying `held`'s tokens."""
        body = token_body(
            f, held.text, held.token_ids, self.attempt, choice if f.request.n > 1 else None, held.logprobs
        )
        self.writers.of(f.lane).token(f.request.id, f.reply_key, body, f.content_type, f.tokens_sent == 0)
        f.tokens_sent += 1

    def _log_done(self, f: InFlight, out: SequenceOutput, t: Timings, now_s: float) -> None:
        prompt = prompt_tokens(f, out)
        self.counters.done += 1
        self.counters.prompt_tokens += prompt
        self.counters.cached_tokens += out.cached_tokens
        log.info(
            "request_done",
            id=f.request.id,
            tenant=f.tenant or f.request.tenant,
            shard=f.shard,
            owned=f.owned,
            queue_ms=t.queue_ms,
            ttft_ms=t.ttft_ms,
            tpot_ms=t.tpot_ms,
            total_ms=t.total_ms,
            prompt_tokens=prompt,
            completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens,
            finish_reason=out.finish_reason,
            kv_dtype=out.kv_dtype,
            kv_peak_tokens=out.kv_peak_tokens,
            kv_evicted_tokens=out.kv_evicted_tokens,
        )
        if self.metrics is not None:
            self.metrics.observe_request(
                out.finish_reason or "stop", f.tenant, prompt, out.cached_tokens,
                out.completion_tokens, t.queue_ms, t.ttft_ms, t.tpot_ms, t.total_ms,
            )  # fmt: skip
        batch = self.counters.batches.get(f.batch_id)
        if batch is not None and add_to_batch(
            batch, prompt, out.completion_tokens, out.cached_tokens, out.kv_peak_tokens
        ):
            del self.counters.batches[f.batch_id]
            log.info("batch_done", **batch_done_fields(f.batch_id, batch, now_s))
