"""Deterministic echo engine: no model, for queue-path tests and benchmarks.

It "generates" the words of the last user message (or of the prompt), one word per
step for every running request, as a model engine would emit one token per step.
Stop strings (`stop`) end the echo as they end a model's reply: once the produced text
contains one, the reply finishes with `stop`, cut before it, and text that could still
start a stop string is held back from the stream. Prompt tokens are counted as UTF-8
bytes. An optional per-step delay makes generations long enough for crash and shutdown tests.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

from scheduler import RunningState
from worker.engine.admission_queue import AdmissionQueue
from worker.engine.base import (
    Engine,
    EngineCapacity,
    FinishReason,
    GenerationRequest,
    SequenceOutput,
    StepStats,
)
from worker.engine.config import EngineConfig
from worker.engine.detokenizer import StopStrings
from worker.engine.encoder import ByteEncoder


@dataclass
class _EchoSequence:
    request: GenerationRequest
    words: list[str]
    produced: list[str] = field(default_factory=list)
    text: StopStrings = field(default_factory=StopStrings)


def _decode_bytes(token_ids: list[int]) -> str:
    return bytes(t for t in token_ids if 0 <= t < 256).decode("utf-8", errors="replace")


class EchoEngine(Engine):
    """Echoes input words back; every step emits one word per running request."""

    name = "echo"

    def __init__(self, config: EngineConfig | None = None):
        config = config or EngineConfig(engine="echo")
        self.policy = config.policy
        self.token_delay_s = config.echo_token_delay_ms / 1000.0
        self._waiting = AdmissionQueue(self.policy)
        self._running: dict[str, _EchoSequence] = {}
        self._stats = StepStats()
        self._encoder = ByteEncoder()

    def describe(self) -> dict[str, str | int]:
        return {"model": "none", "device": "cpu", "dtype": "none"}

    def encoder(self) -> ByteEncoder:
        return self._encoder

    def add_request(self, request: GenerationRequest) -> None:
        self._waiting.add(request)

    def abort_request(self, seq_id: str, reason: FinishReason = "cancelled") -> SequenceOutput | None:
        seq = self._running.pop(seq_id, None)
        if seq is None:
            req = self._waiting.remove(seq_id)
            seq = None if req is None else _EchoSequence(req, [])
        if seq is None:
            return None
        return self._final(seq, reason)

    def take_unstarted(self) -> list[str]:
        return self._waiting.take_all()

    def wake_at_s(self) -> float | None:
        return None if self._running else self._waiting.wake_at_s

    def _final(self, seq: _EchoSequence, reason: FinishReason) -> SequenceOutput:
        return SequenceOutput(
            seq_id=seq.request.seq_id,
            new_token_ids=[],
            new_text="",
            finished=True,
            finish_reason=reason,
            prompt_tokens=len(seq.request.prompt_token_ids),
            completion_tokens=len(seq.produced),
            text=seq.text.text,
        )

    def step(self) -> list[SequenceOutput]:
        now = time.monotonic()
        n = len(self._running)
        decision = self._waiting.admit(RunningState(num_seqs=n, decode_tokens=n), now)
        outputs = [self._final(_EchoSequence(r, []), "deadline_exceeded") for r in decision.expired]
        for req in decision.started:
            words = _decode_bytes(req.prompt_token_ids).split() or ["(empty)"]
            self._running[req.seq_id] = _EchoSequence(req, words, text=StopStrings(req.sampling.stop))
        admitted = tuple(r.seq_id for r in decision.started)
        if not self._running:
            self._stats = StepStats()
            return outputs
        if self.token_delay_s:
            time.sleep(self.token_delay_s)
        ran = len(self._running)
        now = time.monotonic()
        for rid, seq in list(self._running.items()):
            deadline = seq.request.deadline_s
            if deadline is not None and now >= deadline:
                del self._running[rid]
                outputs.append(self._final(seq, "deadline_exceeded"))
                continue
            i = len(seq.produced)
            word = seq.words[i] if i == 0 else " " + seq.words[i]
            seq.produced.append(word)
            delta = seq.text.add(word)
            # As in the model engines, a stop string wins over max_tokens on the same token.
            done_stop = seq.text.stopped or len(seq.produced) >= len(seq.words)
            done_length = len(seq.produced) >= seq.request.sampling.max_tokens
            out = SequenceOutput(
                seq_id=rid,
                new_token_ids=[zlib.crc32(word.encode()) % 50_000],
                new_text=delta,
                prompt_tokens=len(seq.request.prompt_token_ids),
                completion_tokens=len(seq.produced),
            )
            if done_length or done_stop:
                del self._running[rid]
                out.new_text += seq.text.flush()
                out.finished = True
                out.finish_reason = "stop" if done_stop else "length"
                out.text = seq.text.text
            outputs.append(out)
        self._stats = StepStats(num_seqs=ran, decode_tokens=ran, admitted=admitted)
        return outputs

    def has_unfinished(self) -> bool:
        return bool(len(self._waiting) or self._running)

    def capacity(self) -> EngineCapacity:
        running = len(self._running)
        return EngineCapacity(
            running=running,
            decode_tokens=running,
            free_kv_tokens=None,
            total_kv_tokens=None,
            waiting=len(self._waiting),
        )

    def last_step_stats(self) -> StepStats:
        return self._stats
