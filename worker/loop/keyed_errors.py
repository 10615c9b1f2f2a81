"""Server errors that name their key, so one `redis_error` line tells the on-call engineer where to look.

Redis's errors (WRONGTYPE, OOM, NOPERM...) do not say which key a command touched. The worker's
single-key calls run inside `about(key)`, which re-raises such an error as a `KeyedResponseError`
carrying the key; the loop's back-off logs it as the `key` field of `redis_error`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis


class KeyedResponseError(redis.ResponseError):
    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


@contextmanager
def about(key: str) -> Iterator[None]:
    """Name `key` in a server error raised inside (connection errors pass through unchanged)."""
    try:
        yield
    except KeyedResponseError:
        raise
    except redis.ResponseError as exc:
        # redis-py strips the error code (OOM, READONLY...) from the message of the classes it maps it to:
        # the class name keeps it in the `redis_error` line; `refuses_writes` reads the cause.
        named = str(exc) if type(exc) is redis.ResponseError else f"{type(exc).__name__}: {exc}"
        raise KeyedResponseError(named, key) from exc
