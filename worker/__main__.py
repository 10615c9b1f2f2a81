"""`python -m worker`: run one worker process.

Configured by environment variables, listed below with their defaults (docs/configuration.md has the
same table); an option overrides its variable. A bad value exits 2 with one `config_invalid` line.
"""

from __future__ import annotations

import os

# The output is JSON lines only: no progress bars (transformers' "Loading weights", a GGUF conversion's).
# tqdm reads its environment when first imported, below; the engine process inherits both.
os.environ["TQDM_DISABLE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
# Idle OpenMP threads sleep rather than spin on cores that the worker's other threads (and, on a shared
# host, other processes) need: read when torch loads, below (see `worker/engine/host_cpus.py`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import signal
import sys
from contextlib import ExitStack
from types import FrameType

import pydantic
import structlog

from producer.config_errors import CONFIG_ERROR_EXIT, config_error_fields, invalid_setting
from producer.logs import configure_logging
from producer.wire.redis_factory import connect
from worker.engine.cuda_allocator import allocator_defaults
from worker.engine_process.client import EngineProcessDied
from worker.engine_process.launch import open_engine
from worker.local_redis.server import local_server
from worker.loop.consumer import Consumer
from worker.observability.gpu_telemetry import GpuTelemetry
from worker.observability.health import WorkerHealth
from worker.observability.metrics import WorkerMetrics
from worker.observability.metrics_server import MetricsServer
from worker.settings import WorkerSettings
from worker.tools.config_doc import settings_help

log = structlog.get_logger("worker")
OPTIONS = {"engine": "--engine", "model": "--model", "redis_url": "--redis-url"}


class ShutdownFlag:
    """Warm, then cold shutdown, as RQ does.

    The first SIGTERM/SIGINT sets the flag: the loop stops reading, hands back what has
    not started and drains what runs (`Consumer.shutdown`), then exits 0. A second
    signal exits at once with 128+signum; nothing is lost, because every entry it held
    is still pending in Redis and is reclaimed (or replayed by its restart).
    """

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise SystemExit(128 + signum)
        self.requested = True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m worker",
        description=__doc__,
        epilog=f"settings (environment variables):\n{settings_help(WorkerSettings)}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--engine", choices=["paged", "static", "echo", "hf"], help="override LLM_ENGINE")
    p.add_argument("--model", help="override MODEL")
    p.add_argument("--redis-url", help="override REDIS_URL")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {
        k: v
        for k, v in {"engine": args.engine, "model": args.model, "redis_url": args.redis_url}.items()
        if v is not None
    }
    try:
        settings = WorkerSettings(**overrides)
        check_device(settings)
        allocator_defaults(settings.weights)
    except pydantic.ValidationError as exc:
        configure_logging("info")
        options = {k: OPTIONS[k] for k in overrides}
        log.error("config_invalid", **config_error_fields(exc, WorkerSettings, options))
        return CONFIG_ERROR_EXIT
    configure_logging(settings.log_level)
    for env, old, new in settings.deprecations():
        log.warning("setting_deprecated", setting=env, value=old, means=new)
    flag = ShutdownFlag()
    signal.signal(signal.SIGTERM, flag)
    signal.signal(signal.SIGINT, flag)
    with ExitStack() as stack:
        url = settings.resolved_redis_url()
        if settings.redis_url is None:
            # The address clients default to; serve it ourselves only if no one does.
            server = local_server(settings.local_redis_port)
            if server is not None:
                stack.callback(server.stop)
                log.info("embedded_redis_started", address=server.url, port=server.port)
        client = connect(
            url,
            settings.redis_cluster,
            socket_timeout=settings.read_block_ms / 1000 + 10,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        health = WorkerHealth(settings.heartbeat_ttl_s)
        metrics = start_metrics(settings, health, stack)
        try:
            engine = open_engine(settings)
        except Exception:
            health.engine_ok = False
            raise
        stack.callback(engine.close)
        try:
            Consumer(client, engine, settings, metrics, health).run(lambda: flag.requested)
        except EngineProcessDied as exc:
            # The entries this worker held stay pending; a live worker (or this pod's restart) reclaims them.
            log.error("worker_exiting", reason=str(exc)[:200])
            return 1
    return 0


def check_device(settings: WorkerSettings) -> None:
    """Refuse, as a bad setting, a CUDA device this machine lacks (the settings check only its syntax;
    torch would fail later with a traceback). The echo engine uses no device."""
    if settings.engine == "echo" or not settings.device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(settings.device.partition(":")[2] or 0)
    if index < count:
        return
    if count == 0:
        expected = "'auto' or 'cpu': this machine has no CUDA device"
    else:
        expected = f"'auto', 'cpu', 'cuda' or 'cuda:N', N < {count}: this machine has {count} CUDA devices"
    raise invalid_setting(WorkerSettings, "device", settings.device, expected)


def start_metrics(settings: WorkerSettings, health: WorkerHealth, stack: ExitStack) -> WorkerMetrics | None:
    """The metrics port, when `LLM_METRICS_PORT` is set; a port that cannot be bound is logged, not fatal
    (the worker serves without metrics rather than not at all)."""
    if not settings.metrics_port:
        return None
    tenants = [t for t in settings.tenant_list() if t is not None]
    gpus = GpuTelemetry()
    stack.callback(gpus.close)
    metrics = WorkerMetrics(tenants, gpus.sample)
    try:
        server = MetricsServer(metrics, health, settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        log.warning(
            "metrics_unavailable", port=settings.metrics_port, error=f"{type(exc).__name__}: {exc}"[:200]
        )
        return None
    stack.callback(server.close)
    log.info("metrics_started", address=f"{settings.metrics_host}:{server.port}", port=server.port)
    return metrics


if __name__ == "__main__":
    sys.exit(main())
