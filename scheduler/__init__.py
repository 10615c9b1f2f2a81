"""Microbatch admission policy: pure decisions over plain data, no I/O and no clock reads."""

from scheduler.policy import (
    effective_priority,
    kv_tokens_needed,
    prefill_chunk,
    select_admissions,
    service_order,
)
from scheduler.types import Admission, BatchPolicy, Priority, RunningState, WaitingRequest

__all__ = [
    "Admission",
    "BatchPolicy",
    "Priority",
    "RunningState",
    "WaitingRequest",
    "effective_priority",
    "kv_tokens_needed",
    "prefill_chunk",
    "select_admissions",
    "service_order",
]
