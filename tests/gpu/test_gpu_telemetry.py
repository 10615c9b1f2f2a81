"""NVML readings of the live stats (`worker/observability/gpu_telemetry.py`) on a real GPU."""

from __future__ import annotations

import torch

from worker.observability.gpu_telemetry import GpuTelemetry
from worker.observability.stats import gpu_fields


def test_nvml_reads_utilisation_memory_power_and_temperature_of_device_0() -> None:
    x = torch.ones(1024, 1024, device="cuda")  # some memory in use on device 0
    telemetry = GpuTelemetry()
    try:
        samples = telemetry.sample()
        assert samples and samples[0].index == 0
        gpu = samples[0]
        assert gpu.util_pct is not None and 0 <= gpu.util_pct <= 100
        assert gpu.mem_total_bytes is not None and gpu.mem_total_bytes > 2**30
        assert gpu.mem_used_bytes is not None and x.nbytes <= gpu.mem_used_bytes <= gpu.mem_total_bytes
        assert gpu.power_w is not None and 1 < gpu.power_w < 2000
        assert gpu.temp_c is not None and 0 < gpu.temp_c < 120
        fields = gpu_fields(samples)
        assert fields["gpus"] == len(samples) and fields["gpu0_mem_total_bytes"] == gpu.mem_total_bytes
        assert {"gpu_util_pct", "gpu_mem_used_bytes", "gpu0_power_w", "gpu0_temp_c"} <= set(fields)
    finally:
        telemetry.close()
    assert telemetry.sample() == []  # closed: stays quiet
