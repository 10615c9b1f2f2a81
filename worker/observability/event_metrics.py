"""The per-request and per-step metrics: recorded with one deque append, folded with numpy when scraped.

Why not prometheus-client's `Counter` and `Histogram` here: each `inc`/`observe` takes a lock and a
label lookup, about 11 µs for the eight updates of one finished request. On the queue path (an echo
worker answering ~6,000 requests/s on one core) that measured 13.6% of throughput with metrics on
(`loadtest/queue_bench.py --metrics`). Here the loop appends one tuple per request or step to a deque
(thread-safe, ~0.2 µs) and the scrape folds the backlog in a batch: counters in a dict, histogram
buckets with `numpy.searchsorted` + `bincount`. The collector then exposes ordinary Prometheus counters
and histograms (`_bucket`, `_sum`, `_count`), the same text a `Histogram` writes.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterable, Sequence

import numpy as np
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.engine.base import StepSample

# Finish reasons of replies that end in an error event, as the error code clients see.
ERROR_OUTCOME = {"error": "internal"}

# vLLM's buckets for the same histograms, so dashboards built for it read these the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)  # fmt: skip
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                 300.0, 600.0, 1800.0)  # fmt: skip
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2,
                0.5, 1.0, 2.5)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# The loop folds the backlog itself past this many records, so memory stays bounded when nothing scrapes.
FOLD_AT = 4096


class BucketCounts:
    """One histogram's state: counts per bucket (`le` bounds, then +Inf) and the sum of the values."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self.total = 0.0

    def add(self, values: Sequence[float] | np.ndarray) -> None:
        array = np.asarray(values, dtype=np.float64)
        if not array.size:
            return
        # side="left": a value equal to a bound falls in that bucket (`le` is "less than or equal").
        index = np.searchsorted(self.bounds, array, side="left")
        self.counts += np.bincount(index, minlength=len(self.counts))
        self.total += float(array.sum())

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = np.cumsum(self.counts)
        labels = [_le(b) for b in self.bounds] + ["+Inf"]
        return [(label, float(c)) for label, c in zip(labels, cumulative, strict=True)]


def _le(bound: float) -> str:
    """A bucket bound as prometheus-client writes it (`1.0`, `0.005`)."""
    return repr(float(bound))


# A finished request: outcome, tenant label, prompt, cached and generated tokens, then its queue time,
# TTFT, TPOT and end-to-end time in ms (TTFT and TPOT None when it has none).
RequestRecord = tuple[str, str, int, int, int, float, float | None, float | None, float]


class EventMetrics(Collector):
    """Requests and steps as they end; Prometheus counters and histograms when scraped."""

    def __init__(self) -> None:
        self._requests: deque[RequestRecord] = deque()
        self._steps: deque[StepSample] = deque()
        self._lock = threading.Lock()  # one fold at a time (two scrapes may overlap)
        self.outcomes: dict[tuple[str, str], int] = {}
        self.tokens: dict[str, list[int]] = {}  # tenant -> [prompt, cached, generated]
        self.ttft = BucketCounts(TTFT_BUCKETS)
        self.tpot = BucketCounts(TPOT_BUCKETS)
        self.e2e = BucketCounts(LATENCY_BUCKETS)
        self.queue = BucketCounts(QUEUE_BUCKETS)
        self.step_seconds = {phase: BucketCounts(STEP_BUCKETS) for phase in ("prefill", "decode")}
        self.batch_size = BucketCounts(BATCH_BUCKETS)
        self.step_tokens = BucketCounts(STEP_TOKEN_BUCKETS)
        self.host_seconds = 0.0  # of the steps' wall time, planning and launching them

    # -- the loop's side: one append each ---------------------------------------------------------------
    def request(self, record: RequestRecord) -> None:
        self._requests.append(record)
        if len(self._requests) > FOLD_AT:
            self.fold()

    def step(self, sample: StepSample) -> None:
        self._steps.append(sample)
        if len(self._steps) > FOLD_AT:
            self.fold()

    # -- the scrape's side -----------------------------------------------------------------------------
    def fold(self) -> None:
        """Move what the loop recorded since the last fold into the totals."""
        with self._lock:
            requests = _drain(self._requests)
            steps = _drain(self._steps)
            if requests:
                # Columns, then C-level counting and sums: a fold costs well under a microsecond a request.
                outcome, tenant, prompt, cached, generated, queue, ttft, tpot, total = zip(
                    *requests, strict=True
                )
                for (o, t), count in Counter(zip(outcome, tenant, strict=True)).items():
                    key = (ERROR_OUTCOME.get(o, o), t)
                    self.outcomes[key] = self.outcomes.get(key, 0) + count
                for t in set(tenant):
                    mine = [i for i, x in enumerate(tenant) if x == t] if len(set(tenant)) > 1 else None
                    tokens = self.tokens.setdefault(t, [0, 0, 0])
                    for index, column in enumerate((prompt, cached, generated)):
                        tokens[index] += sum(column) if mine is None else sum(column[i] for i in mine)
                self.queue.add(np.asarray(queue, dtype=np.float64) / 1000)
                self.ttft.add(np.asarray([v for v in ttft if v is not None], dtype=np.float64) / 1000)
                self.tpot.add(np.asarray([v for v in tpot if v is not None], dtype=np.float64) / 1000)
                self.e2e.add(np.asarray(total, dtype=np.float64) / 1000)
            for phase, histogram in self.step_seconds.items():
                histogram.add([s.seconds for s in steps if bool(s.prefill_tokens) == (phase == "prefill")])
            self.host_seconds += sum(s.host_seconds for s in steps)
            shaped = [s for s in steps if s.num_seqs]
            self.batch_size.add([s.num_seqs for s in shaped])
            self.step_tokens.add([s.prefill_tokens + s.decode_tokens for s in shaped])

    def collect(self) -> Iterable[Metric]:
        self.fold()
        with self._lock:
            requests = CounterMetricFamily(
                "llm_requests", "Requests the engine answered, by finish reason or error code.",
                labels=["outcome", "tenant"],
            )  # fmt: skip
            for (outcome, tenant), count in sorted(self.outcomes.items()):
                requests.add_metric([outcome, tenant], count)
            yield requests
            for name, doc, index in (
                ("llm_prompt_tokens", "Prompt tokens of the requests answered.", 0),
                ("llm_prompt_tokens_cached", "Prompt tokens served from the prefix cache.", 1),
                ("llm_generation_tokens", "Tokens generated.", 2),
            ):
                family = CounterMetricFamily(name, doc, labels=["tenant"])
                for tenant, counts in sorted(self.tokens.items()):
                    family.add_metric([tenant], counts[index])
                yield family
            for name, doc, histogram in (
                ("llm_time_to_first_token_seconds", "Enqueue to first token published.", self.ttft),
                ("llm_time_per_output_token_seconds", "Mean time between a request's tokens after the first.",
                 self.tpot),
                ("llm_e2e_request_latency_seconds", "Enqueue to final reply.", self.e2e),
                ("llm_request_queue_time_seconds", "Enqueue to the engine starting the request.", self.queue),
                ("llm_engine_step_batch_size", "Sequences in an engine step.", self.batch_size),
                ("llm_engine_step_tokens", "Tokens computed in an engine step.", self.step_tokens),
            ):  # fmt: skip
                single = HistogramMetricFamily(name, doc)
                single.add_metric([], histogram.buckets(), histogram.total)
                yield single
            steps = HistogramMetricFamily(
                "llm_engine_step_seconds", "Wall time of an engine step, submit to collect.", labels=["phase"]
            )
            for phase, histogram in self.step_seconds.items():
                steps.add_metric([phase], histogram.buckets(), histogram.total)
            yield steps
            yield CounterMetricFamily(
                "llm_engine_step_host_seconds",
                "Of the engine steps' wall time, planning and launching them.",
                value=self.host_seconds,
            )


def _drain(queue: deque) -> list:  # type: ignore[type-arg]
    """Take everything in `queue` (appended to by another thread meanwhile: only what is there now)."""
    return [queue.popleft() for _ in range(len(queue))]
