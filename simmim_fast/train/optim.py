"""The original SimMIM optimisation: AdamW with its weight-decay rules, linear LR scaling by batch,
and per-iteration schedules (linear warmup, then cosine / linear / step / multistep)."""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

LR_REFERENCE_BATCH = 512


def skips_weight_decay(model: nn.Module) -> Callable[[str, nn.Parameter], bool]:
    """The original's rule for parameters without weight decay: 1-D ones, biases, the model's
    ``no_weight_decay()`` names and names containing one of its ``no_weight_decay_keywords()``."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    keywords = set(model.no_weight_decay_keywords()) if hasattr(model, "no_weight_decay_keywords") else set()
    return lambda name, param: (param.ndim == 1 or name.endswith(".bias") or name in skip
                                or any(word in name for word in keywords))


def param_groups(model: nn.Module) -> List[Dict]:
    """[decayed, not decayed], by ``skips_weight_decay``."""
    skips = skips_weight_decay(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if skips(name, param) else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lrs(config, global_batch: int, accumulation_steps: int) -> Dict[str, float]:
    """BASE_LR, WARMUP_LR and MIN_LR times (per-device batch x processes / 512) x accumulation steps."""
    factor = global_batch / LR_REFERENCE_BATCH * max(accumulation_steps, 1)
    return {"base": config.TRAIN.BASE_LR * factor, "warmup": config.TRAIN.WARMUP_LR * factor,
            "min": config.TRAIN.MIN_LR * factor}


def build_optimizer(model: nn.Module, config, lr: float, kind: str = "adamw", device_type: str = "cpu",
                    groups: Optional[List[Dict]] = None):
    """TRAIN.OPTIMIZER.NAME adamw (fused on CUDA) or sgd; ``kind='apex-fused-adam'`` takes NVIDIA apex's
    FusedAdam (AdamW-style decay), which must already be installed. ``groups``: parameter groups
    (default ``param_groups(model)``; fine-tuning passes its layer-decay groups)."""
    groups = groups if groups is not None else param_groups(model)
    settings = config.TRAIN.OPTIMIZER
    name = settings.NAME.lower()
    if kind == "apex-fused-adam":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise ValueError("--optimizer apex-fused-adam needs NVIDIA apex built with its CUDA extensions "
                               "(apex.optimizers.FusedAdam); the PyPI package 'apex' is a different project") from None
        return FusedAdam(groups, lr=lr, betas=tuple(settings.BETAS), eps=settings.EPS,
                         weight_decay=config.TRAIN.WEIGHT_DECAY, adam_w_mode=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(settings.BETAS), eps=settings.EPS,
                                 weight_decay=config.TRAIN.WEIGHT_DECAY, fused=device_type == "cuda" or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=settings.MOMENTUM, nesterov=True,
                               weight_decay=config.TRAIN.WEIGHT_DECAY)
    raise ValueError(f"TRAIN.OPTIMIZER.NAME must be 'adamw' or 'sgd', got {settings.NAME!r}")


@dataclass
class LRSchedule:
    """The learning rate of optimizer step ``t`` (0-based): linear warmup from ``warmup_lr`` over
    ``warmup_steps``, then the named decay over the remaining steps, as the original's timm-style
    schedulers with t_in_epochs=False (the cosine spans all ``total_steps``, warmup included).

    Layer-wise LR decay (fine-tuning) as the original's timm 0.4 schedulers see it: a group's peak is
    ``base_lr x lr_scale`` (its initial LR), but the warm-up starts from the unscaled ``warmup_lr`` and the
    cosine ends at the unscaled ``min_lr`` (both are single values there, not per group)."""

    name: str
    base_lr: float
    warmup_lr: float
    min_lr: float
    total_steps: int
    warmup_steps: int
    decay_steps: int = 0          # step: decay every this many steps
    decay_rate: float = 0.1       # step
    milestones: Sequence[int] = ()  # multistep, in steps
    gamma: float = 0.1            # multistep

    def __post_init__(self):
        if self.name not in ("cosine", "linear", "step", "multistep"):
            raise ValueError(f"TRAIN.LR_SCHEDULER.NAME must be cosine, linear, step or multistep, got {self.name!r}")

    def __call__(self, step: int, lr_scale: float = 1.0) -> float:
        peak = self.base_lr * lr_scale
        if step < self.warmup_steps:
            return self.warmup_lr + step * (peak - self.warmup_lr) / self.warmup_steps
        if self.name == "cosine":
            progress = min(step / max(self.total_steps, 1), 1.0)
            return self.min_lr + 0.5 * (peak - self.min_lr) * (1 + math.cos(math.pi * progress))
        if self.name == "linear":  # the original's LinearLRScheduler, down to 1% of the peak
            progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
            return peak - (peak - peak * 0.01) * min(progress, 1.0)
        if self.name == "step":
            return peak * self.decay_rate ** (step // max(self.decay_steps, 1))
        return peak * self.gamma ** bisect.bisect_right(list(self.milestones), step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Sets each group's LR for ``step``; returns the unscaled one (the head's, for the log)."""
        for group in optimizer.param_groups:
            group["lr"] = self(step, group.get("lr_scale", 1.0))
        return self(step)

    def state_dict(self) -> Dict:
        return {key: list(value) if key == "milestones" else value for key, value in vars(self).items()}


def build_schedule(config, lrs: Dict[str, float], total_steps: int, steps_per_epoch: float) -> LRSchedule:
    """Epoch-valued settings (WARMUP_EPOCHS, DECAY_EPOCHS, MULTISTEPS) become steps at ``steps_per_epoch``
    (``--steps`` shortens a run by shrinking an epoch, so every setting keeps its share of the run)."""
    scheduler = config.TRAIN.LR_SCHEDULER
    to_steps = lambda epochs: int(epochs * steps_per_epoch)  # noqa: E731
    return LRSchedule(name=scheduler.NAME, base_lr=lrs["base"], warmup_lr=lrs["warmup"], min_lr=lrs["min"],
                      total_steps=total_steps, warmup_steps=to_steps(config.TRAIN.WARMUP_EPOCHS),
                      decay_steps=to_steps(scheduler.DECAY_EPOCHS), decay_rate=scheduler.DECAY_RATE,
                      milestones=[to_steps(epoch) for epoch in scheduler.MULTISTEPS], gamma=scheduler.GAMMA)
