"""Plain data the admission policy decides over: waiting requests, engine state, knobs, the decision."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal


class Priority(enum.IntEnum):
    """Priority class; lower value is served first."""

    INTERACTIVE = 0
    BATCH = 1


@dataclass(frozen=True)
class WaitingRequest:
    """A request in the waiting queue, as the scheduler sees it (token counts only, no payload)."""

    seq_id: str
    arrival_s: float  # monotonic seconds when it entered the waiting queue
    prompt_tokens: int
    max_tokens: int
    priority: Priority = Priority.INTERACTIVE
    deadline_s: float | None = None  # same clock as arrival_s and `now`; None = no deadline
    cached_tokens: int = 0  # prompt tokens expected from the prefix cache, so not computed in prefill
    waited_steps: int = 0  # engine steps this request has been passed over (drives aging)

    def __post_init__(self) -> None:
        # Reject bad counts here so the budget arithmetic downstream never sees them.
        if self.prompt_tokens < 0 or self.max_tokens < 0 or self.waited_steps < 0:
            raise ValueError(f"negative token or step count in request {self.seq_id!r}")
        if not 0 <= self.cached_tokens <= self.prompt_tokens:
            raise ValueError(f"cached_tokens outside [0, prompt_tokens] in request {self.seq_id!r}")


@dataclass(frozen=True)
class RunningState:
    """What the engine is already running when the scheduler is asked."""

    num_seqs: int = 0  # sequences currently running in the engine
    decode_tokens: int = 0  # tokens the running sequences consume in the next step (1 per decoding seq)
    free_kv_tokens: int | None = None  # KV capacity left, in tokens; None = unbounded (e.g. echo engine)
    prefill_tokens: int = 0  # of decode_tokens, prefill chunks of running sequences already in the step
    steps_since_prefill: int = 0  # consecutive steps that computed no prefill token


@dataclass(frozen=True)
class BatchPolicy:
    """Admission knobs; defaults suit a single mid-size GPU."""

    max_wait_ms: float = 10.0  # time window: how long an idle engine waits to fill a microbatch
    max_batch_tokens: int = 4096  # token budget per step: prefill tokens + decode tokens
    max_num_seqs: int = 32  # running + admitted sequences
    max_prefill_chunk_tokens: int = 512  # largest prefill chunk a single request may take in one step
    # KV tokens reserved at admission: prompt + max_tokens (never preempts, as TGI) or prompt only
    # (packs more, relies on preemption when decode outgrows the cache, as vLLM).
    kv_reserve: Literal["worst_case", "optimistic"] = "worst_case"
    max_waiting_steps: int = 20  # aging: after this many passed-over steps a request is served as INTERACTIVE
    # Prefill batching while decoding (TGI's max_waiting_tokens): a pure decode step is cheap (a CUDA
    # graph), a step with a prefill chunk is not, so new requests join a decoding batch once their
    # first chunks fill the step's token budget, or after this many prefill-free steps. 0 = every step.
    prefill_interval_steps: int = 0

    def __post_init__(self) -> None:
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if self.max_batch_tokens < 1 or self.max_num_seqs < 1 or self.max_prefill_chunk_tokens < 1:
            raise ValueError("max_batch_tokens, max_num_seqs and max_prefill_chunk_tokens must be >= 1")
        if self.kv_reserve not in ("worst_case", "optimistic"):
            raise ValueError(f"unknown kv_reserve {self.kv_reserve!r}")
        if self.max_waiting_steps < 0:
            raise ValueError("max_waiting_steps must be >= 0")
        if self.prefill_interval_steps < 0:
            raise ValueError("prefill_interval_steps must be >= 0")


@dataclass(frozen=True)
class Admission:
    """One scheduling decision; every waiting request lands in at most one of the three tuples."""

    admitted: tuple[WaitingRequest, ...]  # in service order
    expired: tuple[WaitingRequest, ...]  # deadline_s <= now: drop and report, never run
    too_large: tuple[WaitingRequest, ...]  # KV need exceeds the total KV capacity: could never run
    wake_at_s: float | None  # set only when an idle engine holds requests for its time window
    prefill_tokens: tuple[int, ...] = ()  # first prefill chunk of each admitted request, same order
