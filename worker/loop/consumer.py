"""The worker loop: read the consumer group, hand requests to the engine, step it, reply, ack.

One thread does everything, so there is no locking. Each iteration, top to bottom:
1. write what an outage left unwritten, then the housekeeping of docs/reliability.md:
   the heartbeat (`heartbeat.py`), cancellations (`cancellation.py`), reclaiming dead
   consumers' entries (`reclaim.py`), safe trimming and shedding (`backpressure.py`);
2. launch the engine's next step (`submit_step`), if anything can run;
3. while the device computes it: publish the previous step's tokens and finals
   (`publisher.py`, one pipeline through `worker/replies/writer.py`), then read and validate new
   entries (`intake.py`) and hand them to the engine at once;
4. collect the step's outputs.

Each request stream is a `Lane` (`lanes.py`): the single `<prefix>:requests`, or one per
tenant (`LLM_TENANTS`) or per shard (`LLM_STREAM_SHARDS`), or per shard of each tenant, all read
in one call (one per hash slot on Redis Cluster); housekeeping runs per lane. With several shards
the worker reads its own first, and others only when they wait (`shard_ownership.py`).

The engine owns admission (time window, token budget, sequence cap, KV, priority aging,
deadlines) with the one `BatchPolicy` of `WorkerSettings`. The loop blocks on Redis only
when nothing is runnable; while the time window holds requests it polls on its own clock.
An entry costs only itself (`worker/replies/refusals.py`); Redis errors back off and retry without losing
the iteration's writes; the worker exits only on a signal. Shutdown is warm, then cold:
the first SIGTERM stops reading, hands back what has not started, and drains the running
requests for `drain_timeout_s`; a second signal exits at once (`__main__.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

import redis
import structlog
from redis.typing import StreamIdT

from producer.wire.backoff import TRANSIENT_ERRORS, Backoff
from producer.wire.redis_factory import recover
from worker.engine.base import Engine, FinishReason, SequenceOutput, StepSample, StepStats
from worker.engine_process.client import EngineProcessDied
from worker.loop.cancellation import Cancel, CancelWatch
from worker.loop.inflight import InFlight, InFlightTable, choice_seq_id
from worker.loop.intake import generation_requests
from worker.loop.keyed_errors import KeyedResponseError
from worker.loop.lanes import Lane, build_lanes, lanes_to_read, namespaces, read_lanes
from worker.loop.publisher import Publisher, token_text
from worker.loop.shard_ownership import ShardOwnership
from worker.loop.step_cover import StepCover
from worker.loop.stream_coalescing import stream_coalescer
from worker.observability.build_info import build_info
from worker.observability.counters import LoopCounters, Microbatch
from worker.observability.health import WorkerHealth
from worker.observability.live_stats import LiveStats
from worker.observability.metrics import WorkerMetrics
from worker.observability.phase_times import PhaseTimes
from worker.replies.writer import ReplyWriters, retry_delay_s
from worker.replies.writer_thread import ReplyWriterThread
from worker.settings import WorkerSettings

log = structlog.get_logger("worker")

# While the time window holds waiting requests, the loop re-reads at least this often.
WINDOW_POLL_S = 0.001


class Consumer:
    """Drives one engine from one consumer-group member."""

    def __init__(
        self, client: redis.Redis, engine: Engine, settings: WorkerSettings,
        metrics: WorkerMetrics | None = None, health: WorkerHealth | None = None,
    ):  # fmt: skip
        s = self.settings = settings
        self.metrics = metrics
        self.health = health if health is not None else WorkerHealth(s.heartbeat_ttl_s)
        self.client, self.engine = client, engine
        spaces = namespaces(s)
        self.names = spaces[0]
        self.attempt = f"{s.consumer_name}:{int(time.time() * 1000)}"
        self.counters = LoopCounters()
        self.table = InFlightTable()
        self.cancels = CancelWatch(
            client, spaces, s.cancel_poll_interval_ms, s.cancel_memory_requests, replay_s=s.cancel_replay_s,
            read_count=s.cancel_read_count, max_entry_bytes=s.cancel_max_entry_bytes,
        )  # fmt: skip
        self.lanes = build_lanes(client, s, engine, self.table, self.counters, self.cancels, self.attempt)
        # An inline engine computes its steps on this thread: beat for the loop while one runs.
        self.step_cover = (
            None
            if engine.times_own_steps
            else StepCover(
                [lane.heartbeat for lane in self.lanes],
                lambda i: self._entries(self.lanes[i]),
                s.heartbeat_interval_s,
                s.max_step_s,
                self.health.beat,
            )
        )
        self.ownership = ShardOwnership(client, s, spaces)
        self.backoff = Backoff(s.reconnect_backoff_initial_ms, s.reconnect_backoff_max_ms)
        self.replies = ReplyWriters({lane.key: lane.replies for lane in self.lanes})
        self.publisher = Publisher(
            self.replies,
            self.table,
            self.counters,
            self.attempt,
            s.consumer_name,
            token_text(engine),
            metrics,
            stream_coalescer(s.stream_interval_ms, s.stream_interval_tokens),
        )
        # Writes from a thread where a device computes the steps (see reply_thread.py), else inline.
        background = s.async_replies if s.async_replies is not None else engine.overlaps_host
        self.writer = (
            ReplyWriterThread(
                self.replies, Backoff(s.reconnect_backoff_initial_ms, s.reconnect_backoff_max_ms)
            )
            if background
            else None
        )
        self._ready: list[SequenceOutput] = []  # outputs collected but not yet published
        self.phases = PhaseTimes(time_steps=not engine.times_own_steps)
        self._next_batch_id = 0
        self._step_stats: StepStats | None = None  # the shape of the step in flight (loop-timed engines)
        self.stats = LiveStats(
            client, self.names, s, engine, self.counters, self.phases, [lane.stream for lane in self.lanes],
            metrics, {lane.stream: lane.tenant for lane in self.lanes},
        )  # fmt: skip
        if metrics is not None:
            metrics.counters = self.counters
            metrics.phases = self.phases
            metrics.describe(engine.name, engine.describe(), build_info().get("version", "unknown"))
            metrics.owned_shards.set(len(self.ownership.owned))

    # -- setup -----------------------------------------------------------------------------------------
    def ensure_group(self) -> None:
        """Create each stream and its consumer group if absent (id 0: a new group serves the backlog)."""
        for lane in self.lanes:
            try:
                self.client.xgroup_create(lane.stream, self.settings.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def start(self) -> None:
        """Join the groups: create them if needed, beat once, and start watching cancellations."""
        self.ensure_group()
        for lane in self.lanes:
            lane.heartbeat.beat([], force=True)
        if self.ownership.refresh(force=True):
            self._show_ownership()
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
            stream=self.lanes[0].stream if len(self.lanes) == 1 else self._streams_pattern(),
            tenants=len({lane.tenant for lane in self.lanes if lane.tenant is not None}),
            shards=len({lane.names.shard for lane in self.lanes if lane.names.shard is not None}),
            cluster=self.settings.redis_cluster,
            group=self.settings.group,
            attempt=self.attempt,
            **self.engine.describe(),
            **build_info(),
        )
        self.health.joined = True
        try:
            while not should_stop():
                self._guarded(self.run_once)
                self.health.beat()
            self.health.draining = True
            self.shutdown()
        except EngineProcessDied:
            self.health.engine_ok = False
            if self.writer is not None:
                self.writer.close(timeout_s=5.0)  # what is already answered still goes out
            raise
        finally:
            self.health.stopped = True

    def _streams_pattern(self) -> str:
        kind = "t" if self.lanes[0].tenant is not None else "s"
        return f"{self.names.prefix}:{kind}:*:requests"

    def run_once(self, read: bool = True) -> None:
        """One iteration: housekeeping; launch a step; publish and read while it runs; collect it."""
        mark = self.phases.mark
        mark("other")
        if self._writes_pending():
            self._flush()  # writes left over from an outage go first, in order; no step while Redis is away
            mark("flush")
        self._housekeeping(read)
        mark("housekeeping")
        stepping = self._submit()
        mark("submit")
        try:
            self._publish()  # the previous step's outputs go out while this one computes
            mark("publish")
            self._flush()
            mark("flush")
            if read:
                self._read(block=not stepping and not self.engine.has_unfinished())
                mark("read")
        finally:
            if stepping:
                self._collect()
                mark("collect")
                self._observe_loop_timed_step()
        if not self.engine.overlaps_host:
            self._publish()  # nothing computes meanwhile: do not hold the outputs for an iteration
            mark("publish")
            self._flush()
            mark("flush")

    def _guarded(self, step: Callable[[], None]) -> bool:
        """Run one unit of work; on a Redis outage or error back off (with jitter) instead of crashing."""
        try:
            step()
        except TRANSIENT_ERRORS as exc:
            self.health.redis_ok = False
            recover(self.client)
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
            if isinstance(exc, KeyedResponseError):
                fields["key"] = exc.key
            log.warning("redis_error", **fields)
            time.sleep(delay_s)
            return False
        except Exception as exc:  # a bug in one iteration must not end the worker; it is logged loudly
            delay_s, fields = self._backoff_fields(exc)
            log.exception("iteration_failed", **fields)
            time.sleep(delay_s)
            return False
        self.backoff.reset()
        self.health.redis_ok = True
        return True

    def _backoff_fields(self, exc: Exception) -> tuple[float, dict[str, object]]:
        """The next back-off delay, and the fields of the event that reports it."""
        delay_s = retry_delay_s(self.backoff.next_delay_s(exc), exc)  # soon after OOM: memory frees at once
        return delay_s, {"error": f"{type(exc).__name__}: {exc}"[:200], "retry_in_ms": round(delay_s * 1000)}

    # -- the parts of an iteration ---------------------------------------------------------------------
    def _housekeeping(self, reading: bool) -> None:
        self.engine.check_alive()  # an idle worker learns of a dead engine process here, not at its next step
        for lane in self.lanes:
            for entry_id in lane.heartbeat.beat(self._entries(lane)):
                self._drop_lost(lane, entry_id)
        if self.ownership.refresh():
            self._show_ownership()
        for cancel in self.cancels.poll():
            self._cancel(cancel)
        self.stats.tick()  # `worker_stats` and `<prefix>:stats` every interval; never raises Redis errors
        if self.metrics is not None and self.metrics.engine_due(time.monotonic()):
            c = self.counters
            hit_ratio = c.cached_tokens / c.prompt_tokens if c.prompt_tokens else None
            self.metrics.set_engine(self.engine.capacity(), hit_ratio)
        if not reading:
            return
        for lane in self.lanes:
            if lane.reclaimer.due():
                self._hand_over(lane.intake.reclaim(self._room()))
            if lane.backpressure.trim_due():
                trimmed = lane.backpressure.trim()
                if trimmed:
                    log.info("stream_trimmed", entries=trimmed, stream=lane.stream)
            excess = lane.backpressure.excess()
            if excess:
                lane.intake.shed(excess)

    def _show_ownership(self) -> None:
        """The owned shards, in the live stats (`owned_shards`) and the metrics."""
        owned = len(self.ownership.owned)
        self.stats.serves["owned_shards"] = owned
        if self.metrics is not None:
            self.metrics.owned_shards.set(owned)

    def _entries(self, lane: Lane) -> list[bytes]:
        """The entries of `lane`'s stream this worker is serving."""
        return self.table.entry_ids(lane.key)

    def _room(self) -> int:
        return self.settings.max_waiting_requests - self.engine.capacity().waiting

    def _read(self, block: bool) -> None:
        # Block on Redis only when nothing is runnable. While the time window holds requests, wait on
        # the worker's clock (short sleeps between non-blocking reads): a server-side BLOCK shorter than
        # Redis's timer tick (1/hz) ends up to ~100 ms late.
        room = self._room()
        lanes = lanes_to_read(self.lanes, self.ownership, room > 0 and self.engine.capacity().waiting == 0)
        block_ms = self.ownership.block_ms(self.settings.read_block_ms if block else None)
        accepted = read_lanes(self.client, self.settings, lanes, room, block_ms)
        if self.ownership.active and accepted:
            owned = {lane.key for lane in self.lanes if lane.stream in self.ownership.owned}
            for f in accepted:
                f.owned = f.lane in owned
        self._hand_over(accepted)
        wake = self.engine.wake_at_s()
        if not accepted and wake is not None:
            time.sleep(max(0.0, min(wake - time.monotonic(), WINDOW_POLL_S)))

    def _hand_over(self, accepted: list[InFlight]) -> None:
        for f in accepted:
            self.table.add(f)
            for request in generation_requests(f):  # one per choice (`n`)
                self.engine.add_request(request)

    def _submit(self) -> bool:
        """Launch the engine's next step if it has work that may run now; note whom it started."""
        if not self.engine.has_unfinished():
            return False
        now = time.monotonic()
        wake = self.engine.wake_at_s()
        if wake is not None and now < wake:
            return False  # the time window holds every waiting request
        try:
            with self._covered():
                self.engine.submit_step()
        except Exception:
            self._fail_step()
            return False
        stats = self.engine.last_step_stats()
        self.counters.steps += stats.steps
        self.phases.add_steps(stats.step_s)
        self.ownership.note_steps(stats.step_s)
        if self.engine.times_own_steps:  # the steps the engine ran since its last report, timed by it
            for sample in stats.samples:
                self.counters.preempted += sample.preempted
                if self.metrics is not None:
                    self.metrics.observe_step(sample)
        else:  # this step, timed by the loop when it is collected
            self.counters.preempted += int(stats.extra.get("preempted", 0))
            self._step_stats = stats
        self._note_admitted(stats.admitted, now)
        return True

    def _observe_loop_timed_step(self) -> None:
        stats, self._step_stats = self._step_stats, None
        seconds = self.phases.last_step_s
        if stats is not None and seconds is not None:
            self.ownership.note_steps((seconds,))
        if stats is None or seconds is None or self.metrics is None:
            return
        self.metrics.observe_step(
            StepSample(
                seconds, stats.num_seqs, stats.prefill_tokens, stats.decode_tokens,
                host_seconds=self.phases.last_submit_s,
            )
        )  # fmt: skip

    def _collect(self) -> None:
        try:
            with self._covered():
                self._ready += self.engine.collect()
        except Exception:
            self._fail_step()

    @contextmanager
    def _covered(self) -> Iterator[None]:
        """An engine call that may compute a step on this thread: beats go on meanwhile (`StepCover`), and
        entries its beats found claimed by another worker are dropped afterwards."""
        if self.step_cover is None:
            yield
            return
        try:
            with self.step_cover.covering():
                yield
        finally:
            for index, entry_id in self.step_cover.take_lost():
                self._drop_lost(self.lanes[index], entry_id)

    def _fail_step(self) -> None:
        """The engine failed a step: end every started request with `internal`; waiting ones stay."""
        started = self.table.started_ids()
        log.exception("engine_step_failed", running=len(started))
        for seq_id in started:
            self._abort(seq_id, "error")

    def _note_admitted(self, admitted: tuple[str, ...], now: float) -> None:
        """The requests a step started form one microbatch (logged as `batch_done` when all end)."""
        members = [f for seq_id in admitted if (f := self.table.get(seq_id)) is not None]
        if not members:
            return
        batch_id = self._next_batch_id = self._next_batch_id + 1
        wait_ms = max((now - f.read_s) * 1000 for f in members)
        self.counters.batches[batch_id] = Microbatch(len(members), now, wait_ms, len(members))
        for f in members:
            f.admitted_s, f.batch_id = now, batch_id

    def _publish(self) -> None:
        ready, self._ready = self._ready, []
        if ready or self.publisher.holds_tokens:  # held tokens go out once due, even with no new ones
            self.publisher.publish(ready, time.monotonic())

    def _writes_pending(self) -> bool:
        return self.writer.pending if self.writer is not None else self.replies.pending

    def _flush(self) -> None:
        dropped = self.writer.flush() if self.writer is not None else self.replies.flush()
        for request_id in dropped:
            self.counters.finals_dropped += 1
            log.info(
                "final_not_written", id=request_id, reason="another writer already answered this request"
            )

    # -- ending requests early -------------------------------------------------------------------------
    def _abort(self, seq_id: str, reason: FinishReason) -> None:
        """End a request wherever it is in the engine; its final output is published with the next batch."""
        out = self._abort_choices(seq_id, reason)
        self._ready.append(out or SequenceOutput(seq_id, [], "", True, reason))

    def _abort_choices(self, seq_id: str, reason: FinishReason) -> SequenceOutput | None:
        """Abort every choice of a request (`n` > 1) in the engine; choice 0's final output, if any (the
        first error output ends the request; the others' are dropped as answered)."""
        f = self.table.get(seq_id)
        for choice in range(1, f.request.n if f is not None else 1):
            self.engine.abort_request(choice_seq_id(seq_id, choice), reason)
        return self.engine.abort_request(seq_id, reason)

    def _cancel(self, cancel: Cancel) -> None:
        """A client cancelled: stop the request wherever it is, free its resources, answer `cancelled`.

        A request this worker does not hold (queued, served elsewhere, or never sent) gets nothing
        from it now: the worker holding it answers, and a worker that reads it later finds the
        remembered cancel (`CancelWatch`) and answers `cancelled` with a refusal's short TTL. So a
        cancel of an id that is never sent costs its own entry only.
        """
        f = self.table.get(cancel.seq_id)
        if f is None:
            return
        self.counters.cancelled += 1
        log.info("request_cancelled", id=f.request.id, state="running" if f.started else "waiting")
        self._abort(cancel.seq_id, "cancelled")

    def _drop_lost(self, lane: Lane, entry_id: bytes) -> None:
        """Another worker claimed this entry (we stalled past the idle limit): stop our copy silently."""
        for seq_id in self.table.served_from(lane.key, entry_id):
            self._abort_choices(seq_id, "cancelled")
            self.table.end(seq_id)
            self.counters.lost += 1
            log.warning("entry_lost", id=seq_id, entry=entry_id.decode())

    # -- shutdown --------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Warm shutdown: stop reading, hand back what has not started, drain running requests.

        Running requests get `drain_timeout_s` to finish; whatever is still running then is
        aborted locally and handed back: left pending with its idle time set past
        `reclaim_min_idle_ms` (the XNACK of servers that lack one), so a live worker
        reclaims it at its next round. Nothing is acknowledged without a final reply.
        """
        unstarted = self.engine.take_unstarted()
        log.info(
            "shutdown_started",
            waiting=len(unstarted),
            running=len(self.table) - len(unstarted),
            drain_timeout_s=self.settings.drain_timeout_s,
        )
        handed_back = [f for seq_id in unstarted if (f := self.table.end(seq_id)) is not None]
        self._guarded(lambda: self._hand_back(handed_back))
        self._guarded(self._drain_beats)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while (len(self.table) or self._ready or self._writes_pending()) and time.monotonic() < deadline:
            self._guarded(lambda: self.run_once(read=False))
            if self.writer is not None and not (len(self.table) or self._ready):
                self.writer.wait_written(max(0.0, min(0.1, deadline - time.monotonic())))
        if self.step_cover is not None:
            self.step_cover.close()  # no step runs any more: no beat after the key is removed below
        leftovers = self.table.take_all()
        for f in leftovers:
            for choice in range(f.request.n):
                self.engine.abort_request(choice_seq_id(f.seq_id, choice), "cancelled")
        if self.writer is not None:
            self.writer.close(timeout_s=max(0.0, min(5.0, deadline - time.monotonic())))
        try:
            self._hand_back(leftovers)
            self.lanes[0].heartbeat.stop()  # one key for all lanes
            for lane in self.lanes:
                lane.reclaimer.remove_if_empty(self.settings.consumer_name)
        except TRANSIENT_ERRORS as exc:
            # Redis is away: the entries stay pending under our name and are reclaimed once idle.
            log.warning("shutdown_without_redis", error=str(exc)[:200])
        log.info(
            "worker_stopped",
            handed_back=len(handed_back) + len(leftovers),
            phase_s=self.phases.summary(),
            **self.counters.summary(),
        )

    def _drain_beats(self) -> None:
        for lane in self.lanes:
            lane.heartbeat.drain(self._entries(lane))

    def _hand_back(self, requests: list[InFlight]) -> None:
        if not requests:
            return
        idle_ms = self.settings.reclaim_min_idle_ms * 2
        for lane in self.lanes:
            entry_ids = [f.entry_id for f in requests if f.lane == lane.key]
            if not entry_ids:
                continue
            self.client.xclaim(
                lane.stream,
                self.settings.group,
                self.settings.consumer_name,
                0,
                cast(list[StreamIdT], entry_ids),  # only read; list[bytes] is not a list[StreamIdT] to mypy
                idle=idle_ms,
                justid=True,
            )
        log.info("entries_handed_back", count=len(requests))
