"""Reply writes from a background thread, so the loop never waits on Redis inside a step.

With a GPU step of a few milliseconds, the loop's one round trip per step to write a step's
token events and finals (a few hundred XADDs in one script call, behind whatever else the
server is doing) took as long as the step itself. Here the loop hands each iteration's writes
to one thread as a batch and goes on; the thread writes the batches in order, one pipeline each
(the same `ReplyWriter.write`), so every promise of `writer.py` holds: a final and its XACK in
one script, nothing after a final, no write dropped by a lost connection. While Redis is away
the thread retries the oldest batch with backoff, and `flush()` raises a connection error so the
loop backs off instead of stepping on; at most `max_batches` wait, after which `flush()` waits
for the thread (the loop then runs at Redis's pace). A server that refuses writes for now (OOM at
`maxmemory`, BUSY...: `refuses_writes`) is retried the same way, soon (`retry_delay_s`), and logged
`redis_error`; `flush()` then raises that error, so the loop backs off as from its own.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from typing import Any

import redis
import structlog

from producer.wire.backoff import TRANSIENT_ERRORS, Backoff, slot_in_migration
from worker.replies.writer import ReplyWriter, ReplyWriters, refuses_writes, retry_delay_s

log = structlog.get_logger("worker")

SWITCH_INTERVAL_S = 0.0005
# What `ReplyWriter.write` raises to have a batch kept and retried (a ResponseError: `refuses_writes`).
RETRIED_ERRORS: tuple[type[Exception], ...] = (*TRANSIENT_ERRORS, redis.ResponseError)


class ReplyWriterThread:
    """Writes the batches of the lanes' writers (or of one writer) from one thread, oldest first."""

    def __init__(self, writer: ReplyWriters | ReplyWriter, backoff: Backoff, max_batches: int = 8):
        # The loop and this thread share the GIL; with the default 5 ms switch interval the loop can wait
        # a whole decode step for it while this thread encodes a batch.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self.writer = writer
        self.backoff = backoff
        self.max_batches = max_batches
        self._batches: deque[Any] = deque()  # handed over, not yet written; the head is being written
        self._dropped: list[str] = []
        self._failing: str | None = None  # the last connection error while it lasts
        self._migrating = False  # ... and it said a slot is moving (TRYAGAIN), not that Redis is away
        self._refused: redis.ResponseError | None = None  # ... or it was the server refusing writes (OOM)
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="reply-writer", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> bool:
        """Writes queued or handed over that have not reached Redis yet."""
        with self._cond:
            return self.writer.pending or bool(self._batches)

    def flush(self) -> list[str]:
        """Hand over what is queued; returns the ids whose final lost the guard in batches written since.

        Raises a connection error while the thread cannot reach Redis (nothing is lost: the batches wait).
        """
        batch = self.writer.take()
        with self._cond:
            if batch is not None:
                while len(self._batches) >= self.max_batches and self._failing is None:
                    self._cond.wait(0.1)  # Redis is slower than the loop: go at its pace
                self._batches.append(batch)
                self._cond.notify_all()
            dropped, self._dropped = self._dropped, []
            failing, migrating, refused = self._failing, self._migrating, self._refused
        if failing is not None and refused is not None:
            # The loop logs `redis_error` and backs off, as for a refusal of its own commands.
            raise type(refused)(f"reply writes are waiting for the server to accept writes: {failing}")
        if failing is not None and migrating:
            # The loop backs off briefly, as for its own TRYAGAIN (see `Backoff.next_delay_s`).
            raise redis.exceptions.ClusterError(f"reply writes are waiting for a slot to move: {failing}")
        if failing is not None:
            raise redis.ConnectionError(f"reply writes are waiting for Redis: {failing}")
        return dropped

    def wait_written(self, timeout_s: float) -> bool:
        """Wait until every handed-over batch is written (or the timeout passes); True if all were."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._batches and time.monotonic() < deadline:
                self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            return not self._batches

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what was handed over (up to `timeout_s`), then stop the thread."""
        self.wait_written(timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._batches and not self._closing:
                    self._cond.wait()
                if not self._batches:
                    return
                batch = self._batches[0]
            try:
                dropped = self.writer.write(batch)
            except RETRIED_ERRORS as exc:
                refused = refuses_writes(exc)
                if not refused and not isinstance(exc, TRANSIENT_ERRORS):
                    log.exception("reply_batch_failed")  # `write` raises no other server error: a bug
                    dropped = []
                else:
                    delay_s = retry_delay_s(self.backoff.next_delay_s(exc), exc)
                    with self._cond:
                        self._failing = f"{type(exc).__name__}: {exc}"[:200]
                        self._migrating = slot_in_migration(exc)
                        self._refused = exc if refused and isinstance(exc, redis.ResponseError) else None
                        if self._closing:
                            return  # shutting down without Redis: the entries stay pending and are reclaimed
                    event = "redis_error" if refused else "redis_unavailable"
                    log.warning(event, error=self._failing, retry_in_ms=round(delay_s * 1000))
                    time.sleep(delay_s)
                    continue
            except Exception:  # a bug must not stop every later reply: log it and drop this batch
                log.exception("reply_batch_failed")
                dropped = []
            self.backoff.reset()
            with self._cond:
                self._batches.popleft()
                self._dropped += dropped
                self._failing = None
                self._refused = None
                self._cond.notify_all()
