"""Redis Cluster: the keys of each script in one slot, and the service end to end on a real local cluster.

The cluster is started by the tests (`worker/local_redis/cluster.py`): three primaries of the packaged
valkey-server with `--cluster-enabled yes`, joined by `valkey-cli --cluster create`; the failover test
starts three more as replicas and kills a primary while requests are in flight, and the migration test
moves a shard's slot to another primary while they are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot
from worker_process import ROOT, WorkerProcess

from producer.bulk import JobState, enqueue_bulk, job_status
from producer.bulk import main as bulk_main
from producer.bulk.settings import BulkConfigError
from producer.client import ChatClient
from producer.wire import final_guard
from producer.wire.codec import decode_event, decode_request, encode_event
from producer.wire.keys import StreamNames, shard_for
from producer.wire.models import ErrorCode, ErrorEvent, TokenEvent
from producer.wire.redis_factory import by_slot
from worker.local_redis.cluster import LocalCluster
from worker.local_redis.server import EmbeddedRedisError


def _slots(keys: list[str]) -> set[int]:
    return {key_slot(k.encode()) for k in keys}


@pytest.mark.parametrize("tenants", [[None], ["alice", "bob"]], ids=["no-tenant", "tenants"])
@pytest.mark.parametrize("shards", [1, 4])
def test_every_script_touches_one_slot(shards: int, tenants: list[str | None]) -> None:
    for names in StreamNames.layout("llm", tenants, shards, cluster=True):
        done = ErrorEvent(id="r1", code=ErrorCode.INTERNAL, message="x", attempt="a")
        fields = encode_event(done, "json", names.reply("r1"))
        keys, _ = final_guard.final_call(names, "r1", names.reply("r1"), fields, "a", 60, "workers", "1-0")
        assert len(_slots(keys)) == 1, keys
        keys, _ = final_guard.cancel_call(names, "r1", names.reply("r1"), "json", 60, 1000)
        assert len(_slots(keys)) == 1, keys
        calls = [(f"r{i}", names.reply(f"r{i}"), True, ["json", b"{}", ""]) for i in range(5)]
        keys, _ = final_guard.tokens_call(names, 60, calls)
        assert len(_slots(keys)) == 1, keys
        # Heartbeat touch and consumer removal: heartbeat key with the request stream.
        assert len(_slots([names.heartbeat("w1"), names.requests, names.dead_letter, names.cancel])) == 1
    # Several shards spread over the slot space (hash tags {0}..{3}: three of three primaries).
    spaces = StreamNames.layout("llm", [None], 4, cluster=True)
    assert len(by_slot([n.requests for n in spaces])) == 4
    assert {key_slot(n.requests.encode()) * 3 // 16384 for n in spaces} == {0, 1, 2}
    # So do one tenant's shards ({alice.0}..{alice.3}).
    alice = StreamNames.layout("llm", ["alice"], 4, cluster=True)
    assert len(by_slot([n.requests for n in alice])) == 4
    assert {key_slot(n.requests.encode()) * 3 // 16384 for n in alice} == {0, 1, 2}


def test_single_node_keys_are_unchanged_and_shards_are_stable() -> None:
    (names,) = StreamNames.layout("llm", [None], 1, cluster=False)
    assert (names.requests, names.reply("x"), names.heartbeat("w")) == (
        "llm:requests",
        "llm:reply:x",
        "llm:hb:w",
    )
    spaces = StreamNames.layout("llm", [None], 4, cluster=False)
    assert [n.requests for n in spaces] == [f"llm:s:{{{n}}}:requests" for n in range(4)]
    assert spaces[0].heartbeat("w") == "llm:hb:w"  # heartbeats move into the namespace only on a cluster
    assert StreamNames.layout("llm", [None], 1, cluster=True)[0].heartbeat("w") == "llm:s:{0}:hb:w"
    assert shard_for("conversation-42", 4) == shard_for("conversation-42", 4) < 4
    # Tenants: unchanged with one shard, N namespaces each with several (tenant by tenant).
    for cluster in (False, True):
        (alice,) = StreamNames.layout("llm", ["alice"], 1, cluster=cluster)
        assert (alice.requests, alice.reply("x"), alice.lane) == (
            "llm:t:{alice}:requests",
            "llm:t:{alice}:reply:x",
            ("alice", None),
        )
    spaces = StreamNames.layout("llm", ["alice", "bob"], 2)
    assert [(n.requests, n.lane) for n in spaces] == [
        ("llm:t:{alice.0}:requests", ("alice", 0)), ("llm:t:{alice.1}:requests", ("alice", 1)),
        ("llm:t:{bob.0}:requests", ("bob", 0)), ("llm:t:{bob.1}:requests", ("bob", 1)),
    ]  # fmt: skip
    assert spaces[1].reply("x") == "llm:t:{alice.1}:reply:x" and spaces[1].heartbeat("w") == "llm:hb:w"
    assert StreamNames.layout("llm", ["alice"], 2, cluster=True)[1].heartbeat("w") == "llm:t:{alice.1}:hb:w"
    assert spaces[1].reply_allowed("llm:t:{alice.1}:reply:y")
    for other in ("llm:t:{alice.0}:reply:y", "llm:t:{alice}:reply:y", "llm:t:{alice.10}:reply:y"):
        assert not spaces[1].reply_allowed(other)
    for bad_shard in (-1, 1024):
        with pytest.raises(ValueError):
            StreamNames.for_prefix("llm", "alice", bad_shard)


def test_a_slot_in_migration_is_retried_soon_and_unwritten_replies_are_kept() -> None:
    """TRYAGAIN past redis-py's retries (`ClusterError: TTL exhausted.`) is transient and retried after the
    initial delay, not a growing one; a reply batch keeps only what that try did not write."""
    from producer.wire.backoff import TRANSIENT_ERRORS, Backoff, slot_in_migration
    from worker.replies.writer import FinalWrite, ReplyWriter, _Queued

    ttl = redis.exceptions.ClusterError("TTL exhausted.")
    assert isinstance(ttl, TRANSIENT_ERRORS) and slot_in_migration(ttl)
    assert not slot_in_migration(redis.exceptions.ClusterDownError("CLUSTERDOWN"))
    assert not slot_in_migration(None)
    backoff = Backoff(100, 5000)
    for _ in range(5):
        backoff.next_delay_s(redis.ConnectionError())
    assert all(0.05 <= backoff.next_delay_s(ttl) < 0.15 for _ in range(20))
    assert backoff.next_delay_s(redis.ConnectionError()) >= 1.6  # an outage's delay still grows
    # Pipeline order: dead letter + its ack, the tokens script, the finals, the acks.
    failed = [ErrorEvent(id=f"r{i}", code=ErrorCode.INTERNAL, message="x", attempt="a") for i in range(3)]
    finals = [FinalWrite(e.id, f"k-{e.id}", e, "json", b"1-0") for e in failed]
    q = _Queued(tokens=[("r9", "k9", {}, "json", True)], finals=finals, dead=[({}, b"2-0")], acks=[b"3-0"])
    ReplyWriter._keep_unwritten(q, [b"1-1", 1, ttl, 1, ttl, 0, 1], tokens_sent=True)
    assert q.dead == [] and len(q.tokens) == 1 and q.acks == []
    assert [f.request_id for f in q.finals] == ["r1", "r2"]  # r0 won now; r2 lost the guard (reported again)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    try:
        with LocalCluster(masters=3) as c:
            yield c
    except EmbeddedRedisError as exc:
        pytest.skip(f"no local cluster: {exc}")


def start_cluster_worker(
    url: str, prefix: str, tmp_path: Path, shards: int, **settings: object
) -> WorkerProcess:
    name = f"w-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ)
    env.update({
        "REDIS_URL": url, "LLM_REDIS_CLUSTER": "true", "LLM_STREAM_SHARDS": str(shards), "LLM_PREFIX": prefix,
        "LLM_ENGINE": "echo", "LLM_CONSUMER_NAME": name, "PYTHONUNBUFFERED": "1",
    })  # fmt: skip
    env.update({f"LLM_{k.upper()}": str(v) for k, v in settings.items()})
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    worker = WorkerProcess(proc, log_path, name, env)
    worker.wait_started()
    return worker


def set_users_on_every_node(cluster: LocalCluster, users: dict[str, list[str]]) -> None:
    """ACL users are per node: set each one's rules on every node of the cluster."""
    for port in cluster.ports:
        admin = redis.Redis(port=port)
        for user, rules in users.items():
            admin.execute_command("ACL", "SETUSER", user, *rules)
        admin.close()


def finals_per_request(
    client: redis.Redis, client_names: list[StreamNames], ids: list[str]
) -> dict[str, int]:
    """How many final events each request's reply stream holds (must be exactly one)."""
    out = {}
    for request_id in ids:
        names = client_names[shard_for(request_id, len(client_names))]
        entries = client.xrange(names.reply(request_id))
        out[request_id] = sum(1 for _, f in entries if not isinstance(decode_event(f), TokenEvent))
    return out


def answer_exactly_once(client: ChatClient, admin: redis.Redis, count: int) -> list[str]:
    """Send `count` requests; each gets one successful answer and its reply stream one final event."""
    sent = client.submit_many([{"prompt": f"hello {i}", "max_tokens": 4} for i in range(count)])
    ids = [i for i in sent if isinstance(i, str)]
    assert len(ids) == count
    got = client.results(ids, timeout_s=60)
    assert set(got) == set(ids)
    assert all(not isinstance(r, Exception) for r in got.values()), got
    assert set(finals_per_request(admin, client.spaces, ids).values()) == {1}
    return ids


@pytest.mark.parametrize("shards", [1, 4])
def test_every_request_answered_exactly_once(cluster: LocalCluster, tmp_path: Path, shards: int) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    # The second worker writes its replies from a background thread, as a worker on a GPU does.
    workers = [
        start_cluster_worker(cluster.url, prefix, tmp_path, shards, async_replies=background)
        for background in (False, True)
    ]
    client = ChatClient(
        cluster.url, prefix=prefix, redis_cluster=True, stream_shards=shards, content_type="json"
    )
    try:
        answer_exactly_once(client, client.redis, 200)
        # Streaming (the tokens script) and cancelling (the cancel script) on the cluster too.
        tokens = list(client.stream(prompt="one two three", max_tokens=3))
        assert [t.index for t in tokens] == [0, 1, 2]
        # Every shard's stream got its share, each on its own slot.
        if shards > 1:
            lengths = [client.redis.xlen(n.requests) for n in client.spaces]
            assert all(n > 0 for n in lengths), lengths
    finally:
        client.close()
        for w in workers:
            assert w.stop() == 0
    started = workers[0].events("worker_started")[0]
    assert started["cluster"] is True and started["shards"] == shards
    assert all(w.events("worker_stopped")[0]["done"] > 0 for w in workers)  # both ways of writing served


def test_shard_key_keeps_a_conversation_on_one_shard(cluster: LocalCluster, tmp_path: Path) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    worker = start_cluster_worker(cluster.url, prefix, tmp_path, 4)
    client = ChatClient(cluster.url, prefix=prefix, redis_cluster=True, stream_shards=4)
    try:
        ids = [client.submit(prompt=f"turn {i}", max_tokens=2, shard_key="conversation-7") for i in range(5)]
        for request_id in ids:
            assert client.result(request_id, timeout_s=30).text
        shard = shard_for("conversation-7", 4)
        assert client.redis.xlen(client.spaces[shard].requests) == 5
    finally:
        client.close()
        worker.stop()


def test_bulk_job_on_the_cluster(
    cluster: LocalCluster, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A bulk job end to end: RQ's queue and the job's results on a plain Redis (`redis_url`), the chat
    requests through the cluster over four shards, run by the stock `rq worker`."""
    prefix = f"c{uuid.uuid4().hex[:8]}"
    queue = f"{prefix}-bulk"
    service = {"REDIS_URL": cluster.url, "LLM_REDIS_CLUSTER": "true", "LLM_STREAM_SHARDS": "4",
               "LLM_PREFIX": prefix}  # fmt: skip
    for name, value in service.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LLM_BULK_RQ_REDIS_URL", raising=False)
    documents = [" ".join(f"d{i}w{j}" for j in range(1 + (5 * i) % 9)) for i in range(60)]
    docs_file = tmp_path / "docs.jsonl"
    docs_file.write_text("".join(json.dumps(d) + "\n" for d in documents), encoding="utf-8")

    # Cluster mode without a Redis for RQ: refused with a configuration error, nothing enqueued.
    assert bulk_main(["--queue", queue, "submit", str(docs_file)]) == 2
    refused = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (refused["event"], refused["env"]) == ("config_invalid", "LLM_BULK_RQ_REDIS_URL")
    with pytest.raises(BulkConfigError):
        enqueue_bulk(documents, queue=queue)

    monkeypatch.setenv("LLM_BULK_RQ_REDIS_URL", redis_url)
    worker = start_cluster_worker(cluster.url, prefix, tmp_path, 4, trim_interval_s=3600)
    args = ["--queue", queue, "submit", str(docs_file), "--max-tokens", "6", "--max-in-flight", "16"]
    assert bulk_main(args) == 0
    job_id = capsys.readouterr().out.strip()
    rq_redis = redis.Redis.from_url(redis_url)
    log_path = tmp_path / "rq-worker.log"
    try:
        # The stock RQ worker on RQ's Redis; the job reads the cluster settings from its environment.
        with open(log_path, "wb") as log:
            rq = subprocess.run(
                [str(Path(sys.executable).parent / "rq"), "worker", "--url", redis_url, "--serializer",
                 "rq.serializers.JSONSerializer", "--burst", queue],
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
                timeout=120, check=False,
            )  # fmt: skip
        assert rq.returncode == 0, log_path.read_text()
        state = job_status(job_id, rq_redis)
        assert state["status"] == "finished", (state, log_path.read_text())
        result = state["result"]
        assert (result["total"], result["succeeded"], result["failed"]) == (60, 60, 0)
        assert [r["text"] for r in result["results"]] == [" ".join(d.split()[:6]) for d in documents]
        assert JobState(rq_redis, job_id, 60).answered() == 60
        # Every shard carried some of the job's requests, each answered exactly once.
        client = ChatClient(cluster.url, prefix=prefix, redis_cluster=True, stream_shards=4)
        try:
            lengths = [client.redis.xlen(n.requests) for n in client.spaces]
            assert sum(lengths) == 60 and all(n > 0 for n in lengths), lengths
            ids = [
                decode_request(fields, prefix)[0].id
                for names in client.spaces
                for _, fields in client.redis.xrange(names.requests)
            ]
            assert set(finals_per_request(client.redis, client.spaces, ids).values()) == {1}
        finally:
            client.close()
        # RQ's keys are on RQ's Redis only.
        for port in cluster.primaries():
            assert redis.Redis(port=port).keys("rq:*") == []
        assert rq_redis.exists(f"rq:job:{job_id}")
    finally:
        rq_redis.close()
        assert worker.stop() == 0


FAST_RECLAIM = {
    "reclaim_min_idle_ms": 3000, "reclaim_interval_s": 1, "heartbeat_interval_s": 0.5, "heartbeat_ttl_s": 3,
    "read_block_ms": 1000,
}  # fmt: skip


@pytest.mark.slow
def test_primary_failover_loses_and_repeats_no_answer(tmp_path: Path) -> None:
    """Kill a primary while requests flow: its replica takes over; every request gets exactly one final."""
    try:
        c = LocalCluster(masters=3, replicas=1).start()
    except EmbeddedRedisError as exc:
        pytest.skip(f"no local cluster: {exc}")
    prefix = f"c{uuid.uuid4().hex[:8]}"
    workers: list[WorkerProcess] = []
    codes: list[int] = []
    try:
        # Shorter reclaim idle so that entries whose acknowledgement died with the primary come back soon.
        workers = [start_cluster_worker(c.url, prefix, tmp_path, 4, **FAST_RECLAIM) for _ in range(2)]
        client = ChatClient(
            c.url, prefix=prefix, redis_cluster=True, stream_shards=4, content_type="json", submit_retry_s=60
        )
        ids: list[str] = []
        stop = threading.Event()

        failures: list[BaseException] = []

        def produce() -> None:
            try:
                while not stop.is_set():
                    batch = client.submit_many([{"prompt": "x y z", "max_tokens": 3} for _ in range(20)])
                    ids.extend(i for i in batch if isinstance(i, str))
                    time.sleep(0.05)
            except BaseException as exc:  # the client retries through the failover: nothing may get here
                failures.append(exc)

        feeder = threading.Thread(target=produce, daemon=True)
        feeder.start()
        time.sleep(2)
        victim = c.primaries()[0]
        ranges = redis.Redis(port=victim).execute_command("CLUSTER", "SLOTS")
        on_victim = {  # the shards whose slot the victim serves (each master serves one: slots 1584..13907)
            s for s, names in enumerate(client.spaces)
            if any(int(r[0]) <= key_slot(names.requests.encode()) <= int(r[1]) for r in ranges
                   if int(r[2][1]) == victim)
        }  # fmt: skip
        assert on_victim
        dead_id = c.kill(victim)
        c.wait_promoted(victim, dead_id)
        promoted_at = len(ids)
        time.sleep(2)
        stop.set()
        feeder.join(timeout=90)
        assert not failures, failures
        assert len(ids) > 100
        live = next(p for p in c.ports if p != victim)
        reader = ChatClient(
            f"redis://127.0.0.1:{live}/0", prefix=prefix, redis_cluster=True, stream_shards=4, timeout_s=120
        )
        got = reader.results(ids, timeout_s=120)
        assert set(got) == set(ids)
        errors = [r for r in got.values() if isinstance(r, Exception)]
        assert not errors, errors[:5]
        counts = finals_per_request(client.redis, client.spaces, ids)
        # Lost: none; answered twice: none. (A final whose write the dead primary took with it was written
        # again by a redelivery, under the guard, which the replica has or not: either way one final.)
        assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
        # The failed-over shards were served on both sides of the failover (the workers may or may not
        # log an error: redis-py's cluster client retries a lost connection after refreshing the slots).
        shards = [shard_for(i, len(client.spaces)) in on_victim for i in ids]
        assert any(shards[:promoted_at]) and any(shards[promoted_at:]), (promoted_at, len(ids))
        client.close()
        reader.close()
    finally:
        codes = [w.stop() for w in workers]
        c.stop()
    assert codes == [0] * len(workers)


@pytest.mark.slow
def test_slot_migration_under_load_loses_and_repeats_no_answer(tmp_path: Path) -> None:
    """Move shard {0}'s slot to another primary while requests flow (ASK and TRYAGAIN during the move,
    MOVED after it): every request gets exactly one final, no worker fails an iteration or drops a write,
    and the slot is served by the target afterwards. Its own cluster: the move changes the slot map."""
    try:
        c = LocalCluster(masters=3).start()
    except EmbeddedRedisError as exc:
        pytest.skip(f"no local cluster: {exc}")
    prefix = f"c{uuid.uuid4().hex[:8]}"
    slot = key_slot(b"0")  # the hash tag {0}: shard 0's stream, replies, guards and heartbeats
    workers: list[WorkerProcess] = []
    clients: list[ChatClient] = []
    try:
        workers = [
            start_cluster_worker(c.url, prefix, tmp_path, 4, async_replies=background)
            for background in (False, True)
        ]
        common = {"prefix": prefix, "redis_cluster": True, "stream_shards": 4, "timeout_s": 60}
        batches, streamer = ChatClient(c.url, content_type="json", **common), ChatClient(c.url, **common)
        clients = [batches, streamer]
        assert key_slot(batches.spaces[0].requests.encode()) == slot
        ids: list[str] = []
        streamed: list[str] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def submit_and_read() -> None:
            """Batches of 20, final-only and streamed alternately, each read back (one XREAD per slot)."""
            try:
                stream = False
                while not stop.is_set():
                    sent = batches.submit_many([{"prompt": "x y z", "max_tokens": 3, "stream": stream}] * 20)
                    batch = [i for i in sent if isinstance(i, str)]
                    ids.extend(batch)
                    got = batches.results(batch, timeout_s=60)
                    bad = [r for r in got.values() if isinstance(r, Exception)]
                    assert len(got) == len(batch) and not bad, bad[:3]
                    stream = not stream
            except BaseException as exc:  # nothing may get here: redirects and TRYAGAIN are retried
                failures.append(exc)

        def stream_one_by_one() -> None:
            """Streamed requests on shard 0 (the slot that moves), each token read as it comes."""
            try:
                while not stop.is_set():
                    reply = streamer.stream(prompt="a b c d", max_tokens=4, shard_key=conversation)
                    streamed.append(reply.id)
                    assert [t.index for t in reply] == [0, 1, 2, 3]
                    assert reply.reply is not None and reply.reply.text == "a b c d"
            except BaseException as exc:
                failures.append(exc)

        conversation = next(k for k in (f"conv-{n}" for n in range(100)) if shard_for(k, 4) == 0)
        threads = [threading.Thread(target=f, daemon=True) for f in (submit_and_read, stream_one_by_one)]
        for t in threads:
            t.start()
        time.sleep(2)
        source = c.owner(slot)
        target = next(p for p in c.primaries() if p != source)
        moved = c.migrate_slot(slot, target, batch=10, pause_s=0.05)
        time.sleep(2)  # MOVED for the clients and workers that still route to the source
        stop.set()
        for t in threads:
            t.join(timeout=90)
        assert not failures, "\n".join("".join(traceback.format_exception(f)) for f in failures)
        assert moved > 10, moved
        assert all(c.owner(slot, port) == target for port in c.primaries())
        shard0 = [i for i in ids if shard_for(i, 4) == 0]
        assert len(ids) > 200 and len(shard0) > 30 and len(streamed) > 10, (len(ids), len(shard0))
        assert all(w.proc.poll() is None for w in workers)  # still serving
        all_ids = ids + streamed
        counts = finals_per_request(batches.redis, batches.spaces, ids)
        counts.update(finals_per_request(streamer.redis, streamer.spaces[:1], streamed))  # all on shard 0
        assert len(counts) == len(all_ids)
        assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
        # The source redirected (ASK during the move, MOVED after it); TRYAGAIN where keys were on both sides.
        admin = redis.Redis(port=source)
        errors = {k.removeprefix("errorstat_"): v["count"] for k, v in admin.info("errorstats").items()}
        admin.close()
        assert errors.get("ASK", 0) > 0 and errors.get("MOVED", 0) > 0, errors
        print(f"SLOT_MIGRATION requests={len(all_ids)} keys_moved={moved} source ASK={errors['ASK']} "
              f"MOVED={errors['MOVED']} TRYAGAIN={errors.get('TRYAGAIN', 0)}")  # fmt: skip
    finally:
        for client in clients:
            client.close()
        codes = [w.stop() for w in workers]
        c.stop()
    assert codes == [0] * len(workers)
    for w in workers:
        for name in ("iteration_failed", "reply_write_failed", "reply_batch_failed"):
            assert not w.events(name), (name, w.events(name)[:3])
        assert not w.events("redis_error"), w.events("redis_error")[:3]


def test_shards_on_one_node(start_worker, redis_url: str, prefix: str) -> None:
    """Without a cluster, N shards are N streams of one server, read in one XREADGROUP."""
    worker = start_worker(stream_shards=4)
    client = ChatClient(redis_url, prefix=prefix, stream_shards=4, content_type="json")
    try:
        ids = [i for i in client.submit_many([{"prompt": f"p {i}", "max_tokens": 2} for i in range(40)])]
        got = client.results([i for i in ids if isinstance(i, str)], timeout_s=60)
        assert len(got) == 40 and all(not isinstance(r, Exception) for r in got.values())
        assert all(client.redis.xlen(n.requests) > 0 for n in client.spaces)
        assert set(finals_per_request(client.redis, client.spaces, list(got)).values()) == {1}
        assert client.cancel(client.submit(prompt="late", max_tokens=2)) in (True, False)
    finally:
        client.close()
        worker.stop()
    assert worker.events("worker_started")[0]["shards"] == 4


def test_async_client_on_the_cluster(cluster: LocalCluster, tmp_path: Path) -> None:
    import asyncio

    from producer.client import AsyncChatClient

    prefix = f"c{uuid.uuid4().hex[:8]}"
    worker = start_cluster_worker(cluster.url, prefix, tmp_path, 4)

    async def go() -> None:
        client = AsyncChatClient(cluster.url, prefix=prefix, redis_cluster=True, stream_shards=4)
        try:
            ids = [
                i
                for i in await client.submit_many([{"prompt": f"a {i}", "max_tokens": 2} for i in range(20)])
            ]
            got = await client.results([i for i in ids if isinstance(i, str)], timeout_s=30)
            assert len(got) == 20 and all(not isinstance(r, Exception) for r in got.values())
            reply = await client.chat(prompt="b c", max_tokens=2, shard_key="conv-1")
            assert reply.text
            assert await client.cancel(await client.submit(prompt="d", max_tokens=2)) in (True, False)
        finally:
            await client.aclose()

    try:
        asyncio.run(go())
    finally:
        worker.stop()


def test_tenants_on_the_cluster_under_their_acl(cluster: LocalCluster, tmp_path: Path) -> None:
    """Tenants are one slot each as they are; workers and a tenant's backend connect as ACL users
    with the rules `python -m worker.acl ... --cluster` prints (set on every node: ACLs are per node)."""
    from worker.tools.acl import producer_rules, worker_rules

    prefix = f"c{uuid.uuid4().hex[:8]}"
    users = {f"w-{prefix}": worker_rules("worker-pw", prefix, cluster=True),
             f"alice-{prefix}": producer_rules("alice", "alice-pw", prefix, cluster=True)}  # fmt: skip
    set_users_on_every_node(cluster, users)
    port = cluster.ports[0]
    worker = start_cluster_worker(
        f"redis://w-{prefix}:worker-pw@127.0.0.1:{port}/0", prefix, tmp_path, 1, tenants="alice,bob"
    )
    alice = ChatClient(
        f"redis://alice-{prefix}:alice-pw@127.0.0.1:{port}/0",
        prefix=prefix,
        redis_cluster=True,
        tenant="alice",
    )
    try:
        ids = [alice.submit(prompt=f"hi {i}", max_tokens=2) for i in range(10)]
        assert all(alice.result(i, timeout_s=30).text for i in ids)
        assert [t.index for t in alice.stream(prompt="a b", max_tokens=2)] == [0, 1]
        assert alice.cancel(alice.submit(prompt="c", max_tokens=2)) is True
    finally:
        alice.close()
        assert worker.stop() == 0
    assert not worker.events("redis_error"), worker.events("redis_error")[:3]
    assert worker.events("worker_started")[0]["tenants"] == 2


def test_a_tenants_shards_spread_over_the_cluster_under_its_acl(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """One large tenant with four shards: its requests land on several slots (and primaries), every one
    is answered exactly once; the ACL lines are the ones `python -m worker.acl ... --cluster` prints,
    set on every node, and another tenant can read none of the sharded tenant's replies."""
    from worker.tools.acl import producer_rules, worker_rules

    prefix = f"c{uuid.uuid4().hex[:8]}"
    users = {f"w-{prefix}": worker_rules("worker-pw", prefix, cluster=True),
             f"alice-{prefix}": producer_rules("alice", "alice-pw", prefix, cluster=True),
             f"bob-{prefix}": producer_rules("bob", "bob-pw", prefix, cluster=True)}  # fmt: skip
    set_users_on_every_node(cluster, users)
    port = cluster.ports[0]
    settings = {"tenants": "alice,bob", "trim_interval_s": 3600}
    url = f"redis://w-{prefix}:worker-pw@127.0.0.1:{port}/0"
    workers = [start_cluster_worker(url, prefix, tmp_path, 4, **settings) for _ in range(2)]
    common = {"prefix": prefix, "redis_cluster": True, "stream_shards": 4}
    alice = ChatClient(f"redis://alice-{prefix}:alice-pw@127.0.0.1:{port}/0", tenant="alice", **common)
    bob = ChatClient(f"redis://bob-{prefix}:bob-pw@127.0.0.1:{port}/0", tenant="bob", **common)
    admin_cluster = redis.RedisCluster.from_url(cluster.url)
    try:
        assert [n.root for n in alice.spaces] == [f"{prefix}:t:{{alice.{n}}}" for n in range(4)]
        ids = answer_exactly_once(alice, admin_cluster, 200)
        lengths = [admin_cluster.xlen(n.requests) for n in alice.spaces]
        assert sum(lengths) == 200 and all(n > 0 for n in lengths), lengths
        slots = {key_slot(n.requests.encode()) for n in alice.spaces}
        assert len(slots) == 4
        owners = {admin_cluster.get_node_from_key(n.requests).port for n in alice.spaces}
        assert len(owners) > 1, owners  # one tenant spread over several primaries
        # Streaming (tokens script) and cancelling (the tenant's cancel stream) in its shards.
        assert [t.index for t in alice.stream(prompt="one two three", max_tokens=3)] == [0, 1, 2]
        assert alice.cancel(alice.submit(prompt="c", max_tokens=2)) is True
        assert bob.chat(prompt="bob too", max_tokens=2).text == "bob too"
        # Bob, on the cluster, can neither read alice's sharded replies nor add to her streams.
        victim = ids[0]
        own = alice.spaces[shard_for(victim, 4)]
        with pytest.raises(redis.exceptions.NoPermissionError):
            bob.redis.xrange(own.reply(victim))
        with pytest.raises(redis.exceptions.NoPermissionError):
            bob.redis.xadd(own.requests, {"v": "1"})
    finally:
        alice.close()
        bob.close()
        admin_cluster.close()
        codes = [w.stop() for w in workers]
    assert codes == [0, 0]
    for w in workers:
        assert not w.events("redis_error"), w.events("redis_error")[:3]
    started = workers[0].events("worker_started")[0]
    assert (started["tenants"], started["shards"], started["cluster"]) == (2, 4, True)


@pytest.mark.parametrize("stream", [False, True], ids=["final-only", "streamed"])
def test_commands_per_request_on_the_cluster(cluster: LocalCluster, tmp_path: Path, stream: bool) -> None:
    """Cluster mode adds no command per request: the budget of tests/test_commands_per_request.py holds,
    counted over all primaries (with one shard: the reads block as on one node)."""
    from test_commands_per_request import BUDGET, REQUESTS, WORDS

    prefix = f"c{uuid.uuid4().hex[:8]}"
    worker = start_cluster_worker(cluster.url, prefix, tmp_path, 1, max_wait_ms=2)
    client = ChatClient(cluster.url, prefix=prefix, redis_cluster=True, timeout_s=120)
    admin = [redis.Redis(port=p) for p in cluster.primaries()]
    try:
        client.chat(prompt="warm up", max_tokens=2)
        for a in admin:
            a.config_resetstat()
        text = " ".join(f"w{i}" for i in range(WORDS))
        ids = []
        for _ in range(0, REQUESTS, 50):
            batch = client.submit_many([{"prompt": text, "max_tokens": WORDS, "stream": stream}] * 50)
            ids += [r for r in batch if isinstance(r, str)]
        assert len(client.results(ids, timeout_s=120)) == REQUESTS
        calls: dict[str, int] = {}
        for a in admin:
            for k, v in a.info("commandstats").items():
                if k != "cmdstat_info":
                    calls[k] = calls.get(k, 0) + v["calls"]
    finally:
        client.close()
        worker.stop()
        for a in admin:
            a.close()
    per_request = sum(calls.values()) / REQUESTS
    assert per_request <= BUDGET[stream], (per_request, sorted(calls.items(), key=lambda kv: -kv[1]))
