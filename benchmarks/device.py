"""The machine: its measured ceilings, datasheet peaks, software versions, git state, result folder."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .timing import TimingPlan, benchmark

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"
# Smoke results are for checking that every path runs; they land in an ignored folder (runs/).
SMOKE_RESULTS_ROOT = REPO_ROOT / "runs" / "benchmarks-smoke"
COMMIT_ENV_VAR, DIRTY_ENV_VAR = "SIMMIM_FAST_GIT_COMMIT", "SIMMIM_FAST_GIT_DIRTY"

# (name pattern, label, HBM TB/s, dense bf16 TFLOP/s), first match wins: the more specific first.
DATASHEET = (
    (r"H200", "NVIDIA H200 (SXM)", 4.8, 989.0),
    (r"H100.*PCIe", "NVIDIA H100 PCIe", 2.0, 756.0),
    (r"H100.*NVL", "NVIDIA H100 NVL", 3.9, 835.0),
    (r"H100", "NVIDIA H100 SXM (80GB HBM3)", 3.35, 989.0),
    (r"A100.*80GB", "NVIDIA A100 80GB SXM", 2.039, 312.0),
    (r"A100", "NVIDIA A100 40GB", 1.555, 312.0),
)


@dataclass
class Datasheet:
    matched: Optional[str] = None  # which DATASHEET entry the device name matched, None if none
    bandwidth_gbps: Optional[float] = None
    bf16_tflops: Optional[float] = None


def datasheet_for(device_name: str) -> Datasheet:
    for pattern, label, tbps, tflops in DATASHEET:
        if re.search(pattern, device_name):
            return Datasheet(label, tbps * 1e3, tflops)
    return Datasheet()


@dataclass
class Ceilings:
    """Measured in this run: device-to-device copy bandwidth and a large matmul's rate."""

    copy_gbps: float
    copy_bytes: int
    matmul_tflops: float
    matmul_size: int
    matmul_dtype: str
    datasheet: Datasheet = field(default_factory=Datasheet)


def measure_ceilings(device: torch.device, device_name: str, smoke: bool) -> Ceilings:
    """Copy: copy_ between two large buffers (bytes read + written). Matmul: n^3 bf16 on CUDA (fp32 on CPU)."""
    on_gpu = device.type == "cuda"
    copy_bytes = (2 << 30) if on_gpu else (16 << 20 if smoke else 256 << 20)
    source = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    plan = TimingPlan.smoke() if smoke else TimingPlan(target_ms=300.0, min_reps=10, max_reps=100)
    copy_ms = benchmark([lambda: target.copy_(source)], device, plan).median_ms
    del source, target
    size = 8192 if on_gpu else 1024
    dtype = torch.bfloat16 if on_gpu else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmul_ms = benchmark([lambda: a @ b], device, plan).median_ms
    return Ceilings(
        copy_gbps=2 * copy_bytes / (copy_ms * 1e-3) / 1e9, copy_bytes=copy_bytes,
        matmul_tflops=2 * size ** 3 / (matmul_ms * 1e-3) / 1e12, matmul_size=size, matmul_dtype=str(dtype),
        datasheet=datasheet_for(device_name))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    name = device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_state() -> Tuple[str, bool]:
    """(short commit, dirty) of the working tree. A copy without .git (a remote GPU machine) takes
    SIMMIM_FAST_GIT_COMMIT and SIMMIM_FAST_GIT_DIRTY=0/1 from whoever launched it; else ('unknown', True)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    try:
        commit = git("rev-parse", "--short=10", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):
        if os.environ.get(COMMIT_ENV_VAR):
            return os.environ[COMMIT_ENV_VAR], os.environ.get(DIRTY_ENV_VAR, "1") != "0"
        return "unknown", True
    return commit, dirty


def driver_version() -> Optional[str]:
    """From NVML (nvidia-ml-py), else nvidia-smi; None when neither answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # no nvidia-ml-py or no NVML library: ask the command line tool
        pass
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, check=True, timeout=30).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment(device: torch.device) -> Dict[str, object]:
    """Everything needed to reproduce or compare a run."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    commit, dirty = git_state()
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "driver": driver_version() if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["sm_count"] = props.multi_processor_count
        info["memory_gb"] = round(props.total_memory / 1e9, 1)
        info["l2_bytes"] = l2_cache_bytes(device)
    return info


def l2_cache_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))


def results_folder(device: torch.device, smoke: bool) -> Path:
    """results/<device-slug>/<YYYYmmdd-HHMM>-<commit>[-dirty]/ (smoke runs under runs/, ignored)."""
    commit, dirty = git_state()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    root = SMOKE_RESULTS_ROOT if smoke else RESULTS_ROOT
    return root / device_slug(device) / f"{stamp}-{commit}{'-dirty' if dirty else ''}"
