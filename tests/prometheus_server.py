"""A real Prometheus server for the tests: Debian's `prometheus` package, unpacked by `make install`.

`PrometheusServer(targets)` writes a config that scrapes the given `host:port` targets every 200 ms,
starts the server on a free port with its data in a temporary directory, and answers PromQL through
its HTTP API (`query`). `promtool()` is the path of the package's rule checker. Both are found in the
venv (`.venv/prometheus/usr/bin`), else on PATH; tests skip when neither has them.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "prometheus" / "usr" / "bin"
SCRAPE_INTERVAL = "200ms"


def binary(name: str) -> str | None:
    """The path of `prometheus` or `promtool`: the venv's copy, else PATH's; None when absent."""
    local = VENV_BIN / name
    if local.is_file():
        return str(local)
    return shutil.which(name)


def promtool() -> str | None:
    return binary("promtool")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """A private Prometheus scraping `targets`; use as a context manager."""

    def __init__(self, targets: list[str], job: str = "llm-worker") -> None:
        path = binary("prometheus")
        if path is None:
            raise FileNotFoundError("prometheus is not installed (make install unpacks Debian's package)")
        self.path = path
        self.targets = targets
        self.job = job
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="prometheus-")
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrometheusServer:
        root = Path(self._dir.name)
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "scrape_configs": [
                {"job_name": self.job, "scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                 "static_configs": [{"targets": self.targets}]}
            ],
        }  # fmt: skip
        (root / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self._log = open(root / "server.log", "wb")  # noqa: SIM115 (closed in __exit__)
        self._proc = subprocess.Popen(
            [self.path, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if self._proc.poll() is not None:
                break
            time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"prometheus did not start: {(root / 'server.log').read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        self._dir.cleanup()

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar) result of `promql` now: a list of {metric, value} entries."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise RuntimeError(f"{promql}: {body}")
        result = body["data"]["result"]
        if body["data"]["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def value(self, promql: str) -> float | None:
        """The single value of `promql` now (None when the result is empty)."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) != 1:
            raise AssertionError(f"{promql}: {len(result)} series, expected one: {result}")
        return float(result[0]["value"][1])

    def wait_for(self, promql: str, predicate: Any, timeout_s: float = 20.0) -> float | None:
        """Poll `value(promql)` until `predicate(value)` holds; returns the last value seen."""
        deadline = time.monotonic() + timeout_s
        seen = None
        while time.monotonic() < deadline:
            seen = self.value(promql)
            if predicate(seen):
                return seen
            time.sleep(0.2)
        raise AssertionError(f"{promql}: last value {seen} never satisfied the condition in {timeout_s}s")

    def targets_up(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as resp:
            return list(json.loads(resp.read())["data"]["activeTargets"])
