"""The worker loop: read the consumer group, validate, admit, step the engine, reply, ack.

One thread does everything, in the order of an engine step, so there is no locking:
1. XREADGROUP new entries (blocking only when the engine is idle and nothing waits);
2. decode and validate each entry; an invalid one gets an `error` reply and is acked;
3. the scheduler's policy decides which waiting requests join the engine now
   (time window, token budget, sequence cap, free KV);
4. one engine step; its token deltas and final replies go out in one pipeline, and
   each entry is acknowledged only together with its final reply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import redis
import structlog

from producer.protocol import (
    ChatRequest,
    ContentType,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    ProtocolError,
    ReplyEvent,
    Timings,
    TokenEvent,
    Usage,
    decode_request,
    now_ms,
    requests_stream,
)
from scheduler import Admission, BatchPolicy, Priority, RunningState, WaitingRequest, select_admissions
from worker.engine.base import Engine, GenerationRequest, SamplingParams, SequenceOutput
from worker.replies import FinalWrite, ReplyWriter
from worker.settings import WorkerSettings

log = structlog.get_logger("worker")

_FINISH_ERRORS = {"deadline_exceeded": ErrorCode.DEADLINE_EXCEEDED, "cancelled": ErrorCode.CANCELLED,
                  "error": ErrorCode.INTERNAL}


@dataclass
class InFlight:
    """A validated request from the moment it is read until its final reply."""

    entry_id: bytes
    request: ChatRequest
    content_type: ContentType
    reply_key: str
    prompt_token_ids: list[int]
    enqueued_epoch_ms: int
    read_s: float
    deadline_s: float | None
    admitted_s: float | None = None
    first_token_s: float | None = None
    tokens_sent: int = 0
    batch_id: int = 0


@dataclass
class Microbatch:
    """Requests admitted together; logged as one `batch_done` when the last one ends."""

    size: int
    admitted_s: float
    wait_ms: float
    remaining: int
    tokens: int = 0
    cached_tokens: int = 0


@dataclass
class LoopCounters:
    read: int = 0
    invalid: int = 0
    done: int = 0
    errors: int = 0
    steps: int = 0
    batches: dict[int, Microbatch] = field(default_factory=dict)


def entry_epoch_ms(entry_id: bytes) -> int:
    """The server time (ms) embedded in a stream entry id, i.e. when it was XADDed."""
    return int(entry_id.split(b"-", 1)[0])


class Consumer:
    """Drives one engine from one consumer-group member."""

    def __init__(self, client: redis.Redis, engine: Engine, settings: WorkerSettings):
        self.client = client
        self.engine = engine
        self.settings = settings
        self.stream = requests_stream(settings.prefix)
        self.attempt = f"{settings.consumer_name}:{int(time.time() * 1000)}"
        self.replies = ReplyWriter(client, settings.prefix, settings.group, self.stream, self.attempt,
                                   settings.reply_ttl_s)
        self.policy = BatchPolicy(
            max_wait_ms=settings.max_wait_ms, max_batch_tokens=settings.max_batch_tokens,
            max_num_seqs=settings.max_num_seqs, max_prefill_chunk_tokens=settings.max_prefill_chunk_tokens,
            kv_reserve=settings.kv_reserve,
        )
        self.waiting: dict[str, InFlight] = {}
        self.running: dict[str, InFlight] = {}
        self.counters = LoopCounters()
        # After a restart our own pending entries (read but never acked) are served first.
        self._replay_from: str | None = "0"
        self._next_batch_id = 0
        self._wake_at_s: float | None = None

    # -- setup -----------------------------------------------------------------------------------------
    def ensure_group(self) -> None:
        """Create the stream and consumer group if absent (id 0: a new group serves the backlog)."""
        try:
            self.client.xgroup_create(self.stream, self.settings.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- loop ------------------------------------------------------------------------------------------
    def run(self, should_stop: Callable[[], bool]) -> None:
        """Serve until `should_stop()`; then finish what is in flight."""
        self.ensure_group()
        log.info("worker_started", consumer=self.settings.consumer_name, engine=self.engine.name,
                 stream=self.stream, group=self.settings.group)
        while not should_stop():
            self.run_once()
        while self.waiting or self.running:
            self.run_once(read=False)

    def run_once(self, read: bool = True) -> None:
        """One iteration: read, admit, step, reply."""
        if read:
            self._read()
        self._admit()
        if self.engine.has_unfinished():
            self._step()

    def _read(self) -> None:
        room = self.settings.max_waiting_requests - len(self.waiting)
        if room <= 0:
            return
        busy = self.engine.has_unfinished() or bool(self.running)
        block: int | None
        if busy:
            block = None
        elif self.waiting and self._wake_at_s is not None:
            block = max(1, int((self._wake_at_s - time.monotonic()) * 1000))
        else:
            block = self.settings.read_block_ms
        replaying = self._replay_from is not None
        reply = self.client.xreadgroup(self.settings.group, self.settings.consumer_name,
                                       {self.stream: self._replay_from or ">"},
                                       count=min(room, self.settings.read_count),
                                       block=None if replaying else block)
        entries = reply[0][1] if reply else []
        if replaying:
            self._replay_from = entries[-1][0].decode() if entries else None
        for entry_id, fields in entries:
            if not fields:  # pending entry deleted from the stream: nothing to serve, just ack
                self.client.xack(self.stream, self.settings.group, entry_id)
                continue
            self.counters.read += 1
            self._accept(entry_id, fields)

    def _accept(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        s = self.settings
        try:
            request, ct = decode_request(fields, s.prefix, s.max_body_bytes)
        except ProtocolError as exc:
            self.counters.invalid += 1
            log.warning("request_invalid", entry=entry_id.decode(), id=exc.request_id, code=exc.code.value,
                        reason=exc.message)
            self.replies.error(exc.request_id, exc.reply_to, exc.code, exc.message, exc.content_type, entry_id)
            return
        reply_key = request.reply_key(s.prefix)
        known = self.waiting.get(request.id) or self.running.get(request.id)
        if known is not None:
            if known.entry_id != entry_id:
                # The same request id sent twice (a client retry): serve the first, ack this one.
                self.client.xack(self.stream, s.group, entry_id)
            return
        enqueued_ms = entry_epoch_ms(entry_id)
        deadline_epoch = request.deadline_epoch_ms(enqueued_ms)
        deadline_s = None if deadline_epoch is None else time.monotonic() + (deadline_epoch - now_ms()) / 1000
        try:
            if request.messages is not None:
                ids = self.engine.encode_chat([m.model_dump() for m in request.messages])
            else:
                ids = self.engine.encode_prompt(request.prompt or "")
        except Exception as exc:  # a template or tokenizer failure is the request's, not the loop's
            self._fail_early(entry_id, request, ct, reply_key, ErrorCode.INVALID_REQUEST, f"cannot tokenize: {exc}")
            return
        if len(ids) > s.max_prompt_tokens:
            self._fail_early(entry_id, request, ct, reply_key, ErrorCode.TOO_LONG,
                             f"prompt is {len(ids)} tokens; the limit is {s.max_prompt_tokens}")
            return
        self.waiting[request.id] = InFlight(entry_id, request, ct, reply_key, ids, enqueued_ms,
                                            time.monotonic(), deadline_s)

    def _fail_early(self, entry_id: bytes, request: ChatRequest, ct: ContentType, reply_key: str,
                    code: ErrorCode, message: str) -> None:
        self.counters.errors += 1
        log.info("request_rejected", id=request.id, tenant=request.tenant, code=code.value, reason=message)
        self.replies.error(request.id, reply_key, code, message, ct, entry_id)

    def _admit(self) -> None:
        if not self.waiting:
            self._wake_at_s = None
            return
        cap = self.engine.capacity()
        waiting = [
            WaitingRequest(
                request_id=f.request.id, arrival_s=f.read_s, prompt_tokens=len(f.prompt_token_ids),
                max_tokens=f.request.max_tokens,
                priority=Priority.BATCH if f.request.priority == "batch" else Priority.INTERACTIVE,
                deadline_s=f.deadline_s,
            )
            for f in self.waiting.values()
        ]
        running = RunningState(num_seqs=cap.running, decode_tokens=cap.decode_tokens, free_kv_tokens=cap.free_kv_tokens)
        now = time.monotonic()
        decision: Admission = select_admissions(waiting, running, self.policy, now,
                                                kv_capacity_tokens=cap.total_kv_tokens)
        self._wake_at_s = decision.wake_at_s
        for w in decision.expired:
            f = self.waiting.pop(w.request_id)
            self._fail_early(f.entry_id, f.request, f.content_type, f.reply_key, ErrorCode.DEADLINE_EXCEEDED,
                             "deadline passed before the request could start")
        for w in decision.too_large:
            f = self.waiting.pop(w.request_id)
            self._fail_early(f.entry_id, f.request, f.content_type, f.reply_key, ErrorCode.TOO_LONG,
                             "prompt plus max_tokens exceeds this worker's KV cache")
        if not decision.admitted:
            return
        batch_id = self._next_batch_id = self._next_batch_id + 1
        wait_ms = max((now - self.waiting[w.request_id].read_s) * 1000 for w in decision.admitted)
        self.counters.batches[batch_id] = Microbatch(len(decision.admitted), now, wait_ms, len(decision.admitted))
        for w in decision.admitted:
            f = self.waiting.pop(w.request_id)
            f.admitted_s, f.batch_id = now, batch_id
            self.running[f.request.id] = f
            r = f.request
            self.engine.add_request(GenerationRequest(
                request_id=r.id, prompt_token_ids=f.prompt_token_ids,
                sampling=SamplingParams(max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                                        top_k=r.top_k, seed=r.seed, stop=tuple(r.stop)),
                arrival_s=f.read_s, priority=int(w.priority), deadline_s=f.deadline_s,
            ))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            log.exception("engine_step_failed", running=len(self.running))
            outputs = [o for rid in list(self.running) if (o := self.engine.abort_request(rid, "error"))]
            known = {o.request_id for o in outputs}
            outputs += [SequenceOutput(rid, [], "", True, "error") for rid in self.running if rid not in known]
        self.counters.steps += 1
        self._publish(outputs)

    def _publish(self, outputs: list[SequenceOutput]) -> None:
        now = time.monotonic()
        tokens: list[tuple[str, ReplyEvent, ContentType, bool]] = []
        finals: list[FinalWrite] = []
        finished: list[tuple[InFlight, SequenceOutput]] = []
        for out in outputs:
            f = self.running.get(out.request_id)
            if f is None:
                continue
            if out.new_token_ids and f.first_token_s is None:
                f.first_token_s = now
            if f.request.stream and (out.new_text or out.new_token_ids):
                event = TokenEvent(index=f.tokens_sent, text=out.new_text, token_ids=out.new_token_ids,
                                   attempt=self.attempt)
                tokens.append((f.reply_key, event, f.content_type, f.tokens_sent == 0))
                f.tokens_sent += 1
            if out.finished:
                finals.append(self._final_write(f, out, now))
                finished.append((f, out))
        self.replies.write(tokens, finals)
        for f, out in finished:
            self.running.pop(f.request.id, None)
            self._log_done(f, out, now)

    def _final_write(self, f: InFlight, out: SequenceOutput, now: float) -> FinalWrite:
        reason = out.finish_reason or "stop"
        event: ReplyEvent
        if reason in _FINISH_ERRORS:
            event = ErrorEvent(id=f.request.id, code=_FINISH_ERRORS[reason], message=f"request ended: {reason}",
                               attempt=self.attempt)
        else:
            event = DoneEvent(id=f.request.id, text=out.text, finish_reason=reason,
                              usage=Usage(prompt_tokens=out.prompt_tokens or len(f.prompt_token_ids),
                                          completion_tokens=out.completion_tokens, cached_tokens=out.cached_tokens),
                              timings=self._timings(f, out, now), attempt=self.attempt)
        return FinalWrite(f.request.id, f.reply_key, event, f.content_type, f.entry_id)

    def _timings(self, f: InFlight, out: SequenceOutput, now: float) -> Timings:
        admitted = f.admitted_s if f.admitted_s is not None else now
        # Queue time spans the Redis backlog (entry id time) and the local wait before admission.
        queue_ms = max(0.0, now_ms() - f.enqueued_epoch_ms - (now - admitted) * 1000)
        ttft_ms = None if f.first_token_s is None else queue_ms + (f.first_token_s - admitted) * 1000
        total_ms = queue_ms + (now - admitted) * 1000
        tpot_ms = None
        if f.first_token_s is not None and out.completion_tokens > 1:
            tpot_ms = (now - f.first_token_s) * 1000 / (out.completion_tokens - 1)
        return Timings(queue_ms=round(queue_ms, 2), ttft_ms=None if ttft_ms is None else round(ttft_ms, 2),
                       tpot_ms=None if tpot_ms is None else round(tpot_ms, 3), total_ms=round(total_ms, 2),
                       worker=self.settings.consumer_name)

    def _log_done(self, f: InFlight, out: SequenceOutput, now: float) -> None:
        t = self._timings(f, out, now)
        self.counters.done += 1
        log.info("request_done", id=f.request.id, tenant=f.request.tenant, queue_ms=t.queue_ms, ttft_ms=t.ttft_ms,
                 tpot_ms=t.tpot_ms, total_ms=t.total_ms, prompt_tokens=out.prompt_tokens or len(f.prompt_token_ids),
                 completion_tokens=out.completion_tokens, cached_tokens=out.cached_tokens,
                 finish_reason=out.finish_reason)
        batch = self.counters.batches.get(f.batch_id)
        if batch is None:
            return
        batch.remaining -= 1
        batch.tokens += (out.prompt_tokens or len(f.prompt_token_ids)) + out.completion_tokens
        batch.cached_tokens += out.cached_tokens
        if batch.remaining == 0:
            del self.counters.batches[f.batch_id]
            log.info("batch_done", batch=f.batch_id, size=batch.size, tokens=batch.tokens,
                     cached_tokens=batch.cached_tokens, wait_ms=round(batch.wait_ms, 2),
                     duration_ms=round((now - batch.admitted_s) * 1000, 2))
