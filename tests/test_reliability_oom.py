"""Redis out of memory (`maxmemory` with `noeviction`) while a worker answers: nothing lost, nothing redone.

A private server with a small `maxmemory` is filled until it refuses writes (OOM) while an echo worker
holds requests. The worker must report the refusal as `redis_error` (the OOM error named), back off,
keep every final reply it computed, and write it once memory frees: each request is answered exactly
once, within about a second of the freeing, by its first run (one `request_done` per id, no
`pending_resynced` re-read), and no final is said to have lost to "another writer".
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from worker_process import WorkerProcess, spawn_worker

from producer.client import ChatClient, Reply
from producer.wire.codec import decode_event
from producer.wire.keys import StreamNames
from producer.wire.models import DoneEvent, ErrorEvent
from worker.local_redis.server import EmbeddedRedis

REQUESTS = 6
WORDS = 8
TOKEN_DELAY_S = 0.15  # the echo engine's per-step sleep: generations of WORDS steps outlast the filling
FILL_VALUE = b"x" * 64 * 1024
# From freeing memory to the last final reply: the writer retries at most every ~0.75 s after OOM.
ANSWERED_WITHIN_S = 2.0


@pytest.fixture()
def oom_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(extra_args=("--maxmemory-policy", "noeviction")) as server:
        yield server


def fill_until_oom(client: redis.Redis, tag: str) -> list[str]:
    """Cap memory a little above what is used and write filler keys until the server refuses (OOM); the
    fillers hold more than the margin left under the cap, so deleting them frees the server."""
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + 2 * 1024 * 1024)
    keys: list[str] = []
    for i in range(10_000):
        key = f"filler:{tag}:{i}"
        try:
            client.set(key, FILL_VALUE)
        except redis.exceptions.OutOfMemoryError:
            # Full. Keep it so while the worker acknowledges and trims (which free a little memory).
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory", used - 512 * 1024)
            return keys
        keys.append(key)
    raise AssertionError("the server never refused a write")


def refuses_writes(client: redis.Redis) -> bool:
    try:
        client.set("probe", b"x" * 1024)
    except redis.exceptions.OutOfMemoryError:
        return True
    client.delete("probe")
    return False


def wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def finals_of(client: redis.Redis, names: StreamNames, request_id: str) -> list[DoneEvent | ErrorEvent]:
    entries = client.xrange(names.reply(request_id))
    events = [decode_event(fields) for _, fields in entries]
    return [e for e in events if isinstance(e, DoneEvent | ErrorEvent)]


@pytest.mark.parametrize(
    ("stream", "async_replies", "when"),
    [
        (False, False, "generating"),  # finals computed during the outage, kept by the inline writer
        (True, True, "generating"),  # token writes refused too (dropped), the background writer keeps finals
        (False, False, "before_start"),  # a worker that starts while Redis refuses writes, then serves
    ],
    ids=["final-only-inline", "streamed-thread", "start-during-oom"],
)
def test_finals_refused_by_oom_are_written_once_memory_frees(
    oom_server: EmbeddedRedis, tmp_path: Path, stream: bool, async_replies: bool, when: str
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    admin = redis.Redis.from_url(oom_server.url)
    client = ChatClient(oom_server.url, prefix=prefix, timeout_s=60)
    names = StreamNames.for_prefix(prefix)
    worker: WorkerProcess | None = None
    settings = dict(
        echo_token_delay_ms=TOKEN_DELAY_S * 1000, async_replies=str(async_replies).lower(), max_wait_ms=20
    )
    try:
        if when == "generating":
            worker = spawn_worker(oom_server.url, prefix, tmp_path, "w-oom", "echo", **settings)
        else:  # the group must exist for the submissions; the worker starts once Redis refuses writes
            admin.xgroup_create(names.requests, "workers", id="0", mkstream=True)
        prompts = {f"oom {i} " + " ".join(f"w{j}" for j in range(WORDS - 2)): i for i in range(REQUESTS)}
        sent = client.submit_many([{"prompt": p, "max_tokens": WORDS, "stream": stream} for p in prompts])
        ids = {rid: p for rid, p in zip(sent, prompts, strict=True) if isinstance(rid, str)}
        assert len(ids) == REQUESTS
        if worker is not None:  # every request read (pending under the worker), none finished yet
            read = lambda: admin.xpending(names.requests, "workers")["pending"] == REQUESTS  # noqa: E731
            wait_for(read, 10, "the reads")
        fillers = fill_until_oom(admin, prefix)
        if worker is None:  # it cannot announce its start before the server takes writes again
            worker = spawn_worker(oom_server.url, prefix, tmp_path, "w-oom", "echo", wait=False, **settings)
        w = worker
        # The outage lasts past the generations (WORDS x TOKEN_DELAY_S): finals are computed and kept.
        wait_for(lambda: any("OutOfMemoryError" in e["error"] for e in w.events("redis_error")), 20,
                 "redis_error naming the OOM")  # fmt: skip
        time.sleep(1.0)
        assert refuses_writes(admin)
        assert all(not finals_of(admin, names, rid) for rid in ids), "a final was written during OOM"
        admin.delete(*fillers)
        freed = time.monotonic()
        replies = client.results(list(ids), timeout_s=30)
        answered_s = time.monotonic() - freed
        for rid, prompt in ids.items():
            reply = replies[rid]
            assert isinstance(reply, Reply), reply
            assert reply.text == prompt
        time.sleep(0.5)  # anything written twice would show now
        for rid in ids:
            assert len(finals_of(admin, names, rid)) == 1, rid
        done = [e["id"] for e in worker.events("request_done")]
        assert sorted(done) == sorted(ids), "a request was computed twice"
        for event in ("final_not_written", "pending_resynced", "reply_write_failed", "reply_batch_failed"):
            assert not worker.events(event), worker.events(event)
        errors = worker.events("redis_error")
        assert errors and all(e["retry_in_ms"] <= 750 for e in errors if "OutOfMemoryError" in e["error"])
        if stream and any(worker.events("reply_tokens_dropped")):
            assert all(e["events"] > 0 for e in worker.events("reply_tokens_dropped"))
        assert admin.xpending(names.requests, "workers")["pending"] == 0
        # Where the worker could not step during the outage (its token writes or its start were refused),
        # the rest of the generation comes after the freeing.
        generating_after = WORDS * TOKEN_DELAY_S if stream or when == "before_start" else 0.0
        assert answered_s <= ANSWERED_WITHIN_S + generating_after, answered_s
    finally:
        admin.config_set("maxmemory", 0)
        client.close()
        if worker is not None:
            worker.stop()
        admin.close()
