"""`WorkerProcess`: a worker started by a test, with its JSON log lines captured to a file.

Its own module (not `conftest.py`) so test modules can import it: `tests/gpu/` has a
`conftest.py` too, and a plain `from conftest import ...` may find that one first.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

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
