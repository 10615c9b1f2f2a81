"""`make loadtest`, shortened: the same script, its own Redis and echo worker, 5 s with 2 users; and the
HTTP users (`loadtest/locustfile_openai.py`) through a real gateway and echo worker."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway.gateway_process import GatewayProcess, start_worker
from worker_process import WorkerProcess

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


# The HTTP run's worker refuses prompts over this many tokens (the echo engine counts bytes): `too_long`.
HTTP_MAX_PROMPT_TOKENS = 300
HTTP_USERS = 3


@pytest.fixture(scope="module")
def http_stack(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, GatewayProcess]]:
    """An echo worker and an open gateway on a prefix of their own."""
    prefix = f"lt{uuid.uuid4().hex[:8]}"
    logs = tmp_path_factory.mktemp("http-loadtest")
    worker = start_worker(redis_url, prefix, logs, max_prompt_tokens=HTTP_MAX_PROMPT_TOKENS, max_wait_ms=0)
    gateway = GatewayProcess(redis_url, prefix, logs).wait_started()
    try:
        gateway.wait_model("echo")
        yield worker, gateway
    finally:
        gateway.stop()
        worker.stop()


def _chats_seen(worker: WorkerProcess, gateway: GatewayProcess) -> tuple[int, int, int]:
    """Chat completions the gateway answered, requests the worker served and it refused, so far."""
    received = sum(e.get("path") == "/v1/chat/completions" for e in gateway.events("gateway_request_done"))
    return received, len(worker.events("request_done")), len(worker.events("request_rejected"))


# (stream, user turn words max): short turns all fit; long ones are refused `too_long` by the worker
# about half the time (the system prompt is 16 words, so 300 bytes is about 60 words of turn), which the
# gateway answers `context_length_exceeded`.
@pytest.mark.parametrize(
    ("stream", "user_words_max"), [("true", 40), ("false", 40), ("true", 512), ("false", 512)]
)
def test_locust_http_users_count_each_chat_once(
    http_stack: tuple[WorkerProcess, GatewayProcess], tmp_path: Path, stream: str, user_words_max: int
) -> None:
    worker, gateway = http_stack
    before = _chats_seen(worker, gateway)
    csv_prefix = tmp_path / "locust"
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile_openai.py",
         "--host", gateway.url, "--headless", "-u", str(HTTP_USERS), "-r", str(HTTP_USERS), "-t", "2s",
         "--stop-timeout", "10", "--only-summary", "--csv", str(csv_prefix), "--html", f"{csv_prefix}.html",
         "--system-tokens", "16", "--user-tokens-max", str(user_words_max), "--llm-max-tokens", "8",
         "--llm-stream", stream],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    with open(f"{csv_prefix}_failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    with open(f"{csv_prefix}_latency.csv", newline="") as f:
        samples = {row["Name"]: row for row in csv.DictReader(f)}

    # One request per chat, and nothing else: no row per HTTP exchange, none for the model lookup.
    assert set(rows) == {"chat", "Aggregated"}, rows
    assert rows["chat"]["Type"] == "http"
    chats, failed = int(rows["chat"]["Request Count"]), int(rows["chat"]["Failure Count"])
    assert chats > 0 and int(rows["Aggregated"]["Request Count"]) == chats, rows
    assert int(rows["Aggregated"]["Failure Count"]) == failed
    assert run.returncode == (1 if failed else 0), run.stdout[-3000:] + run.stderr[-3000:]

    # The chats counted are the chats the gateway received and the worker answered (served or refused).
    deadline = time.monotonic() + 10  # the logs' last lines may follow Locust's exit by a moment
    while True:
        received, served, refused = (a - b for a, b in zip(_chats_seen(worker, gateway), before, strict=True))
        if (received, served + refused) == (chats, chats) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (received, served + refused) == (chats, chats), (received, served, refused, rows)
    assert (chats - failed, failed) == (served, refused), (rows, served, refused)
    if user_words_max > 100:
        assert 0 < failed < chats, rows  # both kinds in the mix
        too_long = ("chat", "ServiceError('context_length_exceeded')")
        assert {(f["Name"], f["Error"]) for f in failures} == {too_long}, failures
        assert sum(int(f["Occurrences"]) for f in failures) == failed
    else:
        assert failed == 0 and failures == [], failures

    # HTTP-level timings are latency samples: one model lookup per user, one exchange per answered chat.
    assert int(samples["models"]["Sample Count"]) == HTTP_USERS, samples
    assert chats - failed <= int(samples["chat_http"]["Sample Count"]) <= chats, samples
    assert all(row["Type"] == "http" for row in samples.values()), samples
    if stream == "true":
        assert int(samples["ttft"]["Sample Count"]) == chats - failed, samples
        assert int(samples["tpot"]["Sample Count"]) == chats - failed, samples  # 8 tokens each
    else:
        assert set(samples) == {"models", "chat_http"}, samples
    html = Path(f"{csv_prefix}.html").read_text()
    reported = [int(n) for n in re.findall(r'"num_requests": ?(\d+)', html)]
    assert reported and max(reported) == chats, reported
    assert "Latency samples (not requests)" in html and ">chat_http<" in html and ">models<" in html
