"""What the user watches and keeps: a progress bar, a JSONL row per logged step, TensorBoard when it
is installed, and GPU utilisation / memory / power from NVML on CUDA. Rank 0 only."""
from __future__ import annotations

import json
import math
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
# After the first warning, starvation is reported again only when it held over this much training time
# since the last report: a long run keeps the warning meaningful, a short one prints it once.
DATA_WAIT_REMIND_AFTER_S = 1800.0
STARVATION_ADVICE = ("more loader processes (--num-workers) or a prepared copy of the data "
                     "(simmim-fast prepare-data SRC DST --max-side N, then --data DST; docs/input-pipeline.md)")


class DataWaitWatch:
    """The share of training time spent waiting for batches: one warning with the remedies the first time an
    interval passes ``DATA_WAIT_WARNING``, a reminder only when the share since the last report stays above it
    over ``DATA_WAIT_REMIND_AFTER_S``, and the run's total for the closing summary."""

    def __init__(self, remind_after_s: float = DATA_WAIT_REMIND_AFTER_S):
        self.remind_after_s = remind_after_s
        self.total_wait_s = self.total_s = 0.0
        self.warned = False
        self.since_report_wait_s = self.since_report_s = 0.0

    def record(self, wait_s: float, elapsed_s: float, step: int) -> str | None:
        """Add one logged interval; the line to print, if any."""
        self.total_wait_s += wait_s
        self.total_s += elapsed_s
        self.since_report_wait_s += wait_s
        self.since_report_s += elapsed_s
        fraction = wait_s / max(elapsed_s, 1e-9)
        if not self.warned:
            if fraction <= DATA_WAIT_WARNING:
                self.since_report_wait_s = self.since_report_s = 0.0
                return None
            self.warned = True
            self._restart_reporting_window()
            return (f"warning: step {step}: {fraction:.0%} of the last interval was spent waiting for data "
                    f"(over {DATA_WAIT_WARNING:.0%}); the input pipeline is the bottleneck: try "
                    + STARVATION_ADVICE + ". The share stays on every log line ('data wait'); this warning "
                    f"repeats only if it holds for {self.remind_after_s / 60:.0f} minutes.")
        if self.since_report_s < self.remind_after_s:
            return None
        share = self.since_report_wait_s / self.since_report_s
        minutes = self.since_report_s / 60
        self._restart_reporting_window()
        if share <= DATA_WAIT_WARNING:
            return None
        return f"warning: step {step}: still {share:.0%} of the last {minutes:.0f} minutes spent waiting for data"

    def _restart_reporting_window(self) -> None:
        self.since_report_wait_s = self.since_report_s = 0.0

    def summary(self) -> str | None:
        if self.total_s <= 0:
            return None
        share = self.total_wait_s / self.total_s
        line = (f"data wait: {share:.0%} of the training time ({self.total_wait_s:.1f} s of {self.total_s:.1f} s, "
                "the first interval, while the loader starts, not counted)")
        return line + ("; the input pipeline was the bottleneck" if share > DATA_WAIT_WARNING else "")


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
        self.data_wait = DataWaitWatch()
        self.tensorboard = self._tensorboard(output)

    def _drop_rows_after(self, step: int) -> None:
        """A resumed run logs again the steps after its checkpoint: drop the old rows for them."""
        if self.log_path.exists():
            kept = [row for row in read_log(self.log_path) if row["step"] <= step]
            self.log_path.write_text("".join(json_text(row) + "\n" for row in kept))

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
        self.log_file.write(json_text(row) + "\n")
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

    def record_data_wait(self, wait_s: float, elapsed_s: float, step: int) -> None:
        """One logged interval's time waiting for batches, of ``elapsed_s``; warns as ``DataWaitWatch`` decides."""
        if self.enabled and (line := self.data_wait.record(wait_s, elapsed_s, step)):
            self.message(line)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        summary = self.data_wait.summary()
        if summary:
            self.bar.write(summary)
        self.bar.close()
        self.log_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def json_safe(value: Any) -> Any:
    """``value`` with every NaN and +-inf float as None: JSON has no such numbers (Python would write the
    invalid tokens NaN/Infinity), so every JSON file simmim-fast writes says null for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def json_text(value: Any, **dumps_options) -> str:
    """``json.dumps`` of ``json_safe(value)``: always valid JSON (NaN/inf as null)."""
    return json.dumps(json_safe(value), allow_nan=False, **dumps_options)


def read_log(path: Path):
    """The rows of a log.jsonl."""
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]
