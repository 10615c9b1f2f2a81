"""The engine interface the worker loop drives: add requests, step, read outputs.

Every engine (the paged continuous-batching engine, the static padded baseline, the
deterministic echo engine) is stepped by the same loop in `worker/consumer.py`, so
the queue path, the reply stream and the tests are shared by all of them.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "deadline_exceeded", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters; temperature 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class GenerationRequest:
    """A validated request, tokenized, ready for the engine."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_s: float
    priority: int = 0
    deadline_s: float | None = None


@dataclass
class SequenceOutput:
    """What one sequence produced in one engine step."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # Full reply text; set when finished.
    text: str = ""


@dataclass
class StepStats:
    """Counters of the last step, for the `batch_done` log event."""

    num_seqs: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    cached_tokens: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineCapacity:
    """What admission may still hand the engine without overrunning its memory."""

    running: int
    decode_tokens: int
    free_kv_tokens: int | None
    total_kv_tokens: int | None
    accepts_new: bool = True


class Engine(abc.ABC):
    """Iteration-level engine: the caller adds requests and calls `step()` until idle."""

    name: str = "engine"
    eos_token_ids: frozenset[int] = frozenset()

    @abc.abstractmethod
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat, with the model's chat template and the generation prompt."""

    @abc.abstractmethod
    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a raw completion prompt."""

    @abc.abstractmethod
    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request; it starts at a later `step()`."""

    @abc.abstractmethod
    def abort_request(self, request_id: str, reason: FinishReason = "cancelled") -> SequenceOutput | None:
        """Stop a request and free its resources; returns its final output if it was known."""

    @abc.abstractmethod
    def step(self) -> list[SequenceOutput]:
        """Run one iteration; returns the outputs of every sequence that produced tokens or finished."""

    @abc.abstractmethod
    def has_unfinished(self) -> bool:
        """True while any request is waiting or running inside the engine."""

    @abc.abstractmethod
    def capacity(self) -> EngineCapacity:
        """Current load and free KV capacity, for admission control."""

    def last_step_stats(self) -> StepStats:
        """Counters of the most recent step."""
        return StepStats()

    def describe(self) -> dict[str, str]:
        """What the engine runs, for the start-up log: e.g. `weights` and `kv_dtype` (fp16, int8...)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release model memory; engines without resources need not override."""
