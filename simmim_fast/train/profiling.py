"""``--profile``: a trace of a few training steps in the run folder (``<output>/profile/``).

XLA: torch_xla's profiler (device and host activity; TensorBoard's profile plugin reads the folder).
Elsewhere: the torch profiler (CPU and CUDA activity) as a Chrome trace (chrome://tracing, Perfetto).
The first steps of a process compile (XLA graphs, torch.compile, autotuning), so the trace starts later.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

WARMUP_STEPS = 2  # steps of this process before the trace
TRACED_STEPS = 3


class StepProfile:
    """Call ``before_step`` before every optimizer step and ``close`` at the end (it stops an open trace)."""

    def __init__(self, device: torch.device, output: Path):
        self.device = device
        self.folder = Path(output) / "profile"
        self.steps_seen = 0
        self.torch_profiler: Optional[torch.profiler.profile] = None
        self.tracing = False

    def before_step(self) -> None:
        if self.steps_seen == WARMUP_STEPS:
            self._start()
        elif self.steps_seen == WARMUP_STEPS + TRACED_STEPS:
            self.close()
        self.steps_seen += 1

    def _start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.device.type == "xla":
            import torch_xla.debug.profiler as xp

            xp.start_trace(str(self.folder))
        else:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.torch_profiler = torch.profiler.profile(activities=activities)
            self.torch_profiler.start()
        self.tracing = True

    def close(self) -> None:
        """Stop and write the trace (after the device finished the traced steps)."""
        if not self.tracing:
            return
        self.tracing = False
        if self.device.type == "xla":
            import torch_xla.debug.profiler as xp

            xp.stop_trace()
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.torch_profiler.stop()
        self.torch_profiler.export_chrome_trace(str(self.folder / "trace.json"))
        self.torch_profiler = None
