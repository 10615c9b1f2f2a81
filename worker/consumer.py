"""The worker loop: read the consumer group, validate, admit, step the engine, reply, ack.

One thread does everything, in the order of an engine step, so there is no locking:
1. XREADGROUP new entries (blocking only when the engine is idle and nothing waits);
2. decode and validate each entry; an invalid one gets an `error` reply and is acked;
3. the scheduler's policy decides which waiting requests join the engine now
   (time window, token budget, sequence cap, free KV);
4. one engine step; its token deltas and final replies go out in one pipeline, and
   each entry is acknowledged only together with its final reply.

Around that core, each iteration does the housekeeping of docs/reliability.md, each in
its own module: the heartbeat (`heartbeat.py`), cancellations (`cancellation.py`),
running deadlines, reclaiming dead consumers' entries (`reclaim.py`), shedding and safe
trimming (`backpressure.py`), poison entries (`dead_letter.py`). Redis errors back off
and retry without losing the iteration's writes (`replies.py`). Shutdown is warm, then
cold: the first SIGTERM stops reading, hands back what has not started, and drains the
running requests for `drain_timeout_s`; a second signal exits at once (`__main__.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import redis
import structlog
from redis.typing import StreamIdT

from producer.backoff import TRANSIENT_ERRORS, Backoff
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
    dead_letter_stream,
    decode_request,
    final_guard_key,
    now_ms,
    reply_key_allowed,
    reply_stream,
    requests_stream,
)
from producer.redis_types import pending_rows, range_entries, read_entries
from scheduler import Admission, BatchPolicy, Priority, RunningState, WaitingRequest, select_admissions
from worker.backpressure import Backpressure
from worker.cancellation import CancelWatch
from worker.dead_letter import dead_letter_fields
from worker.engine.base import Engine, FinishReason, GenerationRequest, SamplingParams, SequenceOutput
from worker.heartbeat import Heartbeat
from worker.reclaim import Reclaimer, delivery_counts
from worker.replies import FinalWrite, ReplyWriter
from worker.settings import WorkerSettings

log = structlog.get_logger("worker")

# While the time window holds waiting requests, the loop re-reads at least this often.
WINDOW_POLL_S = 0.001

_FINISH_ERRORS = {
    "deadline_exceeded": ErrorCode.DEADLINE_EXCEEDED,
    "cancelled": ErrorCode.CANCELLED,
    "error": ErrorCode.INTERNAL,
}


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
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class LoopCounters:
    read: int = 0
    invalid: int = 0
    done: int = 0
    errors: int = 0
    steps: int = 0
    reclaimed: int = 0
    replayed: int = 0
    dead_lettered: int = 0
    shed: int = 0
    cancelled: int = 0
    lost: int = 0
    finals_dropped: int = 0
    redis_errors: int = 0
    batches: dict[int, Microbatch] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int)}


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
        name = settings.consumer_name
        self.replies = ReplyWriter(
            client,
            settings.prefix,
            settings.group,
            self.stream,
            self.attempt,
            settings.reply_ttl_s,
            dead_letter_stream(settings.prefix),
            settings.dead_letter_max_entries,
        )
        self.heartbeat = Heartbeat(
            client,
            settings.prefix,
            self.stream,
            settings.group,
            name,
            settings.heartbeat_interval_s,
            settings.heartbeat_ttl_s,
        )
        self.reclaimer = Reclaimer(
            client,
            settings.prefix,
            self.stream,
            settings.group,
            name,
            settings.reclaim_interval_s,
            settings.reclaim_min_idle_ms,
            settings.reclaim_count,
        )
        self.backpressure = Backpressure(
            client,
            self.stream,
            settings.group,
            settings.max_backlog_requests,
            settings.backlog_check_interval_ms,
            settings.trim_interval_s,
        )
        self.cancels = CancelWatch(
            client, settings.prefix, settings.cancel_poll_interval_ms, settings.cancel_memory_requests
        )
        self.backoff = Backoff(settings.reconnect_backoff_initial_ms, settings.reconnect_backoff_max_ms)
        self.policy = BatchPolicy(
            max_wait_ms=settings.max_wait_ms,
            max_batch_tokens=settings.max_batch_tokens,
            max_num_seqs=settings.max_num_seqs,
            max_prefill_chunk_tokens=settings.max_prefill_chunk_tokens,
            kv_reserve=settings.kv_reserve,
        )
        self.waiting: dict[str, InFlight] = {}
        self.running: dict[str, InFlight] = {}
        self.counters = LoopCounters()
        # After a restart our own pending entries (read but never acked) are served first.
        self._replay_from: str | None = "0"
        self._unchecked: list[str] = []
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

    def start(self) -> None:
        """Join the group: create it if needed, beat once, and start watching cancellations."""
        self.ensure_group()
        self.heartbeat.beat([], force=True)
        self.cancels.start()

    # -- loop ------------------------------------------------------------------------------------------
    def run(self, should_stop: Callable[[], bool]) -> None:
        """Serve until `should_stop()`; then shut down warm (see `shutdown`)."""
        while not self._guarded(self.start):
            if should_stop():
                return
        log.info(
            "worker_started",
            consumer=self.settings.consumer_name,
            engine=self.engine.name,
            stream=self.stream,
            group=self.settings.group,
            attempt=self.attempt,
        )
        while not should_stop():
            self._guarded(self.run_once)
        self.shutdown()

    def _guarded(self, step: Callable[[], None]) -> bool:
        """Run one unit of work; on a Redis outage back off (with jitter) instead of crashing."""
        try:
            step()
        except TRANSIENT_ERRORS as exc:
            self.counters.redis_errors += 1
            delay_s, fields = self._backoff_fields(exc)
            log.warning("redis_unavailable", **fields)
            time.sleep(delay_s)
            return False
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                # The server lost the group (restarted without persistence): recreate it and go on.
                log.warning("group_recreated", error=str(exc)[:200])
                self.ensure_group()
                return False
            # OOM, BUSY, WRONGTYPE, NOPERM, READONLY...: a server or data problem, not ours to die of.
            self.counters.redis_errors += 1
            delay_s, fields = self._backoff_fields(exc)
            log.warning("redis_error", **fields)
            time.sleep(delay_s)
            return False
        except Exception as exc:  # a bug in one iteration must not end the worker; it is logged loudly
            delay_s, fields = self._backoff_fields(exc)
            log.exception("iteration_failed", **fields)
            time.sleep(delay_s)
            return False
        self.backoff.reset()
        return True

    def _backoff_fields(self, exc: Exception) -> tuple[float, dict[str, object]]:
        """The next back-off delay, and the fields of the event that reports it."""
        delay_s = self.backoff.next_delay_s()
        return delay_s, {"error": f"{type(exc).__name__}: {exc}"[:200], "retry_in_ms": round(delay_s * 1000)}

    def run_once(self, read: bool = True) -> None:
        """One iteration: housekeeping, read, admit, step, reply."""
        self._flush()  # writes left over from an outage go first, in order
        self._housekeeping(read)
        if read:
            self._read()
        self._admit()
        if self.engine.has_unfinished():
            self._step()
        self._flush()

    def _flush(self) -> None:
        for request_id in self.replies.flush():
            self.counters.finals_dropped += 1
            log.info(
                "final_not_written", id=request_id, reason="another writer already answered this request"
            )

    def _serving(self) -> list[bytes]:
        return [f.entry_id for f in self.waiting.values()] + [f.entry_id for f in self.running.values()]

    def _housekeeping(self, reading: bool) -> None:
        for entry_id in self.heartbeat.beat(self._serving()):
            self._drop_lost(entry_id)
        for request_id in self.cancels.poll():
            self._cancel(request_id)
        self._expire_running()
        if not reading:
            return
        room = self.settings.max_waiting_requests - len(self.waiting)
        if self.reclaimer.due():
            if self._replay_from is None:  # the startup replay (XREADGROUP 0) comes first
                self._resync()
            claimed = self.reclaimer.reclaim(room)
            self.counters.reclaimed += len(claimed.entries)
            for entry_id, fields in claimed.entries:
                self._accept(entry_id, fields, claimed.deliveries.get(entry_id, 1))
            self._skip_answered()
        if self.backpressure.trim_due():
            trimmed = self.backpressure.trim()
            if trimmed:
                log.info("stream_trimmed", entries=trimmed)
        excess = self.backpressure.excess()
        if excess:
            self._shed(excess)

    def _read(self) -> None:
        room = self.settings.max_waiting_requests - len(self.waiting)
        if room <= 0:
            return
        busy = self.engine.has_unfinished() or bool(self.running)
        # Block on Redis only when nothing is runnable. Requests waiting here are runnable (the engine
        # has drained, so they are admitted next), unless the time window holds them: that wait runs
        # on the worker's clock (short sleeps between non-blocking reads), because a server-side
        # BLOCK shorter than Redis's timer tick (1/hz) ends up to ~100 ms late.
        block: int | None = None if busy or self.waiting else self.settings.read_block_ms
        replaying = self._replay_from is not None
        reply = read_entries(
            self.client.xreadgroup(
                self.settings.group,
                self.settings.consumer_name,
                {self.stream: self._replay_from or ">"},
                count=min(room, self.settings.read_count),
                block=None if replaying else block,
            )
        )
        entries = reply[0][1] if reply else []
        if not entries and not busy and self._wake_at_s is not None:
            time.sleep(max(0.0, min(self._wake_at_s - time.monotonic(), WINDOW_POLL_S)))
        deliveries: dict[bytes, int] = {}
        if replaying:
            # Our own pending list, left by a previous run of this consumer: served before new entries.
            self._replay_from = entries[-1][0].decode() if entries else None
            deliveries = delivery_counts(
                self.client, self.stream, self.settings.group, [e[0] for e in entries if e[1]]
            )
            self.counters.replayed += len(entries)
            if entries:
                log.info("pending_replayed", count=len(entries), first=entries[0][0].decode())
        for entry_id, fields in entries:
            if not fields:  # pending entry deleted from the stream: nothing to serve, just ack
                self.replies.ack(entry_id)
                continue
            self.counters.read += 1
            try:
                self._accept(entry_id, fields, deliveries.get(entry_id, 1))
            except redis.RedisError:
                raise
            except Exception as exc:  # one entry's failure costs that entry, never its batch-mates
                log.exception("entry_failed", entry=entry_id.decode(), error=type(exc).__name__)
                reason = f"failed while being accepted: {type(exc).__name__}: {exc}"
                self._dead_letter_and_answer(entry_id, fields, reason, deliveries.get(entry_id, 1))
        self._skip_answered()

    def _resync(self) -> None:
        """Serve our own pending entries that we do not know about.

        That happens when a reply to XREADGROUP or XAUTOCLAIM was lost with the connection
        (the client library retries the call): Redis delivered entries we never saw. We
        touch every entry we serve at each heartbeat, so these are the idle ones.
        """
        idle_ms = int(self.settings.heartbeat_interval_s * 2000)
        rows = pending_rows(
            self.client.xpending_range(
                self.stream,
                self.settings.group,
                "-",
                "+",
                self.settings.max_waiting_requests,
                self.settings.consumer_name,
                idle=idle_ms,
            )
        )
        known = set(self._serving())
        unknown = [r for r in rows if r["message_id"] not in known]
        for row in unknown:
            entry_id = row["message_id"]
            got = range_entries(self.client.xrange(self.stream, entry_id, entry_id))
            if not got:
                self.replies.ack(entry_id)
                continue
            log.warning("pending_resynced", entry=entry_id.decode(), deliveries=row["times_delivered"])
            self._accept(entry_id, got[0][1], int(row["times_delivered"]))
        self._skip_answered()

    def _shed(self, excess: int) -> None:
        """Answer `overloaded` to entries over the backlog limit (oldest first), instead of queueing them."""
        reply = read_entries(
            self.client.xreadgroup(
                self.settings.group, self.settings.consumer_name, {self.stream: ">"}, count=min(excess, 1000)
            )
        )
        entries = reply[0][1] if reply else []
        self.backpressure.shed(len(entries))
        for entry_id, fields in entries:
            self.counters.shed += 1
            self._refuse(
                entry_id,
                fields,
                ErrorCode.OVERLOADED,
                f"backlog is over {self.settings.max_backlog_requests} requests; retry later",
            )
        if entries:
            log.warning("requests_shed", count=len(entries), backlog=self.backpressure.backlog)

    def _refuse(self, entry_id: bytes, fields: dict[bytes, bytes], code: ErrorCode, message: str) -> None:
        """Answer an entry with an error without serving it (dead-letter it if it names no sender)."""
        try:
            request, ct = decode_request(fields, self.settings.prefix, self.settings.max_body_bytes)
        except ProtocolError as exc:
            self._reject_invalid(entry_id, fields, exc)
            return
        except Exception as exc:  # a decoder bug must cost one entry, never the loop
            log.exception("request_undecodable", entry=entry_id.decode())
            self._dead_letter(entry_id, fields, f"undecodable: {type(exc).__name__}", 1)
            return
        self.counters.errors += 1
        self.replies.error(request.id, self._reply_key(request), code, message, ct, entry_id)

    def _reply_key(self, request: ChatRequest) -> str:
        key = request.reply_key(self.settings.prefix)
        return (
            key
            if reply_key_allowed(key, self.settings.prefix)
            else reply_stream(request.id, self.settings.prefix)
        )

    def _reject_invalid(self, entry_id: bytes, fields: dict[bytes, bytes], exc: ProtocolError) -> None:
        self.counters.invalid += 1
        log.warning(
            "request_invalid",
            entry=entry_id.decode(),
            id=exc.request_id,
            code=exc.code.value,
            reason=exc.message,
        )
        if exc.request_id is not None:
            self.replies.error(
                exc.request_id, exc.reply_to, exc.code, exc.message, exc.content_type, entry_id
            )
        else:
            self._dead_letter(entry_id, fields, f"{exc.code.value}: {exc.message}", 1)

    def _dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes], reason: str, deliveries: int) -> None:
        self.counters.dead_lettered += 1
        log.warning(
            "entry_dead_lettered", entry=entry_id.decode(), reason=reason[:200], deliveries=deliveries
        )
        self.replies.dead_letter(
            dead_letter_fields(
                entry_id,
                fields,
                reason,
                deliveries,
                self.settings.consumer_name,
                self.settings.dead_letter_max_field_bytes,
            ),
            entry_id,
        )

    def _park_poison(self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> None:
        """An entry delivered too often: dead-letter it and tell its sender, if known."""
        reason = (
            f"delivered {deliveries} times (max_deliveries={self.settings.max_deliveries}) without completing"
        )
        self._dead_letter_and_answer(entry_id, fields, reason, deliveries)

    def _dead_letter_and_answer(
        self, entry_id: bytes, fields: dict[bytes, bytes], reason: str, deliveries: int
    ) -> None:
        """Dead-letter an entry that can never succeed and answer its sender `internal`, if one is known."""
        self._dead_letter(entry_id, fields, reason, deliveries)
        try:
            request, ct = decode_request(fields, self.settings.prefix, self.settings.max_body_bytes)
        except ProtocolError as exc:
            rid, key, ct = exc.request_id, exc.reply_to, exc.content_type
        except Exception:
            return  # undecodable: the dead letter is all there is
        else:
            rid, key = request.id, self._reply_key(request)
        if rid is not None:
            self.replies.error(
                rid, key, ErrorCode.INTERNAL, f"request could not be processed: {reason}"[:300], ct, entry_id
            )

    # -- shutdown --------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Warm shutdown: stop reading, hand back what has not started, drain running requests.

        Running requests get `drain_timeout_s` to finish; whatever is still running then is
        aborted locally and handed back: left pending with its idle time set past
        `reclaim_min_idle_ms` (the XNACK of servers that lack one), so a live worker
        reclaims it at its next round. Nothing is acknowledged without a final reply.
        """
        log.info(
            "shutdown_started",
            waiting=len(self.waiting),
            running=len(self.running),
            drain_timeout_s=self.settings.drain_timeout_s,
        )
        handed_back = [f.entry_id for f in self.waiting.values()]
        self.waiting.clear()
        self._guarded(lambda: self._hand_back(handed_back))
        self._guarded(lambda: self.heartbeat.drain(self._serving()))
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while (self.running or self.replies.pending) and time.monotonic() < deadline:
            self._guarded(lambda: self.run_once(read=False))
        leftovers = [f.entry_id for f in self.running.values()]
        for rid in list(self.running):
            self.engine.abort_request(rid, "cancelled")
        self.running.clear()
        try:
            self._hand_back(leftovers)
            self.heartbeat.stop()
            self.reclaimer.remove_if_empty(self.settings.consumer_name)
        except TRANSIENT_ERRORS as exc:
            # Redis is away: the entries stay pending under our name and are reclaimed once idle.
            log.warning("shutdown_without_redis", error=str(exc)[:200])
        log.info("worker_stopped", handed_back=len(handed_back) + len(leftovers), **self.counters.summary())

    def _hand_back(self, entry_ids: list[bytes]) -> None:
        if not entry_ids:
            return
        idle_ms = self.settings.reclaim_min_idle_ms * 2
        self.client.xclaim(
            self.stream,
            self.settings.group,
            self.settings.consumer_name,
            0,
            cast(list[StreamIdT], entry_ids),  # only read; list[bytes] is not a list[StreamIdT] to mypy
            idle=idle_ms,
            justid=True,
        )
        log.info("entries_handed_back", count=len(entry_ids))

    def _accept(self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int = 1) -> None:
        s = self.settings
        if deliveries > s.max_deliveries:
            self._park_poison(entry_id, fields, deliveries)
            return
        try:
            request, ct = decode_request(fields, s.prefix, s.max_body_bytes)
        except ProtocolError as exc:
            self._reject_invalid(entry_id, fields, exc)
            return
        except Exception as exc:  # a decoder bug must cost one entry, never the loop
            log.exception("request_undecodable", entry=entry_id.decode())
            self._dead_letter(entry_id, fields, f"undecodable: {type(exc).__name__}", deliveries)
            return
        reply_key = request.reply_key(s.prefix)
        if not reply_key_allowed(reply_key, s.prefix):
            self._fail_early(
                entry_id,
                request,
                ct,
                reply_stream(request.id, s.prefix),
                ErrorCode.INVALID_REQUEST,
                f"reply_to must start with `{s.prefix}:reply:`",
            )
            return
        known = self.waiting.get(request.id) or self.running.get(request.id)
        if known is not None:
            if known.entry_id != entry_id:
                # The same request id sent twice (a client retry): serve the first, ack this one.
                self.replies.ack(entry_id)
            return
        if self.cancels.is_cancelled(request.id):
            self._fail_early(
                entry_id, request, ct, reply_key, ErrorCode.CANCELLED, "cancelled before it started"
            )
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
            self._fail_early(
                entry_id, request, ct, reply_key, ErrorCode.INVALID_REQUEST, f"cannot tokenize: {exc}"
            )
            return
        if len(ids) > s.max_prompt_tokens:
            self._fail_early(
                entry_id,
                request,
                ct,
                reply_key,
                ErrorCode.TOO_LONG,
                f"prompt is {len(ids)} tokens; the limit is {s.max_prompt_tokens}",
            )
            return
        self.waiting[request.id] = InFlight(
            entry_id, request, ct, reply_key, ids, enqueued_ms, time.monotonic(), deadline_s
        )
        self._unchecked.append(request.id)

    def _skip_answered(self) -> None:
        """Drop newly accepted requests that already have a final reply (a redelivery, or a client cancel)."""
        ids = [rid for rid in self._unchecked if rid in self.waiting]
        self._unchecked.clear()
        if not ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for rid in ids:
            pipe.exists(final_guard_key(self.settings.prefix, rid))
        for rid, answered in zip(ids, pipe.execute(), strict=True):
            if answered:
                f = self.waiting.pop(rid)
                log.info("request_already_answered", id=rid, entry=f.entry_id.decode())
                self.replies.ack(f.entry_id)

    def _drop_lost(self, entry_id: bytes) -> None:
        """Another worker claimed this entry (we stalled past the idle limit): stop our copy silently."""
        for table in (self.waiting, self.running):
            for rid, f in list(table.items()):
                if f.entry_id == entry_id:
                    table.pop(rid)
                    self.engine.abort_request(rid, "cancelled")
                    self.counters.lost += 1
                    log.warning("entry_lost", id=rid, entry=entry_id.decode())

    def _cancel(self, request_id: str) -> None:
        """A client cancelled: stop the request wherever it is, free its resources, answer `cancelled`."""
        f = self.waiting.pop(request_id, None)
        if f is not None:
            self.counters.cancelled += 1
            log.info("request_cancelled", id=request_id, state="waiting")
            self.replies.error(
                request_id, f.reply_key, ErrorCode.CANCELLED, "cancelled", f.content_type, f.entry_id
            )
            return
        if request_id in self.running:
            self.counters.cancelled += 1
            log.info("request_cancelled", id=request_id, state="running")
            self._abort_running(request_id, "cancelled")

    def _expire_running(self) -> None:
        """Stop running requests whose deadline passed; engines need not check deadlines themselves."""
        now = time.monotonic()
        for rid, f in list(self.running.items()):
            if f.deadline_s is not None and now >= f.deadline_s:
                log.info("request_deadline_exceeded", id=rid, state="running")
                self._abort_running(rid, "deadline_exceeded")

    def _abort_running(self, request_id: str, reason: FinishReason) -> None:
        out = self.engine.abort_request(request_id, reason)
        if out is None:
            out = SequenceOutput(request_id, [], "", True, reason)
        self._publish([out])

    def _fail_early(
        self,
        entry_id: bytes,
        request: ChatRequest,
        ct: ContentType,
        reply_key: str,
        code: ErrorCode,
        message: str,
    ) -> None:
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
                request_id=f.request.id,
                arrival_s=f.read_s,
                prompt_tokens=len(f.prompt_token_ids),
                max_tokens=f.request.max_tokens,
                priority=Priority.BATCH if f.request.priority == "batch" else Priority.INTERACTIVE,
                deadline_s=f.deadline_s,
            )
            for f in self.waiting.values()
        ]
        running = RunningState(
            num_seqs=cap.running, decode_tokens=cap.decode_tokens, free_kv_tokens=cap.free_kv_tokens
        )
        now = time.monotonic()
        decision: Admission = select_admissions(
            waiting, running, self.policy, now, kv_capacity_tokens=cap.total_kv_tokens
        )
        self._wake_at_s = decision.wake_at_s
        for w in decision.expired:
            f = self.waiting.pop(w.request_id)
            self._fail_early(
                f.entry_id,
                f.request,
                f.content_type,
                f.reply_key,
                ErrorCode.DEADLINE_EXCEEDED,
                "deadline passed before the request could start",
            )
        for w in decision.too_large:
            f = self.waiting.pop(w.request_id)
            self._fail_early(
                f.entry_id,
                f.request,
                f.content_type,
                f.reply_key,
                ErrorCode.TOO_LONG,
                "prompt plus max_tokens exceeds this worker's KV cache",
            )
        if not decision.admitted:
            return
        batch_id = self._next_batch_id = self._next_batch_id + 1
        wait_ms = max((now - self.waiting[w.request_id].read_s) * 1000 for w in decision.admitted)
        self.counters.batches[batch_id] = Microbatch(
            len(decision.admitted), now, wait_ms, len(decision.admitted)
        )
        for w in decision.admitted:
            f = self.waiting.pop(w.request_id)
            f.admitted_s, f.batch_id = now, batch_id
            self.running[f.request.id] = f
            r = f.request
            self.engine.add_request(
                GenerationRequest(
                    request_id=r.id,
                    prompt_token_ids=f.prompt_token_ids,
                    sampling=SamplingParams(
                        max_tokens=r.max_tokens,
                        temperature=r.temperature,
                        top_p=r.top_p,
                        top_k=r.top_k,
                        seed=r.seed,
                        stop=tuple(r.stop),
                    ),
                    arrival_s=f.read_s,
                    priority=int(w.priority),
                    deadline_s=f.deadline_s,
                )
            )

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            log.exception("engine_step_failed", running=len(self.running))
            outputs = [o for rid in list(self.running) if (o := self.engine.abort_request(rid, "error"))]
            known = {o.request_id for o in outputs}
            outputs += [
                SequenceOutput(rid, [], "", True, "error") for rid in self.running if rid not in known
            ]
        self.counters.steps += 1
        self._publish(outputs)

    def _publish(self, outputs: list[SequenceOutput]) -> None:
        now = time.monotonic()
        finished: list[tuple[InFlight, SequenceOutput, Timings]] = []
        for out in outputs:
            f = self.running.get(out.request_id)
            if f is None:
                continue
            if out.new_token_ids and f.first_token_s is None:
                f.first_token_s = now
            if f.request.stream and (out.new_text or out.new_token_ids):
                event = TokenEvent(
                    index=f.tokens_sent, text=out.new_text, token_ids=out.new_token_ids, attempt=self.attempt
                )
                self.replies.token(out.request_id, f.reply_key, event, f.content_type, f.tokens_sent == 0)
                f.tokens_sent += 1
            if out.finished:
                timings = self._timings(f, out, now)  # once, so the reply and the log agree
                self.replies.final(self._final_write(f, out, timings))
                finished.append((f, out, timings))
        for f, out, timings in finished:
            self.running.pop(f.request.id, None)
            self._log_done(f, out, timings, now)

    def _final_write(self, f: InFlight, out: SequenceOutput, timings: Timings) -> FinalWrite:
        reason = out.finish_reason or "stop"
        event: ReplyEvent
        if reason in _FINISH_ERRORS:
            event = ErrorEvent(
                id=f.request.id,
                code=_FINISH_ERRORS[reason],
                message=f"request ended: {reason}",
                attempt=self.attempt,
            )
        else:
            event = DoneEvent(
                id=f.request.id,
                text=out.text,
                finish_reason=reason,
                usage=Usage(
                    prompt_tokens=out.prompt_tokens or len(f.prompt_token_ids),
                    completion_tokens=out.completion_tokens,
                    cached_tokens=out.cached_tokens,
                ),
                timings=timings,
                attempt=self.attempt,
            )
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
        return Timings(
            queue_ms=round(queue_ms, 2),
            ttft_ms=None if ttft_ms is None else round(ttft_ms, 2),
            tpot_ms=None if tpot_ms is None else round(tpot_ms, 3),
            total_ms=round(total_ms, 2),
            worker=self.settings.consumer_name,
        )

    def _log_done(self, f: InFlight, out: SequenceOutput, t: Timings, now: float) -> None:
        self.counters.done += 1
        log.info(
            "request_done",
            id=f.request.id,
            tenant=f.request.tenant,
            queue_ms=t.queue_ms,
            ttft_ms=t.ttft_ms,
            tpot_ms=t.tpot_ms,
            total_ms=t.total_ms,
            prompt_tokens=out.prompt_tokens or len(f.prompt_token_ids),
            completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens,
            finish_reason=out.finish_reason,
        )
        batch = self.counters.batches.get(f.batch_id)
        if batch is None:
            return
        batch.remaining -= 1
        prompt_tokens = out.prompt_tokens or len(f.prompt_token_ids)
        batch.prompt_tokens += prompt_tokens
        batch.tokens += prompt_tokens + out.completion_tokens
        batch.cached_tokens += out.cached_tokens
        if batch.remaining == 0:
            del self.counters.batches[f.batch_id]
            log.info(
                "batch_done",
                batch=f.batch_id,
                size=batch.size,
                tokens=batch.tokens,
                cached_tokens=batch.cached_tokens,
                prefix_hit_rate=round(batch.cached_tokens / max(batch.prompt_tokens, 1), 4),
                wait_ms=round(batch.wait_ms, 2),
                duration_ms=round((now - batch.admitted_s) * 1000, 2),
            )
