"""`make loadtest`, shortened: the same script, its own Redis and echo worker, 5 s with 2 users."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "loadtest" / "run_locust.py"

pytestmark = pytest.mark.timeout(120)


def _env() -> dict[str, str]:
    # As `make loadtest` on a laptop: no REDIS_URL, so the script starts a private server.
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LLM_REDIS_URL", "LLM_PREFIX")}
    return env | {"PYTHONUNBUFFERED": "1"}


def test_make_loadtest_runs_and_reports_no_failures(tmp_path: Path) -> None:
    report = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--run-time", "5s", "--users", "2", "--spawn-rate", "2",
         "--report-dir", str(report)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert {"locust_stats.csv", "locust_failures.csv", "locust.html", "worker.log"} <= {
        p.name for p in report.iterdir()
    }
    with open(report / "locust_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["chat"]["Request Count"]) > 0 and int(rows["ttft"]["Request Count"]) > 0, rows
    assert int(rows["Aggregated"]["Failure Count"]) == 0, rows
    assert all(int(row["Failure Count"]) == 0 for row in rows.values())
    with open(report / "locust_failures.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []


def test_loadtest_help_lists_the_locustfile_options() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    options = ("--no-worker", "--report-dir", "--llm-prefix", "--llm-max-tokens", "--llm-stream", "--seed")
    for option in options:
        assert option in run.stdout, option
