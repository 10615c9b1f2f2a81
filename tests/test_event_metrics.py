"""The buffered request and step metrics write what prometheus-client's own Counter and Histogram would.

The same values go to both; the exposition lines (buckets, sum, count, counters by label) must match,
values on a bucket bound included (`le` means "less than or equal"). The backlog is folded by the loop
itself past `FOLD_AT` records, so memory stays bounded when nothing scrapes.
"""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from worker.engine.base import StepSample
from worker.observability import event_metrics
from worker.observability.event_metrics import LATENCY_BUCKETS, STEP_BUCKETS, TTFT_BUCKETS, EventMetrics


def lines(registry: CollectorRegistry, prefix: str) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines() if line.startswith(prefix) and "_created" not in line)


def test_histograms_and_counters_match_prometheus_client() -> None:
    rng = random.Random(0)
    events = EventMetrics()
    ours = CollectorRegistry()
    ours.register(events)
    theirs = CollectorRegistry()
    ttft = Histogram("llm_time_to_first_token_seconds", "x", buckets=TTFT_BUCKETS, registry=theirs)
    e2e = Histogram("llm_e2e_request_latency_seconds", "x", buckets=LATENCY_BUCKETS, registry=theirs)
    steps = Histogram("llm_engine_step_seconds", "x", ["phase"], buckets=STEP_BUCKETS, registry=theirs)
    requests = Counter("llm_requests", "x", ["outcome", "tenant"], registry=theirs)
    generated = Counter("llm_generation_tokens", "x", ["tenant"], registry=theirs)
    for i in range(3000):
        # Values on the bounds themselves, and far past the last one.
        ttft_s = rng.choice([*TTFT_BUCKETS, rng.random() * 3, 5000.0]) if i % 7 else None
        total_s = rng.choice([*LATENCY_BUCKETS, rng.random() * 100])
        tenant = rng.choice(["acme", "none", "globex"])
        outcome = rng.choice(["stop", "length", "error", "cancelled"])
        tokens = rng.randrange(0, 500)
        events.request(
            (
                outcome,
                tenant,
                10,
                2,
                tokens,
                1.0,
                None if ttft_s is None else ttft_s * 1000,
                None,
                total_s * 1000,
            )
        )
        if ttft_s is not None:
            ttft.observe(ttft_s)
        e2e.observe(total_s)
        requests.labels("internal" if outcome == "error" else outcome, tenant).inc()
        generated.labels(tenant).inc(tokens)
        seconds = rng.choice([*STEP_BUCKETS, rng.random() / 10])
        events.step(StepSample(seconds, 8, 16 if i % 3 == 0 else 0, 8))
        steps.labels("prefill" if i % 3 == 0 else "decode").observe(seconds)
    for prefix in (
        "llm_time_to_first_token_seconds_bucket", "llm_time_to_first_token_seconds_count",
        "llm_e2e_request_latency_seconds_bucket", "llm_e2e_request_latency_seconds_count",
        "llm_engine_step_seconds_bucket", "llm_engine_step_seconds_count", "llm_requests_total",
        "llm_generation_tokens_total",
    ):  # fmt: skip
        assert lines(ours, prefix) == lines(theirs, prefix), prefix
    # Sums agree to float rounding (added in another order).
    for prefix in ("llm_e2e_request_latency_seconds_sum", "llm_time_to_first_token_seconds_sum"):
        (a,), (b,) = lines(ours, prefix), lines(theirs, prefix)
        assert abs(float(a.split()[-1]) - float(b.split()[-1])) < 1e-6 * float(b.split()[-1])


def test_the_loop_folds_its_backlog_when_nothing_scrapes(monkeypatch) -> None:
    monkeypatch.setattr(event_metrics, "FOLD_AT", 100)
    events = EventMetrics()
    for _ in range(1000):
        events.request(("stop", "none", 1, 0, 1, 1.0, 1.0, 1.0, 1.0))
        events.step(StepSample(0.001, 1, 0, 1))
    assert len(events._requests) <= 101 and len(events._steps) <= 101
    events.fold()
    assert events.outcomes == {("stop", "none"): 1000}
    assert int(events.e2e.counts.sum()) == 1000 and int(events.step_seconds["decode"].counts.sum()) == 1000
