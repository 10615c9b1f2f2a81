"""The worker's Prometheus metrics and probes (docs/metrics.md), scraped by a real Prometheus server.

- After requests of known sizes, PromQL over the scraped series gives exactly the requests, tokens and
  histogram counts that were sent and answered.
- The queue gauges follow a backlog the test builds (a slow worker reading one request at a time) and
  then drains; the lag's series is absent, not 0, while the server does not know the lag (XDEL of an
  entry no worker has read), and back once it does.
- `/health` and `/ready` follow a Redis outage (unready, still live) and an engine that died.
- Hostile or missing readings (NaN, a failing GPU reading, no GPU, a client-chosen tenant) never break a
  scrape nor make a series.
"""

from __future__ import annotations

import math
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import PrometheusServer, binary
from worker_process import spawn_worker

from producer.client import ChatClient
from producer.wire.keys import StreamNames
from worker.engine.base import EngineCapacity
from worker.local_redis.server import EmbeddedRedis, free_port
from worker.observability.counters import LoopCounters
from worker.observability.gpu_telemetry import GpuSample
from worker.observability.live_stats import LiveStats
from worker.observability.metrics import WorkerMetrics
from worker.observability.phase_times import PhaseTimes
from worker.settings import WorkerSettings

needs_prometheus = pytest.mark.skipif(binary("prometheus") is None, reason="prometheus is not installed")


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_status(port: int, path: str, status: int, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    seen: tuple[int, str] | None = None
    while time.monotonic() < deadline:
        try:
            seen = get(port, path)
        except OSError:
            seen = None
        if seen is not None and seen[0] == status:
            return seen[1]
        time.sleep(0.1)
    raise AssertionError(f"{path} never answered {status}; last: {seen}")


@needs_prometheus
def test_prometheus_reads_exact_request_token_and_histogram_counts(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    worker = spawn_worker(redis_url, prefix, tmp_path, "m1", "echo", metrics_port=port, stats_interval_s=0.2)
    try:
        worker.wait_started()
        with PrometheusServer([f"127.0.0.1:{port}"]) as prom, ChatClient(redis_url, prefix=prefix) as client:
            prom.wait_for('up{job="llm-worker"}', lambda v: v == 1)
            replies = [
                client.chat([{"role": "user", "content": "word " * (3 + i)}], max_tokens=2 + i % 5)
                for i in range(12)
            ]
            stream = client.stream([{"role": "user", "content": "a b c d e f"}], max_tokens=4)
            assert list(stream)  # token events, then the final reply
            replies.append(stream.reply)
            prompt = sum(r.usage.prompt_tokens for r in replies)
            generated = sum(r.usage.completion_tokens for r in replies)
            n = len(replies)
            prom.wait_for("sum(llm_requests_total)", lambda v: v == n)
            for reason in {r.finish_reason for r in replies}:
                expected = sum(r.finish_reason == reason for r in replies)
                assert prom.value(f'llm_requests_total{{outcome="{reason}",tenant="none"}}') == expected
            assert prom.value("llm_generation_tokens_total") == generated
            assert prom.value("llm_prompt_tokens_total") == prompt
            for histogram in (
                "llm_time_to_first_token_seconds", "llm_e2e_request_latency_seconds",
                "llm_request_queue_time_seconds",
            ):  # fmt: skip
                assert prom.value(f"{histogram}_count") == n
                assert prom.value(f'{histogram}_bucket{{le="+Inf"}}') == n
            # Every request generated more than one token: each has a time per output token.
            assert prom.value("llm_time_per_output_token_seconds_count") == n
            p95 = prom.value("histogram_quantile(0.95, sum by (le) (llm_e2e_request_latency_seconds_bucket))")
            assert p95 is not None and 0 < p95 < 30
            steps = prom.value("sum(llm_engine_step_seconds_count)")
            assert steps is not None and steps >= 1
            host = prom.value("llm_engine_step_host_seconds_total")
            busy = prom.value("sum(llm_engine_step_seconds_sum)")
            assert host is not None and busy is not None and 0 < host <= busy
            batches = prom.value("llm_engine_step_batch_size_count")  # steps that reported their sequences
            assert batches is not None and 1 <= batches <= steps
            assert prom.value('llm_worker_info{engine="echo"}') == 1
            assert prom.value("llm_worker_ready") == 1
            assert prom.query("llm_gpu_memory_total_bytes") == []  # no GPU here: absent, not zero
    finally:
        assert worker.stop() == 0


@needs_prometheus
def test_queue_gauges_follow_a_backlog_and_its_drain(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """A worker reading one request at a time, 30 ms a token: 24 requests queue up, then drain."""
    port = free_port()
    worker = spawn_worker(
        redis_url, prefix, tmp_path, "m2", "echo", metrics_port=port, stats_interval_s=0.2,
        max_waiting_requests=1, max_num_seqs=1, echo_token_delay_ms=30,
    )  # fmt: skip
    try:
        worker.wait_started()
        with PrometheusServer([f"127.0.0.1:{port}"]) as prom, ChatClient(redis_url, prefix=prefix) as client:
            prom.wait_for('up{job="llm-worker"}', lambda v: v == 1)
            ids = [client.submit([{"role": "user", "content": f"req {i}"}], max_tokens=4) for i in range(24)]
            lag = prom.wait_for('llm_queue_lag{tenant="none"}', lambda v: v is not None and v >= 10)
            assert lag is not None and lag <= 24
            # The worker trims entries every group has acknowledged, so the stream holds at least the
            # unread ones and at most what was sent; both gauges read at one instant (one scrape).
            length = prom.value('llm_queue_length{tenant="none"}')
            unread_margin = prom.value('llm_queue_length{tenant="none"} - llm_queue_lag{tenant="none"}')
            assert length is not None and length <= 24
            assert unread_margin is not None and unread_margin >= 0
            oldest = prom.wait_for(
                'llm_queue_oldest_pending_age_seconds{tenant="none"}', lambda v: v and v > 0
            )
            assert oldest is not None and oldest < 60
            for request_id in ids:
                client.result(request_id, timeout_s=60)
            prom.wait_for('llm_queue_lag{tenant="none"}', lambda v: v == 0)
            prom.wait_for('llm_queue_pending{tenant="none"}', lambda v: v == 0)
            prom.wait_for('llm_queue_oldest_pending_age_seconds{tenant="none"}', lambda v: v == 0)
            peak = prom.value('max_over_time(llm_queue_lag{tenant="none"}[5m])')
            assert peak is not None and peak >= lag
            assert prom.value("sum(llm_requests_total)") == 24
    finally:
        assert worker.stop() == 0


def queue_samples(text: str) -> dict[tuple[str, str], float]:
    """The `llm_queue_*` samples of an exposition: (name, tenant) -> value."""
    return {
        (sample.name, sample.labels["tenant"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("llm_queue_") and "tenant" in sample.labels
    }


def wait_queue(port: int, check, timeout_s: float = 30.0) -> dict[tuple[str, str], float]:
    """Scrape the worker's /metrics until `check(samples)` holds; the samples."""
    deadline = time.monotonic() + timeout_s
    samples: dict[tuple[str, str], float] = {}
    while time.monotonic() < deadline:
        samples = queue_samples(get(port, "/metrics")[1])
        if check(samples):
            return samples
        time.sleep(0.05)
    raise AssertionError(f"the queue gauges never got there; last: {samples}")


def test_queue_lag_is_absent_while_the_server_does_not_know_it(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A backlog behind a slow worker; an entry no worker has read is deleted: XINFO GROUPS answers a nil
    lag, and the worker's /metrics has no lag sample (not 0) while length and pending stay; once the group
    has read the stream's last entry the lag is known again and the sample is back, 0."""
    port = free_port()
    worker = spawn_worker(
        redis_url, prefix, tmp_path, "m6", "echo", metrics_port=port, stats_interval_s=0.1,
        max_waiting_requests=1, max_num_seqs=1, echo_token_delay_ms=40,
    )  # fmt: skip
    stream = StreamNames.for_prefix(prefix).requests
    lag, length, pending = (("llm_queue_lag", "none"), ("llm_queue_length", "none"),
                            ("llm_queue_pending", "none"))  # fmt: skip
    admin = redis.Redis.from_url(redis_url)
    try:
        worker.wait_started()
        with ChatClient(redis_url, prefix=prefix) as client:
            for i in range(20):
                client.submit([{"role": "user", "content": f"req {i}"}], max_tokens=4)
        wait_queue(port, lambda s: s.get(lag, 0) >= 8)
        (group,) = admin.xinfo_groups(stream)
        unread = [entry_id for entry_id, _ in admin.xrange(stream, min=b"(" + group["last-delivered-id"])]
        assert admin.xdel(stream, unread[len(unread) // 2]) == 1
        assert admin.xinfo_groups(stream)[0]["lag"] is None  # the server no longer knows it

        samples = wait_queue(port, lambda s: lag not in s)
        assert samples[length] >= 8 and pending in samples, samples
        assert "llm_queue_lag" in get(port, "/metrics")[1]  # its HELP and TYPE stay: one tenant's gap

        samples = wait_queue(port, lambda s: s.get(lag) == 0 and s.get(pending) == 0)
        assert admin.xinfo_groups(stream)[0]["lag"] == 0
        assert len(worker.events("request_done")) == 19  # all but the deleted one
    finally:
        admin.close()
        assert worker.stop() == 0


# Each tenant's request streams (its shards): entries, how many the group has read, and which one (if
# any) is deleted afterwards, read or not.
_streams = st.integers(0, 5).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(0, n), st.none() | st.integers(0, max(n - 1, 0)))
)
_shards = st.lists(_streams, min_size=1, max_size=3)
_tenants = st.dictionaries(st.sampled_from(["acme", "bolt", None]), _shards, min_size=1, max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tenants=_tenants)
def test_queue_lag_sample_is_the_sum_over_shards_or_absent(redis_url: str, tenants: dict) -> None:
    """Per tenant, over its shards as the server reports them: length and pending are sums; the lag is
    the sum when every shard's is known, else absent; the next reading after the group caught up with the
    end of every shard brings it back."""
    root = f"q{uuid.uuid4().hex[:10]}"
    client = redis.Redis.from_url(redis_url)
    streams: dict[str, str | None] = {}
    try:
        for tenant, shards in tenants.items():
            for k, (n, read, delete) in enumerate(shards):
                stream = f"{root}:{tenant}:{k}:requests"
                streams[stream] = tenant
                client.xgroup_create(stream, "workers", id="0", mkstream=True)
                ids = [client.xadd(stream, {"n": str(i)}) for i in range(n)]
                if read:
                    client.xreadgroup("workers", "c", {stream: ">"}, count=read)
                if delete is not None and ids:
                    client.xdel(stream, ids[delete])
        worker_settings = WorkerSettings(redis_url=redis_url, stats_interval_s=1e-6, consumer_name="w")
        metrics = WorkerMetrics(tenants=["acme", "bolt"])
        engine = _IdleEngine()
        stats = LiveStats(
            client, StreamNames.for_prefix(root), worker_settings, engine, LoopCounters(),  # type: ignore[arg-type]
            PhaseTimes(), requests=list(streams), metrics=metrics, tenants=streams,
        )  # fmt: skip

        for _ in range(2):  # as read, then with every shard read to its end
            time.sleep(0.001)
            assert stats.tick() is not None
            samples = queue_samples(generate_latest(metrics.registry).decode())
            for tenant in tenants:
                own = [s for s, t in streams.items() if t == tenant]
                groups = [client.xinfo_groups(s)[0] for s in own]
                label = tenant or "none"
                assert samples[("llm_queue_length", label)] == sum(client.xlen(s) for s in own)
                assert samples[("llm_queue_pending", label)] == sum(g["pending"] for g in groups)
                lags = [g["lag"] for g in groups]
                expected = None if None in lags else sum(lags)
                assert samples.get(("llm_queue_lag", label)) == expected, (label, lags, samples)
            for stream in streams:  # a new entry (the newest may be the one deleted), then all read
                client.xadd(stream, {"n": "last"})
                client.xreadgroup("workers", "c", {stream: ">"})
        assert all(("llm_queue_lag", t or "none") in samples for t in tenants)  # caught up: all known
    finally:
        client.delete(*streams, f"{root}:stats")
        client.close()


class _IdleEngine:
    def capacity(self) -> EngineCapacity:
        return EngineCapacity(running=0, decode_tokens=0, free_kv_tokens=None, total_kv_tokens=None)

    def describe(self) -> dict[str, str | int]:
        return {"model": "none"}


def test_probes_follow_a_redis_outage(prefix: str, tmp_path: Path) -> None:
    """Redis away: unready (503, the reason said) but live, so Kubernetes does not restart the worker;
    ready again once Redis is back."""
    server = EmbeddedRedis().start()
    port = free_port()
    worker = spawn_worker(server.url, prefix, tmp_path, "m3", "echo", metrics_port=port,
                          reconnect_backoff_max_ms=200)  # fmt: skip
    try:
        worker.wait_started()
        wait_status(port, "/ready", 200)
        assert get(port, "/health") == (200, "ok\n")
        server.stop(keep_files=True)
        body = wait_status(port, "/ready", 503)
        assert "redis" in body
        assert get(port, "/health")[0] == 200
        status, text = get(port, "/metrics")
        assert status == 200 and "llm_worker_ready 0.0" in text
        server.start()
        wait_status(port, "/ready", 200)
        assert get(port, "/metrics")[1].count("llm_worker_ready 1.0") == 1
    finally:
        worker.stop()
        server.stop()


def test_a_dead_engine_process_ends_readiness(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """The engine's own process dies: the worker is never ready again and exits non-zero (its port
    closes), so the probes fail and Kubernetes replaces the pod."""
    port = free_port()
    worker = spawn_worker(
        redis_url, prefix, tmp_path, "m4", "echo", metrics_port=port, engine_process="separate"
    )
    worker.wait_started()
    wait_status(port, "/ready", 200)
    # The steps run in the engine's process; their metrics reach the worker's endpoint.
    with ChatClient(redis_url, prefix=prefix) as client:
        reply = client.chat([{"role": "user", "content": "one two three"}], max_tokens=3)
        assert reply.usage.completion_tokens
    text = get(port, "/metrics")[1]
    steps = [line for line in text.splitlines() if line.startswith("llm_engine_step_seconds_count")]
    assert sum(float(line.split()[-1]) for line in steps) >= 1
    host = [line for line in text.splitlines() if line.startswith("llm_engine_step_host_seconds_total")]
    assert host and float(host[0].split()[-1]) > 0
    children = psutil.Process(worker.proc.pid).children()
    assert children, "the engine runs in a process of its own"
    for child in children:
        os.kill(child.pid, signal.SIGKILL)
    assert worker.proc.wait(timeout=60) != 0
    with pytest.raises(OSError):
        get(port, "/ready")
    assert worker.events("engine_process_died")


def test_starting_worker_answers_unready_and_live(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """The port opens before the engine loads: a probe finds 503 "starting", not a closed port."""
    port = free_port()
    worker = spawn_worker(redis_url, prefix, tmp_path, "m5", "echo", wait=False, metrics_port=port)
    try:
        seen = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and 200 not in seen:
            try:
                status, body = get(port, "/ready")
            except OSError:
                time.sleep(0.02)
                continue
            seen.add(status)
            if status == 503:
                assert "starting" in body
        assert 200 in seen
        assert get(port, "/nothing-here")[0] == 404
    finally:
        worker.stop()


def test_hostile_readings_never_break_a_scrape_nor_make_series() -> None:
    readings: list[list[GpuSample]] = [
        [GpuSample(0, util_pct=float("nan"), mem_used_bytes=5, mem_total_bytes=10, power_w=float("inf"))],
    ]

    def gpus() -> list[GpuSample]:
        if not readings:
            raise RuntimeError("NVML went away")
        return readings.pop()

    metrics = WorkerMetrics(tenants=["acme"], gpus=gpus)
    metrics.observe_request("stop", "acme", 3, 1, 2, 1.0, 2.0, 0.5, 3.0)
    for tenant in ("evil\n}", "x" * 10_000, None, "acme2"):
        metrics.observe_request("error", tenant, 1, 0, 1, 1.0, None, None, 2.0)
    metrics.set_engine(EngineCapacity(1, 1, None, None), None)  # no KV readings
    text = generate_latest(metrics.registry).decode()
    assert 'llm_requests_total{outcome="internal",tenant="none"} 4.0' in text
    assert 'llm_requests_total{outcome="stop",tenant="acme"} 1.0' in text
    assert "evil" not in text and "acme2" not in text
    assert 'llm_gpu_memory_used_bytes{gpu="0"} 5.0' in text
    assert "llm_gpu_utilization_ratio" not in text and "llm_gpu_power_watts" not in text  # NaN, inf: absent
    text = generate_latest(metrics.registry).decode()  # the GPU reading now raises
    assert "llm_gpu_" not in text and "llm_requests_total" in text
    # Nothing attached yet (the engine is loading): the loop's counters are simply absent.
    assert "llm_dead_letters_total" not in text
    assert all(math.isfinite(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("llm_"))  # fmt: skip
