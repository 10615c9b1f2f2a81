"""Reconnect delays: exponential backoff with jitter, shared by clients and workers.

Jitter spreads the reconnects of many processes after a Redis restart, so they do not
arrive as one thundering herd; the cap keeps a long outage from growing the delay forever.
"""

from __future__ import annotations

import random

import redis

# Errors after which the same call may succeed on a fresh connection.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    # Redis Cluster: a slot without a reachable primary until a replica is promoted.
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
    # Redis Cluster: redis-py follows ASK/MOVED and retries TRYAGAIN itself, 16 times within about
    # 0.4 s, then raises ClusterError("TTL exhausted."). While a slot migrates, a command naming keys
    # of that slot on both sides (a script, a multi-key XREAD) gets TRYAGAIN until the last of its
    # keys has moved, which can outlast those 0.4 s: retry it with our backoff like an outage.
    redis.exceptions.ClusterError,
)


def slot_in_migration(exc: BaseException | None) -> bool:
    """Whether `exc` says a slot is moving between primaries (TRYAGAIN, directly or past redis-py's own
    retries), not that a server is away: the cluster serves, and the same call succeeds once the
    command's keys are on one side again."""
    return isinstance(exc, redis.exceptions.TryAgainError) or type(exc) is redis.exceptions.ClusterError


class Backoff:
    """Delay before the next attempt: initial * 2^failures, capped, times a random factor in [0.5, 1.5)."""

    def __init__(self, initial_ms: float, max_ms: float, rng: random.Random | None = None):
        self.initial_s = initial_ms / 1000
        self.max_s = max_ms / 1000
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay_s(self, exc: BaseException | None = None) -> float:
        """Record one more failure and return how long to wait.

        A slot in migration (`slot_in_migration(exc)`) is retried after the initial delay, and does not
        grow the next one: the move ends when it ends, and waiting seconds would stall every other slot's
        work of the caller meanwhile."""
        if slot_in_migration(exc):
            return self.initial_s * self._rng.uniform(0.5, 1.5)
        base = min(self.max_s, self.initial_s * 2 ** min(self.failures, 30))
        self.failures += 1
        return base * self._rng.uniform(0.5, 1.5)

    def reset(self) -> None:
        """A call succeeded: the next failure starts from the initial delay again."""
        self.failures = 0
