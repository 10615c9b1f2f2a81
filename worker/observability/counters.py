"""The worker loop's counters: totals over its life and the microbatches still in flight."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Microbatch:
    """Requests the engine started in one step; logged as one `batch_done` when the last one ends."""

    size: int
    admitted_s: float
    wait_ms: float
    remaining: int
    tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    kv_peak_tokens: int = 0  # sum of the members' KV peaks


@dataclass
class LoopCounters:
    """Totals over the worker's life, logged with `worker_stopped`."""

    read: int = 0
    invalid: int = 0
    done: int = 0
    tokens: int = 0  # generated tokens published
    prompt_tokens: int = 0  # of the requests done
    cached_tokens: int = 0  # of those prompt tokens, served from the prefix cache
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
    preempted: int = 0  # sequences the engine preempted for KV space
    batches: dict[int, Microbatch] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)  # entries refused before the engine, by error code

    def refused(self, code: str) -> None:
        self.refusals[code] = self.refusals.get(code, 0) + 1

    def summary(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int)}
