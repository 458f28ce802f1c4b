"""GPU telemetry from NVML (nvidia-ml-py, imported lazily): SM clock, power, memory and utilisation,
sampled in a background thread while an end-to-end benchmark runs, summarised per provider.

A throttled clock or a power cap explains a slow number; without these the run cannot tell.
"""
from __future__ import annotations

import os
import threading
from typing import Dict, List, Optional

import torch

from .timing import quantile

SAMPLE_INTERVAL_S = 0.05


def _nvml_handle(device: torch.device):
    """The NVML handle of the torch device: the only GPU, else the one whose UUID matches, else
    the same index (right only when CUDA_VISIBLE_DEVICES does not renumber the devices)."""
    import pynvml

    pynvml.nvmlInit()
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    if len(handles) == 1:
        return handles[0]
    torch_uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", ""))
    for handle in handles:
        nvml_uuid = pynvml.nvmlDeviceGetUUID(handle)
        nvml_uuid = nvml_uuid.decode() if isinstance(nvml_uuid, bytes) else nvml_uuid
        if torch_uuid and torch_uuid in nvml_uuid:  # NVML writes "GPU-<uuid>"
            return handle
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        raise RuntimeError("cannot tell which NVML device is the torch device under CUDA_VISIBLE_DEVICES")
    return handles[device.index or 0]


class Telemetry:
    """``with Telemetry(device) as t: ...`` then ``t.summary()``; on no GPU or no NVML, the summary
    says why instead of holding numbers."""

    def __init__(self, device: torch.device, interval_s: float = SAMPLE_INTERVAL_S):
        self.device = device
        self.interval_s = interval_s
        self.samples: List[Dict[str, float]] = []
        self.unavailable: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._handle = None

    def __enter__(self) -> "Telemetry":
        if self.device.type != "cuda":
            self.unavailable = "no GPU"
            return self
        try:
            self._handle = _nvml_handle(self.device)
            self._sample()
        except Exception as error:  # no NVML library or driver, permission: telemetry is optional
            self.unavailable = f"NVML unavailable ({type(error).__name__}: {error})"
            return self
        self._thread = threading.Thread(target=self._loop, name="nvml-telemetry", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception as error:
                self.unavailable = f"NVML sampling failed ({type(error).__name__}: {error})"
                return

    def _sample(self) -> None:
        import pynvml

        handle = self._handle
        self.samples.append({
            "sm_clock_mhz": float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
            "memory_used_gb": pynvml.nvmlDeviceGetMemoryInfo(handle).used / 1e9,
            "gpu_util_pct": float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        })

    def summary(self) -> Dict[str, object]:
        if not self.samples:
            return {"telemetry": self.unavailable or "no samples"}
        def column(key):
            return [sample[key] for sample in self.samples]
        return {
            "telemetry": f"{len(self.samples)} samples",
            "sm_clock_mhz_median": quantile(column("sm_clock_mhz"), 0.5),
            "sm_clock_mhz_min": min(column("sm_clock_mhz")),
            "power_w_median": quantile(column("power_w"), 0.5),
            "power_w_max": max(column("power_w")),
            "memory_used_gb_max": max(column("memory_used_gb")),
            "gpu_util_pct_median": quantile(column("gpu_util_pct"), 0.5),
        }
