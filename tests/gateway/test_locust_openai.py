"""The Locust HTTP user (`loadtest/locustfile_openai.py`) against the real gateway and an echo worker."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("stream", ["true", "false"])
def test_locust_http_users_run_through_the_gateway_without_failures(
    echo_deployment, tmp_path: Path, stream
) -> None:
    csv_prefix = tmp_path / "locust"
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile_openai.py",
         "--host", echo_deployment.gateway.url, "--headless", "-u", "2", "-r", "2", "-t", "4s",
         "--only-summary", "--csv", str(csv_prefix),
         "--system-tokens", "16", "--user-tokens-max", "64", "--llm-max-tokens", "8", "--llm-stream", stream],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["chat"]["Request Count"]) > 0, rows
    with open(f"{csv_prefix}_latency.csv", newline="") as f:
        samples = {row["Name"] for row in csv.DictReader(f)}  # latency samples, not requests
    assert ("ttft" in samples) == (stream == "true"), samples
    assert all(int(row["Failure Count"]) == 0 for row in rows.values()), rows
    assert float(rows["chat"]["Average Content Size"]) == 8  # completion tokens, from usage
