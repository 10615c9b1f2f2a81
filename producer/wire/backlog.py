"""Admission before XADD: refuse a request with `overloaded` when the backlog is over the limit.

The check and the XADD run in one Lua script, so no burst of concurrent clients can slip
past the limit between reading the backlog and appending. The backlog of the consumer
group is its `lag` (entries not yet delivered to any worker) plus its `pending` count
(delivered, not yet acknowledged); when the server cannot report lag (Redis < 7, or after
XDEL), the stream length is used, which overestimates and so errs on the side of refusing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    import redis.asyncio as aioredis

# KEYS: request stream. ARGV: group, max backlog (0 = no limit), then field/value pairs.
# Returns {1, entry id} when appended, {0, backlog} when refused.
ADMIT_SCRIPT = """
local limit = tonumber(ARGV[2])
if limit > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  local backlog = nil
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == ARGV[1] then
      local lag = info['lag']
      if not lag then lag = redis.call('XLEN', KEYS[1]) end
      backlog = lag + info['pending']
    end
  end
  if backlog == nil then backlog = redis.call('XLEN', KEYS[1]) end
  if backlog >= limit then return {0, backlog} end
end
return {1, redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))}
"""


class AdmissionRefused(Exception):
    """The backlog is at or above the limit; nothing was appended."""

    def __init__(self, backlog: int, limit: int):
        super().__init__(f"backlog of {backlog} requests is at the limit of {limit}")
        self.backlog = backlog
        self.limit = limit


def script_args(group: str, limit: int, fields: dict[str, Any]) -> list[Any]:
    """ARGV of ADMIT_SCRIPT for one request entry."""
    args: list[Any] = [group, limit]
    for name, value in fields.items():
        args += [name, value]
    return args


def admitted_entry_id(reply: list[Any], limit: int) -> bytes:
    """The appended entry id, or raise AdmissionRefused."""
    appended, value = int(reply[0]), reply[1]
    if not appended:
        raise AdmissionRefused(int(value), limit)
    return value if isinstance(value, bytes) else str(value).encode()


def register(client: redis.Redis | aioredis.Redis) -> Any:
    """The admission script bound to a (sync or asyncio) client."""
    return client.register_script(ADMIT_SCRIPT)
