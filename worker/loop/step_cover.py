"""Heartbeats while an inline engine step holds the loop's thread.

The loop beats between engine steps (`heartbeat.py`). An engine that runs inline (on the CPU, or with
`LLM_ENGINE_PROCESS=inline`) computes each step on the loop's own thread, and one step can outlast
`LLM_HEARTBEAT_TTL_S`: a 4,096-token prefill step ran 50 s with four CPU workers sharing two cores
(`loadtest/chat_affinity_bench.py`). The other workers then took the busy worker for dead, dropped it
from the consumers and reclaimed its entries, which it had been computing all along: requests were
answered late or dead-lettered after too many deliveries, and `/health` failed it as well.

`StepCover.covering()` wraps the engine calls that may block. While a step is under way, a thread of
this class beats each lane at the heartbeat interval with the entries the loop serves, and marks the
loop's progress for `/health`, as the loop itself would between steps. It does so for `max_step_s`
into the step only (`LLM_MAX_STEP_S`): a step that runs longer is taken for stalled (a hung device
call, a deadlock), the key lapses and the entries go to live workers, as when a worker dies.

Safety: the thread reads the in-flight table and calls Redis only inside a covered call, while the loop's
thread waits in the engine and touches neither; `covering()` returns only after a beat in progress has
ended (one lock). Entries that a beat finds owned by another worker are handed back to the loop by
`take_lost()`, which stops computing them as it does for its own beats.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import redis
import structlog

from worker.loop.heartbeat import Heartbeat

log = structlog.get_logger("worker")


class StepCover:
    """Beats `heartbeats` (each with the entries `serving(i)` returns) while a covered call runs."""

    def __init__(
        self, heartbeats: Sequence[Heartbeat], serving: Callable[[int], list[bytes]], interval_s: float,
        max_step_s: float, progress: Callable[[], None],
    ):  # fmt: skip
        self.heartbeats = list(heartbeats)
        self.serving = serving
        self.interval_s = interval_s
        self.max_step_s = max_step_s
        self.progress = progress
        self._cond = threading.Condition()
        self._since: float | None = None  # monotonic start of the covered call under way
        self._closed = False
        self._idle = False  # the thread waits for the next covered call (no timeout)
        self._lost: list[tuple[int, bytes]] = []
        self._thread: threading.Thread | None = None

    @contextmanager
    def covering(self) -> Iterator[None]:
        """Beat for the loop while the body runs (a step that may outlast the heartbeat's TTL)."""
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="step-cover", daemon=True)
                self._thread.start()
            self._since = time.monotonic()
            if self._idle:
                self._cond.notify()  # else the thread is in a timed wait and looks again by itself
        try:
            yield
        finally:
            with self._cond:  # waits for a beat in progress
                self._since = None

    def take_lost(self) -> list[tuple[int, bytes]]:
        """(heartbeat index, entry id) of entries another worker claimed, found by this class's beats."""
        if not self._lost:  # the usual case, without the lock (one found later comes at the next call)
            return []
        with self._cond:
            lost, self._lost = self._lost, []
        return lost

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        # A short step (every step of a GPU engine) ends before this thread acts: it waits a quarter of
        # the interval into a step first, and then beats only heartbeats that are due.
        patience_s = self.interval_s / 4
        with self._cond:
            while not self._closed:
                since = self._since
                if since is None:
                    self._idle = True
                    self._cond.wait()
                    self._idle = False
                    continue
                elapsed = time.monotonic() - since
                if elapsed < patience_s:
                    self._cond.wait(timeout=patience_s - elapsed)
                    continue
                if elapsed > self.max_step_s:
                    self._cond.wait(timeout=self.interval_s)  # stalled: no beats until this call ends
                    continue
                self._beat_due()
                self.progress()
                self._cond.wait(timeout=patience_s)

    def _beat_due(self) -> None:
        for index, heartbeat in enumerate(self.heartbeats):
            if not heartbeat.due():
                continue
            try:
                lost = heartbeat.beat(self.serving(index))
            except redis.RedisError as exc:  # the loop meets the outage itself after the step
                log.warning("heartbeat_failed", error=f"{type(exc).__name__}: {exc}"[:200])
                continue
            self._lost += [(index, entry_id) for entry_id in lost]
