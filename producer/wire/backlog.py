"""The backlog of the request stream, and the producer's refusal above a limit.

The backlog of a consumer group is its `lag` (entries not yet delivered to any worker)
plus its `pending` count (delivered, not yet acknowledged), from XINFO GROUPS. When the
server cannot report lag (Redis < 7, or after XDEL), or the group does not exist yet,
the stream length stands in, which overestimates and so errs on the side of refusing;
a stream that does not exist has no backlog.

The rule is written once, in Lua (`_BACKLOG_LUA`), and runs in two scripts:
- `ADMIT_SCRIPT`, the producer's: check and XADD in one script, so no burst of
  concurrent clients can slip past the limit between reading the backlog and appending;
- `BACKLOG_SCRIPT`, read-only, with which workers measure the backlog they shed above.
"""

from __future__ import annotations

from typing import Any

# backlog(stream, group): the rule above. Defines a Lua function for the script that follows.
_BACKLOG_LUA = """\
local function backlog(stream, group)
  if redis.call('EXISTS', stream) == 0 then return 0 end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then
      local lag = info['lag']
      if not lag then lag = redis.call('XLEN', stream) end
      return lag + info['pending']
    end
  end
  return redis.call('XLEN', stream)
end
"""

# KEYS: request stream. ARGV: group. Returns the group's backlog.
BACKLOG_SCRIPT = _BACKLOG_LUA + "return backlog(KEYS[1], ARGV[1])\n"

# KEYS: request stream. ARGV: group, max backlog (0 = no limit), then field/value pairs.
# Returns {1, entry id} when appended, {0, backlog} when refused.
ADMIT_SCRIPT = (
    _BACKLOG_LUA
    + """\
local limit = tonumber(ARGV[2])
if limit > 0 then
  local n = backlog(KEYS[1], ARGV[1])
  if n >= limit then return {0, n} end
end
return {1, redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))}
"""
)


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
