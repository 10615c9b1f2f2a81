"""Fixtures of the gateway suite: one echo worker and one open gateway shared by the whole session.

Tests that need other settings (a slow worker, tenants, a model, SIGTERM) start their own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from gateway_process import GatewayProcess, start_worker
from worker_process import WorkerProcess

# The shared worker refuses prompts over this many tokens (the echo engine counts bytes): `too_long`.
MAX_PROMPT_TOKENS = 300


@dataclass
class Deployment:
    redis_url: str
    prefix: str
    worker: WorkerProcess
    gateway: GatewayProcess


@pytest.fixture(scope="session")
def echo_deployment(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """An echo worker and an open gateway (no keys file) on a prefix of their own."""
    prefix = f"gw{uuid.uuid4().hex[:8]}"
    logs = tmp_path_factory.mktemp("echo-deployment")
    worker = start_worker(redis_url, prefix, logs, max_prompt_tokens=MAX_PROMPT_TOKENS, max_wait_ms=0)
    gateway = GatewayProcess(redis_url, prefix, logs).wait_started()
    try:
        gateway.wait_model("echo")
        yield Deployment(redis_url, prefix, worker, gateway)
    finally:
        gateway.stop()
        worker.stop()
