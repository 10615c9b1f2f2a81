"""API keys -> tenants through the gateway, with Redis ACLs still in force behind it.

A private server gets the users `python -m worker.acl` prints (alice, bob, the workers) plus the
gateway's own user, which may only PING and read the workers' stats. The gateway's keys file maps
one key to alice (user and password), one to bob (a whole URL), and one to a tenant `carol` that is
given alice's credentials: Redis refuses alice's user carol's keys, so that key gets a 500, never a
request in carol's (or anyone else's) namespace.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import redis
from gateway_process import GatewayProcess, start_worker
from worker_process import WorkerProcess

from producer.gateway.api_keys import hash_key
from producer.wire.keys import StreamNames
from worker.local_redis.server import EmbeddedRedis
from worker.tools import acl

pytestmark = pytest.mark.timeout(120)

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "llm-worker": "worker-pw", "llm-gateway": "gateway-pw"}
KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-0123456789", "carol": "sk-carol-0123456789"}


@dataclass
class Tenants:
    server: EmbeddedRedis
    prefix: str
    worker: WorkerProcess
    gateway: GatewayProcess

    def url(self, user: str) -> str:
        return f"redis://{user}:{PASSWORDS[user]}@127.0.0.1:{self.server.port}/0"

    def client(self, tenant: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.v1, api_key=KEYS[tenant], max_retries=0)


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    prefix = f"gwt{uuid.uuid4().hex[:8]}"
    logs: Path = tmp_path_factory.mktemp("tenants")
    gateway_rules = ["reset", "on", f">{PASSWORDS['llm-gateway']}", "resetchannels", "-@all", "+ping",
                     "+xrevrange", f"%R~{prefix}:stats"]  # fmt: skip
    lines = [
        acl.setuser("alice", acl.producer_rules("alice", PASSWORDS["alice"], prefix)),
        acl.setuser("bob", acl.producer_rules("bob", PASSWORDS["bob"], prefix)),
        acl.setuser("llm-worker", acl.worker_rules(PASSWORDS["llm-worker"], prefix)),
    ]
    keys = logs / "keys.jsonl"
    with EmbeddedRedis() as server:
        admin = redis.Redis(port=server.port)
        for line in lines:
            assert admin.execute_command(*shlex.split(line)) == b"OK"
        assert admin.execute_command("ACL", "SETUSER", "llm-gateway", *gateway_rules) == b"OK"
        admin.execute_command("ACL", "SETUSER", "default", "on", ">admin-pw")
        admin.close()
        entries = [
            {"key_sha256": hash_key(KEYS["alice"]), "tenant": "alice", "redis_user": "alice",
             "redis_password": PASSWORDS["alice"], "name": "alice-backend"},
            {"key_sha256": hash_key(KEYS["bob"]), "tenant": "bob",
             "redis_url": f"redis://bob:{PASSWORDS['bob']}@127.0.0.1:{server.port}/0"},
            {"key_sha256": hash_key(KEYS["carol"]), "tenant": "carol", "redis_user": "alice",
             "redis_password": PASSWORDS["alice"]},
        ]  # fmt: skip
        keys.write_text("# the gateway's keys\n" + "\n".join(json.dumps(e) for e in entries) + "\n")
        worker_url = f"redis://llm-worker:{PASSWORDS['llm-worker']}@127.0.0.1:{server.port}/0"
        worker = start_worker(
            worker_url, prefix, logs, tenants="alice,bob", echo_token_delay_ms=20, max_wait_ms=0
        )
        gateway_url = f"redis://llm-gateway:{PASSWORDS['llm-gateway']}@127.0.0.1:{server.port}/0"
        gateway = GatewayProcess(gateway_url, prefix, logs, "--keys-file", str(keys)).wait_started()
        try:
            gateway.wait_model(headers={"Authorization": f"Bearer {KEYS['alice']}"})
            yield Tenants(server, prefix, worker, gateway)
        finally:
            gateway.stop()
            worker.stop()


def test_a_missing_or_wrong_key_is_401(tenants: Tenants) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    url = f"{tenants.gateway.v1}/chat/completions"
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {KEYS['alice']}"}):
        refused = httpx.post(url, json=body, headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{tenants.gateway.v1}/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tenants.gateway.v1, api_key="sk-nope", max_retries=0).models.list()
    assert httpx.get(f"{tenants.gateway.url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{tenants.gateway.url}/ready").status_code == 200


def test_each_key_writes_into_its_tenants_namespace(tenants: Tenants) -> None:
    ask = [{"role": "user", "content": "whose request is this"}]
    for tenant in ("alice", "bob"):
        client = tenants.client(tenant)
        assert client.chat.completions.create(model="echo", messages=ask).choices[0].message.content == (
            "whose request is this"
        )
        streamed = client.chat.completions.create(model="echo", messages=ask, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == "whose request is this"
    admin = redis.Redis(port=tenants.server.port, password="admin-pw")
    try:
        for tenant in ("alice", "bob"):
            assert admin.xlen(StreamNames.for_prefix(tenants.prefix, tenant).requests) == 2
        assert not admin.exists(f"{tenants.prefix}:requests")  # nothing in the un-tenanted namespace
    finally:
        admin.close()
    served = {e["tenant"] for e in tenants.worker.events("request_done")}
    assert {"alice", "bob"} <= served
    logged = {e.get("tenant") for e in tenants.gateway.events("gateway_request_done")}
    assert {"alice", "bob"} <= logged


def test_the_same_request_id_in_two_tenants_is_two_requests(tenants: Tenants) -> None:
    def ask(tenant: str) -> str:
        reply = tenants.client(tenant).chat.completions.create(
            model="echo", messages=[{"role": "user", "content": f"{tenant} asks"}],
            extra_headers={"X-Request-Id": "shared-id-1"},
        )  # fmt: skip
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(ask, ["alice", "bob"])) == ["alice asks", "bob asks"]


def test_acls_hold_behind_the_gateway(tenants: Tenants) -> None:
    """carol's key names alice's Redis user: Redis refuses it carol's keys, the gateway answers 500."""
    with pytest.raises(openai.InternalServerError) as refused:
        tenants.client("carol").chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "x"}]
        )
    assert refused.value.code == "internal_error"
    admin = redis.Redis(port=tenants.server.port, password="admin-pw")
    try:
        assert not admin.keys(f"{tenants.prefix}:t:{{carol*")
    finally:
        admin.close()
    assert "Traceback" not in tenants.gateway.output()
    # and the others are still served
    alice = tenants.client("alice").chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "ok"}]
    )
    assert alice.choices[0].message.content == "ok"


def test_a_tenants_client_that_leaves_cancels_through_its_cancel_stream(tenants: Tenants) -> None:
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": " ".join(["w"] * 300)}]}
    headers = {"Authorization": f"Bearer {KEYS['alice']}", "X-Request-Id": "alice-leaves"}
    with httpx.stream(
        "POST", f"{tenants.gateway.v1}/chat/completions", json=body, headers=headers
    ) as response:
        for line in response.iter_lines():
            if '"content":"w"' in line:
                break
    deadline = time.monotonic() + 10
    while not [e for e in tenants.worker.events("request_cancelled") if e["id"] == "alice-leaves"]:
        assert time.monotonic() < deadline, "the worker did not cancel alice's request"
        time.sleep(0.05)
