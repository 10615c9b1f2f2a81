"""The waiting queue of an engine without a KV block pool (echo, static), admitted by the one policy.

The paged engine's `StepScheduler` does the same with exact KV accounting; both ask
`scheduler.select_admissions` with the worker's `BatchPolicy`, so the time window, the token
budget, the sequence cap, priority aging and deadlines behave alike in every engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler import ArrivalGap, BatchPolicy, Priority, RunningState, WaitingRequest, select_admissions
from worker.engine.base import GenerationRequest


@dataclass
class Admitted:
    """One decision: requests to start now, and requests that leave the queue without starting."""

    started: list[GenerationRequest] = field(default_factory=list)
    expired: list[GenerationRequest] = field(default_factory=list)
    too_large: list[GenerationRequest] = field(default_factory=list)


class AdmissionQueue:
    """FIFO of waiting requests with aging; `admit` applies the policy to the engine's running state."""

    def __init__(self, policy: BatchPolicy):
        self.policy = policy
        self._waiting: dict[str, tuple[GenerationRequest, int]] = {}  # id -> (request, steps passed over)
        self.arrivals = ArrivalGap()
        self.wake_at_s: float | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, request: GenerationRequest) -> None:
        self._waiting[request.seq_id] = (request, 0)
        self.arrivals.observe(request.arrival_s)
        self.wake_at_s = None

    def remove(self, seq_id: str) -> GenerationRequest | None:
        entry = self._waiting.pop(seq_id, None)
        return None if entry is None else entry[0]

    def take_all(self) -> list[str]:
        ids = list(self._waiting)
        self._waiting.clear()
        return ids

    def admit(self, running: RunningState, now: float, kv_capacity_tokens: int | None = None) -> Admitted:
        """Ask the policy; started and dropped requests leave the queue, the rest age by one step."""
        out = Admitted()
        if not self._waiting:
            self.wake_at_s = None
            return out
        decision = select_admissions(
            [self._as_waiting(req, passed) for req, passed in self._waiting.values()],
            running,
            self.policy,
            now,
            kv_capacity_tokens=kv_capacity_tokens,
            next_arrival_s=self.arrivals.next_arrival_s(now),
        )
        self.wake_at_s = decision.wake_at_s
        for group, target in (
            (decision.admitted, out.started),
            (decision.expired, out.expired),
            (decision.too_large, out.too_large),
        ):
            for w in group:
                target.append(self._waiting.pop(w.seq_id)[0])
        for rid, (req, passed) in self._waiting.items():
            self._waiting[rid] = (req, passed + 1)
        return out

    @staticmethod
    def _as_waiting(req: GenerationRequest, passed: int) -> WaitingRequest:
        return WaitingRequest(
            seq_id=req.seq_id,
            arrival_s=req.arrival_s,
            prompt_tokens=len(req.prompt_token_ids),
            max_tokens=req.sampling.max_tokens,
            priority=Priority.BATCH if req.priority >= Priority.BATCH else Priority.INTERACTIVE,
            deadline_s=req.deadline_s,
            waited_steps=passed,
        )
