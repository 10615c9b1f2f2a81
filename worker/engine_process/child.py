"""The engine's own process: schedule and run steps, and nothing else.

With a GPU step of a few milliseconds, one Python process cannot both keep the device busy and
do the service's per-token host work (reading and validating requests, tokenizing, building
reply events, Redis I/O): they share one interpreter lock. As vLLM splits its engine core from
its front end, the worker then runs the engine here, in a child process, and the loop of
`worker/loop/consumer.py` drives it through `EngineProcess` (`client.py`) over a pipe.

This loop steps the engine whenever it has runnable work and otherwise sleeps on the pipe. It
launches step N, sends step N-1's outputs and takes new commands while the device computes, then
collects step N. Messages are tuples of plain values, pickled by `multiprocessing`:

    from the worker: ("add", [GenerationRequest]), ("abort", [(seq_id, reason)]),
                     ("take_unstarted",), ("close",)
    to the worker:   ("ready", name, describe, encoder, detokenize_optional, supported_extras),
                     ("outputs", rows, admitted, capacity, steps), ("unstarted", ids), ("failed", error),
                     ("closed",)
    (`steps`: a tuple of `StepSample` fields per step run since the last report)

An output row is `pack_output(SequenceOutput)`. Messages are written by a thread (`Outbox`), so a
step never waits for the worker to drain the pipe. The child ignores SIGINT and SIGTERM: the worker
decides when it stops (warm shutdown, `("close",)`), and a worker that dies closes the pipe,
which ends this process too.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import structlog

from producer.logs import configure_logging
from worker.engine.base import Engine, SequenceOutput
from worker.engine.config import EngineConfig
from worker.engine.factory import create_engine

log = structlog.get_logger("worker")

OutputRow = tuple[Any, ...]


def pack_output(o: SequenceOutput) -> OutputRow:
    """A `SequenceOutput` as a tuple of its fields, in order: a tuple pickles several times faster than
    the dataclass, and `dataclasses.astuple` (which deep-copies) costs more than the step's detokenizing."""
    return (
        o.seq_id, o.new_token_ids, o.new_text, o.finished, o.finish_reason, o.prompt_tokens,
        o.completion_tokens, o.cached_tokens, o.text, o.kv_dtype, o.kv_peak_tokens, o.kv_evicted_tokens,
        o.logprobs, o.error, o.error_param,
    )  # fmt: skip


def unpack_output(row: OutputRow) -> SequenceOutput:
    return SequenceOutput(*row)


def serve(conn: Connection, config: EngineConfig, log_level: str) -> None:
    """Entry point of the child process: build the engine, say ready, run until closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(log_level)
    try:
        engine = create_engine(config)
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"[:2000]))
        raise
    outbox = Outbox(conn)
    outbox.send(
        ("ready", engine.name, engine.describe(), engine.encoder(), engine.detokenize_optional,
         engine.supported_extras)
    )  # fmt: skip
    try:
        StepLoop(engine, conn, outbox).run()
    finally:
        engine.close()
        outbox.send(("closed",))
        outbox.close()


class Outbox:
    """Messages to the worker, pickled in order by the loop and written to the pipe by a thread.

    A worker busy publishing a step may leave the pipe's buffer full for a moment; written from the
    loop, the next step would wait for it. The queue is bounded: a worker that falls behind for good
    slows the engine down instead of growing this process without limit.
    """

    def __init__(self, conn: Connection, max_pending: int = 1024):
        self.conn = conn
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="engine-outbox", daemon=True)
        self._thread.start()

    def send(self, message: tuple[Any, ...]) -> None:
        self._queue.put(bytes(ForkingPickler.dumps(message)))

    def close(self, timeout_s: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                self.conn.send_bytes(data)
            except OSError:
                return  # the worker is gone; the loop sees the closed pipe when it next reads


class StepLoop:
    """Steps one engine for a worker at the other end of `conn`."""

    def __init__(self, engine: Engine, conn: Connection, outbox: Outbox):
        self.engine = engine
        self.conn = conn
        self.outbox = outbox
        self.closing = False
        self._unsent: list[OutputRow] = []  # outputs collected, not yet sent
        self._admitted: list[str] = []
        self._samples: list[tuple[float, int, int, int, int, float]] = []  # `StepSample` fields, per step
        self.steps = 0
        self.busy_s = 0.0

    def run(self) -> None:
        while not self.closing:
            runnable = self._runnable()
            if not runnable:
                self._send()  # nothing will compute meanwhile: send what was collected now
                self._take_commands(self._idle_wait_s())
                continue
            start = time.perf_counter()
            try:
                self.engine.submit_step()
            except Exception:
                self._fail()
                continue
            submitted = time.perf_counter() - start
            stats = self.engine.last_step_stats()
            self._admitted += stats.admitted
            if self.engine.overlaps_host:
                self._send()  # the previous step's outputs go out while this one computes
                self._take_commands(0.0)
            try:
                self._unsent += map(pack_output, self.engine.collect())
            except Exception:
                self._fail()
                continue
            elapsed = time.perf_counter() - start
            preempted = int(stats.extra.get("preempted", 0))
            self._samples.append(
                (elapsed, stats.num_seqs, stats.prefill_tokens, stats.decode_tokens, preempted, submitted)
            )
            self.steps += 1
            self.busy_s += elapsed
            if not self.engine.overlaps_host:
                self._send()
                self._take_commands(0.0)
        self._send()
        log.info("engine_process_stopped", steps=self.steps, busy_s=round(self.busy_s, 3))

    def _runnable(self) -> bool:
        if not self.engine.has_unfinished():
            return False
        wake = self.engine.wake_at_s()
        return wake is None or time.monotonic() >= wake

    def _idle_wait_s(self) -> float | None:
        """How long to sleep on the pipe: until the time window opens, or until a command comes."""
        if not self.engine.has_unfinished():
            return None
        wake = self.engine.wake_at_s()
        return 0.0 if wake is None else max(0.0, wake - time.monotonic())

    def _take_commands(self, wait_s: float | None) -> None:
        """Apply every command waiting on the pipe; first wait up to `wait_s` (None: until one comes)."""
        if not self.conn.poll(wait_s):
            return
        while not self.closing and self.conn.poll():
            try:
                message = self.conn.recv()
            except EOFError:  # the worker is gone
                self.closing = True
                return
            self._apply(message)

    def _apply(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "add":
            for request in message[1]:
                self.engine.add_request(request)
        elif kind == "abort":
            for seq_id, reason in message[1]:
                out = self.engine.abort_request(seq_id, reason)
                if out is not None:
                    self._unsent.append(pack_output(out))
        elif kind == "take_unstarted":
            self._send()
            self.outbox.send(("unstarted", self.engine.take_unstarted()))
        elif kind == "close":
            self.closing = True
        else:
            log.error("engine_process_bad_message", kind=str(kind)[:100])

    def _send(self) -> None:
        if not (self._unsent or self._admitted or self._samples):
            return
        self.outbox.send(
            ("outputs", self._unsent, tuple(self._admitted), self.engine.capacity(), tuple(self._samples))
        )
        self._unsent, self._admitted, self._samples = [], [], []

    def _fail(self) -> None:
        """A step failed: say so (the worker ends the started requests); the engine stays usable."""
        error = traceback.format_exc(limit=20)
        log.error("engine_process_step_failed", error=error[-2000:])
        self._send()
        self.outbox.send(("failed", error[-2000:]))
