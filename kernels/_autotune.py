"""The one autotuning policy of every Triton kernel in this package.

- ``configs[0]`` is the kernel's known-good default: it compiles for every shape the dispatch sends
  (within shared memory, no register spills in 16-bit) and is the only config bound when tuning is
  off, so it must be a sensible choice on its own.
- Keys never name the batch size (nor anything that grows with it): a new batch size must not
  start another round of compiles and timings.
- A kernel whose summation order depends on a tile size keeps that tile fixed in every config, so its
  bits are the same in every process and rank. ``num_warps`` is such a choice too wherever a result goes
  through a cross-thread ``tl.sum`` (its reduction tree follows the warp layout): those kernels tune
  ``num_stages`` only.
- ``SIMMIM_FAST_AUTOTUNE=0`` (read when ``simmim_fast.kernels`` modules are first imported), and the
  CPU interpreter (which has no timer), bind the default alone: one compile, no timing.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import triton

AUTOTUNE_ENV = "SIMMIM_FAST_AUTOTUNE"


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1") != "0" and os.environ.get("TRITON_INTERPRET", "0") != "1"


def autotune(configs: Sequence[triton.Config], key: Sequence[str], prune: Optional[Callable] = None):
    """``triton.autotune`` under the policy above; ``prune`` is an ``early_config_prune`` that must
    keep at least one config."""
    configs = list(configs) if autotune_enabled() else list(configs[:1])
    prune_by = {"early_config_prune": prune} if prune is not None and len(configs) > 1 else None
    return triton.autotune(configs=configs, key=list(key), prune_configs_by=prune_by)
