"""What every training loop of simmim_fast shares (pretraining in ``loop``, fine-tuning in
``simmim_fast.downstream.finetune``): AMP choice, seeding, the kernel backend for the process, and one
optimizer step over accumulated micro-batches (DDP/FSDP gradient sync on the last one, GradScaler,
clipping, a skipped update on a non-finite loss).
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import torch

from .. import dispatch
from .._checks import check_count
from . import checkpoints, distributed


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
    compile: bool = False
    resume: Optional[str] = None
    seed: Optional[int] = None
    device: str = "auto"
    fsdp: bool = False
    num_workers: Optional[int] = None
    log_every: Optional[int] = None
    max_nonfinite: int = 10
    xla_matmul_precision: Optional[str] = None


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
    if options.device == "xla":
        from . import xla_spmd

        xla_spmd.check_options(options)


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss."""


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


class TrainingSteps:
    """The batches and optimizer steps of a training loop that holds ``options`` (with ``fsdp``), ``runtime``,
    ``model`` (unwrapped), ``train_model`` (DDP/FSDP/compiled), ``optimizer``, ``scaler`` (or None),
    ``schedule``, ``step``, ``clip_grad``, ``device``, ``amp_dtype``, ``loader`` (an ``EpochSampler``'s),
    ``accumulation``, ``epoch`` and ``samples_into_epoch``."""

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

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def restore_progress(self, state: Mapping[str, Any]) -> None:
        """What a resumed run takes back besides weights and optimizer: the loss scaler, the position in
        the data, the skipped-step count, and this rank's random state (last: nothing draws after it)."""
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.samples_into_epoch = state["data"]["samples_into_epoch"]
        self.nonfinite_skipped = state["nonfinite_skipped"]
        saved_rng = state["rng"]
        checkpoints.restore_rng(saved_rng[self.runtime.rank % len(saved_rng)], self.device)

    def optimizer_step(self, batches, loss_of: Callable[[Any], torch.Tensor]) -> Dict[str, Any]:
        """Forward/backward of ``loss_of(batch)`` over the micro-batches, then the update unless the loss is
        non-finite. Returns tensors (no host sync here: on XLA the caller reads them after ``xla_sync``)."""
        lr = self.schedule.apply(self.optimizer, self.step)
        loss_sum = torch.zeros((), device=self.device)
        for index, batch in enumerate(batches):
            with self._micro_batch_context(last=index == len(batches) - 1), self._autocast():
                loss = loss_of(batch)
            scaled = loss.float() / len(batches)
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
        step_loss = distributed.mean_across(loss_sum / len(batches), self.runtime)
        if not self.runtime.is_xla and not torch.isfinite(step_loss):
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

