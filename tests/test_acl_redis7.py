"""The generated ACL users on Redis 7.0, the oldest server the README supports.

The rest of the suite runs on the packaged Valkey 8.1, which knows every command of Redis 7.2; Redis
7.0 refuses a whole `ACL SETUSER` line over one command it lacks (`+client|setinfo`). These tests use
the Redis 7.0 server at 127.0.0.1:6379 (`LLM_TEST_REDIS7_URL` to name another; CI runs the same): it
is shared, so each test uses a key prefix and user names of its own, and deletes those users (ACL
DELUSER) and the keys under that prefix at the end, touching nothing else there. Without such a
server they are skipped, except under CI (`CI` set), where that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from test_live_stats import POISON_SHAPES, _poison
from worker_process import WorkerProcess, spawn_worker

from producer.client import ChatClient, ChatError
from producer.wire.keys import StreamNames
from producer.wire.models import ErrorCode
from worker.observability.live_stats import FUTURE_ALLOWANCE_MS, write_entry
from worker.tools import acl

pytestmark = pytest.mark.timeout(240)

REDIS7_URL = os.environ.get("LLM_TEST_REDIS7_URL", "redis://127.0.0.1:6379/0")
FAST = {"heartbeat_interval_s": "0.3", "heartbeat_ttl_s": "1", "read_block_ms": "200",
        "reclaim_interval_s": "0.3", "reclaim_min_idle_ms": "1000", "trim_interval_s": "0.2",
        "stats_interval_s": "0.3"}  # fmt: skip


def server_version(client: redis.Redis) -> tuple[int, int]:
    """(major, minor) of the server's `redis_version` (Valkey reports the Redis version it matches)."""
    return acl.parse_version(str(client.info("server")["redis_version"]))


def redis7_admin() -> redis.Redis:
    """A connection to the shared Redis 7.0 as its default user; the test is skipped without one."""
    client = redis.Redis.from_url(REDIS7_URL, socket_connect_timeout=2, socket_timeout=10)
    try:
        version = server_version(client)
    except (redis.RedisError, ValueError) as exc:
        client.close()
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no Redis 7 server at {REDIS7_URL}: {exc}")
    if version != (7, 0):
        client.close()
        if os.environ.get("CI"):
            raise AssertionError(f"{REDIS7_URL} is Redis {version}, not 7.0")
        pytest.skip(f"{REDIS7_URL} is Redis {version}, not 7.0")
    return client


@dataclass
class SharedServer:
    """One test's part of a shared server: users named `<name>-<tag>`, keys under `acl7<tag>:`. `close`
    deletes exactly those."""

    admin: redis.Redis
    url_base: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    users: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"acl7{self.tag}"

    def user(self, name: str) -> str:
        """The server-wide name of this test's user `name` (recorded for deletion before it exists)."""
        unique = f"{name}-{self.tag}"
        if unique not in self.users:
            self.users.append(unique)
        return unique

    def load(self, line: str) -> object:
        """Run one generated `ACL SETUSER` line as an operator pastes it into redis-cli."""
        words = shlex.split(line)
        assert words[:2] == ["ACL", "SETUSER"] and words[2] in self.users, words[:3]
        return self.admin.execute_command(*words)

    def url(self, user: str, password: str) -> str:
        return f"redis://{user}:{password}@{self.url_base}"

    def close(self) -> None:
        try:
            if self.users:
                self.admin.execute_command("ACL", "DELUSER", *self.users)
            keys = list(self.admin.scan_iter(match=f"{self.prefix}:*", count=1000))
            for start in range(0, len(keys), 500):
                self.admin.delete(*keys[start : start + 500])
        finally:
            self.admin.close()


def shared_redis7() -> SharedServer:
    parts = urlsplit(REDIS7_URL)
    base = f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}{parts.path or '/0'}"
    return SharedServer(redis7_admin(), base)


@pytest.fixture()
def redis7() -> Iterator[SharedServer]:
    server = shared_redis7()
    try:
        yield server
    finally:
        server.close()


def _allowed(admin: redis.Redis, user: str, *command: str) -> bool:
    """Whether `user` may run `command`, asked of the server itself (ACL DRYRUN runs nothing)."""
    return admin.execute_command("ACL", "DRYRUN", user, *command) == b"OK"


# -- every line loads ------------------------------------------------------------------------------------
def test_every_generated_line_loads_on_redis_7_0(redis7: SharedServer, capsys: pytest.CaptureFixture) -> None:
    """Every role, with and without `--cluster` and `--hashed`, for the default and every server version
    up to this one, and the command line's own output: each line is accepted whole."""
    versions = [acl.OLDEST_SERVER, server_version(redis7.admin)]
    lines = []
    for server in versions:
        for cluster in (False, True):
            for hashed in (False, True):
                common: dict[str, Any] = {
                    "prefix": redis7.prefix, "hashed": hashed, "cluster": cluster, "server": server
                }  # fmt: skip
                rules = {
                    "alice": acl.producer_rules("alice", "alice-pw", **common),
                    "alice-2": acl.producer_rules("alice-2", "alice-pw", **common),
                    "producer": acl.shared_producer_rules("producer-pw", **common),
                    "worker": acl.worker_rules("worker-pw", **common),
                }
                lines += [acl.setuser(redis7.user(name), r) for name, r in rules.items()]
    base = ["--prefix", redis7.prefix]
    for argv in (
        ["producer", "--tenant", "bob", "--user", redis7.user("bob"), "--password", "pw"],
        ["producer", "--no-tenants", "--user", redis7.user("cli-producer"), "--password", "pw", "--hashed"],
        ["worker", "--user", redis7.user("cli-worker"), "--password", "pw", "--cluster"],
        ["worker", "--user", redis7.user("cli-worker-7"), "--password", "pw", "--redis-version", "7.0.15"],
    ):
        assert acl.main(base + argv) == 0
        lines += capsys.readouterr().out.splitlines()
    for line in lines:
        assert redis7.load(line) == b"OK", line
    assert not [line for line in lines if "client|setinfo" in line]
    assert set(redis7.users) <= {u.decode() for u in redis7.admin.execute_command("ACL", "USERS")}
    # What the default leaves out is what this server lacks: a line for 7.2 is refused here whole.
    newer = acl.setuser(redis7.user("worker-72"), acl.worker_rules("pw", redis7.prefix, server=(7, 2)))
    assert "+client|setinfo" in newer
    with pytest.raises(redis.ResponseError, match="client\\|setinfo"):
        redis7.load(newer)


def _connects(url: str, stats: str) -> None:
    """A sync and an async client of `url` connect and work (PING, XADD and XLEN of `stats`)."""
    import asyncio

    import redis.asyncio as aioredis

    client = redis.Redis.from_url(url)
    try:
        assert client.ping() is True
        assert client.xadd(stats, {"worker": "w"})
    finally:
        client.close()

    async def async_ping() -> bool:
        async with aioredis.Redis.from_url(url) as c:
            return bool(await c.ping()) and await c.xlen(stats) == 1

    assert asyncio.run(async_ping())


def test_a_user_without_client_setinfo_connects(redis7: SharedServer) -> None:
    """redis-py sends CLIENT SETINFO on connect. A user of the default line has no `+client|setinfo`:
    on 7.0 the command is unknown, on Valkey it is refused (NOPERM, counted in ACL LOG); either way the
    client ignores the refusal, connects and works, sync and async. The 7.2 line grants it."""
    from worker.local_redis.server import EmbeddedRedis

    user = redis7.user("worker")
    assert redis7.load(acl.setuser(user, acl.worker_rules("pw", redis7.prefix))) == b"OK"
    _connects(redis7.url(user, "pw"), f"{redis7.prefix}:stats")
    with EmbeddedRedis() as valkey:
        admin = redis.Redis(port=valkey.port)
        assert server_version(admin) >= (7, 2)
        for name, server in (("old", acl.OLDEST_SERVER), ("new", server_version(admin))):
            line = acl.setuser(name, acl.worker_rules("pw", name, server=server))
            assert admin.execute_command(*shlex.split(line)) == b"OK"
            _connects(f"redis://{name}:pw@127.0.0.1:{valkey.port}/0", f"{name}:stats")
        log = admin.acl_log()
        assert {(e["username"], e["object"]) for e in log} == {("old", "client|setinfo")}, log
        admin.close()


# -- the users do their jobs ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", POISON_SHAPES)
def test_the_worker_user_repairs_the_stats_stream_on_redis_7_0(redis7: SharedServer, shape: str) -> None:
    """The stats writer's repair (`live_stats.write_entry`) on Redis 7.0, as the generated worker user."""
    user = redis7.user("worker")
    assert redis7.load(acl.setuser(user, acl.worker_rules("pw", redis7.prefix))) == b"OK"
    as_worker = redis.Redis.from_url(redis7.url(user, "pw"))
    stream = f"{redis7.prefix}:stats"
    try:
        for i in range(3):
            write_entry(as_worker, stream, {"worker": f"w{i}"}, max_entries=100)
        _poison(redis7.admin, stream, shape)
        with capture_logs() as logs:
            entry_id = write_entry(as_worker, stream, {"worker": "w0"}, max_entries=100)
            write_entry(as_worker, stream, {"worker": "w1"}, max_entries=100)
    finally:
        as_worker.close()
    assert [e["event"] for e in logs] == ["stats_stream_repaired"], logs
    seconds, micros = redis7.admin.time()
    limit = seconds * 1000 + micros // 1000 + FUTURE_ALLOWANCE_MS
    assert int(entry_id.split("-")[0]) <= limit
    assert all(int(i.split(b"-")[0]) <= limit for i, _ in redis7.admin.xrange(stream))
    assert redis7.admin.xrevrange(stream, count=1)[0][1] == {b"worker": b"w1"}


def _start_worker(tmp_path: Path, redis7: SharedServer, url: str, name: str, **env: str) -> WorkerProcess:
    return spawn_worker(url, redis7.prefix, tmp_path, name, "echo", **{**FAST, **env})


def test_tenants_are_served_and_kept_apart_on_redis_7_0(
    redis7: SharedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker serving alice and bob as the generated worker user; each backend as its tenant's user:
    both are answered, bob is refused alice's streams, and the worker writes its stats unrefused."""
    monkeypatch.delenv("LLM_TEST_WORKER_ACL", raising=False)  # the user here is the generated one
    prefix = redis7.prefix
    users = {name: redis7.user(name) for name in ("alice", "bob", "worker")}
    for tenant in ("alice", "bob"):
        assert redis7.load(acl.setuser(users[tenant], acl.producer_rules(tenant, f"{tenant}-pw", prefix)))
    assert redis7.load(acl.setuser(users["worker"], acl.worker_rules("worker-pw", prefix)))
    worker = _start_worker(
        tmp_path, redis7, redis7.url(users["worker"], "worker-pw"), "w0", tenants="alice,bob",
        echo_token_delay_ms="20",
    )  # fmt: skip
    clients = {
        t: ChatClient(redis7.url(users[t], f"{t}-pw"), prefix=prefix, tenant=t, timeout_s=60)
        for t in ("alice", "bob")
    }
    raw_bob = redis.Redis.from_url(redis7.url(users["bob"], "bob-pw"))
    try:
        for tenant, client in clients.items():
            reply = client.chat([{"role": "user", "content": f"hi {tenant}"}], max_tokens=8)
            assert reply.text == f"hi {tenant}"
        rid = clients["alice"].submit([{"role": "user", "content": " ".join(["w"] * 100)}], max_tokens=100)
        a, b = StreamNames.for_prefix(prefix, "alice"), StreamNames.for_prefix(prefix, "bob")
        for call in (
            lambda: raw_bob.xread({a.requests: "0"}),
            lambda: raw_bob.xrange(a.reply(rid)),
            lambda: raw_bob.xadd(a.reply(rid), {"ct": "json", "body": "{}"}),
            lambda: raw_bob.xadd(a.requests, {"v": "1"}),
            lambda: raw_bob.xadd(a.cancel, {"id": rid}),
            lambda: raw_bob.xread({b.requests: "0"}),
            lambda: raw_bob.xadd(f"{prefix}:stats", {"worker": "bob"}),
            lambda: raw_bob.set(a.final_guard(rid), "bob"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                call()
        assert clients["alice"].cancel(rid)
        with pytest.raises(ChatError) as info:
            clients["alice"].result(rid, timeout_s=30)
        assert info.value.code == ErrorCode.CANCELLED
        deadline = time.monotonic() + 30
        while len(worker.events("worker_stats")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(worker.events("worker_stats")) >= 2
        assert redis7.admin.xlen(f"{prefix}:stats") >= 1
        assert worker.proc.poll() is None
        log = worker.log_path.read_text()
        assert "NOPERM" not in log and "stats_not_written" not in log and "Traceback" not in log, log[-3000:]
        assert {e["tenant"] for e in worker.events("request_done")} == {"alice", "bob"}
    finally:
        raw_bob.close()
        for client in clients.values():
            client.close()
        assert worker.stop() == 0


# -- the stats stream: every key under the prefix but that one -------------------------------------------
@pytest.fixture(scope="module")
def producer_acl_servers() -> Iterator[list[tuple[redis.Redis, str, str]]]:
    """(admin, producer user, prefix) on Valkey (private) and on Redis 7.0 (shared, if there is one)."""
    from worker.local_redis.server import EmbeddedRedis

    servers: list[tuple[redis.Redis, str, str]] = []
    with EmbeddedRedis() as valkey:
        admin = redis.Redis(port=valkey.port)
        assert admin.execute_command(*shlex.split(acl.setuser("p", acl.shared_producer_rules("pw", "pfx"))))
        servers.append((admin, "p", "pfx"))
        shared = None
        with contextlib.suppress(pytest.skip.Exception):  # without a Redis 7.0: Valkey alone
            shared = shared_redis7()
        try:
            if shared is not None:
                user = shared.user("producer")
                assert shared.load(acl.setuser(user, acl.shared_producer_rules("pw", shared.prefix)))
                servers.append((shared.admin, user, shared.prefix))
            yield servers
        finally:
            admin.close()
            if shared is not None:
                shared.close()


KEY_CHARS = st.characters(min_codepoint=33, max_codepoint=126) | st.sampled_from("stats:{}.-_ claim0123")


NEAR_STATS = ["stats", "stat", "statsx", "stats:x", "Stats", "s", ""]
# Request id claims (the bare namespace's and the shards' `s:{<n>}`), and the keys next to them.
NEAR_CLAIMS = [
    "claim:", "claim:abc", "claim:a:b", "claim", "claimx", "claim-x", "Claim:x", "c", "cl", "clai",
    "s:{0}:claim:x", "s:{12}:claim:", "s:{123}:claim:y", "s:{1023}:claim:z", "s:{9999}:claim:z",
    "s:{12345}:claim:z", "s:{}:claim:x", "s:{a}:claim:x", "s:{0}claim:x", "s:{0}:claimx", "s:{0}:claim",
    "s:{0}:cancel", "s:{0}:requests", "s:{3}:reply:x", "s:{3}:final:x", "s:{0}:dead", "s:{0}:hb:w",
    "final:x", "cancel", "reply:claim:x", "s:", "s:{", "s:{0", "s:{0}", "s:{0}:", "s:{0}:c",
]  # fmt: skip
CLAIM_KEY = re.compile(r"(s:\{[0-9]{1,4}\}:)?claim:.*", re.S)


def producer_writable(suffix: str) -> bool:
    """Whether the `--no-tenants` producer may write `<prefix>:<suffix>`: not the stats stream, no claim."""
    return suffix != "stats" and not CLAIM_KEY.fullmatch(suffix)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.text(KEY_CHARS, max_size=16) | st.sampled_from(NEAR_STATS + NEAR_CLAIMS))
def test_the_producer_may_write_every_key_under_the_prefix_but_the_stats_stream_and_claims(
    producer_acl_servers: list[tuple[redis.Redis, str, str]], suffix: str
) -> None:
    for admin, user, prefix in producer_acl_servers:
        key = f"{prefix}:{suffix}"
        writable = producer_writable(suffix)
        assert _allowed(admin, user, "XADD", key, "*", "worker", "x") == writable, key
        assert _allowed(admin, user, "SET", key, "x") == writable, key
        assert _allowed(admin, user, "EVALSHA", "0" * 40, "1", key) == writable, key  # reads and writes
        # Every key under the prefix reads but the claims, which the producer may not touch at all.
        readable = not CLAIM_KEY.fullmatch(suffix)
        assert _allowed(admin, user, "XREVRANGE", key, "+", "-") == readable, key
        assert _allowed(admin, user, "XINFO", "GROUPS", key) == readable, key
        assert not _allowed(admin, user, "XADD", f"x{prefix}:{suffix}", "*", "a", "b")  # nothing outside


def test_the_producer_may_not_touch_a_claim_and_the_worker_may(
    producer_acl_servers: list[tuple[redis.Redis, str, str]],
) -> None:
    """Every claim shape, on both servers: the producer is refused SET (NX too), GET and DEL of the claim,
    and a script naming it; it still takes a guard (its cancel) and writes its request and cancel streams.
    The workers' user may write each claim."""
    for admin, user, prefix in producer_acl_servers:
        worker = f"{user}-worker"
        admin.execute_command(*shlex.split(acl.setuser(worker, acl.worker_rules("wpw", prefix))))
        try:
            for names in StreamNames.layout(prefix, [None]) + StreamNames.layout(prefix, [None], 3):
                claim, guard = names.claim("victim-id"), names.final_guard("victim-id")
                for command in (
                    ("SET", claim, "x"), ("SET", claim, "x", "NX", "GET", "EX", "60"), ("GET", claim),
                    ("DEL", claim), ("EVALSHA", "0" * 40, "1", claim),
                    ("EVALSHA", "0" * 40, "2", claim, guard),
                ):  # fmt: skip
                    assert not _allowed(admin, user, *command), command
                    assert _allowed(admin, worker, *command), command
                for key in (names.final_guard("victim-id"), names.requests, names.cancel, names.reply("v")):
                    assert _allowed(admin, user, "EVALSHA", "0" * 40, "1", key), key
        finally:
            admin.execute_command("ACL", "DELUSER", worker)
