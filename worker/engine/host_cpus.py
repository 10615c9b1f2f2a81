"""How many CPUs this process may really use, and how many threads torch gets on them.

A CPU engine's matmuls run on torch's OpenMP threads, which meet at a barrier after every parallel
region. With as many threads as cores and anything else runnable on those cores (the worker's own loop
thread, another pod, a test run), one descheduled thread holds up the others at each barrier: on a 2-core
machine with two busy processes beside it, SmolLM2-135M decoded 5-9x slower with 2 threads than with 1
(1.3-2.5 vs 11-14 tok/s), and `make demo` fell 18x. So the default leaves one CPU to the rest of the
worker, and `worker/__main__.py` makes idle OpenMP threads sleep (`OMP_WAIT_POLICY=PASSIVE`) instead of
spinning on cores others need.

The count honours CPU affinity (`taskset`, Kubernetes' static CPU manager) and a cgroup CPU quota (a
pod's `limits.cpu`), which `os.cpu_count()` does not; Python has no call that reads the quota (3.13's
`os.process_cpu_count()` reads affinity only), so it is read here from the cgroup files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (v2 `cpu.max`, else v1 CFS), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()  # "max 100000" or "200000 100000"
    except (OSError, ValueError):
        pass
    else:
        try:
            return None if quota == "max" else int(quota) / int(period)
        except (ValueError, ZeroDivisionError):
            return None
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may run on: its affinity set, capped by the cgroup quota (rounded up), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def default_torch_threads(root: Path = CGROUP) -> int:
    """Intra-op threads for a CPU engine when none are configured: the available CPUs but one (the worker's
    loop and the reply writer need a core), at least 1."""
    return max(1, available_cpus(root) - 1)
