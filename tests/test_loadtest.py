"""`make loadtest`, shortened: the same script, its own Redis and echo worker, 5 s with 2 users."""

from __future__ import annotations

import csv
import json
import os
import re
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
    assert {"locust_latency.csv"} <= {p.name for p in report.iterdir()}
    with open(report / "locust_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["Aggregated"]["Failure Count"]) == 0, rows
    assert all(int(row["Failure Count"]) == 0 for row in rows.values())
    with open(report / "locust_failures.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []

    # Requests are the chats the users sent (each answered once: `request_done` in the worker's log),
    # and nothing else: the latency samples are not requests.
    chats = int(rows["chat"]["Request Count"])
    done = [
        line for line in (report / "worker.log").read_text().splitlines()
        if line.startswith("{") and json.loads(line).get("event") == "request_done"
    ]  # fmt: skip
    assert set(rows) == {"chat", "Aggregated"}, rows
    assert chats > 0 and chats == len(done) == int(rows["Aggregated"]["Request Count"]), (rows, len(done))
    assert float(rows["Aggregated"]["Requests/s"]) == float(rows["chat"]["Requests/s"])
    html = (report / "locust.html").read_text()
    reported = [int(n) for n in re.findall(r'"num_requests": ?(\d+)', html)]
    assert reported and max(reported) == chats, reported  # the HTML's Aggregated row

    # TTFT and TPOT are still reported, apart: one sample per streamed chat (TPOT: 2+ tokens).
    with open(report / "locust_latency.csv", newline="") as f:
        samples = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(samples["ttft"]["Sample Count"]) == chats, samples
    assert 0 < int(samples["tpot"]["Sample Count"]) <= chats, samples
    assert float(samples["ttft"]["Median (ms)"]) >= 0 and float(samples["ttft"]["99% (ms)"]) > 0
    assert "Latency samples (not requests)" in html and ">ttft<" in html and ">tpot<" in html
    assert "latency" in run.stdout and "ttft" in run.stdout


def test_loadtest_help_lists_the_locustfile_options() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    options = ("--no-worker", "--report-dir", "--llm-prefix", "--llm-max-tokens", "--llm-stream", "--seed")
    for option in options:
        assert option in run.stdout, option
