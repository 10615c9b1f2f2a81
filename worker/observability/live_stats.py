"""Every `LLM_STATS_INTERVAL_S`: log `worker_stats` and append the same fields to `<prefix>:stats`.

The loop calls `tick()` once per iteration in its housekeeping; it does nothing until the interval
is over. Then it reads the group's lag and pending (XINFO GROUPS), the engine's capacity, the
step times of `PhaseTimes` and the GPUs (`gpu_telemetry.py`), builds the record (`stats.py`),
logs it and XADDs it with `MAXLEN ~ LLM_STATS_MAX_ENTRIES`. Stats never stop the loop: a Redis
error here is logged (`stats_not_written`) and the record goes to the log without the group's
numbers; the next interval tries again. `python -m worker.top` reads the stream.

`XADD *` gives an id above the stream's last one, so one entry dated ahead of the clock (an explicit
id, a server clock that jumped back) dates every later record in the future, and one at the largest
id (`18446744073709551615-18446744073709551615`) makes every later XADD fail. `write_entry` sees
either (the XADD refused, or an id ahead of the clock by more than `FUTURE_ALLOWANCE_MS`), and
repairs the stream in one script, checked against the server's own clock: it keeps the entries
not ahead of it (up to the cap), drops the others, and adds the record again; it logs
`stats_stream_repaired`. Only the workers' ACL user may write the stream (`worker/tools/acl.py`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis
import structlog

from producer.wire.keys import StreamNames
from producer.wire.redis_factory import register_script
from worker.engine.base import Engine
from worker.observability.counters import LoopCounters
from worker.observability.gpu_telemetry import GpuTelemetry
from worker.observability.metrics import WorkerMetrics, stream_id_age_s
from worker.observability.phase_times import PhaseTimes
from worker.observability.stats import Fields, GroupBacklog, StatsWindow
from worker.settings import WorkerSettings

log = structlog.get_logger("worker")

# How far an entry id may be ahead of the clock and still count as clock skew between hosts rather
# than a bad entry (the stats writer's repair, and `python -m worker.top`, which ignores entries
# further ahead).
FUTURE_ALLOWANCE_MS = 5_000

# KEYS[1] the stats stream; ARGV: the allowance (ms), the cap (MAXLEN ~), then the record's fields and
# values. Nothing to repair (no stream, not a stream, last id not ahead of the server's clock): {0}.
# Else the stream is rebuilt: an emptied stream keeps its last id (XSETID cannot lower it past a
# deleted id on Redis 7.2+), so the kept entries go into a new one, with their ids, before the record.
_REPAIR_SCRIPT = """\
local key, allowance, cap = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local now = redis.call('TIME')
local limit = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + allowance
local info = redis.pcall('XINFO', 'STREAM', key)
if type(info) ~= 'table' or info.err then return {0} end
local last, length = nil, 0
for i = 1, #info - 1, 2 do
  if info[i] == 'last-generated-id' then last = info[i + 1] end
  if info[i] == 'length' then length = info[i + 1] end
end
local last_ms = last and tonumber(string.match(last, '^(%d+)'))
if not last_ms or last_ms <= limit then return {0} end
local kept = redis.call('XREVRANGE', key, string.format('%.0f', limit), '-', 'COUNT', cap)
redis.call('DEL', key)
for i = #kept, 1, -1 do
  redis.call('XADD', key, kept[i][1], unpack(kept[i][2]))
end
local id = redis.call('XADD', key, 'MAXLEN', '~', cap, '*', unpack(ARGV, 3))
return {1, id, last, #kept, length - #kept}
"""


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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def write_entry(client: redis.Redis, stream: str, fields: Fields, max_entries: int) -> str:
    """Append one stats record to the capped stream (values as strings); returns its id.

    A stream whose last id is ahead of the clock (see the module's doc) is repaired and the record
    added again, once; a refusal for any other reason is raised as it came."""
    body = {k: str(v) for k, v in fields.items()}
    try:
        entry_id = _text(client.xadd(stream, body, maxlen=max_entries, approximate=True))  # type: ignore[arg-type]
    except redis.ResponseError as exc:  # e.g. "The stream has exhausted the last possible ID"
        try:
            repaired = _repair(client, stream, body, max_entries)
        except redis.RedisError:
            raise exc from None
        if repaired is None:
            raise
        return repaired
    if int(entry_id.split("-", 1)[0]) > time.time() * 1000 + FUTURE_ALLOWANCE_MS:
        # Dated ahead of this host's clock: the server's decides (a skewed host repairs nothing).
        return _repair(client, stream, body, max_entries) or entry_id
    return entry_id


def _repair(client: redis.Redis, stream: str, body: dict[str, str], max_entries: int) -> str | None:
    """Run the repair script; the record's new id, or None when the stream needed no repair."""
    args: list[Any] = [FUTURE_ALLOWANCE_MS, max_entries]
    for name, value in body.items():
        args += [name, value]
    result = register_script(client, _REPAIR_SCRIPT)(keys=[stream], args=args)
    if not result or int(result[0]) == 0:
        return None
    entry_id, last_id, kept, dropped = _text(result[1]), _text(result[2]), int(result[3]), int(result[4])
    log.warning("stats_stream_repaired", key=stream, last_id=last_id, kept=kept, dropped=dropped)
    return entry_id


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
        of its oldest pending entry, summed over the tenant's streams (its shards). The lag is None (its
        series absent) while the server does not know it for one of them: XINFO GROUPS answers nil once an
        entry the group had not read was deleted (XDEL), until the group has read the stream's newest one."""
        assert self.metrics is not None
        totals: dict[str | None, tuple[int, int | None, int, float]] = {}
        for stream in self.requests:
            length = int(self.client.xlen(stream))
            backlog = group_backlog(self.client, stream, self.group)
            summary = self.client.xpending(stream, self.group) if backlog is not None else None
            oldest = summary.get("min") if isinstance(summary, dict) else None
            age = stream_id_age_s(oldest) if oldest else 0.0
            lag = backlog.lag if backlog is not None else 0
            pending = (backlog.pending or 0) if backlog is not None else 0
            tenant = self.tenants.get(stream)
            entries, lag_sum, pending_sum, oldest_s = totals.get(tenant, (0, 0, 0, 0.0))
            totals[tenant] = (
                entries + length,
                None if lag is None or lag_sum is None else lag_sum + lag,
                pending_sum + pending,
                max(oldest_s, age),
            )
        for tenant, (entries, lag_sum, pending_sum, oldest_s) in totals.items():
            self.metrics.set_queue(tenant, entries, lag_sum, pending_sum, oldest_s)

    def _not_written(self, exc: Exception) -> None:
        log.warning("stats_not_written", error=f"{type(exc).__name__}: {exc}"[:200])
