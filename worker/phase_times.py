"""Where the loop's time goes: wall seconds per phase of an iteration, summed over the worker's life.

`mark(phase)` charges the time since the previous mark to `phase`, so marking at the end of each
phase costs one clock read. Logged with `worker_stopped` (`phase_s`), so a slow service can be
split into waiting on Redis, planning and launching steps, waiting for the device, and publishing.
"""

from __future__ import annotations

import time
from collections import defaultdict


class PhaseTimes:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[phase] += now - self._last
        self._last = now

    def summary(self) -> dict[str, float]:
        return {phase: round(seconds, 3) for phase, seconds in sorted(self.totals.items())}
