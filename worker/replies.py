"""Writing reply events: streamed tokens, then exactly one final `done` or `error`.

Delivery is at-least-once (a reclaimed entry can run twice), so the final event goes
through a Lua script that sets a per-request guard key with NX and only then appends
the event and acknowledges the request entry. The first final write wins; a duplicate
run's final is dropped, and the client sees one `done`/`error` per request id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from producer.protocol import ContentType, ErrorCode, ErrorEvent, ReplyEvent, encode_event

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


def final_guard_key(prefix: str, request_id: str) -> str:
    """Key whose NX set decides which run writes the final reply."""
    return f"{prefix}:final:{request_id}"


@dataclass(frozen=True)
class FinalWrite:
    """A final event for one request, with the stream entry to acknowledge."""

    request_id: str
    reply_key: str
    event: ReplyEvent
    content_type: ContentType
    entry_id: str | bytes | None


class ReplyWriter:
    """Batches reply writes of one engine step into one round trip."""

    def __init__(self, client: redis.Redis, prefix: str, group: str, stream: str, attempt: str, ttl_s: int):
        self.client = client
        self.prefix = prefix
        self.group = group
        self.stream = stream
        self.attempt = attempt
        self.ttl_s = ttl_s
        self._final = client.register_script(_FINAL_SCRIPT)

    def write(self, tokens: list[tuple[str, ReplyEvent, ContentType, bool]], finals: list[FinalWrite]) -> list[bool]:
        """Append token events (key, event, ct, first) and finals in one pipeline; returns which finals won."""
        if not tokens and not finals:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key, event, ct, first in tokens:
            pipe.xadd(key, encode_event(event, ct))  # type: ignore[arg-type]
            if first:
                pipe.expire(key, self.ttl_s)
        for final in finals:
            self._queue_final(pipe, final)
        results = pipe.execute()
        return [bool(r) for r in results[len(results) - len(finals) :]]

    def _queue_final(self, pipe: Any, final: FinalWrite) -> None:
        fields = encode_event(final.event, final.content_type)
        entry = final.entry_id.decode() if isinstance(final.entry_id, bytes) else (final.entry_id or "")
        self._final(
            keys=[final_guard_key(self.prefix, final.request_id), final.reply_key, self.stream],
            args=[self.attempt, self.ttl_s, fields["ct"], fields["body"], self.group, entry],
            client=pipe,
        )

    def error(self, request_id: str | None, reply_key: str | None, code: ErrorCode, message: str,
              content_type: ContentType, entry_id: str | bytes | None) -> bool:
        """Write one final error (or only acknowledge when the sender left no usable address)."""
        if request_id is None or reply_key is None:
            if entry_id is not None:
                self.client.xack(self.stream, self.group, entry_id)
            return False
        event = ErrorEvent(id=request_id, code=code, message=message, attempt=self.attempt)
        return self.write([], [FinalWrite(request_id, reply_key, event, content_type, entry_id)])[0]
