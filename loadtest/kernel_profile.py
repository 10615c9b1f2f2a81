"""Where a GPU step's time goes: the kernels of a few steps under `torch.profiler`, per step.

A decode step replayed from a CUDA graph is a few hundred kernels; its wall time is their sum plus
the gaps between them. `profile_steps` runs `step` N times under the profiler (CUPTI records kernels
launched by a graph replay too) and sums device time by kernel name, so a table says how many
kernels a step launches, how much of the step they are busy, and which ones dominate.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelRow:
    name: str
    calls_per_step: float
    us_per_step: float


@dataclass(frozen=True)
class StepProfile:
    steps: int
    wall_us_per_step: float
    kernels_per_step: float
    busy_us_per_step: float
    rows: list[KernelRow]

    def table(self, top: int = 15, width: int = 70) -> str:
        lines = [
            f"  {self.kernels_per_step:.0f} kernels/step, busy {self.busy_us_per_step:.0f} us of "
            f"{self.wall_us_per_step:.0f} us wall ({self.busy_us_per_step / self.wall_us_per_step:.0%})",
            f"  {'kernel':<{width}} {'calls':>6} {'us/step':>8} {'share':>6}",
        ]
        for row in self.rows[:top]:
            share = row.us_per_step / self.busy_us_per_step if self.busy_us_per_step else 0.0
            name = row.name[:width]
            calls, us = row.calls_per_step, row.us_per_step
            lines.append(f"  {name:<{width}} {calls:>6.1f} {us:>8.1f} {share:>6.1%}")
        return "\n".join(lines)


def profile_steps(step: Callable[[], object], steps: int, sync: Callable[[], None]) -> StepProfile:
    """Run `step` `steps` times under the profiler; device time per kernel name, per step."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - start
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type.name != "CUDA":  # kernels, copies and memsets on the device
            continue
        totals[event.name] += event.time_range.elapsed_us()
        calls[event.name] += 1
    rows = sorted(
        (KernelRow(name, calls[name] / steps, us / steps) for name, us in totals.items()),
        key=lambda r: -r.us_per_step,
    )
    return StepProfile(
        steps=steps,
        wall_us_per_step=wall / steps * 1e6,
        kernels_per_step=sum(calls.values()) / steps,
        busy_us_per_step=sum(totals.values()) / steps,
        rows=rows,
    )
