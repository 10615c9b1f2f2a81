"""The worker's heartbeat: a key with a TTL, plus a touch of every entry it is serving.

`<prefix>:hb:<consumer>` exists while the worker lives; its value says `alive` or
`draining` (after SIGTERM). Each beat also resets the idle time of the worker's own
pending entries (XCLAIM to itself with JUSTID, which does not count as a delivery), so
reclaimers, which only take entries idle for `reclaim_min_idle_ms`, never steal a live
worker's long generation. An entry that another worker has already claimed is reported
back as lost, and the worker stops generating it.

Who is alive (`live_workers`): the group's consumers of a request stream whose key says `alive`, what
shard ownership is computed over (`shard_ownership.py`); a draining worker already counts as gone.

The loop beats between engine steps, and while an inline engine's step holds its thread,
`step_cover.StepCover` beats for it (up to `LLM_MAX_STEP_S` into the step). The TTL is a
multiple of the interval (3x by default); a reclaim still needs the entries idle for
`reclaim_min_idle_ms`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from producer.wire.keys import StreamNames
from producer.wire.redis_factory import register_script
from worker.loop.keyed_errors import about

ALIVE = "alive"
DRAINING = "draining"

# KEYS: heartbeat key, request stream. ARGV: state, ttl_ms, group, consumer, entry ids...
# Touches the entries this consumer still owns; returns the ones it no longer owns.
_BEAT_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local lost = {}
for i = 5, #ARGV do
  local p = redis.call('XPENDING', KEYS[2], ARGV[3], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[4] then
    redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[4], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""


class Heartbeat:
    """Beats at most once per interval; `beat(force=True)` beats now."""

    def __init__(
        self,
        client: redis.Redis,
        names: StreamNames,
        group: str,
        consumer: str,
        interval_s: float,
        ttl_s: float,
    ):
        self.client = client
        self.key = names.heartbeat(consumer)
        self.stream = names.requests
        self.group = group
        self.consumer = consumer
        self.interval_s = interval_s
        self.ttl_ms = int(ttl_s * 1000)
        self.state = ALIVE
        self._last_s = float("-inf")
        self._script = register_script(client, _BEAT_SCRIPT)

    def due(self) -> bool:
        """Whether the interval has passed since the last beat (`beat` without `force` beats only then)."""
        return time.monotonic() - self._last_s >= self.interval_s

    def beat(self, serving: Iterable[bytes], force: bool = False) -> list[bytes]:
        """Refresh the key and touch the entries being served; returns entries now owned by someone else."""
        now = time.monotonic()
        if not force and now - self._last_s < self.interval_s:
            return []
        ids = [i.decode() if isinstance(i, bytes) else i for i in serving]
        with about(self.key):
            lost = self._script(
                keys=[self.key, self.stream], args=[self.state, self.ttl_ms, self.group, self.consumer, *ids]
            )
        self._last_s = now
        return [i if isinstance(i, bytes) else str(i).encode() for i in lost]

    def drain(self, serving: Iterable[bytes]) -> None:
        """Announce a warm shutdown: reclaimers may take handed-back entries at once."""
        self.state = DRAINING
        self.beat(serving, force=True)

    def stop(self) -> None:
        """Remove the key: this consumer is gone."""
        self.client.delete(self.key)


def live_workers(client: redis.Redis, names: StreamNames, group: str) -> list[str]:
    """The consumers of `names`' request stream in `group` whose heartbeat key says `alive`."""
    with about(names.requests):
        consumers = [_text(c["name"]) for c in client.xinfo_consumers(names.requests, group)]
    if not consumers:
        return []
    pipe = client.pipeline(transaction=False)
    for name in consumers:
        pipe.get(names.heartbeat(name))
    states = pipe.execute()
    return [name for name, state in zip(consumers, states, strict=True) if state == ALIVE.encode()]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
