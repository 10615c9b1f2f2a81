"""GPU telemetry through NVML (`pynvml`, from the `nvidia-ml-py` distribution), safe where there is none.

`GpuTelemetry.sample()` returns one `GpuSample` per GPU this process may use: the devices of
`CUDA_VISIBLE_DEVICES` when it is set (indexes or `GPU-...` UUIDs), else every device NVML sees
(in a pod, the ones the device plugin mounted). Without a GPU, without the NVML library, or on
any NVML error at start-up it returns an empty list for good, and says so once at debug level; a
reading a device does not support (power on some boards) is left out of its sample alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger("worker")


@dataclass(frozen=True)
class GpuSample:
    """One device's readings; None where NVML could not read one."""

    index: int
    util_pct: float | None = None
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    power_w: float | None = None
    temp_c: float | None = None


def _visible(nvml: Any) -> list[Any]:
    """NVML handles of the devices this process may use."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    handles = []
    for item in (v.strip() for v in visible.split(",")):
        if item.isdigit():
            handles.append(nvml.nvmlDeviceGetHandleByIndex(int(item)))
        elif item.startswith(("GPU-", "MIG-")):
            handles.append(nvml.nvmlDeviceGetHandleByUUID(item))
        else:
            break  # CUDA stops at the first entry it cannot parse (`-1` hides every device)
    return handles


def _read(read: Any) -> Any:
    try:
        return read()
    except Exception:  # NVMLError_NotSupported and friends: this reading only
        return None


class GpuTelemetry:
    """Samples the visible GPUs; initialises NVML on first use and stays off if that fails."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] | None = None  # None: not initialised yet; []: no GPU or no NVML

    def _start(self) -> list[Any]:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = _visible(pynvml)
        except Exception as exc:  # no library, no driver, no device: GPU fields stay absent
            self._handles = []
            log.debug("gpu_telemetry_unavailable", error=f"{type(exc).__name__}: {exc}"[:200])
        return self._handles

    def sample(self) -> list[GpuSample]:
        handles = self._handles if self._handles is not None else self._start()
        if not handles:
            return []
        nvml = self._nvml
        samples = []
        for index, h in enumerate(handles):
            util = _read(lambda h=h: nvml.nvmlDeviceGetUtilizationRates(h))
            mem = _read(lambda h=h: nvml.nvmlDeviceGetMemoryInfo(h))
            power_mw = _read(lambda h=h: nvml.nvmlDeviceGetPowerUsage(h))
            temp = _read(lambda h=h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
            samples.append(
                GpuSample(
                    index=index,
                    util_pct=None if util is None else float(util.gpu),
                    mem_used_bytes=None if mem is None else int(mem.used),
                    mem_total_bytes=None if mem is None else int(mem.total),
                    power_w=None if power_mw is None else round(power_mw / 1000, 1),
                    temp_c=None if temp is None else float(temp),
                )
            )
        return samples

    def close(self) -> None:
        if self._nvml is not None:
            _read(self._nvml.nvmlShutdown)
            self._nvml, self._handles = None, []
