"""One final reply per request: the guard-and-append scripts every writer of a reply uses.

The rule: the first final reply (`done` or `error`) of a request wins, and nothing is
appended to its reply stream after it. Delivery is at-least-once and a client may
cancel at any moment, so several writers race to finish a request; all of them go
through the Lua below, which is the rule's only implementation:

- a final takes the guard `<prefix>:final:<id>` with `SET NX` and appends its event
  only if it won (`_GUARD_AND_APPEND`). A worker's final then acknowledges the request
  entry either way (`FINAL_SCRIPT`): a duplicate run is still answered once. A client's
  cancel appends `cancelled` the same way, then broadcasts the id on `<prefix>:cancel`
  so workers stop generating (`CANCEL_SCRIPT`); a worker that reads the request later
  finds the guard and skips it;
- token events are appended only while no guard exists (`TOKENS_SCRIPT`).

Backends in other languages cancel the same way (docs/protocol.md, "Cancelling").
"""

from __future__ import annotations

from typing import Any

import msgpack

from producer.wire.codec import ContentType, encode_event
from producer.wire.keys import StreamNames
from producer.wire.models import ErrorCode, ErrorEvent
from producer.wire.signing import SIGNATURE_FIELD

# The guard's value when a client, not a worker run, wrote the final reply.
CLIENT_ATTEMPT = "client"

# KEYS[1] guard, KEYS[2] reply stream. ARGV[1] guard value (the writer's attempt), ARGV[2] ttl_s,
# ARGV[3] ct, ARGV[4] body of the final event, ARGV[7] its `sig` field ('' = unsigned, no field; see
# signing.py). Leaves `won` for the script's own follow-up.
_GUARD_AND_APPEND = """\
local won = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
if won then
  if ARGV[7] and ARGV[7] ~= '' then
    redis.call('XADD', KEYS[2], '*', 'ct', ARGV[3], 'body', ARGV[4], 'sig', ARGV[7])
  else
    redis.call('XADD', KEYS[2], '*', 'ct', ARGV[3], 'body', ARGV[4])
  end
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
"""
_RETURN_WON = "if won then return 1 else return 0 end\n"

# A worker's final. KEYS[3] request stream. ARGV[5] group, ARGV[6] entry id ('' = none to acknowledge).
# Returns 1 if the event was appended, 0 if another final had won.
FINAL_SCRIPT = (
    _GUARD_AND_APPEND
    + """\
if ARGV[6] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[5], ARGV[6])
end
"""
    + _RETURN_WON
)

# A client's cancel. KEYS[3] cancel stream. ARGV[5] request id, ARGV[6] cancel stream max length.
# Returns 1 if `cancelled` was appended, 0 if the request already had its final reply.
CANCEL_SCRIPT = (
    _GUARD_AND_APPEND
    + """\
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'id', ARGV[5])
"""
    + _RETURN_WON
)

# A worker's token events of one step, for any number of requests in one call: one command per step
# instead of one per request (at a few hundred streams per step the client library's per-command and
# per-argument cost dominated the worker's loop). KEYS: guard, reply stream of each request in turn.
# ARGV[1] ttl_s; ARGV[2] a msgpack array (raw strings: Redis's cmsgpack has no bin type) holding, per
# request in KEYS order, [set the TTL (1/0), [ct, body, sig, ct, body, sig, ...]] (sig '' = unsigned, no
# `sig` field). A request that has a final
# reply gets nothing appended. Returns how many requests got their events appended. (With sharded
# keys the caller makes one call per hash slot.)
TOKENS_SCRIPT = """\
local appended = 0
for j, s in ipairs(cmsgpack.unpack(ARGV[2])) do
  if redis.call('EXISTS', KEYS[2 * j - 1]) == 0 then
    local reply, events = KEYS[2 * j], s[2]
    for i = 1, #events, 3 do
      if events[i + 2] ~= '' then
        redis.call('XADD', reply, '*', 'ct', events[i], 'body', events[i + 1], 'sig', events[i + 2])
      else
        redis.call('XADD', reply, '*', 'ct', events[i], 'body', events[i + 1])
      end
    end
    if s[1] == 1 then redis.call('EXPIRE', reply, ARGV[1]) end
    appended = appended + 1
  end
end
return appended
"""

# KEYS and ARGV of one script call.
ScriptCall = tuple[list[str], list[Any]]


def final_call(
    names: StreamNames,
    request_id: str,
    reply_key: str,
    event_fields: dict[str, bytes | str],
    attempt: str,
    ttl_s: int,
    group: str,
    entry_id: str,
) -> ScriptCall:
    """FINAL_SCRIPT's KEYS and ARGV for a worker's final event (`encode_event` fields, `sig` if signed)."""
    keys = [names.final_guard(request_id), reply_key, names.requests]
    sig = event_fields.get(SIGNATURE_FIELD, "")
    return keys, [attempt, ttl_s, event_fields["ct"], event_fields["body"], group, entry_id, sig]


def cancel_call(
    names: StreamNames,
    request_id: str,
    reply_key: str,
    content_type: ContentType,
    ttl_s: int,
    max_entries: int,
    signing_key: bytes | None = None,
    request_digest: str | None = None,
) -> ScriptCall:
    """CANCEL_SCRIPT's KEYS and ARGV for one request; the `cancelled` event is encoded like the request,
    and signed when the deployment signs replies (the client holds the same key as the workers). With the
    digest of the entry sent (`request_digest.py`), the event names it (`rd`), as the workers' do."""
    event = ErrorEvent(
        id=request_id, code=ErrorCode.CANCELLED, message="cancelled by the client", attempt=CLIENT_ATTEMPT,
        rd=request_digest or None,
    )  # fmt: skip
    fields = encode_event(event, content_type, reply_key, signing_key)
    keys = [names.final_guard(request_id), reply_key, names.cancel]
    sig = fields.get(SIGNATURE_FIELD, "")
    return keys, [CLIENT_ATTEMPT, ttl_s, fields["ct"], fields["body"], request_id, max_entries, sig]


def tokens_call(
    names: StreamNames, ttl_s: int, streams: list[tuple[str, str, bool, list[Any]]]
) -> ScriptCall:
    """TOKENS_SCRIPT's KEYS and ARGV for (request id, reply key, set the TTL, events) of each request;
    `events` is the flat ct, body, sig, ct, body, sig, ... of its token events in order."""
    keys: list[str] = []
    for request_id, reply_key, _, _ in streams:
        keys += (names.final_guard(request_id), reply_key)
    blob = msgpack.packb([[int(set_ttl), events] for _, _, set_ttl, events in streams], use_bin_type=False)
    return keys, [ttl_s, blob]
