"""Worker processes for the benchmarks: `python -m worker` with settings as `LLM_*` variables, its JSON log
in a file, started when the log says `worker_started`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spawn_worker(
    url: str,
    prefix: str,
    settings: Mapping[str, object],
    log_path: Path,
    wrap: Sequence[str] = (),
    python_args: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start a worker on `url` under `prefix`, each of `settings` as `LLM_<NAME>` (upper case), stdout and
    stderr into `log_path`; `wrap` goes before the interpreter (`taskset -c 0`), `python_args` after it
    (`-m cProfile -o out.prof`). Returns at once: `wait_started` waits for it."""
    env = {**os.environ, "REDIS_URL": url, "LLM_PREFIX": prefix, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update({f"LLM_{k.upper()}": str(v) for k, v in settings.items()})
    cmd = [*wrap, sys.executable, *python_args, "-m", "worker"]
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_started(procs: Sequence[subprocess.Popen[bytes]], logs: Sequence[Path], timeout_s: float) -> None:
    """Until every worker's log has `worker_started`; kills them all and exits with the first failing
    one's log tail when one exits or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    for proc, log in zip(procs, logs, strict=True):
        while '"worker_started"' not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited {proc.returncode}"
                    if proc.poll() is not None
                    else f"not started in {timeout_s:g} s"
                )
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                raise SystemExit(f"worker {log.stem} {why}:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
