"""The CPUs a worker sizes torch's thread pool by: affinity and the cgroup quota, at most what it may use."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from worker.engine.host_cpus import available_cpus, cgroup_cpu_limit, default_torch_threads


def cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({}, None),  # no cgroup files (not Linux, or not mounted)
        ({"cpu.max": "max 100000\n"}, None),  # v2, unlimited
        ({"cpu.max": "150000 100000\n"}, 1.5),  # v2: a pod's limits.cpu of 1500m
        ({"cpu.max": "50000 100000\n"}, 0.5),
        ({"cpu.max": "garbage\n"}, None),
        ({"cpu.max": "100 0\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, unlimited
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),  # v1
        ({"cpu/cpu.cfs_quota_us": "x\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ],
)
def test_the_cgroup_quota_is_read_from_v2_or_v1_files(tmp_path: Path, files: dict[str, str], limit) -> None:
    root = cgroup(tmp_path, files)
    assert cgroup_cpu_limit(root) == limit
    affinity = len(os.sched_getaffinity(0))
    expected = affinity if limit is None else min(affinity, math.ceil(limit))
    assert available_cpus(root) == max(1, expected)
    assert default_torch_threads(root) == max(1, expected - 1)


def test_a_fractional_quota_still_gets_one_thread(tmp_path: Path) -> None:
    root = cgroup(tmp_path, {"cpu.max": "10000 100000\n"})  # 100m
    assert available_cpus(root) == 1 and default_torch_threads(root) == 1


def test_this_machine_is_counted_by_affinity_and_quota() -> None:
    cpus = available_cpus()
    assert 1 <= cpus <= len(os.sched_getaffinity(0))
    assert default_torch_threads() == max(1, cpus - 1)
