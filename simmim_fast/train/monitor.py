"""What the user watches and keeps: a progress bar, a JSONL row per logged step, TensorBoard when it
is installed, and GPU utilisation / memory / power from NVML on CUDA. Rank 0 only."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict

import torch


class GpuStats:
    """NVML readings for one CUDA device; absent (empty dict) when pynvml or the driver is missing."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception as error:  # no nvidia-ml-py, no driver, a virtualised GPU: log without it
            print(f"GPU stats off (NVML unavailable: {error})", file=sys.stderr)
        self.device = device

    def read(self) -> Dict[str, float]:
        if self.handle is None:
            return {}
        nvml = self.nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return {"gpu_util_pct": nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu,
                "gpu_mem_used_gib": memory.used / 2 ** 30,
                "gpu_power_w": nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000,
                "torch_max_allocated_gib": torch.cuda.max_memory_allocated(self.device) / 2 ** 30}


# Above this fraction of an interval spent waiting for batches, the accelerator is starved.
DATA_WAIT_WARNING = 0.10
STARVATION_ADVICE = ("more loader processes (--num-workers) or a prepared copy of the data "
                     "(simmim-fast prepare-data SRC DST --max-side N, then --data DST; docs/input-pipeline.md)")


class Monitor:
    def __init__(self, output: Path, total_steps: int, start_step: int, device: torch.device, enabled: bool,
                 name: str = "pretrain"):
        self.enabled = enabled
        self.name = name
        if not enabled:
            return
        from tqdm.auto import tqdm

        self.log_path = Path(output) / "log.jsonl"
        self._drop_rows_after(start_step)
        self.log_file = open(self.log_path, "a")
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc=name)
        self.gpu = GpuStats(device)
        self.tensorboard = self._tensorboard(output)

    def _drop_rows_after(self, step: int) -> None:
        """A resumed run logs again the steps after its checkpoint: drop the old rows for them."""
        if self.log_path.exists():
            kept = [row for row in read_log(self.log_path) if row["step"] <= step]
            self.log_path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    @staticmethod
    def _tensorboard(output: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: the JSONL log has everything
            return None
        return SummaryWriter(log_dir=str(Path(output) / "tensorboard"))

    def step(self, row: Dict[str, Any], with_device_stats: bool) -> None:
        """Record one optimizer step's row (step, loss, lr, ...); device stats only when asked (they cost)."""
        if not self.enabled:
            return
        if with_device_stats:
            row.update(self.gpu.read())
        self.log_file.write(json.dumps(row) + "\n")
        self.log_file.flush()
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{self.name}/{key}", value, row["step"])
        postfix = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "img/s": f"{row['images_per_s']:.0f}"}
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(row["step"] - self.bar.n)

    def advance(self, step: int) -> None:
        """Move the bar without a row (XLA steps between logged ones)."""
        if self.enabled:
            self.bar.update(step - self.bar.n)

    def warn_data_wait(self, fraction: float, step: int) -> None:
        """A line when the last interval waited for data more than ``DATA_WAIT_WARNING`` of its time."""
        if fraction > DATA_WAIT_WARNING:
            self.message(f"warning: step {step}: {fraction:.0%} of the last interval was spent waiting for data "
                         f"(over {DATA_WAIT_WARNING:.0%}); the input pipeline is the bottleneck: try "
                         + STARVATION_ADVICE)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.log_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_log(path: Path):
    """The rows of a log.jsonl."""
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]
