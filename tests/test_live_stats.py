"""Live stats: the interval arithmetic in process, the capped stream, a real worker's `worker_stats`
records and `python -m worker.top --once` against it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from structlog.testing import capture_logs

from producer.client import ChatClient
from producer.wire.keys import StreamNames
from worker.engine.base import EngineCapacity
from worker.observability.counters import LoopCounters
from worker.observability.gpu_telemetry import GpuSample, GpuTelemetry
from worker.observability.live_stats import FUTURE_ALLOWANCE_MS, group_backlog, write_entry
from worker.observability.phase_times import PhaseTimes
from worker.observability.stats import GroupBacklog, StatsWindow, gpu_fields, percentile

ROOT = Path(__file__).resolve().parents[1]
GPU_FIELDS = ("gpus", "gpu_util_pct", "gpu_mem_used_bytes", "gpu0_util_pct", "gpu0_power_w", "gpu0_temp_c")


# -- in process ---------------------------------------------------------------------------------------
def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    samples = [float(i) for i in range(1, 101)]
    assert percentile(samples, 0.5) == 50.0 and percentile(samples, 0.95) == 95.0
    assert percentile(list(reversed(samples)), 1.0) == 100.0


def test_window_rates_kv_steps_and_absent_readings() -> None:
    counters = LoopCounters()
    window = StatsWindow(5.0, counters, now_s=100.0)
    assert not window.due(104.9) and window.due(105.0)
    counters.done, counters.tokens, counters.prompt_tokens, counters.cached_tokens = 10, 400, 1000, 250
    capacity = EngineCapacity(
        running=3, decode_tokens=3, free_kv_tokens=160, total_kv_tokens=640, waiting=2, cached_kv_tokens=64
    )
    fields = window.close(
        "w1", counters, 105.0, [0.010, 0.002, 0.004, 0.020], capacity, 16,
        GroupBacklog(lag=7, pending=5), [],
    )  # fmt: skip
    assert fields == {
        "worker": "w1", "interval_s": 5.0, "requests_per_s": 2.0, "tokens_per_s": 80.0,
        "prefix_hit_rate": 0.25, "lag": 7, "pending": 5, "running": 3, "waiting": 2,
        "kv_blocks_used": 30, "kv_blocks_free": 10, "kv_blocks_total": 40, "kv_blocks_cached": 4,
        "steps": 4, "step_p50_ms": 4.0, "step_p95_ms": 20.0,
    }  # fmt: skip
    # The next interval starts where this one ended; what the worker does not know is absent.
    idle = EngineCapacity(running=0, decode_tokens=0, free_kv_tokens=None, total_kv_tokens=None)
    fields = window.close("w1", counters, 107.0, [], idle, 16, GroupBacklog(lag=None, pending=0), [])
    assert fields == {
        "worker": "w1", "interval_s": 2.0, "requests_per_s": 0.0, "tokens_per_s": 0.0, "pending": 0,
        "running": 0, "waiting": 0, "steps": 0,
    }  # fmt: skip


def test_stats_off_is_never_due() -> None:
    assert not StatsWindow(0.0, LoopCounters(), now_s=0.0).due(1e9)


def test_gpu_fields_per_device_and_over_all() -> None:
    gpus = [
        GpuSample(0, util_pct=90.0, mem_used_bytes=10, mem_total_bytes=80, power_w=350.5, temp_c=61.0),
        GpuSample(1, util_pct=50.0, mem_used_bytes=30, mem_total_bytes=80, power_w=None, temp_c=55.0),
    ]
    fields = gpu_fields(gpus)
    assert fields["gpus"] == 2 and fields["gpu_util_pct"] == 70.0
    assert fields["gpu_mem_used_bytes"] == 40 and fields["gpu_mem_total_bytes"] == 160
    assert fields["gpu0_power_w"] == 350.5 and "gpu1_power_w" not in fields and fields["gpu1_temp_c"] == 55.0
    assert gpu_fields([]) == {}


def test_phase_times_measure_steps_from_submit_to_collect() -> None:
    phases = PhaseTimes()
    phases.mark("housekeeping")
    phases.mark("submit")  # no step launched: no collect follows
    phases.mark("housekeeping")
    time.sleep(0.01)
    phases.mark("submit")
    phases.mark("publish")
    time.sleep(0.01)
    phases.mark("collect")
    steps = phases.take_steps()
    assert len(steps) == 1 and 0.02 <= steps[0] < 1.0
    assert phases.take_steps() == []


def test_gpu_telemetry_without_nvml_is_empty_and_quiet() -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has NVML; tests/gpu covers it")
    except Exception:
        pass
    telemetry = GpuTelemetry()
    assert telemetry.sample() == [] and telemetry.sample() == []


def test_stats_stream_stays_capped(redis_client: redis.Redis, prefix: str) -> None:
    stream = StreamNames.for_prefix(prefix).stats
    for i in range(1000):
        write_entry(redis_client, stream, {"worker": "w", "requests_per_s": float(i)}, max_entries=100)
    # MAXLEN ~ trims whole stream nodes (100 entries each by default): a little over the cap, never more.
    assert 100 <= redis_client.xlen(stream) <= 200
    last = redis_client.xrevrange(stream, count=1)[0][1]
    assert last == {b"worker": b"w", b"requests_per_s": b"999.0"}


# -- entries ahead of the clock ---------------------------------------------------------------------------
MAX_ID = "18446744073709551615-18446744073709551615"


def _ms(entry_id: bytes | str) -> int:
    return int((entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")[0])


def _now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def _poison(client: redis.Redis, stream: str, shape: str) -> None:
    """Put the stream's last id ahead of the clock, in one of the ways it can get there."""
    now = _now_ms(client)
    if shape == "max id":  # XADD * can go no further: it fails
        client.xadd(stream, {"worker": "evil"}, id=MAX_ID)
    elif shape == "max ms":  # XADD * still works, at that ms: every record dated in the year 584 million
        client.xadd(stream, {"worker": "evil"}, id="18446744073709551615-0")
    elif shape == "an hour ahead":
        client.xadd(stream, {"worker": "ghost"}, id=f"{now + 3_600_000}-0")
    elif shape == "many ahead":  # more than the cap, all ahead
        for i in range(150):
            client.xadd(stream, {"worker": f"ghost{i}"}, id=f"{now + 60_000 + i}-0")
    elif shape == "ahead, then deleted":  # no entry is ahead, but the stream's last id still is
        client.xadd(stream, {"worker": "ghost"}, id=f"{now + 600_000}-0")
        client.xdel(stream, f"{now + 600_000}-0")
    elif shape == "max id, then trimmed to it":
        client.xadd(stream, {"worker": "evil"}, id=MAX_ID)
        client.xtrim(stream, maxlen=1)
    else:
        raise AssertionError(shape)


POISON_SHAPES = [
    "max id",
    "max ms",
    "an hour ahead",
    "many ahead",
    "ahead, then deleted",
    "max id, then trimmed to it",
]


@pytest.mark.parametrize("shape", POISON_SHAPES)
def test_stats_writes_survive_a_stream_whose_last_id_is_ahead_of_the_clock(
    redis_client: redis.Redis, prefix: str, shape: str
) -> None:
    """Whatever put the last id ahead (an entry a non-worker wrote before the ACL said no, a clock
    that jumped back), the next write repairs the stream once: the record is written dated now, the
    entries ahead are gone, the good ones stay, and later writes need no repair."""
    stream = StreamNames.for_prefix(prefix).stats
    for i in range(5):
        write_entry(redis_client, stream, {"worker": f"w{i}", "n": i}, max_entries=100)
    _poison(redis_client, stream, shape)
    with capture_logs() as logs:
        entry_id = write_entry(redis_client, stream, {"worker": "w0", "n": 5}, max_entries=100)
        later = [
            write_entry(redis_client, stream, {"worker": "w1", "n": 6 + i}, max_entries=100) for i in range(3)
        ]
    now = _now_ms(redis_client)
    repaired = [e for e in logs if e["event"] == "stats_stream_repaired"]
    assert len(repaired) == 1 and repaired[0]["log_level"] == "warning", logs
    assert repaired[0]["key"] == stream and _ms(repaired[0]["last_id"]) > now + FUTURE_ALLOWANCE_MS
    assert repaired[0]["kept"] >= (0 if "trimmed" in shape else 5) and repaired[0]["dropped"] >= 0
    for written in [entry_id, *later]:
        assert now - 10_000 <= _ms(written) <= now + FUTURE_ALLOWANCE_MS, (written, now)
    entries = redis_client.xrange(stream)
    assert all(_ms(i) <= now + FUTURE_ALLOWANCE_MS for i, _ in entries), entries[-3:]
    assert entries[-1][1] == {b"worker": b"w1", b"n": b"8"}
    if "trimmed" not in shape:  # the five good records were kept, in order, with their ids
        assert [f[b"n"] for _, f in entries[:6]] == [b"0", b"1", b"2", b"3", b"4", b"5"]
    assert _ms(redis_client.xinfo_stream(stream)["last-generated-id"]) <= now + FUTURE_ALLOWANCE_MS


def test_stats_writes_ahead_within_the_allowance_or_refused_otherwise_are_left_alone(
    redis_client: redis.Redis, prefix: str
) -> None:
    """An id a little ahead is clock skew, not a bad entry: nothing is repaired. A refusal that has
    nothing to do with ids (a key of another type) is raised as it came, with nothing deleted."""
    stream = StreamNames.for_prefix(prefix).stats
    near = f"{_now_ms(redis_client) + FUTURE_ALLOWANCE_MS // 2}-0"
    redis_client.xadd(stream, {"worker": "near"}, id=near)
    with capture_logs() as logs:
        entry_id = write_entry(redis_client, stream, {"worker": "w"}, max_entries=100)
    assert _ms(entry_id) == _ms(near) and redis_client.xlen(stream) == 2
    assert not [e for e in logs if e["event"] == "stats_stream_repaired"]
    other = f"{prefix}:not-a-stream"
    redis_client.set(other, "x")
    with capture_logs() as logs, pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        write_entry(redis_client, other, {"worker": "w"}, max_entries=100)
    assert redis_client.get(other) == b"x" and not logs


def test_the_worker_acl_may_repair_the_stats_stream(
    redis_client: redis.Redis, redis_url: str, prefix: str
) -> None:
    """The repair runs as the workers' generated ACL user (its script's TIME, XINFO STREAM, DEL...)."""
    from worker.tools import acl

    user = f"stats-worker-{prefix}"
    redis_client.execute_command("ACL", "SETUSER", user, *acl.worker_rules("pw", prefix))
    scheme, rest = redis_url.split("://", 1)
    as_worker = redis.Redis.from_url(f"{scheme}://{user}:pw@{rest.split('@')[-1]}")
    try:
        stream = StreamNames.for_prefix(prefix).stats
        write_entry(as_worker, stream, {"worker": "w"}, max_entries=100)
        redis_client.xadd(stream, {"worker": "evil"}, id=MAX_ID)
        with capture_logs() as logs:
            write_entry(as_worker, stream, {"worker": "w"}, max_entries=100)
        assert [e["event"] for e in logs] == ["stats_stream_repaired"]
        assert redis_client.xlen(stream) == 2
    finally:
        as_worker.close()
        redis_client.execute_command("ACL", "DELUSER", user)


# -- a real worker ------------------------------------------------------------------------------------
def _load(client: ChatClient, stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        prompts = [f"one two three four five six seven eight {n} {i}" for i in range(8)]
        ids = client.submit_many([{"prompt": p, "max_tokens": 8} for p in prompts])
        client.results([i for i in ids if isinstance(i, str)])
        n += 1


def test_worker_writes_stats_under_load(start_worker, redis_url: str, redis_client, prefix: str) -> None:
    worker = start_worker("echo", stats_interval_s=0.5, echo_token_delay_ms=2, stats_max_entries=100)
    stop = threading.Event()
    client = ChatClient(redis_url, prefix=prefix, timeout_s=60)
    loader = threading.Thread(target=_load, args=(client, stop), daemon=True)
    loader.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(worker.events("worker_stats")) < 5:
            time.sleep(0.2)
        # A frame of the terminal view while the load runs.
        top = subprocess.run(
            [sys.executable, "-m", "worker.top", "--once", "--redis-url", redis_url, "--prefix", prefix],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        stop.set()
        loader.join(timeout=30)
        client.close()

    events = worker.events("worker_stats")
    assert len(events) >= 5, worker.log_path.read_text()[-3000:]
    busy = [e for e in events if e["requests_per_s"] > 0]
    assert busy, events
    for e in events:
        assert e["worker"] == worker.name and e["level"] == "info"
        assert 0.4 <= e["interval_s"] < 5
        assert isinstance(e["lag"], int) and isinstance(e["pending"], int) and e["pending"] >= 0
        assert isinstance(e["running"], int) and isinstance(e["waiting"], int)
        assert not any(f in e for f in GPU_FIELDS)  # no GPU on this machine
    from test_logging_schema import check, documented  # every field is on docs/logging.md, typed

    common, documented_events = documented()
    assert not [p for e in events for p in check(e, common, documented_events)]
    e = busy[-1]
    assert e["tokens_per_s"] > 0 and e["steps"] > 0
    assert 0 < e["step_p50_ms"] <= e["step_p95_ms"] < 5000
    assert e["prefix_hit_rate"] == 0.0  # the echo engine caches nothing

    entries = redis_client.xrange(StreamNames.for_prefix(prefix).stats)
    assert len(entries) >= len(events) - 1 and len(entries) <= 200
    fields = {k.decode(): v.decode() for k, v in entries[-1][1].items()}
    assert fields["worker"] == worker.name
    assert (fields["engine"], fields["model"]) == ("echo", "none")  # what the gateway's /v1/models lists
    assert {"requests_per_s", "tokens_per_s", "lag", "pending", "running", "waiting", "steps"} <= set(fields)
    assert int(fields["lag"]) >= 0 and not any(f in fields for f in GPU_FIELDS)

    assert top.returncode == 0, top.stderr
    row = next(line for line in top.stdout.splitlines() if worker.name in line)
    cells = [x.replace(",", "") for x in row.split()]
    numbers = [float(x) for x in cells if x.replace(".", "").isdigit()]
    assert any(n > 0 for n in numbers), top.stdout  # its rates
    assert "total (1)" in top.stdout and "req/s" in top.stdout and "step p95 ms" in top.stdout


def test_a_worker_keeps_writing_stats_after_an_entry_at_the_largest_id(
    start_worker, redis_client: redis.Redis, prefix: str
) -> None:
    """The reported case: after an entry at the largest id every XADD * fails. The worker repairs the
    stream once (`stats_stream_repaired`) and goes on writing, never `stats_not_written`."""
    worker = start_worker("echo", stats_interval_s=0.3)
    stream = StreamNames.for_prefix(prefix).stats
    deadline = time.monotonic() + 30
    while not redis_client.xlen(stream):
        assert time.monotonic() < deadline, worker.log_path.read_text()[-3000:]
        time.sleep(0.1)
    redis_client.xadd(stream, {"worker": "evil"}, id=MAX_ID)
    deadline = time.monotonic() + 30
    while not worker.events("stats_stream_repaired") or len(worker.events("worker_stats")) < 3:
        assert time.monotonic() < deadline, worker.log_path.read_text()[-3000:]
        time.sleep(0.1)
    time.sleep(0.5)  # a write or two after the repair
    assert [e["event"] for e in worker.events("stats_stream_repaired")] == ["stats_stream_repaired"]
    assert not worker.events("stats_not_written")
    last = redis_client.xrevrange(stream, count=1)[0]
    assert last[1][b"worker"] == worker.name.encode()
    assert _ms(last[0]) <= _now_ms(redis_client) + FUTURE_ALLOWANCE_MS
    assert not [f for _, f in redis_client.xrange(stream) if f.get(b"worker") == b"evil"]


def test_stats_group_backlog_reads_lag_and_pending(redis_client: redis.Redis, prefix: str) -> None:
    names = StreamNames.for_prefix(prefix)
    redis_client.xgroup_create(names.requests, "workers", id="0", mkstream=True)
    for i in range(3):
        redis_client.xadd(names.requests, {"n": str(i)})
    redis_client.xreadgroup("workers", "c1", {names.requests: ">"}, count=1)
    backlog = group_backlog(redis_client, names.requests, "workers")
    assert backlog is not None and backlog.pending == 1 and backlog.lag in (2, None)
    assert group_backlog(redis_client, names.requests, "other") is None


class _IdleEngine:
    def capacity(self) -> EngineCapacity:
        return EngineCapacity(running=0, decode_tokens=0, free_kv_tokens=None, total_kv_tokens=None)

    def describe(self) -> dict[str, str | int]:
        return {"model": "none"}


def test_stats_without_redis_are_logged_and_skipped(prefix: str) -> None:
    from worker.observability.live_stats import LiveStats
    from worker.settings import WorkerSettings

    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)  # nothing listens
    settings = WorkerSettings(redis_url="redis://127.0.0.1:1/0", stats_interval_s=0.01, consumer_name="w")
    stats = LiveStats(client, StreamNames.for_prefix(prefix), settings, _IdleEngine(), LoopCounters(),
                      PhaseTimes())  # type: ignore[arg-type]  # fmt: skip
    time.sleep(0.02)
    with capture_logs() as logs:
        fields = stats.tick()  # does not raise
    assert fields is not None and fields["worker"] == "w" and "lag" not in fields
    events = [e["event"] for e in logs if e["event"] != "gpu_telemetry_unavailable"]
    assert events == ["stats_not_written", "worker_stats"]


def test_dashboard_reads_fields_that_worker_stats_has() -> None:
    dashboard = json.loads((ROOT / "k8s" / "base" / "dashboards" / "llm-workers.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queried = {f for e in exprs if 'event="worker_stats"' in e for f in re.findall(r"unwrap (\w+)", e)}
    panels = {"lag", "pending", "kv_blocks_used", "prefix_hit_rate", "gpu_util_pct", "gpu_mem_used_bytes"}
    assert panels <= queried
    counters = LoopCounters(done=1, tokens=4, prompt_tokens=10, cached_tokens=5)
    capacity = EngineCapacity(
        running=1, decode_tokens=1, free_kv_tokens=32, total_kv_tokens=64, cached_kv_tokens=16
    )
    gpu = GpuSample(0, util_pct=50.0, mem_used_bytes=1, mem_total_bytes=2, power_w=100.0, temp_c=40.0)
    fields = StatsWindow(1.0, LoopCounters(), 0.0).close(
        "w", counters, 1.0, [0.001], capacity, 16, GroupBacklog(0, 0), [gpu]
    )
    assert queried <= set(fields), queried - set(fields)
