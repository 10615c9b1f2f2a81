"""The background reply writer keeps the inline writer's promises, against a real server."""

from __future__ import annotations

import redis

from producer.wire.backoff import Backoff
from producer.wire.codec import decode_event
from producer.wire.keys import StreamNames
from producer.wire.models import DoneEvent, Timings, TokenEvent, Usage
from worker.replies.writer import FinalWrite, ReplyWriter
from worker.replies.writer_thread import ReplyWriterThread


def token(i: int) -> dict:
    return {"type": "token", "index": i, "text": f" t{i}", "token_ids": [i], "attempt": "w:1"}


def done(rid: str) -> DoneEvent:
    return DoneEvent(
        id=rid,
        text="x",
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=1),
        timings=Timings(queue_ms=1.0, ttft_ms=1.5, tpot_ms=None, total_ms=2.0, worker="w"),
        attempt="w:1",
    )


def test_batches_are_written_in_order_and_nothing_follows_a_final(
    redis_client: redis.Redis, prefix: str
) -> None:
    names = StreamNames.for_prefix(prefix)
    redis_client.xgroup_create(names.requests, "workers", id="0", mkstream=True)
    entry = redis_client.xadd(names.requests, {"v": "1"})
    redis_client.xreadgroup("workers", "w", {names.requests: ">"})
    writer = ReplyWriter(redis_client, names, "workers", "w:1", ttl_s=60)
    background = ReplyWriterThread(writer, Backoff(10, 100))
    try:
        key = names.reply("r1")
        for step in range(50):  # fifty iterations, each handing over one batch
            writer.token("r1", key, token(step), "json", first=step == 0)
            assert background.flush() == []
        writer.final(FinalWrite("r1", key, done("r1"), "json", entry))
        background.flush()
        writer.token("r1", key, token(50), "json", first=False)  # after the final: must be dropped
        background.flush()
        # A second final for the same request (a duplicate run) loses the guard and is reported.
        writer.final(FinalWrite("r1", key, done("r1"), "json", entry))
        background.flush()
        assert background.wait_written(10) and not background.pending
        assert background.flush() == ["r1"]
    finally:
        background.close()
    events = [decode_event(fields) for _, fields in redis_client.xrange(key)]
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [t.index for t in tokens] == list(range(50))
    assert isinstance(events[-1], DoneEvent) and len(events) == 51
    assert redis_client.xpending(names.requests, "workers")["pending"] == 0  # acked with its final
    assert redis_client.ttl(key) > 0
