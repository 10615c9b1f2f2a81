"""Shared fixtures: a real Redis-compatible server, worker processes, clients.

Tests use `REDIS_URL` when set; otherwise one private server (the packaged
valkey-server) is started for the session. Each test gets its own key prefix, so
tests never see each other's streams.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which must be
# chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from worker_process import WorkerProcess, spawn_worker

from producer.client import ChatClient
from worker.local_redis.server import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture()
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture()
def rq_conn(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    """RQ's connection for bulk jobs; the job reads the service's Redis (and a signing key) from the RQ
    worker's environment, as in production."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture()
def start_worker(redis_url: str, prefix: str, tmp_path: Path) -> Iterator:
    """Factory: start_worker(engine="echo", **env_settings) -> WorkerProcess (already serving)."""
    started: list[WorkerProcess] = []

    def start(engine: str = "echo", wait: bool = True, **settings: object) -> WorkerProcess:
        name = f"w{len(started)}-{uuid.uuid4().hex[:6]}"
        worker = spawn_worker(redis_url, prefix, tmp_path, name, engine, wait=False, **settings)
        started.append(worker)
        if wait:
            worker.wait_started()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture()
def chat_client(redis_url: str, prefix: str) -> Iterator[ChatClient]:
    client = ChatClient(redis_url, prefix=prefix, timeout_s=300)
    yield client
    client.close()
