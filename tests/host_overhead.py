"""Host time per op call up to Triton's launcher, measured on this CPU: ``python -m tests.host_overhead``.

Each op of benchmarks/kernel_cases.py runs at its smoke shape on CPU tensors under CPU bf16 autocast
(torch's own ops between the kernels dispatch in C++ as they would on CUDA, and compute next to nothing
at these sizes; meta tensors would not do: many of their shape functions are Python decompositions,
10x a CUDA dispatch), with the compile-only driver of tests/compile_only.py: every Triton launch goes
through Triton's autotuner (its key built and found in a cache that holds the default config, as after
tuning) and Triton's argument binding, specialisation key and kernel-cache lookup, then stops where
Triton's C launcher would run (which needs a CUDA driver: timed on a GPU, with the CUDA launches of
torch's own ops, by benchmarks/gpu_check.sh). Measured: the op's call as training makes it (kernels/_eager.py's
eager entry, input checks, autocast casts, output allocation, the launcher's Python), per forward call
(autograd recording, as in training) and per forward + backward; each also with Triton's JITFunction.run
left out (ours alone: the entry, launchers, the shared autotuner and heuristics), which splits the time
between this package's Python and Triton's per-launch binding.

Rounds interleave the ops; the figure is the median over rounds of the mean per call in a round, in
CPU time of the measuring thread (time.thread_time): the 2-core host is shared and often far over
2 runnable processes, where wall-clock time measures the queue instead.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import os
import platform
import statistics
import sys
import time
from unittest import mock

import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from benchmarks.kernel_cases import all_cases
from simmim_fast.backends import registry
from simmim_fast.backends.triton import KERNEL_ENTRY_POINTS
from tests import compile_only

ROUNDS = 7
CALLS_PER_ROUND = 50


class _TunedCache(dict):
    """An autotuner's cache after tuning: every key holds the default config."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def __contains__(self, key):
        return True

    def __missing__(self, key):
        return self.config


def _tuned_caches():
    """Patches giving every autotuner of simmim_fast.kernels a _TunedCache."""
    modules = [importlib.import_module(f"simmim_fast.kernels.{module}") for module, _ in KERNEL_ENTRY_POINTS.values()]
    tuners = {tuner for module in modules for tuner in vars(module).values() if isinstance(tuner, Autotuner)}
    return [mock.patch.object(tuner, "cache", _TunedCache(tuner.configs[0])) for tuner in tuners]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _calls(case):
    """(forward call, forward + backward call) of a benchmarks/kernel_cases.py case on CPU tensors."""
    op = registry()["triton"].implementation(case.op)
    arguments = case.build(torch.device("cpu"), torch.float32, 0)
    trained = {name: arguments[name].requires_grad_() for name in case.grad_names}

    def forward():  # as in training: autograd records the op
        op(**arguments)

    def forward_backward():
        out = op(**arguments)
        out.backward(torch.ones_like(out))
        for leaf in trained.values():
            leaf.grad = None
    return forward, forward_backward


def measure(rounds: int = ROUNDS, calls_per_round: int = CALLS_PER_ROUND):
    """[(case label, forward us per call, forward + backward us per call, launches per fwd + bwd,
    forward us without Triton's JITFunction.run, forward + backward us without it)]."""
    jit_run, autotuner_run = JITFunction.run, Autotuner.run
    launches = [0]
    with_triton_run = [True]

    def up_to_the_launcher(self, *args, grid, warmup, **kwargs):
        launches[0] += 1
        if with_triton_run[0]:
            return jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        return None  # ours alone: everything up to Triton's binder, specialisation key and kernel cache

    results = {}
    cases = all_cases(smoke=True)
    with compile_only.compile_only(90, every_config=False), compile_only.triton_everywhere(), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        calls = [(case, *_calls(case)) for case in cases]
        per_fb_launches = {}
        for case, forward, forward_backward in calls:  # the first call compiles
            forward()
            forward_backward()
        # Triton's own autotuner in place of the harness's compile-every-config one; as timeit does, no
        # garbage collection inside the timed loops.
        with contextlib.ExitStack() as stack:
            for patch in [mock.patch.object(JITFunction, "run", up_to_the_launcher),
                          mock.patch.object(Autotuner, "run", autotuner_run), *_tuned_caches()]:
                stack.enter_context(patch)
            gc.collect()
            gc.disable()
            for case, forward, forward_backward in calls:
                launches[0] = 0
                forward_backward()
                per_fb_launches[case.name] = launches[0]
            samples = {case.name: {(fn, triton_run): [] for fn in (0, 1) for triton_run in (True, False)}
                       for case in cases}
            for _ in range(rounds):
                for case, forward, forward_backward in calls:
                    for (index, triton_run), timed in samples[case.name].items():
                        fn = (forward, forward_backward)[index]
                        with_triton_run[0] = triton_run
                        start = time.thread_time()
                        for _ in range(calls_per_round):
                            fn()
                        timed.append((time.thread_time() - start) / calls_per_round * 1e6)
            with_triton_run[0] = True
            gc.enable()
    for case in cases:
        median = {mode: statistics.median(timed) for mode, timed in samples[case.name].items()}
        results[case.name] = (f"{case.op} {case.name}", median[0, True], median[1, True], per_fb_launches[case.name],
                              median[0, False], median[1, False])
    return list(results.values())


def main() -> None:
    rows = measure()
    print(f"Host time per op call up to Triton's launcher (CPU tensors at the smoke shapes, bf16 autocast, "
          f"tuned cache): "
          f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {sys.version.split()[0]}; "
          f"median of {ROUNDS} interleaved rounds of {CALLS_PER_ROUND} calls")
    print("| op / case | forward us | of which ours | forward+backward us | of which ours | Triton launches "
          "(fwd+bwd) | Triton's run per launch us |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for label, forward, forward_backward, launches, own_forward, own_forward_backward in rows:
        print(f"| {label} | {forward:.0f} | {own_forward:.0f} | {forward_backward:.0f} | {own_forward_backward:.0f} "
              f"| {launches} | {(forward_backward - own_forward_backward) / launches:.0f} |")


if __name__ == "__main__":
    main()
