"""What `/health` and `/ready` answer: the worker's state, set by the loop, read by the metrics server.

The loop sets the flags as it goes (plain attribute writes: the server thread only reads them), so
a probe costs no Redis round trip and no lock:

- `/health` fails once the loop stopped, or when it has not finished an iteration for `stall_s`
  (a hung step or a deadlock); a Redis outage is not a failure of the worker (the loop keeps
  iterating through its back-off), so it never restarts a worker that waits for Redis.
- `/ready` holds while the worker consumes: it joined its groups, is not draining, its last Redis
  call succeeded, and its engine lives. The reason it does not hold is the answer's body.
"""

from __future__ import annotations

import time


class WorkerHealth:
    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.joined = False  # the groups exist and the worker beats
        self.draining = False  # shutdown started: no more reading
        self.stopped = False  # the loop returned (or died)
        self.redis_ok = True  # the last Redis call of the loop succeeded
        self.engine_ok = True  # the engine (process) is alive
        self.last_beat_s = time.monotonic()  # the end of the loop's last iteration (or its start)

    def beat(self) -> None:
        """The loop finished an iteration (successful or backing off)."""
        self.last_beat_s = time.monotonic()

    def live(self) -> tuple[bool, str]:
        """(healthy, reason) for `/health`."""
        if self.stopped:
            return False, "the worker loop stopped"
        stalled = time.monotonic() - self.last_beat_s
        if self.joined and stalled > self.stall_s:
            return False, f"the worker loop made no progress for {stalled:.0f} s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """(ready, reason) for `/ready`."""
        if self.stopped:
            return False, "the worker loop stopped"
        if not self.engine_ok:
            return False, "the engine is not running"
        if not self.joined:
            return False, "starting: the worker has not joined its consumer group yet"
        if self.draining:
            return False, "draining: shutting down"
        if not self.redis_ok:
            return False, "redis unavailable"
        live, reason = self.live()
        return live, reason
