"""Cancelling a request: answer the client at once, then tell every worker to stop it.

One Lua script does both steps atomically. It takes the request's final-reply guard
with `SET NX` and, if it won, appends the `cancelled` error to the reply stream, so the
client sees exactly one final reply even if a worker finishes at the same moment (the
worker's own final then loses the guard and is dropped). It always appends the id to the
broadcast stream `<prefix>:cancel`, which every worker polls to abort the generation
and free its KV blocks; a worker that reads the request later finds the guard and skips it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis

from producer.wire.codec import ContentType, encode_event
from producer.wire.keys import StreamNames
from producer.wire.models import ErrorCode, ErrorEvent

if TYPE_CHECKING:
    import redis.asyncio as aioredis

CLIENT_ATTEMPT = "client"

# KEYS: guard, reply stream, cancel stream. ARGV: request id, ttl_s, ct, body, cancel stream max length.
CANCEL_SCRIPT = """
local won = redis.call('SET', KEYS[1], ARGV[6], 'NX', 'EX', ARGV[2])
if won then
  redis.call('XADD', KEYS[2], '*', 'ct', ARGV[3], 'body', ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'id', ARGV[1])
if won then return 1 else return 0 end
"""


def cancel_call(
    names: StreamNames,
    request_id: str,
    reply_key: str,
    content_type: ContentType,
    ttl_s: int,
    max_entries: int,
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of CANCEL_SCRIPT for one request."""
    event = ErrorEvent(
        id=request_id, code=ErrorCode.CANCELLED, message="cancelled by the client", attempt=CLIENT_ATTEMPT
    )
    fields = encode_event(event, content_type)
    keys = [names.final_guard(request_id), reply_key, names.cancel]
    return keys, [request_id, ttl_s, fields["ct"], fields["body"], max_entries, CLIENT_ATTEMPT]


def register(client: redis.Redis | aioredis.Redis) -> Any:
    """The cancel script bound to a (sync or asyncio) client."""
    return client.register_script(CANCEL_SCRIPT)
