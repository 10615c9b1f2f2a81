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
)


class Backoff:
    """Delay before the next attempt: initial * 2^failures, capped, times a random factor in [0.5, 1.5)."""

    def __init__(self, initial_ms: float, max_ms: float, rng: random.Random | None = None):
        self.initial_s = initial_ms / 1000
        self.max_s = max_ms / 1000
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay_s(self) -> float:
        """Record one more failure and return how long to wait."""
        base = min(self.max_s, self.initial_s * 2 ** min(self.failures, 30))
        self.failures += 1
        return base * self._rng.uniform(0.5, 1.5)

    def reset(self) -> None:
        """A call succeeded: the next failure starts from the initial delay again."""
        self.failures = 0
