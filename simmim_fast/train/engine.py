"""What every training loop of simmim_fast shares (pretraining in ``loop``, fine-tuning in
``simmim_fast.downstream.finetune``): AMP choice, seeding, the kernel backend for the process, one
optimizer step over accumulated micro-batches (DDP/FSDP gradient sync on the last one, GradScaler,
clipping, a skipped update on a bad loss), and what keeps a long run's good work (docs/long-runs.md):
bad steps (a non-finite loss, or a spike above ``SPIKE_FACTOR`` x the running median), checkpoints
that are never written with a non-finite value and are marked bad after a divergence, retention that
counts good checkpoints only, the one-line stop and interrupt.
"""
from __future__ import annotations

import collections
import contextlib
import math
import os
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import torch

from .. import dispatch
from .._checks import check_count
from . import checkpoints, distributed, run_lock


@dataclass
class RunOptions:
    """The command-line options ``pretrain`` and ``finetune`` share; None = the config's or preset's value."""

    preset: Optional[str] = None
    config: Optional[str] = None
    set: List[str] = field(default_factory=list)
    data: Optional[str] = None
    output: Optional[str] = None
    epochs: Optional[int] = None
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    accum_steps: Optional[int] = None
    amp: str = "auto"
    backend: Optional[str] = None
    compile: Optional[str] = None  # a torch.compile mode (COMPILE_MODES); None: eager
    resume: Optional[str] = None
    seed: Optional[int] = None
    device: str = "auto"
    fsdp: bool = False
    num_workers: Optional[int] = None
    log_every: Optional[int] = None
    max_nonfinite: int = 10
    xla_matmul_precision: Optional[str] = None


# ``--compile [MODE]``: torch.compile's modes. The two with CUDA graphs replay each compiled forward and
# backward as one graph launch: no Python runs per op call (our ops' launchers included) after the first
# steps at a shape, where eager pays 40-170 us of host time per op (docs/kernels.md).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def compile_for_training(model: torch.nn.Module, mode: Optional[str]) -> torch.nn.Module:
    """``model`` under torch.compile in ``mode`` (None: ``model`` itself)."""
    return model if mode is None else torch.compile(model, mode=mode)


# Options that count things, and the smallest value each allows (None: the config's value).
COUNT_OPTIONS = {"steps": 1, "epochs": 1, "batch_size": 1, "accum_steps": 1, "num_workers": 0, "log_every": 1,
                 "save_every": 1, "picture_every": 1, "keep_last": 0, "picture_count": 1, "max_nonfinite": 1}


def check_options(options: RunOptions) -> None:
    """Refuse counts out of range up front (``--steps 0`` is not "unset", ``--accum-steps -2`` not 1), and
    what the XLA path does not do, before any device starts."""
    for name, minimum in COUNT_OPTIONS.items():
        value = getattr(options, name, None)  # each command has its own subset
        if value is not None:
            check_count("--" + name.replace("_", "-"), value, minimum)
    if options.compile is not None and options.compile not in COMPILE_MODES:
        raise ValueError(f"--compile {options.compile!r}: expected one of {', '.join(COMPILE_MODES)}")
    if options.device == "xla":
        from . import xla_spmd

        xla_spmd.check_options(options)


class NonFiniteLossError(RuntimeError):
    """The run diverged: too many optimizer steps in a row had a bad loss (NaN/inf or a spike), or the
    model/optimizer state holds a non-finite value at a checkpoint."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says the step and the checkpoint to resume from."""


# A loss above SPIKE_FACTOR x the median of the last SPIKE_WINDOW good losses is a spike (a bad step, like a
# NaN): a healthy SimMIM L1 or fine-tuning cross-entropy never jumps 10x. It is judged once SPIKE_MIN_HISTORY
# good losses are known (the window is saved in checkpoints, so a resumed run judges its first step).
SPIKE_FACTOR = 10.0
SPIKE_WINDOW = 100
SPIKE_MIN_HISTORY = 10


def resolve_amp(choice: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype (None = full precision). auto: bf16 on CUDA where supported, else fp16; bf16 on
    TPUs; off elsewhere (the CPU, XLA's CPU device)."""
    if choice == "auto":
        if device.type == "xla":
            from . import xla_spmd

            return xla_spmd.default_amp()
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if choice not in ("bf16", "fp16", "off"):
        raise ValueError(f"--amp must be auto, bf16, fp16 or off, got {choice!r}")
    if choice == "fp16" and device.type == "xla":
        raise ValueError("--amp fp16 is not supported on XLA; use bf16")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[choice]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def xla_sync() -> None:
    import torch_xla

    if hasattr(torch_xla, "sync"):
        torch_xla.sync()
    else:
        import torch_xla.core.xla_model as xm

        xm.mark_step()


@contextlib.contextmanager
def kernel_backend(spec: Optional[str]):
    """--backend for the whole process: through the environment variable rather than ``use_backend``,
    whose choice is per thread, as autograd runs the backward pass on its own threads on CUDA."""
    if not spec:
        yield
        return
    dispatch.parse_spec(spec)  # a typo fails here, before any work
    previous = os.environ.get(dispatch.ENV_VAR)
    os.environ[dispatch.ENV_VAR] = spec
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(dispatch.ENV_VAR, None)
        else:
            os.environ[dispatch.ENV_VAR] = previous


def check_forced_backend(forward: Callable[[], object], device: torch.device,
                         amp_dtype: Optional[torch.dtype]) -> None:
    """With a forced kernel backend (``--backend`` or SIMMIM_FAST_BACKEND), run ``forward`` (one image,
    under the run's autocast) once before the run writes anything: a backend that cannot run here
    (triton on a CPU without the interpreter) is its BackendError now, not after the output folder and
    log exist. No RNG advances."""
    if dispatch.parse_spec(os.environ.get(dispatch.ENV_VAR)) == (None, {}):
        return
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), \
            (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()):
        forward()


class TrainingSteps:
    """The run, batches and optimizer steps of a training loop that holds ``options`` (with ``fsdp``,
    ``keep_last``, ``max_nonfinite``), ``output``, ``runtime``,
    ``model`` (unwrapped), ``train_model`` (DDP/FSDP/compiled), ``optimizer``, ``scaler`` (or None),
    ``schedule``, ``step``, ``clip_grad``, ``clip_each_micro_batch`` (TRAIN.CLIP_EACH_MICRO_BATCH), ``device``,
    ``amp_dtype``, ``loader`` (an ``EpochSampler``'s), ``accumulation``, ``epoch`` and ``samples_into_epoch``,
    and defines ``resume()`` and ``_train()``."""

    def run(self) -> Dict[str, Any]:
        """Train to the last step (``_train``) from where ``resume`` puts the run; returns its summary.
        The folder's lock first: a second run is refused before it reads a checkpoint this one may be
        replacing, and a checkpoint that cannot be continued leaves no trace (run_lock removes a new folder)."""
        with run_lock.holding(self.output, self.runtime.is_main):
            self.resume()
            try:
                return self._train()
            except KeyboardInterrupt:
                raise self.interrupted() from None

    def _batches(self):
        """Micro-batches from the saved position on, epoch after epoch; keeps ``self.epoch`` current."""
        for epoch, batch in self._epoch_batches():
            if epoch != self.epoch:
                self.epoch, self.samples_into_epoch = epoch, 0
            yield batch

    def _epoch_batches(self):
        """(epoch, micro-batch) from the saved position on; reads the position once, changes nothing (XLA's
        loader thread runs it ahead of the steps)."""
        epoch, skip = self.epoch, self.samples_into_epoch // self.runtime.world_size
        while True:
            self.loader.sampler.set_position(epoch, skip)
            micro_batches = len(self.loader) // self.accumulation * self.accumulation
            iterator = iter(self.loader)
            for _ in range(micro_batches):
                yield epoch, next(iterator)
            epoch, skip = epoch + 1, 0

    def _micro_batch_context(self, last: bool):
        """Gradient sync only on the last micro-batch of an accumulation."""
        if self.options.fsdp:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.runtime.distributed and not last:
            return self.train_model.no_sync()
        return contextlib.nullcontext()

    def compile_note(self) -> str:
        """The run header's words on torch.compile: empty for an eager run."""
        mode = self.options.compile
        if mode is None:
            return ""
        if mode not in CUDA_GRAPH_COMPILE_MODES:
            return f", torch.compile {mode}"
        graphs = "CUDA graphs" if self.device.type == "cuda" else f"no CUDA graphs on {self.device.type}"
        return f", torch.compile {mode} ({graphs})"

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---- divergence: bad steps, checkpoints good and bad ---------------------------------------------

    def start_health(self) -> None:
        """The divergence state of a fresh run (``restore_progress`` overwrites what a checkpoint holds)."""
        self.nonfinite_skipped = 0  # bad steps in all (the name predates spikes; checkpoints keep it)
        self.recent_losses: collections.deque = collections.deque(maxlen=SPIKE_WINDOW)
        self.consecutive_bad = 0
        self.bad_since: Optional[int] = None  # the first bad step of the current streak
        self.unconfirmed: Optional[Path] = None  # the checkpoint written at the step before the next judged one
        self.last_good: Optional[Path] = None

    def spike_threshold(self) -> float:
        if len(self.recent_losses) < SPIKE_MIN_HISTORY:
            return math.inf
        return SPIKE_FACTOR * statistics.median(self.recent_losses)

    def bad_loss_reason(self, loss: float) -> Optional[str]:
        """Why ``loss`` makes its step bad, or None."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if loss > self.spike_threshold():
            return (f"loss spike ({loss:.4g} > {SPIKE_FACTOR:g} x the median {statistics.median(self.recent_losses):.4g} "
                    f"of the last {len(self.recent_losses)} losses)")
        return None

    def judge_step(self, step: int, loss: float, skipped: bool, monitor) -> Optional[str]:
        """Record step ``step``'s loss; returns why the step is bad (its update was skipped), or None. A bad
        step right after a checkpoint marks that checkpoint bad (its weights gave the bad loss); a good one
        confirms it and applies retention."""
        reason = self.bad_loss_reason(loss) or ("loss over the spike threshold" if skipped else None)
        if self.unconfirmed is not None:
            if reason is None:
                self.last_good = self.unconfirmed
            else:
                marked = checkpoints.mark_bad(self.unconfirmed)
                monitor.message(f"step {step}: {reason}; the checkpoint before it is marked bad: {marked.name}")
            self.unconfirmed = None
            if self.runtime.is_main:
                checkpoints.keep_last(self.output, self.options.keep_last)
        if reason is None:
            self.recent_losses.append(loss)
            self.consecutive_bad, self.bad_since = 0, None
            return None
        self.nonfinite_skipped += 1
        self.consecutive_bad += 1
        if self.bad_since is None:
            self.bad_since = step
        monitor.message(f"step {step}: {reason}, update {'not ' if self.runtime.is_xla else ''}skipped "
                        f"({self.consecutive_bad} in a row, {self.nonfinite_skipped} in all)")
        return reason

    def stop_if_diverged(self, step: int, reason: Optional[str]) -> None:
        """``max_nonfinite`` bad steps in a row (one on XLA, which cannot skip the update without a host sync
        per step) stop the run with one line naming the last good checkpoint."""
        if reason is not None and (self.runtime.is_xla or self.consecutive_bad >= self.options.max_nonfinite):
            raise NonFiniteLossError(
                f"step {step}: {self.consecutive_bad} optimizer step(s) in a row had a bad loss since step "
                f"{self.bad_since} (last: {reason}); stopping. {self.last_good_sentence()} Lower TRAIN.BASE_LR, "
                "use --amp bf16 instead of fp16, or check the data.")

    def last_good_sentence(self) -> str:
        if self.last_good is not None:
            return f"The last good checkpoint is {self.last_good}."
        return "There is no good checkpoint of this run."

    def write_checkpoint(self, state: Dict[str, Any], kind: str) -> Path:
        """Rank 0: write ``state`` (device tensors; copied to the CPU here) as the checkpoint of this step,
        unless it holds a non-finite value (checked where the tensors are, one host read): then the run
        stops. Written during a bad streak it is marked bad by its name; else it is confirmed (and
        retention applied) by the next step's loss."""
        if not checkpoints.all_finite(state["model"], state["optimizer"]):
            raise NonFiniteLossError(f"step {self.step}: the model or optimizer state holds a non-finite value; "
                                     f"no checkpoint written, stopping. {self.last_good_sentence()}")
        bad = self.bad_since is not None
        path = (checkpoints.bad_checkpoint_path if bad else checkpoints.checkpoint_path)(self.output, self.step)
        checkpoints.save_checkpoint(path, {**checkpoints.to_cpu(state), "recent_losses": list(self.recent_losses)},
                                    kind=kind)
        if bad:
            checkpoints.keep_last(self.output, self.options.keep_last)
        else:
            self.unconfirmed = path
        return path

    def confirm_last_checkpoint(self) -> None:
        """At the end of a run: the last checkpoint has no next step to judge it; it stands as written."""
        if self.unconfirmed is not None:
            self.last_good, self.unconfirmed = self.unconfirmed, None
            checkpoints.keep_last(self.output, self.options.keep_last)

    def interrupted(self) -> RunInterrupted:
        """The one line of a Ctrl-C: the step, and the checkpoint --resume auto takes."""
        good = checkpoints.list_checkpoints(self.output)
        newest = good[-1] if good else None
        where = f"the newest checkpoint is {newest}" if newest else "no checkpoint was written"
        return RunInterrupted(f"interrupted at step {self.step}; no checkpoint is written on interrupt: {where}"
                              + (" (--resume auto continues from it)" if newest else ""))

    def restore_progress(self, state: Mapping[str, Any], path: Path) -> None:
        """What a resumed run takes back besides weights and optimizer: the loss scaler, the position in
        the data, the bad-step count and loss window, and this rank's random state (last: nothing draws
        after it)."""
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.samples_into_epoch = state["data"]["samples_into_epoch"]
        self.nonfinite_skipped = state["nonfinite_skipped"]
        self.recent_losses.extend(state.get("recent_losses", []))  # absent from older checkpoints
        if checkpoints.CHECKPOINT_PATTERN.match(path.name):
            self.last_good = path
        saved_rng = state["rng"]
        checkpoints.restore_rng(saved_rng[self.runtime.rank % len(saved_rng)], self.device)

    def optimizer_step(self, batches, loss_of: Callable[[Any], torch.Tensor]) -> Dict[str, Any]:
        """Forward/backward of ``loss_of(batch)`` over the micro-batches, then the update unless the loss is
        bad (non-finite, or a spike). Returns tensors (no host sync here: on XLA the caller reads them after
        ``xla_sync``).

        Clipping: once, on the step's summed gradients; or, with ``clip_each_micro_batch`` (the original's
        main_finetune.py and main_simmim.py under accumulation), the running sum after every micro-batch's
        backward too, then gradients are synchronised after every micro-batch, as the original's DDP did,
        so that each clip sees the sum over all processes."""
        lr = self.schedule.apply(self.optimizer, self.step)
        loss_sum = torch.zeros((), device=self.device)
        clip_each = self.clip_each_micro_batch and len(batches) > 1
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            if self.options.compile in CUDA_GRAPH_COMPILE_MODES:
                # A new CUDA-graph generation: the last micro-batch's outputs (read into loss_sum already)
                # may be overwritten by this replay.
                torch.compiler.cudagraph_mark_step_begin()
            with self._micro_batch_context(last=last or clip_each), self._autocast():
                loss = loss_of(batch)
            scaled = loss.float() / len(batches)
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
            if clip_each and not last:  # the gradients are still scaled here: so is the threshold
                scale = self.scaler.get_scale() if self.scaler is not None else 1.0
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad * scale)
        step_loss = distributed.mean_across(loss_sum / len(batches), self.runtime)
        # A bad loss (docs/long-runs.md) skips the update; XLA cannot branch on it without a host sync per
        # step, so there judge_step stops the run when the loss is read.
        if not self.runtime.is_xla and not bool(torch.isfinite(step_loss) & (step_loss <= self.spike_threshold())):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:  # an fp16 overflow is the usual cause: back the scale off
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
            return {"loss": step_loss, "lr": lr, "grad_norm": None, "skipped": True}
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "skipped": False}

