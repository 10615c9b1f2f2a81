"""Where the loop's time goes: wall seconds per phase of an iteration, summed over the worker's life.

`mark(phase)` charges the time since the previous mark to `phase`, so marking at the end of each
phase costs one clock read. Logged with `worker_stopped` (`phase_s`), so a slow service can be
split into waiting on Redis, planning and launching steps, waiting for the device, and publishing.

It also keeps the wall time of each engine step, from the start of `submit` to the end of its
`collect` (the live stats take them with `take_steps()` for their p50/p95).
"""

from __future__ import annotations

import time
from collections import defaultdict, deque

# Step times kept until the live stats take them (a bound, for when nobody takes them).
MAX_STEP_SAMPLES = 65_536


class PhaseTimes:
    def __init__(self, time_steps: bool = True) -> None:
        self.time_steps = time_steps
        self.totals: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()
        self._step_start: float | None = None
        self.steps: deque[float] = deque(maxlen=MAX_STEP_SAMPLES)
        self.last_step_s: float | None = None  # the wall time of the step the last `collect` mark ended
        self.last_submit_s = 0.0  # the time the last `submit` mark charged (planning and launching a step)

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[phase] += now - self._last
        if phase == "submit":
            self.last_submit_s = now - self._last
        if self.time_steps:
            if phase == "submit":
                self._step_start = self._last  # a step that is launched here ends with the next `collect`
            elif phase == "collect" and self._step_start is not None:
                self.last_step_s = now - self._step_start
                self.steps.append(self.last_step_s)
                self._step_start = None
        self._last = now

    def add_steps(self, step_s: tuple[float, ...]) -> None:
        """Step times measured by the engine itself (an engine in its own process)."""
        self.steps.extend(step_s)

    def take_steps(self) -> list[float]:
        """The step times (seconds) recorded since the last call."""
        steps = list(self.steps)
        self.steps.clear()
        return steps

    def summary(self) -> dict[str, float]:
        return {phase: round(seconds, 3) for phase, seconds in sorted(self.totals.items())}
