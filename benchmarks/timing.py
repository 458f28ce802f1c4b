"""Timing: CUDA events on a GPU, time.perf_counter on the CPU; inputs rotated; quantiles; peak memory."""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default 'linear' method)."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    host_ms: Optional[float] = None  # CUDA: median host time to enqueue one call (Python + launches)

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], host_ms: Optional[float] = None) -> "Timing":
        return cls(quantile(samples_ms, 0.5), quantile(samples_ms, 0.2), quantile(samples_ms, 0.8), len(samples_ms),
                   host_ms)


@dataclass
class TimingPlan:
    """How long to warm up and measure. ``target_ms`` of timed work, reps kept within [min, max].

    ``gpu_time_only``: time the GPU work of each call, the host's enqueue time reported apart (kernel
    microbenchmarks). Off for a training step, whose host work is part of what it costs.
    """

    warmup_ms: float = 25.0
    min_warmup: int = 3
    target_ms: float = 200.0
    min_reps: int = 10
    max_reps: int = 500
    flush_l2: bool = False
    gpu_time_only: bool = True

    @classmethod
    def smoke(cls) -> "TimingPlan":
        # The caller's first call (compile, autotune) already ran; smoke only checks that paths run.
        return cls(warmup_ms=0.0, min_warmup=0, target_ms=0.0, min_reps=2, max_reps=2)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class L2Flusher:
    """Writes a buffer twice the L2 size so the next kernel starts with a cold cache (GPU only)."""

    def __init__(self, device: torch.device, l2_bytes: int):
        self.buffer = torch.empty(2 * l2_bytes, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


MAX_WARMUP_CALLS = 1000
# Calls enqueued per synchronisation on CUDA: few enough that their launches never fill the
# launch queue while the GPU is held by the spin kernel.
CUDA_CALLS_PER_SYNC = 10
MAX_SPIN_MS = 200.0


@functools.lru_cache(maxsize=None)
def _spin_cycles_per_ms(device_index: int) -> float:
    """Calibrates torch.cuda._sleep (a spin kernel counting clock cycles) against CUDA events."""
    spin_cycles = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(spin_cycles)  # first launch outside the measurement
    start.record()
    torch.cuda._sleep(spin_cycles)
    end.record()
    end.synchronize()
    return spin_cycles / start.elapsed_time(end)


class _HostCover:
    """Holds the GPU in a spin kernel while the host enqueues a chunk of calls, so the events time
    GPU work only, back to back, not Python and launch overhead (nvbench's "blocking kernel").
    The spin lasts twice the host time the previous chunk took per call."""

    def __init__(self, device: torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.cycles_per_ms = _spin_cycles_per_ms(index)
        self.host_ms_per_call: Optional[float] = None  # unknown until a chunk ran

    def hold(self, calls: int) -> None:
        if self.host_ms_per_call is not None:
            spin_ms = min(MAX_SPIN_MS, 2.0 * self.host_ms_per_call * calls + 0.05)
            torch.cuda._sleep(int(spin_ms * self.cycles_per_ms))


def _timed_calls(device: torch.device, calls: Sequence[Callable[[], object]], count: int, first: int,
                 prepare: Callable[[int], None], cover: Optional[_HostCover]) -> Tuple[List[float], List[float]]:
    """(milliseconds of each call, host milliseconds per call of each CUDA chunk) for calls
    first .. first+count-1; call i uses input set i % len(calls).

    On CUDA the host enqueues calls between pairs of events without waiting, as a training loop does
    (with ``cover``, behind a spin kernel so that only GPU time is measured).
    """
    samples, host_ms = [], []
    if device.type != "cuda":
        for index in range(first, first + count):
            prepare(index)
            begin = time.perf_counter()
            calls[index % len(calls)]()
            samples.append((time.perf_counter() - begin) * 1e3)
        return samples, host_ms
    for chunk_first in range(first, first + count, CUDA_CALLS_PER_SYNC):
        chunk = range(chunk_first, min(chunk_first + CUDA_CALLS_PER_SYNC, first + count))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in chunk]
        if cover is not None:
            cover.hold(len(chunk))
        begin = time.perf_counter()
        for index, (start, end) in zip(chunk, events):
            prepare(index)
            start.record()
            calls[index % len(calls)]()
            end.record()
        host_ms.append((time.perf_counter() - begin) * 1e3 / len(chunk))
        if cover is not None:
            cover.host_ms_per_call = host_ms[-1]
        torch.cuda.synchronize()
        samples += [start.elapsed_time(end) for start, end in events]
    return samples, host_ms


def benchmark(calls: Sequence[Callable[[], object]], device: torch.device, plan: TimingPlan,
              before_each: Optional[Callable[[int], None]] = None, l2_bytes: int = 0) -> Timing:
    """Time ``calls[i % len(calls)]`` (one per rotated input set) after a warm-up.

    ``before_each(i)`` runs before call i outside its timed region (e.g. clearing .grad), as does
    the optional L2 flush.
    """
    flush = L2Flusher(device, l2_bytes) if plan.flush_l2 else None
    cover = _HostCover(device) if device.type == "cuda" and plan.gpu_time_only else None

    def prepare(index: int) -> None:
        if before_each is not None:
            before_each(index)
        if flush is not None:
            flush()

    # Warm-up: min_warmup calls, then doubling batches until warmup_ms of work; gives a per-call estimate.
    warm_samples, _ = _timed_calls(device, calls, plan.min_warmup, 0, prepare, cover)
    while sum(warm_samples) < plan.warmup_ms and len(warm_samples) < MAX_WARMUP_CALLS:
        warm_samples += _timed_calls(device, calls, max(len(warm_samples), 1), len(warm_samples), prepare, cover)[0]
    if warm_samples:
        estimate_ms = max(quantile(warm_samples, 0.5), 1e-4)
        reps = int(min(plan.max_reps, max(plan.min_reps, plan.target_ms / estimate_ms)))
    else:
        reps = plan.min_reps
    synchronize(device)
    samples, host_ms = _timed_calls(device, calls, reps, 0, prepare, cover)
    return Timing.from_samples(samples, quantile(host_ms, 0.5) if host_ms else None)


def peak_memory_bytes(device: torch.device, call: Callable[[], object]) -> Optional[int]:
    """Bytes the call allocates at its peak beyond what was allocated before it (inputs excluded).

    What the call returns is kept until the peak is read, as a training step keeps it.
    """
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = call()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak
