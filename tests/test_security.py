"""Security: ACL users with minimal rights, TLS end to end, bounded inputs, no code from data."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from test_acl_redis7 import shared_redis7

from producer.client import ChatClient, ChatError
from producer.wire.limits import MAX_MESSAGES, MAX_TOKENS_CAP
from producer.wire.models import ErrorCode, new_request_id
from worker.local_redis.server import EmbeddedRedis, free_port
from worker.settings import WorkerSettings
from worker.tools import acl

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class AclServer:
    """A server with the users `python -m worker.acl worker` and `producer --no-tenants` generate."""

    address: str  # host:port/db
    prefix: str
    worker: str  # user names
    producer: str
    admin: redis.Redis

    def url(self, user: str, password: str) -> str:
        return f"redis://{user}:{password}@{self.address}"


def spawn_worker(url: str, prefix: str, log_path: Path, **settings: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, REDIS_URL=url, LLM_PREFIX=prefix, LLM_ENGINE="echo", PYTHONUNBUFFERED="1")
    env.update({f"LLM_{k.upper()}": v for k, v in settings.items()})
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.fixture(params=["valkey", "redis-7.0"])
def acl_server(request: pytest.FixtureRequest) -> Iterator[AclServer]:
    """Valkey (private, its default user then password-protected) or the shared Redis 7.0 (users and
    keys of this test's own, deleted at the end: `test_acl_redis7.py`)."""
    if request.param == "valkey":
        with EmbeddedRedis() as server:
            admin = redis.Redis(port=server.port)
            for user, rules in (
                ("llm-worker", acl.worker_rules("wpw", "sec")),
                ("llm-producer", acl.shared_producer_rules("ppw", "sec")),
            ):
                assert admin.execute_command(*shlex.split(acl.setuser(user, rules))) == b"OK"
            admin.execute_command("ACL", "SETUSER", "default", "on", ">adminpw")
            admin.close()
            admin = redis.Redis(port=server.port, password="adminpw")
            try:
                yield AclServer(f"127.0.0.1:{server.port}/0", "sec", "llm-worker", "llm-producer", admin)
            finally:
                admin.close()
        return
    shared = shared_redis7()
    try:
        worker, producer = shared.user("llm-worker"), shared.user("llm-producer")
        assert shared.load(acl.setuser(worker, acl.worker_rules("wpw", shared.prefix))) == b"OK"
        assert shared.load(acl.setuser(producer, acl.shared_producer_rules("ppw", shared.prefix))) == b"OK"
        yield AclServer(shared.url_base, shared.prefix, worker, producer, shared.admin)
    finally:
        shared.close()


def test_acl_restricted_users_work_end_to_end(acl_server: AclServer, tmp_path: Path) -> None:
    """The generated worker and producer (`--no-tenants`) users serve a chat, a cancel, trim and reclaim
    rounds and stats; the producer may read the workers' stats stream and may not write it, and may not
    touch a request id's claim, which the worker writes."""
    s = acl_server
    stats = f"{s.prefix}:stats"
    worker = spawn_worker(
        s.url(s.worker, "wpw"),
        s.prefix,
        tmp_path / "w.log",
        heartbeat_interval_s="0.3",
        heartbeat_ttl_s="1",
        read_block_ms="200",
        reclaim_interval_s="0.3",
        reclaim_min_idle_ms="1000",
        trim_interval_s="0.2",
        echo_token_delay_ms="50",
        stats_interval_s="0.2",
    )
    client = ChatClient(s.url(s.producer, "ppw"), prefix=s.prefix, timeout_s=30)
    try:
        served = client.chat([{"role": "user", "content": "through acl"}], max_tokens=8)
        assert served.text == "through acl"
        rid = client.submit([{"role": "user", "content": " ".join(["x"] * 100)}], max_tokens=200)
        time.sleep(0.5)
        assert client.cancel(rid)
        with pytest.raises(ChatError) as info:
            client.result(rid)
        assert info.value.code == ErrorCode.CANCELLED
        time.sleep(1.0)  # let a trim and a reclaim round run under the restricted user
        assert worker.poll() is None, (tmp_path / "w.log").read_text()[-2000:]
        as_worker = redis.Redis.from_url(s.url(s.worker, "wpw"))
        for forbidden in (
            lambda: as_worker.get("other:key"),
            lambda: as_worker.flushall(),
            lambda: as_worker.config_get("*"),
            lambda: as_worker.keys("*"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
        as_producer = redis.Redis.from_url(s.url(s.producer, "ppw"))
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_producer.xreadgroup("workers", "evil", {f"{s.prefix}:requests": ">"})
        # The workers' stats: the producer reads them (the gateway's /v1/models), writes none.
        records = as_producer.xrevrange(stats, count=10)
        assert records and all(fields.get(b"worker") for _, fields in records)
        top = b"18446744073709551615-18446744073709551615"
        for write in (
            lambda: as_producer.xadd(stats, {"worker": "forged"}),
            lambda: as_producer.xadd(stats, {"worker": "forged"}, id=top),
            lambda: as_producer.set(stats, "x"),
            lambda: as_producer.expire(stats, 1),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                write()
        sha = s.admin.script_load("return redis.call('XADD', KEYS[1], '*', 'worker', 'forged')")
        with pytest.raises(redis.exceptions.ResponseError, match="(?i)no permissions|NOPERM"):
            as_producer.evalsha(sha, 1, stats)
        assert as_producer.xadd(f"{s.prefix}:statsx", {"a": "b"})  # its neighbours are ordinary keys
        # Claims: the worker took the served request's (under its user); the producer can neither read,
        # take, replace nor delete one, so it cannot own a victim's id before the victim's entry is read.
        claim, fresh = f"{s.prefix}:claim:{served.id}", f"{s.prefix}:claim:{new_request_id()}"
        assert s.admin.exists(claim)
        for call in (
            lambda: as_producer.set(fresh, "0" * 32 + " 1-0", nx=True),
            lambda: as_producer.set(claim, "0" * 32 + " 1-0"),
            lambda: as_producer.get(claim),
            lambda: as_producer.delete(claim),
            lambda: as_producer.expire(claim, 1),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                call()
        taker = s.admin.script_load("return redis.call('SET', KEYS[1], ARGV[1])")
        with pytest.raises(redis.exceptions.ResponseError, match="(?i)no permissions|NOPERM"):
            as_producer.evalsha(taker, 1, fresh, "0" * 32 + " 1-0")
        assert as_worker.set(fresh, "0" * 32 + " 1-0", nx=True, ex=60) and as_worker.get(fresh)
        assert as_worker.evalsha(taker, 1, fresh, "1" * 32 + " 1-0") == b"OK"
        as_worker.close()
        assert not [f for _, f in s.admin.xrange(stats) if f.get(b"worker") == b"forged"]
        as_producer.close()
        log = (tmp_path / "w.log").read_text()
        assert "NOPERM" not in log and "Traceback" not in log and "stats_not_written" not in log, log[-2000:]
        assert '"worker_stats"' in log
    finally:
        assert stop(worker) == 0
        client.close()


def _tls_redis_server() -> str | None:
    """A redis-server binary built with TLS (the packaged valkey-server is not), or None."""
    path = shutil.which("redis-server")
    if not path or not shutil.which("openssl"):
        return None
    out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    return path if "libssl" in out else None


def test_tls_end_to_end(tmp_path: Path) -> None:
    binary = _tls_redis_server()
    if binary is None:
        pytest.skip("no redis-server with TLS support on this machine")
    ca, key, crt = tmp_path / "ca.crt", tmp_path / "server.key", tmp_path / "server.crt"
    run = lambda *args: subprocess.run(args, check=True, capture_output=True, cwd=tmp_path)  # noqa: E731
    run(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        str(ca),
    )
    run(
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        "server.csr",
    )
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "openssl",
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        str(ca),
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        str(crt),
    )
    port = free_port()
    server = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(crt),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(ca),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
    worker = None
    try:
        probe = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "TLS server did not start"
                time.sleep(0.1)
        with pytest.raises(redis.ConnectionError):  # plain text is refused on the TLS port
            redis.Redis(port=port, socket_timeout=2).ping()
        worker = spawn_worker(url, "tls", tmp_path / "w.log")
        with ChatClient(url, prefix="tls", timeout_s=60) as client:
            assert client.chat([{"role": "user", "content": "over tls"}], max_tokens=8).text == "over tls"
    finally:
        if worker is not None:
            assert stop(worker) == 0
        server.terminate()
        server.wait()


def test_request_ids_are_unguessable_128_bit() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_reply_to_cannot_point_outside_the_reply_namespace(
    start_worker, redis_client: redis.Redis, chat_client: ChatClient, prefix: str
) -> None:
    start_worker("echo")
    for n, target in enumerate((f"{prefix}:requests", "victim:key")):
        with pytest.raises(ValueError):
            chat_client.submit([{"role": "user", "content": "hi"}], reply_to=target)
        body = json.dumps({"id": f"hostile-{n}", "prompt": "hi", "reply_to": target})
        redis_client.xadd(f"{prefix}:requests", {"v": "1", "ct": "json", "body": body})
        with pytest.raises(ChatError) as info:
            chat_client.result(f"hostile-{n}", timeout_s=30)  # answered on the default channel
        assert info.value.code == ErrorCode.INVALID_REQUEST
    assert not redis_client.exists("victim:key")
    assert all(
        b"v" in fields for _, fields in redis_client.xrange(f"{prefix}:requests")
    )  # no reply went there


def test_inputs_are_bounded_before_model_work(start_worker, chat_client: ChatClient) -> None:
    worker = start_worker("echo", max_prompt_tokens=64, max_body_bytes=4096)
    cases = [
        ({"messages": [{"role": "user", "content": "x" * 5000}]}, ErrorCode.TOO_LONG),  # body bytes
        ({"messages": [{"role": "user", "content": "y" * 100}]}, ErrorCode.TOO_LONG),  # prompt tokens
    ]
    for params, code in cases:
        with pytest.raises(ChatError) as info:
            chat_client.chat(timeout_s=30, **params)
        assert info.value.code == code
    with pytest.raises(ValueError):  # the client refuses before sending
        chat_client.submit([{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1))
    with pytest.raises(ValueError):
        chat_client.submit([{"role": "user", "content": "x"}], max_tokens=MAX_TOKENS_CAP + 1)
    assert not worker.events("request_done")  # nothing reached the engine


def test_no_pickle_eval_or_remote_code_by_default() -> None:
    assert WorkerSettings().trust_remote_code is False
    offenders = []
    patterns = [
        r"\bimport pickle\b",
        r"\bpickle\.",
        r"(?<![.\w])eval\(",
        r"(?<![.\w])exec\(",
        r"trust_remote_code\s*=\s*True",
        r"torch\.load\((?![^)]*weights_only=True)",
    ]
    for path in [
        *ROOT.glob("producer/**/*.py"),
        *ROOT.glob("worker/**/*.py"),
        *ROOT.glob("scheduler/**/*.py"),
    ]:
        text = path.read_text()
        offenders += [f"{path.relative_to(ROOT)}: {p}" for p in patterns if re.search(p, text)]
    assert not offenders, offenders
