"""`WorkerProcess`: a worker started by a test, with its JSON log lines captured to a file.

Its own module (not `conftest.py`) so test modules can import it: `tests/gpu/` has a
`conftest.py` too, and a plain `from conftest import ...` may find that one first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class WorkerProcess:
    """A `python -m worker` subprocess whose JSON log lines are captured to a file."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    name: str
    env: dict[str, str] = field(default_factory=dict)

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    def wait_started(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.events("worker_started"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"worker exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            time.sleep(0.1)
        raise TimeoutError(f"worker did not start:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def worker_acl_url(redis_url: str, prefix: str) -> str:
    """With `LLM_TEST_WORKER_ACL=1`, workers connect as a user with exactly the ACL that
    `python -m worker.acl worker` generates for the test's prefix (clients stay the default user)."""
    from worker.tools.acl import worker_rules

    user, password = f"worker-{prefix}", "test-worker-pw"
    admin = redis.Redis.from_url(redis_url)
    try:
        admin.execute_command("ACL", "SETUSER", user, *worker_rules(password, prefix))
    finally:
        admin.close()
    scheme, rest = redis_url.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest}"


def spawn_worker(
    redis_url: str, prefix: str, log_dir: Path, name: str, engine: str = "echo", wait: bool = True,
    **settings: object,
) -> WorkerProcess:  # fmt: skip
    """`python -m worker` named `name` on `prefix`, its log lines in `log_dir/<name>.log`; each setting
    as its `LLM_<NAME>` variable. With `LLM_TEST_WORKER_ACL` set, it connects under the worker ACL."""
    env = dict(os.environ)
    env.update(
        REDIS_URL=redis_url, LLM_PREFIX=prefix, LLM_ENGINE=engine, LLM_CONSUMER_NAME=name, HF_HUB_OFFLINE="1",
        TQDM_DISABLE="1", PYTHONUNBUFFERED="1",
        LLM_METRICS_PORT="0",  # many workers per test run: a test that wants the port passes metrics_port
    )  # fmt: skip
    env.update({f"LLM_{k.upper()}": str(v) for k, v in settings.items()})
    if os.environ.get("LLM_TEST_WORKER_ACL"):
        env["REDIS_URL"] = worker_acl_url(redis_url, prefix)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    worker = WorkerProcess(proc, log_path, name, env)
    if wait:
        worker.wait_started()
    return worker
