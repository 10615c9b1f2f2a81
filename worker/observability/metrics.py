"""A worker's Prometheus metrics (docs/metrics.md): one registry, fed by the loop, read by the server.

Three kinds of source, chosen so the loop pays microseconds, not round trips:

- events recorded as they happen: a request's final reply (`observe_request`: counters by outcome and
  tenant, the latency histograms), an engine step (`observe_step`: its time, batch size and tokens),
  each one deque append, folded when scraped (`event_metrics.py` says why);
- gauges the loop sets: the engine's occupancy (`set_engine`, at most every `ENGINE_GAUGE_INTERVAL_S`),
  the queue (`set_queue`, read with the live stats every `LLM_STATS_INTERVAL_S`) and the shard streams
  the worker owns (`owned_shards`, when they change; `worker/loop/shard_ownership.py`);
- values read at scrape time by collectors: the loop's lifetime counters (`LoopCounters`: reclaims,
  redeliveries, dead letters, refusals, preemptions, the time per loop phase) and the GPUs through NVML
  (absent, not zero, when there is none or NVML cannot read one).

Labels are bounded: `tenant` is one of the configured tenants or `none`, `outcome` a finish reason or an
error code, `code` an error code, `gpu` a device index. Nothing here raises into the loop or the server: a
reading that fails is left out of the scrape.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from worker.engine.base import EngineCapacity, StepSample
from worker.observability.counters import LoopCounters
from worker.observability.event_metrics import EventMetrics
from worker.observability.gpu_telemetry import GpuSample
from worker.observability.phase_times import PhaseTimes

# No `*_created` series beside each counter and histogram: they double the series and nothing reads them.
disable_created_metrics()

NO_TENANT = "none"
ENGINE_GAUGE_INTERVAL_S = 0.25


class _LoopCollector(Collector):
    """The loop's lifetime counters and phase times, read at scrape time (no cost in the loop)."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        c = self.metrics.counters
        if c is None:  # no loop yet (the engine is loading)
            return
        for name, doc, value in (
            ("llm_queue_reclaimed", "Entries this worker claimed from a dead consumer.", c.reclaimed),
            ("llm_queue_redelivered", "Entries this worker read again after a restart.", c.replayed),
            ("llm_dead_letters", "Entries moved to the dead-letter stream.", c.dead_lettered),
            ("llm_preemptions", "Sequences preempted for KV cache space.", c.preempted),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        refusals = CounterMetricFamily(
            "llm_refusals", "Entries answered with an error before they reached the engine.", labels=["code"]
        )
        for code, count in sorted(dict(c.refusals).items()):
            refusals.add_metric([code], count)
        yield refusals
        phases = self.metrics.phases
        if phases is not None:
            host = CounterMetricFamily(
                "llm_worker_loop_seconds", "Worker loop time by phase of its iterations.", labels=["phase"]
            )
            for phase, seconds in sorted(dict(phases.totals).items()):
                host.add_metric([phase], seconds)
            yield host


class _GpuCollector(Collector):
    """NVML readings at scrape time; a GPU (or a reading) NVML cannot give is absent, never zero."""

    FIELDS = (
        ("llm_gpu_utilization_ratio", "Share of the last sample period a kernel ran on the GPU.",
         lambda g: None if g.util_pct is None else g.util_pct / 100),
        ("llm_gpu_memory_used_bytes", "GPU memory in use.", lambda g: g.mem_used_bytes),
        ("llm_gpu_memory_total_bytes", "GPU memory.", lambda g: g.mem_total_bytes),
        ("llm_gpu_power_watts", "GPU board power draw.", lambda g: g.power_w),
        ("llm_gpu_temperature_celsius", "GPU core temperature.", lambda g: g.temp_c),
    )  # fmt: skip

    def __init__(self, sample: Callable[[], Sequence[GpuSample]]) -> None:
        self.sample = sample

    def collect(self) -> Iterable[Metric]:
        try:
            gpus = list(self.sample())
        except Exception:  # NVML failing mid-run: no GPU metrics this scrape
            gpus = []
        for name, doc, read in self.FIELDS:
            family = GaugeMetricFamily(name, doc, labels=["gpu"])
            for gpu in gpus:
                value = read(gpu)
                if value is not None and math.isfinite(value):
                    family.add_metric([str(gpu.index)], float(value))
            if family.samples:
                yield family


class WorkerMetrics:
    """Every metric of one worker, in a registry of its own (several workers may share a test process)."""

    def __init__(
        self, tenants: Sequence[str] = (), gpus: Callable[[], Sequence[GpuSample]] | None = None
    ) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.tenants = frozenset(tenants)
        # The loop's counters and phase times, attached by the loop when it starts (`Consumer`).
        self.counters: LoopCounters | None = None
        self.phases: PhaseTimes | None = None
        r.register(_LoopCollector(self))
        if gpus is not None:
            r.register(_GpuCollector(gpus))
        tenant = ["tenant"]
        self.events = EventMetrics()  # requests and steps: counters and histograms (`event_metrics.py`)
        r.register(self.events)
        self.running = Gauge("llm_num_requests_running", "Sequences started in the engine.", registry=r)
        self.waiting = Gauge("llm_num_requests_waiting", "Sequences handed to the engine, not started.",
                             registry=r)  # fmt: skip
        self.kv_usage = Gauge("llm_kv_cache_usage_ratio", "KV cache blocks in use / blocks.", registry=r)
        self.prefix_hits = Gauge(
            "llm_prefix_cache_hit_ratio", "Prompt tokens from the prefix cache / prompt tokens.", registry=r
        )
        self.queue_length = Gauge("llm_queue_length", "Entries in the request stream(s).", tenant, registry=r)
        self.queue_lag = Gauge(
            "llm_queue_lag", "Entries no worker of the group has read.", tenant, registry=r
        )
        self.queue_pending = Gauge(
            "llm_queue_pending", "Entries read, not yet acknowledged.", tenant, registry=r
        )
        self.queue_oldest = Gauge(
            "llm_queue_oldest_pending_age_seconds", "Age of the oldest pending entry (0: none).", tenant,
            registry=r,
        )  # fmt: skip
        self.info = Gauge(
            "llm_worker_info", "What the worker serves (value 1).",
            ["engine", "model", "kv_dtype", "weights", "version"], registry=r,
        )  # fmt: skip
        self.ready = Gauge("llm_worker_ready", "1 while /ready answers 200.", registry=r)
        self.owned_shards = Gauge(
            "llm_worker_owned_shards",
            "Request streams this worker reads first (all it reads while shard ownership is off).",
            registry=r,
        )
        self._engine_at = 0.0

    def tenant_label(self, tenant: str | None) -> str:
        """`tenant` if it is a configured tenant, else `none` (a client-chosen value never makes a series)."""
        return tenant if tenant is not None and tenant in self.tenants else NO_TENANT

    def describe(self, engine: str, fields: dict[str, str | int], version: str) -> None:
        self.info.labels(
            engine, str(fields.get("model", "none")), str(fields.get("kv_dtype", "none")),
            str(fields.get("weights", "none")), version,
        ).set(1)  # fmt: skip

    def observe_request(
        self, outcome: str, tenant: str | None, prompt: int, cached: int, generated: int,
        queue_ms: float, ttft_ms: float | None, tpot_ms: float | None, total_ms: float,
    ) -> None:  # fmt: skip
        """A request's final reply was written."""
        self.events.request(
            (
                outcome,
                self.tenant_label(tenant),
                prompt,
                cached,
                generated,
                queue_ms,
                ttft_ms,
                tpot_ms,
                total_ms,
            )
        )

    def observe_step(self, step: StepSample) -> None:
        """An engine step ended; `prefill` when it computed prompt tokens."""
        self.events.step(step)

    def engine_due(self, now_s: float) -> bool:
        """Whether the engine gauges are due (every `ENGINE_GAUGE_INTERVAL_S`); True starts an interval."""
        if now_s - self._engine_at < ENGINE_GAUGE_INTERVAL_S:
            return False
        self._engine_at = now_s
        return True

    def set_engine(self, capacity: EngineCapacity, prefix_hit_ratio: float | None) -> None:
        """The engine's occupancy (the loop calls it when `engine_due`)."""
        self.running.set(capacity.running)
        self.waiting.set(capacity.waiting)
        total, free = capacity.total_kv_tokens, capacity.free_kv_tokens
        if total and free is not None:
            self.kv_usage.set(min(1.0, max(0.0, (total - free) / total)))
        if prefix_hit_ratio is not None:
            self.prefix_hits.set(prefix_hit_ratio)

    def set_queue(
        self, tenant: str | None, length: int | None, lag: int | None, pending: int | None,
        oldest_age_s: float | None,
    ) -> None:  # fmt: skip
        """One tenant's request streams as the group sees them. `lag` None: the server does not know it
        (XINFO GROUPS answers nil), so `llm_queue_lag` has no sample for the tenant until it is known
        again, rather than a 0 that reads as an empty queue; another reading None keeps its last value."""
        label = self.tenant_label(tenant)
        if lag is None:
            self.queue_lag.remove(label)  # nothing to remove: a no-op
        for gauge, value in (
            (self.queue_length, length), (self.queue_lag, lag), (self.queue_pending, pending),
            (self.queue_oldest, oldest_age_s),
        ):  # fmt: skip
            if value is not None:
                gauge.labels(label).set(value)


def stream_id_age_s(entry_id: bytes | str, now_ms: float | None = None) -> float:
    """Seconds since a stream entry id's millisecond timestamp (0 for an id from the future)."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms = int(raw.split("-", 1)[0])
    now = time.time() * 1000 if now_ms is None else now_ms
    return max(0.0, (now - ms) / 1000)
