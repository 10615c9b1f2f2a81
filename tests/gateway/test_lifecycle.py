"""Nothing orphaned: a caller that leaves, a deadline that passes or a drain that runs out cancels the request
on the wire (the slow echo worker logs `request_cancelled`); SIGTERM lets open streams finish; a bad
setting exits 2 with one `config_invalid` line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from gateway_process import ROOT, GatewayProcess, start_worker
from worker_process import WorkerProcess

pytestmark = pytest.mark.timeout(120)

TOKEN_DELAY_MS = 30


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def is_content(line: str) -> bool:
    """An SSE line of a chunk carrying text (not the opening one with the role)."""
    return line.startswith("data: ") and '"content":"' in line and '"role"' not in line


def chat(n_words: int, **fields: object) -> dict:
    return {
        "model": "echo",
        "messages": [{"role": "user", "content": words(n_words)}],
        "stream": True,
        **fields,
    }


@pytest.fixture(scope="module")
def slow(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, WorkerProcess, Path]]:
    """An echo worker that takes TOKEN_DELAY_MS per token, on a prefix of its own."""
    prefix = f"gwl{uuid.uuid4().hex[:8]}"
    logs = tmp_path_factory.mktemp("slow")
    worker = start_worker(redis_url, prefix, logs, echo_token_delay_ms=TOKEN_DELAY_MS, max_wait_ms=0)
    yield prefix, worker, logs
    worker.stop()


@pytest.fixture(scope="module")
def gw(redis_url: str, slow: tuple[str, WorkerProcess, Path]) -> Iterator[GatewayProcess]:
    prefix, _, logs = slow
    with GatewayProcess(redis_url, prefix, logs) as gateway:
        gateway.wait_model()
        yield gateway


def wait_cancelled(worker: WorkerProcess, request_id: str, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [e for e in worker.events("request_cancelled") if e["id"] == request_id]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"the worker did not cancel {request_id}")


def test_a_client_that_leaves_mid_stream_cancels_its_request(gw: GatewayProcess, slow: tuple) -> None:
    worker: WorkerProcess = slow[1]
    with (
        httpx.Client(timeout=30) as http,
        http.stream(
            "POST", f"{gw.v1}/chat/completions", json=chat(200), headers={"X-Request-Id": "leaves-mid-stream"}
        ) as response,
    ):
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if is_content(line):
                seen += 1
            if seen == 2:
                break  # and close the connection with the stream unfinished
    assert wait_cancelled(worker, "leaves-mid-stream")["state"] == "running"
    deadline = time.monotonic() + 5
    while not [e for e in gw.events("gateway_request_done") if e["request_id"] == "leaves-mid-stream"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    done = [e for e in gw.events("gateway_request_done") if e["request_id"] == "leaves-mid-stream"][0]
    assert done["cancelled"] is True and done["disconnected"] is True


def test_a_client_that_stops_waiting_for_a_whole_answer_cancels_it(gw: GatewayProcess, slow: tuple) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gw.v1}/chat/completions",
            json=chat(200, stream=False),
            headers={"X-Request-Id": "stops-waiting"},
            timeout=httpx.Timeout(30, read=0.4),
        )
    wait_cancelled(slow[1], "stops-waiting")


def test_a_request_id_in_progress_is_409_for_a_second_caller(gw: GatewayProcess) -> None:
    headers = {"X-Request-Id": "twice-at-once"}
    with httpx.stream(
        "POST", f"{gw.v1}/chat/completions", json=chat(40), headers=headers, timeout=30
    ) as first:
        assert first.status_code == 200
        second = httpx.post(f"{gw.v1}/chat/completions", json=chat(40), headers=headers, timeout=30)
        assert second.status_code == 409 and second.json()["error"]["code"] == "duplicate_request_id"
        assert "data: [DONE]" in list(first.iter_lines())


def test_a_deadline_passing_mid_stream_ends_it_with_an_error_event(gw: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": words(200)}],
        stream=True,
        extra_body={"timeout_ms": 300},
    )
    texts = []
    with pytest.raises(openai.APIError) as ended:
        for chunk in stream:
            texts.append(chunk.choices[0].delta.content or "")
    assert ended.value.code in ("deadline_exceeded", "timeout")
    assert "".join(texts).startswith("w0 w1")


def test_sigterm_lets_open_streams_finish(redis_url: str, slow: tuple) -> None:
    prefix, _, logs = slow
    gateway = GatewayProcess(redis_url, prefix, logs, "--drain-s", "20").wait_started()
    gateway.wait_model()
    first = threading.Event()
    result: dict = {}

    def read() -> None:
        with httpx.stream("POST", f"{gateway.v1}/chat/completions", json=chat(40), timeout=30) as response:
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                if is_content(line):
                    first.set()
            result["lines"] = lines

    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(10)
    gateway.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while True:  # the listening socket closes at once
        try:
            httpx.get(f"{gateway.url}/health", timeout=0.5)
        except httpx.TransportError:
            break  # refused, or accepted just before the socket closed and left unanswered
        assert time.monotonic() < deadline, "still accepting after SIGTERM"
        time.sleep(0.05)
    reader.join(30)
    lines = [line for line in result["lines"] if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in lines[:-1]
        if '"choices":[{' in line
    )
    assert text == words(40)
    assert gateway.proc.wait(30) == 0
    assert gateway.events("gateway_draining") and gateway.events("gateway_stopped")


def test_a_drain_that_runs_out_cancels_what_is_left(redis_url: str, slow: tuple) -> None:
    prefix, worker, logs = slow
    gateway = GatewayProcess(redis_url, prefix, logs, "--drain-s", "1").wait_started()
    gateway.wait_model()
    first = threading.Event()

    def read() -> None:
        try:
            with httpx.stream(
                "POST", f"{gateway.v1}/chat/completions", json=chat(300),
                headers={"X-Request-Id": "drain-cut"}, timeout=30,
            ) as response:  # fmt: skip
                for line in response.iter_lines():
                    if is_content(line):
                        first.set()
        except httpx.HTTPError:
            pass  # the stream is cut

    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(10)
    started = time.monotonic()
    gateway.proc.send_signal(signal.SIGTERM)
    assert gateway.proc.wait(30) == 0
    assert time.monotonic() - started < 8  # 1 s of drain, then the cancel and the shutdown
    reader.join(10)
    wait_cancelled(worker, "drain-cut")
    assert gateway.events("gateway_stopped")


def _config_error(args: list[str], **env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LLM_") and k != "REDIS_URL"}
    full.update(env)
    proc = subprocess.run(
        [sys.executable, "-m", "producer.gateway", *args], cwd=ROOT, env=full, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stdout + proc.stderr, (proc.stdout, proc.stderr)
    event = json.loads(lines[0])
    assert (event["event"], event["level"]) == ("config_invalid", "error")
    return event


def test_bad_settings_exit_2_with_one_config_invalid_line(tmp_path: Path) -> None:
    assert _config_error(["--port", "0"])["env"] == "--port"
    drain = _config_error([], LLM_GATEWAY_DRAIN_S="soon")
    assert (drain["env"], drain["value"], drain["settings"]) == (
        "LLM_GATEWAY_DRAIN_S",
        "soon",
        "GatewaySettings",
    )
    assert _config_error([], REDIS_URL="nonsense")["env"] == "REDIS_URL"
    assert _config_error(["--redis-url", "redis://:secret@host:notaport"])["env"] == "--redis-url"
    missing = _config_error([], LLM_GATEWAY_KEYS_FILE=str(tmp_path / "nope.jsonl"))
    assert missing["env"] == "LLM_GATEWAY_KEYS_FILE" and "cannot read" in missing["expected"]
    bad = tmp_path / "keys.jsonl"
    bad.write_text('{"key_sha256": "abc", "tenant": "alice", "redis_user": "a", "redis_password": "b"}\n')
    assert "key_sha256" in _config_error(["--keys-file", str(bad)])["expected"]
