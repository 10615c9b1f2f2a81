"""A tenant's excess load is shed by the workers and reaches its HTTP callers as 429 `overloaded`.

With a keys file the gateway sends a tenant's requests as that tenant's ACL user, which may not read
the request stream's backlog: it skips the admission check and appends every request. The worker
measures the backlog (lag + pending) every `backlog_check_interval_ms` and answers what is over
`max_backlog_requests` `overloaded` (worker/loop/backpressure.py, `requests_shed`).

The worker here runs one sequence at a time and holds at most one more (`max_waiting_requests=1`), so
everything else stays unread in the stream where the backlog check can shed it; each request takes
about a second (`TOKEN_DELAY_MS` per word), far longer than the burst takes to arrive. So the first
requests are served (200) and the rest of the burst, beyond the limit, is shed (429 with Retry-After),
and the number of 429s is exactly what the worker logged as shed.
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier

import httpx
import pytest
import redis
from gateway_process import GatewayProcess, start_worker

from producer.gateway.api_keys import hash_key
from worker.local_redis.server import EmbeddedRedis
from worker.tools import acl

pytestmark = pytest.mark.timeout(120)

TENANT, PASSWORD, KEY = "dave", "dave-pw", "sk-dave-0123456789"
TOKEN_DELAY_MS = 100
WORDS = 10  # the echo engine answers one word per step: about WORDS * TOKEN_DELAY_MS per request
BURST = 16
MAX_BACKLOG = 2


def test_a_tenants_burst_is_shed_by_the_worker_as_429(tmp_path: Path) -> None:
    prefix = f"gwo{uuid.uuid4().hex[:8]}"
    text = " ".join(f"w{i}" for i in range(WORDS))
    with EmbeddedRedis() as server:
        admin = redis.Redis(port=server.port)
        try:
            admin.execute_command("ACL", "SETUSER", TENANT, *acl.producer_rules(TENANT, PASSWORD, prefix))
        finally:
            admin.close()
        keys = tmp_path / "keys.jsonl"
        entry = {"key_sha256": hash_key(KEY), "tenant": TENANT, "redis_user": TENANT}
        keys.write_text(json.dumps({**entry, "redis_password": PASSWORD}) + "\n")
        worker = start_worker(
            server.url, prefix, tmp_path, tenants=TENANT, echo_token_delay_ms=TOKEN_DELAY_MS, max_wait_ms=0,
            max_num_seqs=1, max_waiting_requests=1, max_backlog_requests=MAX_BACKLOG,
            backlog_check_interval_ms=10,
        )  # fmt: skip
        headers = {"Authorization": f"Bearer {KEY}"}
        try:
            with GatewayProcess(server.url, prefix, tmp_path, "--keys-file", str(keys)) as gateway:
                gateway.wait_model(headers=headers)
                start = Barrier(BURST)

                def ask(i: int) -> httpx.Response:
                    body = {"model": "echo", "messages": [{"role": "user", "content": text}]}
                    body["stream"] = i % 2 == 1  # half streamed: refused before any output, also 429
                    start.wait(timeout=30)
                    return httpx.post(
                        f"{gateway.v1}/chat/completions", json=body, headers=headers, timeout=60
                    )

                with ThreadPoolExecutor(BURST) as pool:
                    answers = list(pool.map(ask, range(BURST)))
        finally:
            worker.stop()
    assert worker.proc.returncode == 0
    shed = sum(e["count"] for e in worker.events("requests_shed"))

    statuses = [a.status_code for a in answers]
    assert set(statuses) == {200, 429}, [(a.status_code, a.text[:200]) for a in answers]
    for i, answer in enumerate(answers):
        if answer.status_code == 429:
            assert answer.headers["retry-after"] == "1"
            assert answer.headers["content-type"].startswith("application/json")
            error = answer.json()["error"]
            assert (error["type"], error["code"], error["param"]) == ("rate_limit_error", "overloaded", None)
            assert "backlog" in error["message"]
        elif i % 2:
            assert answer.headers["content-type"].startswith("text/event-stream")
            assert answer.text.rstrip().endswith("data: [DONE]")
        else:
            assert answer.json()["choices"][0]["message"]["content"] == text
    assert {i % 2 for i, a in enumerate(answers) if a.status_code == 429} == {0, 1}  # streamed ones too
    # Every 429 is the worker's: the gateway refused nothing itself.
    assert statuses.count(429) == shed
    logged = [e for e in gateway.events("gateway_request_done") if e.get("error") == "overloaded"]
    assert len(logged) == shed and {e["tenant"] for e in logged} == {TENANT}
