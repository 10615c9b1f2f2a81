"""`loadtest/service_bench.py` open loop, end to end at toy scale: its own valkey server, one echo worker
(`python -m worker`, no model, so a row takes seconds), W1's requests sent at Poisson arrival times after
the offline row that measures the capacity, all rows on that one worker."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "loadtest" / "service_bench.py"
REQUESTS = 24
RATES = (8.0, 16.0)

pytestmark = pytest.mark.timeout(150)


def test_open_loop_rows_answer_every_request_at_the_rate_asked(tmp_path: Path) -> None:
    out, png = tmp_path / "open_loop.json", tmp_path / "open_loop.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_") and k != "REDIS_URL"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--engine", "echo", "--skip-engine", "--requests", str(REQUESTS),
         "--request-rate", ",".join(map(str, RATES)), "--capacity-fractions", "0.5", "--goodput-search", "1",
         "--json-out", str(out), "--plot", str(png)],
        cwd=ROOT, env=env | {"PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=140,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    offline, *rows = report["results"]

    assert offline["system"] == "service" and offline["answered"] == offline["requests"] == REQUESTS
    capacity = offline["capacity_rate"]
    assert capacity == pytest.approx(REQUESTS / offline["wall_s"])
    assert 3 <= len(rows) <= 4  # the rates asked, half the capacity, and at most one search row
    asked = [r["request_rate"] for r in rows]
    assert asked[:3] == pytest.approx(sorted([*RATES, capacity / 2]))  # in order, then the search's
    assert all(min(asked[:3]) < rate < max(asked[:3]) for rate in asked[3:])  # between two tested rates
    for row in rows:
        assert row["system"] == "service, open loop"
        assert row["answered"] == row["requests"] == REQUESTS and row["errors"] == 0, row
        assert row["offered_rate"] == pytest.approx(row["request_rate"])  # the gaps are scaled to it
        assert 0.5 <= row["achieved_rate"] / row["request_rate"] <= 1.5, row
        for name in ("ttft", "client_ttft", "tpot", "e2e"):
            assert 0 <= row[f"{name}_p50_ms"] <= row[f"{name}_p99_ms"], (name, row)
        # The client's wait holds the worker's (XADD to first token, ms-rounded), and the whole reply.
        assert row["client_ttft_p50_ms"] >= row["ttft_p50_ms"] - 2, row
        assert row["e2e_p50_ms"] >= row["client_ttft_p50_ms"], row
        assert row["capacity_fraction"] == pytest.approx(row["request_rate"] / capacity)
        slo = report["goodput"]
        met = row["client_ttft_p99_ms"] <= slo["ttft_slo_ms"] and row["tpot_p99_ms"] <= slo["tpot_slo_ms"]
        assert row["meets_slo"] == met, row

    found = report["goodput"]
    passing = [r for r in rows if r["meets_slo"]]
    if found["rate"] is None:
        assert not passing
    else:
        best = max(passing, key=lambda r: r["request_rate"])
        assert found["rate"] == best["request_rate"] in asked
        assert found["ratio_to_offline"] == pytest.approx(best["output_tok_s"] / offline["output_tok_s"])
    assert "goodput" in run.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0
