"""`EngineProcess`: the worker loop's handle on an engine that runs in its own process.

It is an `Engine` like the others, so `worker/loop/consumer.py` drives it unchanged; behind it the
child process (`child.py`) steps the real engine on its own, as fast as the device goes.
What the loop does with it:

- `add_request`/`abort_request` queue commands; `submit_step()` sends them in one message and
  takes whatever outputs have arrived. `collect()` returns them, first waiting up to
  `wait_s` on the pipe when none have, so a busy loop sleeps between steps instead of spinning.
- `abort_request` answers at once (a final output with the abort's reason and no text); the
  child's own final for that request, if it comes, is dropped by the loop like any output of a
  request it already answered.
- Tokenizing happens here, with the engine's encoder sent by the child at start-up, and so does
  detokenizing where the engine allows it (`Engine.detokenize_optional`): the child then sends token
  ids only and this process turns them into text deltas, as vLLM's front end does for its engine
  core, so the process that drives the device spends no time on text. A request with stop strings
  is still detokenized in the child, which must see the text to stop at the right token.
- If the child dies, every call raises `EngineProcessDied`: the worker exits, and the entries it
  held stay pending for another worker to reclaim (docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from typing import Any

import structlog

from worker.engine.base import (
    Engine,
    EngineCapacity,
    FinishReason,
    GenerationRequest,
    SequenceOutput,
    StepSample,
    StepStats,
)
from worker.engine.config import EngineConfig
from worker.engine.detokenizer import IncrementalDetokenizer
from worker.engine.encoder import Encoder, TokenizerEncoder
from worker.engine_process.child import serve, unpack_output

log = structlog.get_logger("worker")

# With requests in the engine and no outputs yet, `collect()` waits this long on the pipe, so the
# loop reads new requests from Redis at least this often while it waits for a step.
DEFAULT_WAIT_S = 0.002


class EngineProcessDied(BaseException):
    """The engine's process exited or its pipe broke: the worker cannot go on without it.

    A `BaseException`, like `SystemExit`: the loop's per-entry and per-iteration error handling
    (which absorbs any `Exception` so that one request cannot stop a worker) must let it through.
    """


class EngineProcess(Engine):
    """Drives the engine built from `config` in a child process (spawned, so CUDA starts clean)."""

    overlaps_host = True
    times_own_steps = True

    def __init__(
        self,
        config: EngineConfig,
        log_level: str = "info",
        wait_s: float = DEFAULT_WAIT_S,
        start_timeout_s: float = 3600,
    ):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(
            target=serve, args=(child_conn, config, log_level), name="engine", daemon=True
        )
        self._proc.start()
        child_conn.close()
        self.wait_s = wait_s
        self._commands: dict[str, list[Any]] = {"add": [], "abort": []}
        self._live: set[str] = set()  # handed to the child, not yet finished
        self._outputs: list[SequenceOutput] = []
        self._stats = StepStats()
        self._reported = StepStats(steps=0)  # what the child reported since `submit_step()` last took it
        self._capacity = EngineCapacity(running=0, decode_tokens=0, free_kv_tokens=None, total_kv_tokens=None)
        self._failure: str | None = None
        self._control: dict[str, tuple[Any, ...]] = {}  # the last reply of each kind, until taken
        ready = self._wait_for("ready", start_timeout_s)
        _, self.name, self._describe, self._encoder, detokenize_optional, self.supported_extras = ready
        # The tokenizer that detokenizes here, when the child leaves text to this process.
        self._tokenizer = (
            self._encoder.tokenizer
            if detokenize_optional and isinstance(self._encoder, TokenizerEncoder)
            else None
        )
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        log.info("engine_process_started", pid=self._proc.pid, engine=self.name)

    # -- encoding: here, with the encoder the child sent (`Engine.encode_*` use it) ----------------------
    def encoder(self) -> Encoder:
        return self._encoder

    # -- requests --------------------------------------------------------------------------------------
    def add_request(self, request: GenerationRequest) -> None:
        if request.seq_id in self._live:
            raise ValueError(f"duplicate request id {request.seq_id!r}")
        self._live.add(request.seq_id)
        if self._tokenizer is not None and not request.sampling.stop:
            detokenizer = IncrementalDetokenizer(self._tokenizer, request.prompt_token_ids)
            self._detokenizers[request.seq_id] = detokenizer
            request = dataclasses.replace(request, detokenize=False)
        self._commands["add"].append(request)

    def abort_request(self, seq_id: str, reason: FinishReason = "cancelled") -> SequenceOutput | None:
        if seq_id not in self._live:
            return None
        self._live.discard(seq_id)
        self._detokenizers.pop(seq_id, None)
        self._commands["abort"].append((seq_id, reason))
        return SequenceOutput(seq_id, [], "", finished=True, finish_reason=reason)

    def take_unstarted(self) -> list[str]:
        self._send_commands()
        self._send(("take_unstarted",))
        ids: list[str] = self._wait_for("unstarted", 60.0)[1]
        self._live.difference_update(ids)
        for seq_id in ids:
            self._detokenizers.pop(seq_id, None)
        return ids

    # -- stepping --------------------------------------------------------------------------------------
    def step(self) -> list[SequenceOutput]:
        self.submit_step()
        return self.collect()

    def submit_step(self) -> None:
        """Send the queued commands and take the outputs that have arrived."""
        self._send_commands()
        self._receive(0.0)
        self._stats, self._reported = self._reported, StepStats(steps=0)
        self._raise_failure()

    def collect(self) -> list[SequenceOutput]:
        self._send_commands()  # what the loop read meanwhile reaches the engine before the next step
        if not self._outputs and self._live:
            self._receive(self.wait_s)
            self._raise_failure()
        outputs, self._outputs = self._outputs, []
        return outputs

    def wake_at_s(self) -> float | None:
        return None  # the child keeps the time window; the loop waits on the pipe in `collect()`

    def has_unfinished(self) -> bool:
        # Also while admissions are reported that the loop has not taken (its `submit_step()` takes them).
        return bool(self._live or self._outputs or self._reported.admitted)

    def capacity(self) -> EngineCapacity:
        c = self._capacity
        waiting = max(0, len(self._live) - c.running)  # requests sent since the child last counted
        return EngineCapacity(
            c.running, c.decode_tokens, c.free_kv_tokens, c.total_kv_tokens, waiting, c.cached_kv_tokens
        )

    def last_step_stats(self) -> StepStats:
        return self._stats

    def check_alive(self) -> None:
        if not self._proc.is_alive():
            raise self._died(None)

    def describe(self) -> dict[str, str | int]:
        return dict(self._describe)

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._send(("close",))
                self._wait_for("closed", 30.0)
            except EngineProcessDied:
                pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()

    # -- the pipe --------------------------------------------------------------------------------------
    def _send_commands(self) -> None:
        for kind, items in self._commands.items():
            if items:
                self._send((kind, items))
                self._commands[kind] = []

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._conn.send(message)
        except (OSError, EOFError) as exc:
            raise self._died(exc) from exc

    def _receive(self, wait_s: float | None) -> None:
        """Apply every message waiting on the pipe, first waiting up to `wait_s` for one."""
        try:
            if not self._conn.poll(wait_s):
                if not self._proc.is_alive():
                    raise self._died(None)
                return
            while self._conn.poll():
                self._apply(self._conn.recv())
        except (OSError, EOFError) as exc:
            raise self._died(exc) from exc

    def _apply(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "outputs":
            _, rows, admitted, self._capacity, steps = message
            for row in rows:
                out = unpack_output(row)
                if out.seq_id in self._detokenizers:
                    self._detokenize(out)
                if out.finished:
                    self._live.discard(out.seq_id)
                self._outputs.append(out)
            s = self._reported
            samples = tuple(StepSample(*step) for step in steps)
            self._reported = StepStats(
                admitted=s.admitted + admitted, steps=s.steps + len(samples), samples=s.samples + samples
            )
        elif kind == "failed":
            self._failure = message[1]
        elif kind in ("ready", "unstarted", "closed"):
            self._control[kind] = message
        else:
            log.error("engine_process_bad_message", kind=str(kind)[:100])

    def _detokenize(self, out: SequenceOutput) -> None:
        """Fill in the text the child left out: the delta of the new tokens, and the whole text at the end."""
        if out.finished:
            detokenizer = self._detokenizers.pop(out.seq_id)
            out.new_text = "".join(detokenizer.add(t) for t in out.new_token_ids) + detokenizer.flush()
            out.text = detokenizer.text
        else:
            detokenizer = self._detokenizers[out.seq_id]
            out.new_text = "".join(detokenizer.add(t) for t in out.new_token_ids)

    def _wait_for(self, kind: str, timeout_s: float) -> tuple[Any, ...]:
        """Receive until a message of `kind` comes (applying the others); raise if the child dies first."""
        deadline = time.monotonic() + timeout_s
        while kind not in self._control:
            if kind == "ready" and self._failure is not None:
                raise EngineProcessDied(f"the engine process failed to start: {self._failure}")
            if time.monotonic() >= deadline:
                raise EngineProcessDied(f"the engine process sent no {kind!r} within {timeout_s:.0f} s")
            self._receive(min(1.0, max(0.0, deadline - time.monotonic())))
        return self._control.pop(kind)

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise RuntimeError(f"engine step failed in the engine process:\n{failure}")

    def _died(self, exc: BaseException | None) -> EngineProcessDied:
        self._proc.join(timeout=1.0)
        code = self._proc.exitcode
        log.error("engine_process_died", exitcode=code, error=None if exc is None else str(exc)[:200])
        return EngineProcessDied(f"the engine process exited (exit code {code})")
