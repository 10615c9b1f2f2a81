"""Redis faults: kill -9 and restart of a private AOF server mid-run; nothing it kept is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from producer.client import ChatClient
from worker.local_redis.server import free_port, server_binary

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def start_server(port: int, data_dir: Path) -> subprocess.Popen[bytes]:
    """A server that fsyncs every write to its AOF, so whatever it acknowledged survives kill -9."""
    proc = subprocess.Popen(
        [
            str(server_binary()),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            client.ping()
            return proc
        except (redis.ConnectionError, redis.BusyLoadingError):
            time.sleep(0.05)
    raise RuntimeError("server did not start")


@pytest.mark.parametrize("async_replies", ["false", "true"], ids=["inline-writes", "background-writes"])
def test_redis_restart_mid_run(tmp_path: Path, async_replies: str) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_server(port, tmp_path)
    log_path = tmp_path / "worker.log"
    env = dict(
        os.environ,
        REDIS_URL=url,
        LLM_PREFIX="rr",
        LLM_ENGINE="echo",
        LLM_ECHO_TOKEN_DELAY_MS="20",
        LLM_CONSUMER_NAME="w-restart",
        PYTHONUNBUFFERED="1",
        LLM_RECONNECT_BACKOFF_MAX_MS="500",
        LLM_ASYNC_REPLIES=async_replies,  # replies written by the loop, or by its writer thread
    )
    with open(log_path, "wb") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    client = ChatClient(url, prefix="rr", timeout_s=120, reconnect_backoff_max_ms=500)
    submitted: list[tuple[str, str]] = []
    done_submitting = threading.Event()

    def produce() -> None:
        for i in range(300):
            text = f"req {i} " + " ".join(f"t{j}" for j in range(i % 12))
            submitted.append(
                (client.submit([{"role": "user", "content": text}], max_tokens=32), text.strip())
            )
            time.sleep(0.01)
        done_submitting.set()

    producer = threading.Thread(target=produce)
    try:
        producer.start()
        while len(submitted) < 100:
            time.sleep(0.01)
        server.send_signal(signal.SIGKILL)
        server.wait()
        killed_at = time.monotonic()
        time.sleep(1.5)
        server = start_server(port, tmp_path)
        restarted_after = time.monotonic() - killed_at
        assert done_submitting.wait(120)
        producer.join()
        lost = duplicates = 0
        for rid, text in submitted:
            events = list(client.events(rid, timeout_s=60))
            finals = [e for e in events if e.type != "token"]
            duplicates += len(finals) > 1
            lost += not finals
            assert finals[0].type == "done" and finals[0].text == text
        recovered_after = time.monotonic() - killed_at
        log = log_path.read_text()
        print(
            f"\nREDIS_RESTART requests={len(submitted)} lost={lost} duplicates={duplicates} "
            f"outage_s={restarted_after:.2f} all_answered_s={recovered_after:.2f} "
            f"worker_backoffs={log.count('redis_unavailable')}"
        )
        assert (lost, duplicates) == (0, 0)
        assert worker.poll() is None, "the worker died instead of reconnecting"
        # No assertion on `redis_unavailable`: redis-py's own retry (reconnect with backoff) may ride out a
        # 1.5 s outage before the loop sees an error (`worker_backoffs=0`, 2 runs in 8 here). Either way the
        # server is a new process, and every request sent during and after the outage was answered once.
        assert log.count('"worker_started"') == 1, "the worker restarted instead of reconnecting"
    finally:
        producer.join(timeout=5)
        worker.send_signal(signal.SIGTERM)
        try:
            assert worker.wait(timeout=30) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
            client.close()
            server.terminate()
            server.wait()
