"""Writing reply events: streamed tokens, then exactly one final `done` or `error`.

Delivery is at-least-once (a reclaimed entry can run twice), so the final event goes
through a Lua script that sets a per-request guard key with NX and only then appends
the event and acknowledges the request entry. The first final write wins; a duplicate
run's final is dropped, and the client sees one `done`/`error` per request id.

All writes of one loop iteration (tokens, finals, dead letters, acks) are queued in the
`ReplyWriter` and sent in one pipeline by `flush()`. If Redis is unreachable, the queue
is kept and the loop retries the flush (with backoff) before it steps the engine again,
so no final reply and no acknowledgement is dropped by a connection loss; a retried
flush may repeat token events, which clients drop by `index` (see `TokenRuns`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis
import structlog

from producer.wire.codec import ContentType, encode_event
from producer.wire.keys import StreamNames
from producer.wire.models import ErrorCode, ErrorEvent, ReplyEvent

__all__ = ["FinalWrite", "ReplyWriter"]

log = structlog.get_logger("worker")

# KEYS: guard, reply stream, request stream. ARGV: attempt, ttl_s, ct, body, group, entry id.
_FINAL_SCRIPT = """
local won = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
if won then
  redis.call('XADD', KEYS[2], '*', 'ct', ARGV[3], 'body', ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
if ARGV[6] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[5], ARGV[6])
end
if won then return 1 else return 0 end
"""


# KEYS: guard, reply stream. ARGV: ttl_s, set_ttl (1/0), then ct, body for each token event in order.
# Token events are appended only while the request has no final reply: once a final is written (by
# this worker, another one, or a client's cancel, which all take the guard first), nothing follows it.
_TOKENS_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 3, #ARGV, 2 do
  redis.call('XADD', KEYS[2], '*', 'ct', ARGV[i], 'body', ARGV[i + 1])
end
if ARGV[2] == '1' then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
return 1
"""


@dataclass(frozen=True)
class FinalWrite:
    """A final event for one request, with the stream entry to acknowledge."""

    request_id: str
    reply_key: str
    event: ReplyEvent
    content_type: ContentType
    entry_id: str | bytes | None


@dataclass
class _Queued:
    tokens: list[tuple[str, str, ReplyEvent, ContentType, bool]] = field(default_factory=list)
    finals: list[FinalWrite] = field(default_factory=list)
    dead: list[tuple[dict[bytes, bytes], bytes]] = field(default_factory=list)
    acks: list[bytes] = field(default_factory=list)


class ReplyWriter:
    """Queues the reply writes of one loop iteration and sends them in one round trip."""

    def __init__(
        self,
        client: redis.Redis,
        names: StreamNames,
        group: str,
        attempt: str,
        ttl_s: int,
        dead_max_entries: int = 100_000,
    ):
        self.client = client
        self.names = names
        self.group = group
        self.stream = names.requests
        self.attempt = attempt
        self.ttl_s = ttl_s
        self.dead_stream = names.dead_letter
        self.dead_max_entries = dead_max_entries
        self._final = client.register_script(_FINAL_SCRIPT)
        self._tokens = client.register_script(_TOKENS_SCRIPT)
        self._queued = _Queued()

    @property
    def pending(self) -> bool:
        """Writes are queued that have not reached Redis yet."""
        q = self._queued
        return bool(q.tokens or q.finals or q.dead or q.acks)

    def token(
        self, request_id: str, key: str, event: ReplyEvent, content_type: ContentType, first: bool
    ) -> None:
        """Queue a token event (`first`: also set the reply stream's TTL); dropped if the request is final."""
        self._queued.tokens.append((request_id, key, event, content_type, first))

    def final(self, final: FinalWrite) -> None:
        """Queue a final reply, guarded and acknowledged atomically."""
        self._queued.finals.append(final)

    def error(
        self,
        request_id: str | None,
        reply_key: str | None,
        code: ErrorCode,
        message: str,
        content_type: ContentType,
        entry_id: str | bytes | None,
    ) -> None:
        """Queue one final error (or only the acknowledgement when the sender left no usable address)."""
        if request_id is None or reply_key is None:
            if entry_id is not None:
                self.ack(entry_id if isinstance(entry_id, bytes) else entry_id.encode())
            return
        event = ErrorEvent(id=request_id, code=code, message=message, attempt=self.attempt)
        self.final(FinalWrite(request_id, reply_key, event, content_type, entry_id))

    def dead_letter(self, fields: dict[bytes, bytes], entry_id: bytes) -> None:
        """Queue parking an entry in the dead-letter stream, then its acknowledgement."""
        self._queued.dead.append((fields, entry_id))

    def ack(self, entry_id: bytes) -> None:
        """Queue a bare acknowledgement (an entry that needs no reply)."""
        self._queued.acks.append(entry_id)

    def flush(self) -> list[str]:
        """Send everything queued; returns the request ids whose final lost the guard (already answered).

        On a connection error the queue is kept and the error propagates; call again to retry.
        """
        q = self._queued
        if not self.pending:
            return []
        pipe = self.client.pipeline(transaction=False)
        for fields, entry_id in q.dead:
            pipe.xadd(self.dead_stream, fields, maxlen=self.dead_max_entries, approximate=True)  # type: ignore[arg-type]
            pipe.xack(self.stream, self.group, entry_id)
        # One script call per reply stream, carrying its token events in order.
        streams: dict[tuple[str, str], list[Any]] = {}
        for request_id, key, event, ct, first in q.tokens:
            args = streams.setdefault((request_id, key), [self.ttl_s, "0"])
            encoded = encode_event(event, ct)
            args += [encoded["ct"], encoded["body"]]
            if first:
                args[1] = "1"
        for (request_id, key), args in streams.items():
            self._tokens(keys=[self.names.final_guard(request_id), key], args=args, client=pipe)
        for final in q.finals:
            self._queue_final(pipe, final)
        if q.acks:
            pipe.xack(self.stream, self.group, *q.acks)
        # A command error (say, a hostile reply key of the wrong type) must not block the queue forever:
        # it is logged and dropped; only connection errors propagate and keep the queue for a retry.
        results = pipe.execute(raise_on_error=False)
        self._queued = _Queued()
        for result in results:
            if isinstance(result, Exception):
                log.warning("reply_write_failed", error=str(result)[:200])
        won = results[len(results) - len(q.finals) - (1 if q.acks else 0) :][: len(q.finals)]
        return [f.request_id for f, w in zip(q.finals, won, strict=True) if w != 1]

    def _queue_final(self, pipe: Any, final: FinalWrite) -> None:
        fields = encode_event(final.event, final.content_type)
        entry = final.entry_id.decode() if isinstance(final.entry_id, bytes) else (final.entry_id or "")
        self._final(
            keys=[self.names.final_guard(final.request_id), final.reply_key, self.stream],
            args=[self.attempt, self.ttl_s, fields["ct"], fields["body"], self.group, entry],
            client=pipe,
        )
