"""The one autotuning policy of every Triton kernel in this package.

- ``configs[0]`` is the kernel's known-good default: it compiles for every shape the dispatch sends
  (within shared memory, no register spills in 16-bit) and is the only config bound when tuning is
  off, so it must be a sensible choice on its own.
- Keys never name the batch size (nor anything that grows with it): a new batch size must not
  start another round of compiles and timings.
- A config may change the summation order (tiles; ``num_warps`` wherever a result goes through a
  cross-thread ``tl.sum``): ranks and runs still compute the same bits because the choice per key is
  made once and shared, not made by each process. A timed choice is recorded in the tuning table
  (``simmim_fast.tuning_table``, entries ``(KERNEL_CONFIG, kernel, key)``), which later runs read and
  ``simmim_fast.tuning.use_rank_0_table`` hands from rank 0 to every rank; a process that may not
  time (the table is frozen to rank 0's, ``SIMMIM_FAST_AUTOTUNE=0``, the CPU interpreter, which has
  no timer) takes the table's choice, else the default.
- ``SIMMIM_FAST_AUTOTUNE=0`` times nothing: a key compiles once, as the table's choice (rank 0's, or an
  earlier run's), else the default. Every config stays bound, so that such a process can still run the
  choice the other ranks share.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
import triton
from triton.runtime.autotuner import Autotuner, Heuristics

from .. import tuning_table

AUTOTUNE_ENV = "SIMMIM_FAST_AUTOTUNE"


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1") != "0" and os.environ.get("TRITON_INTERPRET", "0") != "1"


def config_json(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def untimed_choice(tuner: "SharedAutotuner") -> triton.Config:
    """What a process that may not time takes where the table has no choice: the default."""
    return tuner.configs[0]


def _json_value(value):
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


class SharedAutotuner(Autotuner):
    """triton's Autotuner, but the config of a key comes from the tuning table when it holds one;
    otherwise it is timed (when this process may) and recorded there, or it is the default."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # run() is once per launch, so kept lean (host overhead, docs/kernels.md): what it can, it looks up here.
        self._key_positions = [(name, self.arg_names.index(name)) for name in self.keys]
        self._kernel_name = f"{self.base_fn.__module__}.{self.base_fn.__name__}"

    def run(self, *args, **kwargs):
        tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
        # triton's own key: the key arguments' values and every tensor argument's dtype, as JSON values
        # (the table is a JSON file: a dtype among the key arguments is written as its name)
        key = tuple(_json_value(args[index] if index < len(args) else kwargs[name]) for name, index in self._key_positions)
        key += tuple(str(tensor.dtype) for tensor in tensors)
        kernel = self._kernel_name
        device = tensors[0].device
        config = self._candidate(tuning_table.kernel_config(device, kernel, key))
        if config is None and len(self.configs) > 1 and (tuning_table.frozen() or not autotune_enabled()):
            config = untimed_choice(self)
        if config is not None:
            self.best_config = config
            return self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.best_config = None  # set by triton's run when it chose (not by the compile-only harness's)
        result = super().run(*args, **kwargs)
        if len(self.configs) > 1 and self.best_config is not None:
            tuning_table.record_kernel_config(device, kernel, key, config_json(self.best_config))
        return result

    def _candidate(self, shared: Optional[dict]) -> Optional[triton.Config]:
        """The config the table names, if it is still one of this kernel's (a table outlives code changes)."""
        if shared is None:
            return None
        return next((config for config in self.configs if config_json(config) == shared), None)


def autotune(configs: Sequence[triton.Config], key: Sequence[str], prune: Optional[Callable] = None):
    """A SharedAutotuner under the policy above; ``prune`` is an ``early_config_prune`` (applied when
    timing) that must keep at least one config."""
    configs = list(configs)
    prune_by = {"early_config_prune": prune} if prune is not None and len(configs) > 1 else None
    return lambda fn: SharedAutotuner(fn, fn.arg_names, configs, list(key), reset_to_zero=None, restore_value=None,
                                      prune_configs_by=prune_by)


class _Heuristics(Heuristics):
    """triton's Heuristics with the arguments' dict built once per launch, not once per value (each a
    dict of 40-odd arguments: host time, docs/kernels.md); a rule may read the values before it."""

    def run(self, *args, **kwargs):
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        for name, rule in self.values.items():
            named[name] = kwargs[name] = rule(named)
        return self.fn.run(*args, **kwargs)


def heuristics(values: dict):
    """``triton.heuristics(values)``, one wrapper for all of them."""
    return lambda fn: _Heuristics(fn, fn.arg_names, values)
