"""`GatewayProcess`: a real `python -m producer.gateway` started by a test, its JSON log lines captured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from worker.local_redis.server import EmbeddedRedis, free_port

if TYPE_CHECKING:
    from worker_process import WorkerProcess

ROOT = Path(__file__).resolve().parents[2]


class GatewayProcess:
    """The gateway on a free port of 127.0.0.1, with `REDIS_URL`, `LLM_PREFIX` and `env` set."""

    def __init__(self, redis_url: str, prefix: str, log_dir: Path, *args: str, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"gateway-{self.port}.log"
        self.err_path = log_dir / f"gateway-{self.port}.err"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
        full_env.update(
            REDIS_URL=redis_url,
            LLM_PREFIX=prefix,
            PYTHONUNBUFFERED="1",
            LLM_GATEWAY_STATS_REFRESH_S="0.2",
            LLM_GATEWAY_DEFAULT_MODEL="echo",
        )
        full_env.update(env)
        with open(self.log_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "producer.gateway", "--port", str(self.port), *args],
                cwd=ROOT,
                env=full_env,
                stdout=out,
                stderr=err,
            )

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if name is None or event.get("event") == name:
                    out.append(event)
        return out

    def wait_started(self, timeout_s: float = 30.0) -> GatewayProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"gateway did not start:\n{self.output()[-3000:]}")

    def wait_model(self, model: str = "echo", timeout_s: float = 30.0, headers: dict | None = None) -> None:
        """Until a live worker serving `model` shows in /v1/models (its first stats record is in)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = httpx.get(f"{self.v1}/models", headers=headers, timeout=5).json()
            if model in [m["id"] for m in got.get("data", [])]:
                return
            time.sleep(0.1)
        raise TimeoutError(f"no worker serving {model} showed up:\n{self.output()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> GatewayProcess:
        return self.wait_started()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_worker(redis_url: str, prefix: str, log_dir: Path, engine: str = "echo", **settings: object):
    """A `python -m worker` serving `prefix` (as the `start_worker` fixture, for wider scopes), reporting
    stats every 0.5 s so the gateway sees it at once."""
    from worker_process import spawn_worker

    settings.setdefault("stats_interval_s", 0.5)
    return spawn_worker(redis_url, prefix, log_dir, f"w-{free_port()}", engine, **settings)


@contextmanager
def private_stack(
    prefix: str, log_dir: Path, **gateway_env: str
) -> Iterator[tuple[EmbeddedRedis, WorkerProcess, GatewayProcess]]:
    """A Redis server, an echo worker and a gateway of their own, for a test that stops the server or the
    worker; whatever the test left running is stopped at the end."""
    server = EmbeddedRedis().start()
    worker = gateway = None
    try:
        worker = start_worker(server.url, prefix, log_dir, max_wait_ms=0)
        gateway = GatewayProcess(server.url, prefix, log_dir, **gateway_env).wait_started()
        gateway.wait_model("echo")
        yield server, worker, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        if worker is not None:
            worker.stop()
        server.stop()
