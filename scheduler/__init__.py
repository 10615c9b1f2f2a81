"""Microbatch admission policy: pure decisions over plain data, no I/O and no clock reads."""

from scheduler.arrivals import ArrivalGap
from scheduler.policy import (
    defer_prefill,
    effective_priority,
    kv_tokens_for,
    kv_tokens_needed,
    prefill_chunk,
    select_admissions,
    service_order,
)
from scheduler.types import Admission, BatchPolicy, Priority, RunningState, WaitingRequest

__all__ = [
    "Admission",
    "ArrivalGap",
    "BatchPolicy",
    "Priority",
    "RunningState",
    "WaitingRequest",
    "defer_prefill",
    "effective_priority",
    "kv_tokens_for",
    "kv_tokens_needed",
    "prefill_chunk",
    "select_admissions",
    "service_order",
]
