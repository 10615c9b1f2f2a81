"""Every `LLM_STATS_INTERVAL_S`: log `worker_stats` and append the same fields to `<prefix>:stats`.

The loop calls `tick()` once per iteration in its housekeeping; it does nothing until the interval
is over. Then it reads the group's lag and pending (XINFO GROUPS), the engine's capacity, the
step times of `PhaseTimes` and the GPUs (`gpu_telemetry.py`), builds the record (`stats.py`),
logs it and XADDs it with `MAXLEN ~ LLM_STATS_MAX_ENTRIES`. Stats never stop the loop: a Redis
error here is logged (`stats_not_written`) and the record goes to the log without the group's
numbers; the next interval tries again. `python -m worker.top` reads the stream.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import redis
import structlog

from producer.wire.keys import StreamNames
from worker.engine.base import Engine
from worker.observability.counters import LoopCounters
from worker.observability.gpu_telemetry import GpuTelemetry
from worker.observability.metrics import WorkerMetrics, stream_id_age_s
from worker.observability.phase_times import PhaseTimes
from worker.observability.stats import Fields, GroupBacklog, StatsWindow
from worker.settings import WorkerSettings

log = structlog.get_logger("worker")


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def group_backlog(client: redis.Redis, stream: str, group: str) -> GroupBacklog | None:
    """Lag and pending of `group` on `stream` (XINFO GROUPS); None when the group is not there."""
    for g in client.xinfo_groups(stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else str(g["name"])
        if name == group:
            return GroupBacklog(lag=_int_or_none(g.get("lag")), pending=_int_or_none(g.get("pending")))
    return None


def total_backlog(client: redis.Redis, streams: Sequence[str], group: str) -> GroupBacklog | None:
    """`group_backlog` summed over the request streams (one per tenant); None if no group is there."""
    found = [b for b in (group_backlog(client, s, group) for s in streams) if b is not None]
    if len(found) <= 1:
        return found[0] if found else None
    lags, pendings = [b.lag for b in found], [b.pending for b in found]
    return GroupBacklog(
        lag=None if None in lags else sum(x or 0 for x in lags),
        pending=None if None in pendings else sum(x or 0 for x in pendings),
    )


def write_entry(client: redis.Redis, stream: str, fields: Fields, max_entries: int) -> None:
    """Append one stats record to the capped stream (values as strings)."""
    body = {k: str(v) for k, v in fields.items()}
    client.xadd(stream, body, maxlen=max_entries, approximate=True)  # type: ignore[arg-type]


class LiveStats:
    """The loop's periodic stats; off when `stats_interval_s` is 0."""

    def __init__(
        self,
        client: redis.Redis,
        names: StreamNames,
        settings: WorkerSettings,
        engine: Engine,
        counters: LoopCounters,
        phases: PhaseTimes,
        requests: Sequence[str] | None = None,
        metrics: WorkerMetrics | None = None,
        tenants: Mapping[str, str | None] | None = None,
    ):
        self.client, self.engine, self.counters, self.phases = client, engine, counters, phases
        self.metrics = metrics
        self.tenants = dict(tenants or {})  # request stream -> its tenant (None without tenants)
        self.stream = names.stats
        # The request streams whose backlog is reported (one per tenant); default: the names' one.
        self.requests = list(requests) if requests is not None else [names.requests]
        self.group = settings.group
        self.worker = settings.consumer_name
        self.max_entries = settings.stats_max_entries
        self.block_size = settings.kv_block_size_tokens
        self.window = StatsWindow(settings.stats_interval_s, counters, time.monotonic())
        self.gpus = GpuTelemetry()
        # What this worker serves, so readers of the stream (the HTTP gateway's /v1/models) can list it.
        model = str(engine.describe().get("model", "none"))
        self.serves: Fields = {"engine": settings.engine, "model": model}

    def tick(self) -> Fields | None:
        """Log and write the record if the interval is over; returns it (None when not due)."""
        now = time.monotonic()
        if not self.window.due(now):
            return None
        backlog, reachable = None, True
        try:
            backlog = total_backlog(self.client, self.requests, self.group)
            if self.metrics is not None:
                self._queue_metrics()
        except redis.RedisError as exc:
            reachable = False
            self._not_written(exc)
        fields = self.window.close(
            self.worker, self.counters, now, self.phases.take_steps(), self.engine.capacity(),
            self.block_size, backlog, self.gpus.sample(),
        )  # fmt: skip
        fields.update(self.serves)
        log.info("worker_stats", **fields)
        if reachable:  # Redis answered a moment ago
            try:
                write_entry(self.client, self.stream, fields, self.max_entries)
            except redis.RedisError as exc:
                self._not_written(exc)
        return fields

    def _queue_metrics(self) -> None:
        """The queue gauges of each tenant (`metrics.py`): XLEN, the group's lag and pending, and the age
        of its oldest pending entry, summed over the tenant's streams (its shards)."""
        assert self.metrics is not None
        totals: dict[str | None, list[float]] = {}
        for stream in self.requests:
            length = int(self.client.xlen(stream))
            backlog = group_backlog(self.client, stream, self.group)
            summary = self.client.xpending(stream, self.group) if backlog is not None else None
            oldest = summary.get("min") if isinstance(summary, dict) else None
            age = stream_id_age_s(oldest) if oldest else 0.0
            t = totals.setdefault(self.tenants.get(stream), [0.0, 0.0, 0.0, 0.0])
            t[0] += length
            t[1] += (backlog.lag or 0) if backlog is not None else 0
            t[2] += (backlog.pending or 0) if backlog is not None else 0
            t[3] = max(t[3], age)
        for tenant, (entries, lag, pending, oldest_s) in totals.items():
            self.metrics.set_queue(tenant, int(entries), int(lag), int(pending), oldest_s)

    def _not_written(self, exc: Exception) -> None:
        log.warning("stats_not_written", error=f"{type(exc).__name__}: {exc}"[:200])
