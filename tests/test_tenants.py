"""Tenants under real ACLs: each backend may touch only its own namespace, and Redis says so.

A private server gets the users `python -m worker.acl` prints (two tenants and the workers);
a worker serving both tenants runs as the workers' user, and each client connects as its
tenant's user. Tenant B then tries every attack of issue 9 against tenant A: each is refused
by Redis (NOPERM) or by the client or worker, and A's request still gets its own answer.
The same again with shards within tenants (`LLM_STREAM_SHARDS=4`: each tenant's keys in four
namespaces `<prefix>:t:{<tenant>.<n>}`), under the very same ACL lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import redis
from test_acl_redis7 import shared_redis7

from producer.client import AsyncChatClient, ChatClient, ChatError
from producer.wire.codec import decode_event, encode_request
from producer.wire.keys import StreamNames, shard_for
from producer.wire.models import ChatRequest, ErrorCode, TokenEvent
from worker.engine.echo_engine import EchoEngine
from worker.local_redis.server import EmbeddedRedis
from worker.loop.cancellation import CancelWatch
from worker.loop.inflight import InFlightTable
from worker.loop.lanes import build_lanes, namespaces, read_lanes
from worker.observability.counters import LoopCounters
from worker.settings import WorkerSettings
from worker.tools import acl

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "llm-worker": "worker-pw"}


@dataclass
class Deployment:
    server: EmbeddedRedis
    prefix: str
    tmp_path: Path
    workers: list[subprocess.Popen[bytes]]

    def url(self, user: str) -> str:
        return f"redis://{user}:{PASSWORDS[user]}@127.0.0.1:{self.server.port}/0"

    def as_user(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user))

    def client(self, tenant: str, **overrides: object) -> ChatClient:
        return ChatClient(self.url(tenant), prefix=self.prefix, tenant=tenant, timeout_s=60, **overrides)

    def names(self, tenant: str, shard: int | None = None) -> StreamNames:
        return StreamNames.for_prefix(self.prefix, tenant, shard)

    def start_worker(self, **settings: str) -> subprocess.Popen[bytes]:
        name = f"w{len(self.workers)}"
        env = dict(
            os.environ, REDIS_URL=self.url("llm-worker"), LLM_PREFIX=self.prefix, LLM_ENGINE="echo",
            LLM_TENANTS="alice,bob", LLM_CONSUMER_NAME=name, PYTHONUNBUFFERED="1",
        )  # fmt: skip
        env.update({f"LLM_{k.upper()}": v for k, v in settings.items()})
        with open(self.tmp_path / f"{name}.log", "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        self.workers.append(proc)
        deadline = time.monotonic() + 120
        index = len(self.workers) - 1
        while not self.events(index, "worker_started"):
            assert proc.poll() is None and time.monotonic() < deadline, self.log(index)[-3000:]
            time.sleep(0.1)
        return proc

    def log(self, index: int = 0) -> str:
        return (self.tmp_path / f"w{index}.log").read_text(errors="replace")

    def events(self, index: int, name: str) -> list[dict]:
        lines = [line for line in self.log(index).splitlines() if line.startswith("{")]
        return [e for e in map(json.loads, lines) if e.get("event") == name]


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@pytest.fixture()
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    lines = [
        acl.setuser("alice", acl.producer_rules("alice", PASSWORDS["alice"], prefix)),
        acl.setuser("bob", acl.producer_rules("bob", PASSWORDS["bob"], prefix)),
        acl.setuser("llm-worker", acl.worker_rules(PASSWORDS["llm-worker"], prefix)),
    ]
    with EmbeddedRedis() as server:
        admin = redis.Redis(port=server.port)
        for line in lines:  # exactly as an operator pastes them into redis-cli
            assert admin.execute_command(*shlex.split(line)) == b"OK"
        admin.execute_command("ACL", "SETUSER", "default", "on", ">admin-pw")
        admin.close()
        d = Deployment(server, prefix, tmp_path, [])
        try:
            yield d
        finally:
            for proc in d.workers:
                stop(proc)


FAST = {"heartbeat_interval_s": "0.3", "heartbeat_ttl_s": "1", "read_block_ms": "200",
        "reclaim_interval_s": "0.3", "reclaim_min_idle_ms": "1000", "trim_interval_s": "0.2"}  # fmt: skip


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def bob_cannot_reach_alices_request(
    alice: ChatClient, bob: ChatClient, raw_bob: redis.Redis, victim: str, victim_reply: str,
    bob_requests: str, evil_id: str, text: str,
) -> None:  # fmt: skip
    """Alice's request `victim` (answered `text`) stays hers whatever bob sends.

    A reply_to naming her reply stream is refused by bob's client before sending, and a raw entry
    carrying it in bob's own request stream is answered `invalid_request` in bob's namespace. Bob
    reusing her id gets his own answer, and his cancel reaches only his own request.
    """
    with pytest.raises(ValueError):
        bob.submit(ask("steal"), reply_to=victim_reply)
    evil = ChatRequest(id=evil_id, messages=ask("steal"), reply_to=victim_reply)  # type: ignore[arg-type]
    raw_bob.xadd(bob_requests, encode_request(evil))  # type: ignore[arg-type]
    with pytest.raises(ChatError) as info:
        bob.result(evil_id, timeout_s=20)
    assert info.value.code == ErrorCode.INVALID_REQUEST
    assert bob.chat(ask("bob same id"), id=victim, max_tokens=8).text == "bob same id"
    bob.cancel(victim)
    reply = alice.result(victim, timeout_s=60)
    assert reply.text == text and reply.id == victim
    assert alice.rejected_events == 0


def assert_both_cancels_answered(client: ChatClient) -> None:
    """A tenant cancels a running request through its own cancel stream, and one it sends only after
    the cancel: a worker writes the `cancelled` reply of each (the second when it reads the request)."""
    rid = client.submit(ask(" ".join(["word"] * 200)), max_tokens=200)
    time.sleep(0.5)
    assert client.cancel(rid)
    client.cancel("not-sent-yet")
    client.submit(ask("sent after its cancel"), id="not-sent-yet", max_tokens=4)
    for request_id in (rid, "not-sent-yet"):
        with pytest.raises(ChatError) as info:
            client.result(request_id, timeout_s=20)
        assert info.value.code == ErrorCode.CANCELLED


def test_tenants_are_served_end_to_end_under_their_acls(deployment: Deployment) -> None:
    d = deployment
    key = "tenant-test-signing-key"  # signed replies work in tenant namespaces too (cancels included)
    worker = d.start_worker(echo_token_delay_ms="20", reply_signing_key=key, **FAST)
    alice, bob = d.client("alice", reply_signing_key=key), d.client("bob", reply_signing_key=key)
    try:
        assert alice.chat(ask("hello from alice"), max_tokens=8).text == "hello from alice"
        stream = bob.stream(ask("bob streams words"), max_tokens=8)
        assert "".join(t.text for t in stream) == "bob streams words"
        assert stream.reply is not None and stream.reply.text == "bob streams words"
        ids = alice.submit_many([{"messages": ask(f"batch {i}"), "max_tokens": 4} for i in range(5)])
        results = alice.results([i for i in ids if isinstance(i, str)])
        assert sorted(r.text for r in results.values() if not isinstance(r, ChatError)) == [
            f"batch {i}" for i in range(5)
        ]
        assert_both_cancels_answered(alice)

        async def async_chat() -> list[str]:
            async with AsyncChatClient(
                d.url("bob"), prefix=d.prefix, tenant="bob", timeout_s=60, reply_signing_key=key
            ) as c:
                texts = [(await c.chat(ask("async bob"), max_tokens=4)).text]
                batch = [{"messages": ask(f"async {i}"), "max_tokens": 4} for i in range(3)]
                ids = await c.submit_many(batch)
                replies = await c.results([i for i in ids if isinstance(i, str)])
                return texts + sorted(r.text for r in replies.values() if not isinstance(r, ChatError))

        assert asyncio.run(async_chat()) == ["async bob", "async 0", "async 1", "async 2"]
        time.sleep(1.0)  # a trim, reclaim and backlog round under the worker's user
        assert worker.poll() is None
        log = d.log()
        assert "NOPERM" not in log and "Traceback" not in log and "redis_error" not in log, log[-3000:]
        done = d.events(0, "request_done")
        assert {e["tenant"] for e in done} == {"alice", "bob"}
        assert alice.rejected_events == 0 and bob.rejected_events == 0
    finally:
        alice.close()
        bob.close()


def test_one_tenant_cannot_reach_another(deployment: Deployment) -> None:
    d = deployment
    d.start_worker(echo_token_delay_ms="30", **FAST)
    alice, bob = d.client("alice"), d.client("bob")
    a, b = d.names("alice"), d.names("bob")
    raw_bob = d.as_user("bob")
    try:
        text = " ".join(f"w{i}" for i in range(40))
        rid = alice.submit(ask(text), max_tokens=64)
        time.sleep(0.3)  # in flight

        def refused(call) -> None:  # noqa: ANN001
            with pytest.raises(redis.exceptions.NoPermissionError):
                call()

        # Read another tenant's requests (and, for that matter, its own).
        refused(lambda: raw_bob.xread({a.requests: "0"}))
        refused(lambda: raw_bob.xrange(a.requests))
        refused(lambda: raw_bob.xreadgroup("workers", "evil", {a.requests: ">"}))
        refused(lambda: raw_bob.xread({b.requests: "0"}))
        # Read another tenant's replies.
        refused(lambda: raw_bob.xread({a.reply(rid): "0"}))
        # Forge events into another tenant's reply stream.
        forged = {"ct": "json", "body": json.dumps({"type": "done", "id": rid, "text": "forged"})}
        refused(lambda: raw_bob.xadd(a.reply(rid), forged))  # type: ignore[arg-type]
        # Take another request's final-reply guard (or any guard: a tenant has no SET at all).
        refused(lambda: raw_bob.set(a.final_guard(rid), "bob"))
        refused(lambda: raw_bob.set(b.final_guard(rid), "bob"))
        # Break the cancel streams: SET one to a string, or cancel another tenant's request.
        refused(lambda: raw_bob.set(f"{d.prefix}:cancel", "x"))
        refused(lambda: raw_bob.set(a.cancel, "x"))
        refused(lambda: raw_bob.xadd(a.cancel, {"id": rid}))
        # Replace or drop the request stream.
        refused(lambda: raw_bob.delete(a.requests))
        refused(lambda: raw_bob.set(a.requests, "x"))
        refused(lambda: raw_bob.rename(b.requests, a.requests))
        refused(lambda: raw_bob.xadd(a.requests, {"v": "1"}))
        # Scripts, key listing, server administration.
        refused(lambda: raw_bob.eval("return redis.call('SET', KEYS[1], 'x')", 1, a.final_guard(rid)))
        refused(lambda: raw_bob.evalsha("0" * 40, 0))
        refused(lambda: raw_bob.script_load("return 1"))
        refused(lambda: raw_bob.execute_command("FUNCTION", "LIST"))
        refused(lambda: raw_bob.keys("*"))
        refused(lambda: raw_bob.scan())
        refused(lambda: raw_bob.config_get("*"))
        refused(lambda: raw_bob.flushall())
        refused(lambda: raw_bob.publish("x", "y"))

        # reply_to naming A's reply stream, and A's in-flight id reused by B.
        bob_cannot_reach_alices_request(alice, bob, raw_bob, rid, a.reply(rid), b.requests, "evil-1", text)
    finally:
        alice.close()
        bob.close()
        raw_bob.close()


def test_a_dead_workers_tenant_requests_are_reclaimed_under_the_worker_acl(deployment: Deployment) -> None:
    d = deployment
    first = d.start_worker(echo_token_delay_ms="100", **FAST)
    alice, bob = d.client("alice"), d.client("bob")
    try:
        texts = {"alice": "slow words for alice to finish", "bob": "and some for bob as well"}
        rids = {t: c.submit(ask(texts[t]), max_tokens=16) for t, c in (("alice", alice), ("bob", bob))}
        time.sleep(0.4)  # both running on the first worker
        stop(first, signal.SIGKILL)
        d.start_worker(async_replies="true", **FAST)  # and its writes go through the background writer
        assert alice.result(rids["alice"], timeout_s=60).text == texts["alice"]
        assert bob.result(rids["bob"], timeout_s=60).text == texts["bob"]
        assert d.events(1, "entries_reclaimed")
        assert "NOPERM" not in d.log(1)
    finally:
        alice.close()
        bob.close()


def test_one_tenants_flood_is_shed_on_its_own_stream_while_another_is_served(deployment: Deployment) -> None:
    d = deployment
    d.start_worker(
        echo_token_delay_ms="50", max_num_seqs="1", max_waiting_requests="2", max_backlog_requests="5",
        backlog_check_interval_ms="50", **FAST,
    )  # fmt: skip
    alice, bob = d.client("alice"), d.client("bob")
    try:
        flood = alice.submit_many([{"messages": ask(f"flood {i}"), "max_tokens": 4} for i in range(40)])
        time.sleep(0.3)
        assert bob.chat(ask("bob is served"), max_tokens=4).text == "bob is served"
        results = alice.results([i for i in flood if isinstance(i, str)], timeout_s=120)
        codes = [r.code for r in results.values() if isinstance(r, ChatError)]
        served = [r for r in results.values() if not isinstance(r, ChatError)]
        assert codes and set(codes) == {ErrorCode.OVERLOADED}
        assert served and all(r.text.startswith("flood ") for r in served)
        shed = d.events(0, "requests_shed")
        assert shed and sum(e["count"] for e in shed) == len(codes)
    finally:
        alice.close()
        bob.close()


def test_a_tenants_undecodable_entries_are_dead_lettered_in_its_namespace(deployment: Deployment) -> None:
    d = deployment
    d.start_worker(**FAST)
    raw_bob = d.as_user("bob")
    admin = redis.Redis(port=d.server.port, password="admin-pw")
    try:
        raw_bob.xadd(d.names("bob").requests, {"v": "1", "ct": "json", "body": "not json"})
        deadline = time.monotonic() + 30
        while not admin.xlen(d.names("bob").dead_letter) and time.monotonic() < deadline:
            time.sleep(0.1)
        dead = admin.xrange(d.names("bob").dead_letter)
        assert len(dead) == 1 and dead[0][1][b"f:body"] == b"not json"
        assert not admin.exists(d.names("alice").dead_letter, f"{d.prefix}:dead")
        group = admin.xinfo_groups(d.names("bob").requests)[0]
        assert group["pending"] == 0  # acknowledged on bob's stream
    finally:
        raw_bob.close()
        admin.close()


def test_one_read_gives_every_tenant_the_same_share(redis_client: redis.Redis, prefix: str) -> None:
    """In process, no ACL: one XREADGROUP over both streams, COUNT per stream, so a deep backlog
    (alice's 100) cannot crowd out a shallow one (bob's 3) in any read."""
    s = WorkerSettings(prefix=prefix, tenants="alice,bob", consumer_name="c1", read_count=64)
    spaces = namespaces(s)
    table = InFlightTable()
    cancels = CancelWatch(redis_client, spaces, 50, 100)
    lanes = build_lanes(redis_client, s, EchoEngine(), table, LoopCounters(), cancels, "c1:1")
    for lane in lanes:
        redis_client.xgroup_create(lane.stream, s.group, id="0", mkstream=True)
    for tenant, n in (("alice", 100), ("bob", 3)):
        for i in range(n):
            request = ChatRequest(id=f"r{i}", prompt=f"{tenant} {i}")
            redis_client.xadd(StreamNames.for_prefix(prefix, tenant).requests, encode_request(request))  # type: ignore[arg-type]
    read_lanes(redis_client, s, lanes, 64, None)  # the startup replay of our (empty) pending lists
    first = read_lanes(redis_client, s, lanes, 64, None)
    assert sorted(f.seq_id for f in first if f.tenant == "bob") == ["bob/r0", "bob/r1", "bob/r2"]
    assert len([f for f in first if f.tenant == "alice"]) == 32  # ceil(64 / 2)
    # The same id in two tenants is two requests.
    assert {f.seq_id for f in first} >= {"alice/r0", "bob/r0"}


def test_a_tenant_with_shards_is_served_and_kept_apart(deployment: Deployment) -> None:
    """Four shards per tenant, the same ACL lines: alice's requests spread over her four streams and are
    all answered once; bob can neither read nor forge anything in any of her shard namespaces."""
    d = deployment
    worker = d.start_worker(
        stream_shards="4", echo_token_delay_ms="30", **{**FAST, "trim_interval_s": "3600"}
    )
    alice, bob = d.client("alice", stream_shards=4), d.client("bob", stream_shards=4)
    raw_bob = d.as_user("bob")
    admin = redis.Redis(port=d.server.port, password="admin-pw")
    try:
        assert [n.root for n in alice.spaces] == [f"{d.prefix}:t:{{alice.{n}}}" for n in range(4)]
        ids = alice.submit_many([{"messages": ask(f"sharded {i}"), "max_tokens": 4} for i in range(40)])
        got = alice.results([i for i in ids if isinstance(i, str)], timeout_s=60)
        assert sorted(r.text for r in got.values() if not isinstance(r, ChatError)) == sorted(
            f"sharded {i}" for i in range(40)
        )
        lengths = [admin.xlen(d.names("alice", n).requests) for n in range(4)]
        assert sum(lengths) == 40 and all(n > 0 for n in lengths), lengths
        assert not admin.exists(d.names("alice").requests)  # nothing in the unsharded namespace
        for request_id in got:  # one final each, in the shard of its id
            names = alice.spaces[shard_for(request_id, 4)]
            events = [decode_event(f) for _, f in admin.xrange(names.reply(request_id))]
            assert len([e for e in events if not isinstance(e, TokenEvent)]) == 1, request_id
        # A conversation stays on one shard; a reply_to in another of alice's shards picks that one.
        conv = [alice.submit(ask(f"turn {i}"), max_tokens=2, shard_key="conv-9") for i in range(3)]
        assert [alice.result(i).text for i in conv] == ["turn 0", "turn 1", "turn 2"]
        other = alice.spaces[(shard_for("own-reply", 4) + 1) % 4]
        rid = alice.submit(ask("own reply key"), id="own-reply", reply_to=other.reply("mine"), max_tokens=4)
        assert alice.result(rid).text == "own reply key" and admin.exists(other.reply("mine"))
        # Streaming, and both kinds of cancel, in a shard namespace.
        assert "".join(t.text for t in alice.stream(ask("alice streams"), max_tokens=4)) == "alice streams"
        assert_both_cancels_answered(alice)

        # Bob against alice's shards, with one of her requests in flight.
        text = " ".join(f"w{i}" for i in range(40))
        victim = alice.submit(ask(text), max_tokens=64)
        a = alice.spaces[shard_for(victim, 4)]
        b = bob.spaces[0]
        time.sleep(0.3)

        def refused(call) -> None:  # noqa: ANN001
            with pytest.raises(redis.exceptions.NoPermissionError):
                call()

        for n in range(4):
            s = d.names("alice", n)
            refused(partial(raw_bob.xread, {s.requests: "0"}))
            refused(partial(raw_bob.xreadgroup, "workers", "evil", {s.requests: ">"}))
            refused(partial(raw_bob.xadd, s.requests, {"v": "1"}))
            refused(partial(raw_bob.xadd, s.cancel, {"id": victim}))
            refused(partial(raw_bob.xread, {s.reply(victim): "0"}))
            refused(partial(raw_bob.xrange, s.reply(victim)))
        forged = {"ct": "json", "body": json.dumps({"type": "done", "id": victim, "text": "forged"})}
        refused(lambda: raw_bob.xadd(a.reply(victim), forged))  # type: ignore[arg-type]
        refused(lambda: raw_bob.set(a.final_guard(victim), "bob"))
        refused(lambda: raw_bob.delete(a.requests))
        refused(lambda: raw_bob.rename(b.requests, a.requests))
        refused(lambda: raw_bob.xadd(d.names("alice").requests, {"v": "1"}))  # her unsharded form too
        # The same within shards: bob's raw entry goes to the shard his client would pick.
        bob_requests = bob.spaces[shard_for("evil-2", 4)].requests
        bob_cannot_reach_alices_request(
            alice, bob, raw_bob, victim, a.reply(victim), bob_requests, "evil-2", text
        )
        assert bob.rejected_events == 0
        assert worker.poll() is None
        log = d.log()
        assert "NOPERM" not in log and "Traceback" not in log and "redis_error" not in log, log[-3000:]
        started = d.events(0, "worker_started")[0]
        assert (started["tenants"], started["shards"]) == (2, 4)
        assert {e["tenant"] for e in d.events(0, "request_done")} == {"alice", "bob"}
    finally:
        alice.close()
        bob.close()
        raw_bob.close()
        admin.close()


def test_a_dead_workers_sharded_tenant_requests_are_reclaimed(deployment: Deployment) -> None:
    d = deployment
    first = d.start_worker(stream_shards="4", echo_token_delay_ms="100", **FAST)
    alice = d.client("alice", stream_shards=4)
    try:
        texts = {f"r{i}": f"slow words number {i} for alice" for i in range(8)}
        for rid, text in texts.items():
            alice.submit(ask(text), id=rid, max_tokens=16)
        assert len({shard_for(rid, 4) for rid in texts}) > 1
        time.sleep(0.4)
        stop(first, signal.SIGKILL)
        d.start_worker(stream_shards="4", **FAST)
        assert {rid: alice.result(rid, timeout_s=60).text for rid in texts} == texts
        assert d.events(1, "entries_reclaimed")
        assert "NOPERM" not in d.log(1)
    finally:
        alice.close()


def _allowed(admin: redis.Redis, user: str, *command: str) -> bool:
    """Whether `user` may run `command`, asked of the server itself (ACL DRYRUN runs nothing)."""
    return admin.execute_command("ACL", "DRYRUN", user, *command) == b"OK"


@dataclass
class AclAdmin:
    """An administrator's connection, the key prefix and the server-wide names of the users `alice`,
    `alice-2` and `llm-worker`, whose lines were loaded as generated."""

    admin: redis.Redis
    prefix: str
    user: dict[str, str]


@pytest.fixture(params=["valkey", "redis-7.0"])
def acl_admin(request: pytest.FixtureRequest) -> Iterator[AclAdmin]:
    """A private Valkey with prefix `llm`, or the shared Redis 7.0 with this test's own prefix and user
    names, deleted at the end (`test_acl_redis7.py`)."""
    lines = lambda prefix: {  # noqa: E731
        "alice": acl.producer_rules("alice", "pw", prefix),
        "alice-2": acl.producer_rules("alice-2", "pw", prefix),
        "llm-worker": acl.worker_rules("pw", prefix),
    }
    if request.param == "valkey":
        with EmbeddedRedis() as server:
            admin = redis.Redis(port=server.port)
            for name, rules in lines("llm").items():
                assert admin.execute_command(*shlex.split(acl.setuser(name, rules))) == b"OK"
            yield AclAdmin(admin, "llm", {name: name for name in lines("llm")})
            admin.close()
        return
    shared = shared_redis7()
    try:
        users = {name: shared.user(name) for name in lines(shared.prefix)}
        for name, rules in lines(shared.prefix).items():
            assert shared.load(acl.setuser(users[name], rules)) == b"OK"
        yield AclAdmin(shared.admin, shared.prefix, users)
    finally:
        shared.close()


def test_tenant_acl_patterns_match_its_namespaces_and_nothing_else(acl_admin: AclAdmin) -> None:
    """The generated patterns on a real server (Valkey, and Redis 7.0): every shard namespace of the tenant,
    for any N, and neither another tenant's (`alice-2` starts with `alice`) nor a key of a form no worker
    uses."""
    admin, prefix, user = acl_admin.admin, acl_admin.prefix, acl_admin.user

    def ok(name: str, *command: str) -> bool:
        """`_allowed` for the user `name`, with the prefix `llm` of the keys below as the fixture's."""
        return _allowed(admin, user[name], *(re.sub(r"^llm(?=:|$)", prefix, c) for c in command))

    own = [
        "llm:t:{alice}",
        "llm:t:{alice.0}",
        "llm:t:{alice.7}",
        "llm:t:{alice.42}",
        "llm:t:{alice.1023}",
    ]
    for root in own:
        assert ok("alice", "XADD", f"{root}:requests", "*", "v", "1"), root
        assert ok("alice", "XADD", f"{root}:cancel", "*", "id", "x"), root
        assert ok("alice", "XREAD", "STREAMS", f"{root}:reply:r1", "0"), root
        assert ok("alice", "XRANGE", f"{root}:reply:r1", "-", "+"), root
        assert not ok("alice", "XREAD", "STREAMS", f"{root}:requests", "0"), root
        assert not ok("alice", "XADD", f"{root}:reply:r1", "*", "a", "b"), root
        assert not ok("alice", "XADD", f"{root}:final:r1", "*", "a", "b"), root
        assert not ok("alice", "XADD", f"{root}:dead", "*", "a", "b"), root
        assert not ok("alice", "SET", f"{root}:final:r1", "x"), root
        for command in (
            ("XREADGROUP", "GROUP", "workers", "w", "STREAMS", f"{root}:requests", ">"),
            ("SET", f"{root}:hb:w", "alive"),
            ("EVALSHA", "0" * 40, "1", f"{root}:requests"),
        ):
            assert ok("llm-worker", *command), command
            assert not ok("alice", *command), command
    foreign = [
        "llm:t:{alice-2}", "llm:t:{alice-2.0}", "llm:t:{alice_}", "llm:t:{alicex.0}", "llm:t:{bob.0}",
        "llm:t:{alice.}", "llm:t:{alice.x}", "llm:t:{alice.10000}", "llm:t:{alice.0.1}",
        "llm:t:{alice.0}x", "llm:t:{alice.0}:reply:x}", "llm:s:{0}", "llm",
    ]  # fmt: skip
    for root in foreign:
        assert not ok("alice", "XADD", f"{root}:requests", "*", "v", "1"), root
        assert not ok("alice", "XADD", f"{root}:cancel", "*", "id", "x"), root
        if ":reply:" not in root:  # (that one is under alice's own `{alice.0}:reply:`)
            assert not ok("alice", "XREAD", "STREAMS", f"{root}:reply:r1", "0"), root
    for root in ("llm:t:{alice-2}", "llm:t:{alice-2.0}", "llm:t:{alice-2.999}"):
        assert ok("alice-2", "XADD", f"{root}:requests", "*", "v", "1"), root
        assert not ok("alice", "XREAD", "STREAMS", f"{root}:reply:r1", "0"), root
    for root in ("llm:t:{alice}", "llm:t:{alice.3}"):
        assert not ok("alice-2", "XADD", f"{root}:requests", "*", "v", "1"), root
        assert not ok("alice-2", "XREAD", "STREAMS", f"{root}:reply:r1", "0"), root


def test_one_read_gives_every_shard_of_every_tenant_the_same_share(
    redis_client: redis.Redis, prefix: str
) -> None:
    """Tenants with shards: one lane per (tenant, shard), read in one XREADGROUP with COUNT per stream."""
    s = WorkerSettings(prefix=prefix, tenants="alice,bob", stream_shards=4, consumer_name="c1", read_count=64)
    spaces = namespaces(s)
    assert [n.lane for n in spaces] == [(t, n) for t in ("alice", "bob") for n in range(4)]
    cancels = CancelWatch(redis_client, spaces, 50, 100)
    lanes = build_lanes(redis_client, s, EchoEngine(), InFlightTable(), LoopCounters(), cancels, "c1:1")
    for lane in lanes:
        redis_client.xgroup_create(lane.stream, s.group, id="0", mkstream=True)
    for i in range(100):  # alice's 100 over her four shards, bob's 2 in one
        request = ChatRequest(id=f"r{i}", prompt=f"alice {i}")
        redis_client.xadd(spaces[shard_for(request.id, 4)].requests, encode_request(request))  # type: ignore[arg-type]
    for i in range(2):
        request = ChatRequest(id=f"r{i}", prompt=f"bob {i}")
        redis_client.xadd(spaces[4 + 1].requests, encode_request(request))  # type: ignore[arg-type]
    read_lanes(redis_client, s, lanes, 64, None)  # the startup replay of our (empty) pending lists
    first = read_lanes(redis_client, s, lanes, 64, None)
    assert sorted(f.seq_id for f in first if f.tenant == "bob") == ["bob/r0", "bob/r1"]
    per_lane = {lane.key: len([f for f in first if f.lane == lane.key]) for lane in lanes}
    assert all(per_lane[("alice", n)] == 8 for n in range(4)), per_lane  # ceil(64 / 8) from each
    assert all(f.reply_key == spaces[f.shard or 0].reply(f.request.id) for f in first if f.tenant == "alice")


# -- the ACL generator ---------------------------------------------------------------------------------


def test_producer_acl_grants_exactly_its_own_streams() -> None:
    line = acl.setuser("alice", acl.producer_rules("alice", "pw", "llm"))
    roots = ["llm:t:{alice}"] + [f"llm:t:{{alice.{'[0-9]' * width}}}" for width in (1, 2, 3, 4)]
    assert roots[1:3] == ["llm:t:{alice.[0-9]}", "llm:t:{alice.[0-9][0-9]}"]
    assert line == (
        "ACL SETUSER alice reset on >pw resetchannels -@all +ping "
        "(+xadd " + " ".join(f"%W~{r}:requests %W~{r}:cancel" for r in roots) + ") "
        "(+xread +xrange " + " ".join(f"%R~{r}:reply:*" for r in roots) + ")"
    )
    # CLIENT SETINFO only for servers that have it (7.2+, Valkey): Redis 7.0 refuses the line over it.
    for server, setinfo in (((7, 0), False), ((7, 1), False), ((7, 2), True), ((8, 0), True)):
        for rules in (
            acl.producer_rules("alice", "pw", "llm", server=server),
            acl.shared_producer_rules("pw", "llm", server=server),
            acl.worker_rules("pw", "llm", cluster=True, server=server),
        ):
            assert ("+client|setinfo" in rules) == setinfo, (server, rules)
    assert acl.parse_version("7.0.15") == (7, 0) and acl.parse_version("8") == (8, 0)
    for bad in ("6.2.14", "7.x", "", "seven"):
        with pytest.raises(ValueError):
            acl.parse_version(bad)


def test_shared_producer_acl_reads_but_does_not_write_the_stats_stream() -> None:
    rules = acl.shared_producer_rules("pw", "svc")
    assert rules[:6] == ["reset", "on", ">pw", "resetchannels", "-@all", "+ping"]
    keys = [r for r in rules if "~" in r]
    assert keys[0] == "%R~svc:stats" and all(k.startswith("~svc:") for k in keys[1:])
    assert "~svc:*" not in keys and "~svc:stats" not in keys and "+xrevrange" in rules
    assert acl.all_keys_but("p:", "ab") == ["p:", "p:a", "p:[^a]*", "p:a[^b]*", "p:ab?*"]
    assert "+eval" not in rules and "+eval" in acl.shared_producer_rules("pw", "svc", cluster=True)


def test_worker_acl_covers_every_command_of_the_worker_and_its_scripts() -> None:
    rules = acl.worker_rules("pw", "llm")
    assert rules[:6] == ["reset", "on", ">pw", "resetchannels", "-@all", "+ping"]
    assert "~llm:*" in rules and "+eval" not in rules and "+keys" not in rules
    commands = {r[1:] for r in rules if r.startswith("+")}
    sources = [ROOT / p for p in ("producer/wire/final_guard.py", "producer/wire/backlog.py",
                                  "worker/loop/heartbeat.py", "worker/loop/reclaim.py",
                                  "worker/observability/live_stats.py")]  # fmt: skip
    calls = r"redis\.p?call\('([A-Z]+)'(?:, '([A-Z]+)')?"
    in_scripts = {(m[0].lower(), m[1].lower()) for p in sources for m in re.findall(calls, p.read_text())}
    assert ("xinfo", "stream") in in_scripts and ("time", "") in in_scripts  # the stats stream's repair
    for command, sub in in_scripts:
        if any(c.startswith(command + "|") for c in commands):  # a command with subcommands: that one
            assert f"{command}|{sub}" in commands, (command, sub)
        else:
            assert command in commands, command


def test_acl_cli_prints_one_command_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert acl.main(["--prefix", "svc", "producer", "--tenant", "bob", "--password", "s3cret"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("ACL SETUSER bob reset on >s3cret ")
    assert "%W~svc:t:{bob}:requests" in out[0]
    assert acl.main(["worker", "--password", "s3cret", "--hashed"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("ACL SETUSER llm-worker reset on #") and "s3cret" not in out[0]
    assert "client|setinfo" not in out[0]
    assert acl.main(["worker", "--password", "s3cret", "--redis-version", "7.2.4"]) == 0
    assert "+ping +client|setinfo ~llm:* " in capsys.readouterr().out
    assert acl.main(["--prefix", "svc", "producer", "--no-tenants", "--password", "s3cret"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [acl.setuser("llm-producer", acl.shared_producer_rules("s3cret", "svc"))]
    bad_args = (
        ["producer", "--password", "x"],  # a tenant, or explicitly none
        ["producer", "--tenant", "a", "--no-tenants", "--password", "x"],
        ["worker", "--password", "x", "--redis-version", "6.2"],
        ["worker", "--password", "x", "--redis-version", "latest"],
        ["producer", "--tenant", "a*", "--password", "x"],
        ["producer", "--tenant", "{a}", "--password", "x"],
        ["producer", "--tenant", "a.1", "--password", "x"],
        ["producer", "--tenant", "a\n", "--password", "x"],
        ["worker", "--password", "has space"],
    )
    for bad in bad_args:
        with pytest.raises(SystemExit):
            acl.main(bad)


def test_security_page_shows_the_generated_lines() -> None:
    page = (ROOT / "docs" / "security.md").read_text()
    assert acl.setuser("alice", acl.producer_rules("alice", "alice-secret")) in page
    assert acl.setuser("llm-worker", acl.worker_rules("worker-secret")) in page
    assert acl.setuser("llm-producer", acl.shared_producer_rules("producer-secret")) in page


def test_clients_take_their_tenant_from_the_argument_or_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    client = ChatClient("redis://127.0.0.1:1/0", prefix="p", tenant="alice")
    assert client.names.requests == "p:t:{alice}:requests"
    assert client.names.reply("x") == "p:t:{alice}:reply:x"
    with pytest.raises(ValueError):
        client.submit(ask("hi"), reply_to="p:reply:x")  # outside its namespace: refused before sending
    monkeypatch.setenv("LLM_TENANT", "bob")
    assert AsyncChatClient("redis://127.0.0.1:1/0", prefix="p").names.cancel == "p:t:{bob}:cancel"
    monkeypatch.delenv("LLM_TENANT")
    assert ChatClient("redis://127.0.0.1:1/0", prefix="p").names.requests == "p:requests"
    for bad in ("a*", "{a}", "a:b", "", "a.0", "a\n", "a?", "a[b]", "a b"):
        with pytest.raises(ValueError):
            ChatClient("redis://127.0.0.1:1/0", tenant=bad)
    # With shards, the tenant's namespaces; a reply_to in any of them, and in nothing else.
    sharded = ChatClient("redis://127.0.0.1:1/0", prefix="p", tenant="alice", stream_shards=4)
    assert [n.requests for n in sharded.spaces] == [f"p:t:{{alice.{n}}}:requests" for n in range(4)]
    for outside in ("p:t:{alice}:reply:x", "p:t:{alice.4}:reply:x", "p:t:{bob.0}:reply:x", "p:s:{0}:reply:x"):
        with pytest.raises(ValueError):
            sharded.submit(ask("hi"), reply_to=outside)
    assert ChatClient("redis://127.0.0.1:1/0", prefix="p", tenant="alice").names.root == "p:t:{alice}"


def test_hostile_entries_on_a_tenants_shard_cost_only_themselves(
    start_worker, redis_client: redis.Redis, redis_url: str, prefix: str
) -> None:
    """Entries of every shape (the fuzz suite's generator: bad bytes, huge numbers, deep nesting,
    wrong types) plus forged ones (another tenant's reply key, a bytes map key) in one of a sharded
    tenant's streams: the worker answers or dead-letters each, keeps serving both tenants, and
    nothing reaches the other tenant's namespace."""
    import random

    import msgpack
    from test_reliability_fuzz import random_fields

    from producer.wire.keys import namespace

    worker = start_worker("echo", tenants="alice,bob", stream_shards=4, read_count=64)
    alice_2 = namespace(prefix, "alice", 2)
    bob_0 = namespace(prefix, "bob", 0)
    rng = random.Random(7)
    hostile = [random_fields(rng, i) for i in range(500)]
    forged = [
        json.dumps({"id": "x1", "prompt": "a", "deadline_ms": 10**320}).encode(),
        json.dumps({"id": "x2", "prompt": "a", "max_tokens": "lots"}).encode(),
        msgpack.packb({"id": "x3", "prompt": "a", "metadata": {b"k": 1}}),
        json.dumps({"id": "x4", "prompt": "a", "reply_to": f"{bob_0}:reply:x4"}).encode(),
    ]
    hostile += [
        {b"v": b"1", b"ct": b"msgpack" if i == 2 else b"json", b"body": body} for i, body in enumerate(forged)
    ]
    pipe = redis_client.pipeline(transaction=False)
    for fields in hostile:
        pipe.xadd(f"{alice_2}:requests", fields)
    pipe.execute()
    clients = {
        tenant: ChatClient(redis_url, prefix=prefix, tenant=tenant, stream_shards=4, timeout_s=60)
        for tenant in ("alice", "bob")
    }
    try:
        for tenant, client in clients.items():
            ids = client.submit_many([{"prompt": f"{tenant} {i}", "max_tokens": 4} for i in range(20)])
            replies = client.results([i for i in ids if isinstance(i, str)])
            assert sorted(r.text for r in replies.values() if not isinstance(r, ChatError)) == sorted(
                f"{tenant} {i}" for i in range(20)
            )
        # Each forged request gets one final, in the namespace of the stream it came from (alice's
        # shard 2): a refusal for the unusable ones; a bytes key in `metadata` is only metadata.
        for rid in ("x1", "x2", "x3", "x4"):
            events = [decode_event(f) for _, f in redis_client.xrange(f"{alice_2}:reply:{rid}")]
            finals = [e for e in events if not isinstance(e, TokenEvent)]
            assert len(finals) == 1, (rid, events)
            expected = "done" if rid == "x3" else ErrorCode.INVALID_REQUEST
            assert getattr(finals[0], "code", finals[0].type) == expected, (rid, finals)
    finally:
        for client in clients.values():
            client.close()
    deadline = time.monotonic() + 60
    while redis_client.xpending(f"{alice_2}:requests", "workers")["pending"]:
        assert time.monotonic() < deadline, "the worker stopped consuming alice's shard"
        time.sleep(0.2)
    assert not redis_client.exists(f"{bob_0}:reply:x4")  # the forged reply key was never written
    assert worker.proc.poll() is None
