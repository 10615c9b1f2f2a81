"""Live stats: what one worker did over the last interval, as one flat record of numbers.

Pure: the caller passes the clock, the loop's lifetime counters, the engine's capacity and the
Redis and GPU readings, so the arithmetic is unit-tested in process. `live_stats.py` collects the
inputs every `LLM_STATS_INTERVAL_S`, logs the record as `worker_stats` and appends it to
`<prefix>:stats`.

Fields (a reading the worker does not have is absent, never zero):

| field | meaning |
| --- | --- |
| worker | the consumer name |
| engine, model | what the worker serves: `LLM_ENGINE` and the model's name (`none` for echo) |
| interval_s | seconds this record covers |
| requests_per_s, tokens_per_s | requests answered and tokens generated per second over the interval |
| lag, pending | the consumer group's lag (entries no worker has read) and pending entries (XINFO GROUPS) |
| running, waiting | sequences in the engine: started, and handed over but not started |
| kv_blocks_used, kv_blocks_free, kv_blocks_total | KV cache blocks (paged engine); free includes cached |
| kv_blocks_cached | free blocks that still hold a reusable prefix |
| prefix_hit_rate | prompt tokens served from the prefix cache / prompt tokens, of the requests answered |
| owned_shards | shard streams the worker owns and reads first (`loop/shard_ownership.py`); absent when off |
| steps, step_p50_ms, step_p95_ms | engine steps in the interval and their wall time, submit to collect |
| gpus, gpu_util_pct, gpu_mem_used_bytes, gpu_mem_total_bytes | over the visible GPUs: count, mean, sums |
| gpu<i>_util_pct, gpu<i>_mem_used_bytes, gpu<i>_mem_total_bytes, gpu<i>_power_w, gpu<i>_temp_c | per GPU |
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from worker.engine.base import EngineCapacity
from worker.observability.counters import LoopCounters
from worker.observability.gpu_telemetry import GpuSample

Number = int | float
Fields = dict[str, str | Number]


@dataclass(frozen=True)
class Totals:
    """The lifetime counters that rates are taken from, at one moment."""

    at_s: float
    requests: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @classmethod
    def of(cls, counters: LoopCounters, at_s: float) -> Totals:
        return cls(at_s, counters.done, counters.tokens, counters.prompt_tokens, counters.cached_tokens)


@dataclass(frozen=True)
class GroupBacklog:
    """The consumer group's lag and pending count; lag is None where the server does not know it."""

    lag: int | None
    pending: int | None


def percentile(samples: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 1]) of the samples; None when there are none."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def rate_fields(prev: Totals, cur: Totals) -> Fields:
    elapsed = max(cur.at_s - prev.at_s, 1e-9)
    fields: Fields = {
        "interval_s": round(elapsed, 3),
        "requests_per_s": round((cur.requests - prev.requests) / elapsed, 3),
        "tokens_per_s": round((cur.tokens - prev.tokens) / elapsed, 2),
    }
    prompt = cur.prompt_tokens - prev.prompt_tokens
    if prompt > 0:
        fields["prefix_hit_rate"] = round((cur.cached_tokens - prev.cached_tokens) / prompt, 4)
    return fields


def engine_fields(capacity: EngineCapacity, block_size: int) -> Fields:
    fields: Fields = {"running": capacity.running, "waiting": capacity.waiting}
    if capacity.total_kv_tokens is not None and capacity.free_kv_tokens is not None:
        total = capacity.total_kv_tokens // block_size
        free = capacity.free_kv_tokens // block_size
        fields.update(kv_blocks_used=total - free, kv_blocks_free=free, kv_blocks_total=total)
        if capacity.cached_kv_tokens is not None:
            fields["kv_blocks_cached"] = capacity.cached_kv_tokens // block_size
    return fields


def step_fields(step_s: Sequence[float]) -> Fields:
    fields: Fields = {"steps": len(step_s)}
    p50, p95 = percentile(step_s, 0.5), percentile(step_s, 0.95)
    if p50 is not None and p95 is not None:
        fields.update(step_p50_ms=round(p50 * 1000, 3), step_p95_ms=round(p95 * 1000, 3))
    return fields


def group_fields(backlog: GroupBacklog | None) -> Fields:
    if backlog is None:
        return {}
    fields: Fields = {}
    if backlog.lag is not None:
        fields["lag"] = backlog.lag
    if backlog.pending is not None:
        fields["pending"] = backlog.pending
    return fields


def gpu_fields(gpus: Sequence[GpuSample]) -> Fields:
    if not gpus:
        return {}
    fields: Fields = {"gpus": len(gpus)}
    utils = [g.util_pct for g in gpus if g.util_pct is not None]
    if utils:
        fields["gpu_util_pct"] = round(sum(utils) / len(utils), 1)
    used = [g.mem_used_bytes for g in gpus if g.mem_used_bytes is not None]
    total = [g.mem_total_bytes for g in gpus if g.mem_total_bytes is not None]
    if used:
        fields["gpu_mem_used_bytes"] = sum(used)
    if total:
        fields["gpu_mem_total_bytes"] = sum(total)
    for g in gpus:
        for name in ("util_pct", "mem_used_bytes", "mem_total_bytes", "power_w", "temp_c"):
            value = getattr(g, name)
            if value is not None:
                fields[f"gpu{g.index}_{name}"] = value
    return fields


class StatsWindow:
    """The interval in progress: when it ends, and the totals at its start."""

    def __init__(self, interval_s: float, counters: LoopCounters, now_s: float):
        self.interval_s = interval_s
        self.start = Totals.of(counters, now_s)

    def due(self, now_s: float) -> bool:
        return self.interval_s > 0 and now_s - self.start.at_s >= self.interval_s

    def close(
        self,
        worker: str,
        counters: LoopCounters,
        now_s: float,
        step_s: Sequence[float],
        capacity: EngineCapacity,
        block_size: int,
        backlog: GroupBacklog | None,
        gpus: Sequence[GpuSample],
    ) -> Fields:
        """The record of the interval ending now; the next interval starts now."""
        cur = Totals.of(counters, now_s)
        fields: Fields = {"worker": worker}
        fields.update(rate_fields(self.start, cur))
        fields.update(group_fields(backlog))
        fields.update(engine_fields(capacity, block_size))
        fields.update(step_fields(step_s))
        fields.update(gpu_fields(gpus))
        self.start = cur
        return fields
