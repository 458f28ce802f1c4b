"""Compile every Triton specialisation the GPU check's headline benchmarks launch, in parallel worker
processes, before anything launches: the cubins (and, where libcuda is there, the launchers gcc builds)
land in Triton's on-disk cache, so the benchmarks start warm instead of paying ~1 s per specialisation
one after another.

Each worker runs the same workloads under tests/compile_only.py's ``compile_only`` (launchers on meta or
CPU tensors, kernels compiled for ``sm_<capability>`` by Triton's ptxas, nothing run) and compiles only
the distinct specialisations (Triton's own launch key) whose first-seen rank is its own modulo the worker
count. ``--sample N`` compiles only the first N (the dry run: it counts them all and times N compiles).
What they compile:

- the e2e headline steps (benchmarks/e2e.py GPU_MODELS at HEADLINE_BATCH, bf16 autocast, every op on
  the triton kernels, every autotune config) and the same models at ORACLE_SAMPLES images, the batch
  slice on which ``simmim_fast.tune`` checks numerics;
- the kernel suite's headline cases (HEADLINE_KERNEL_OPS at bf16, benchmarks/kernel_cases.py).

    python -m benchmarks.precompile [--workers N] [--capability 90] [--sample N] [--json FILE]

prints one line (specialisations, workers, wall and CPU seconds) and writes the counts to ``--json``
(what benchmarks/gpu_budget.py predicts from).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

HEADLINE_BATCH = 128
HEADLINE_KERNEL_OPS = ("attention", "window_attention", "masked_l1_loss", "masked_decoder_loss")


def workloads() -> List[Tuple[str, Callable[[], None]]]:
    """(name, run) of everything the headline launches; each runs inside a compile_only()."""
    import torch

    from benchmarks.e2e import GPU_MODELS
    from benchmarks.kernel_cases import all_cases
    from simmim_fast.tuning import ORACLE_SAMPLES
    from tests.compile_only import run_case, training_step_on_meta

    units: List[Tuple[str, Callable[[], None]]] = []
    for preset in GPU_MODELS.values():
        for batch in (HEADLINE_BATCH, ORACLE_SAMPLES):
            units.append((f"{preset} step b{batch}", lambda preset=preset, batch=batch: training_step_on_meta(preset, batch)))
    for case in all_cases(smoke=False):
        if case.op in HEADLINE_KERNEL_OPS:
            units.append((f"{case.op} {case.name}", lambda case=case: run_case(case, torch.bfloat16)))
    return units


def _build_launchers(kernels) -> Tuple[int, str]:
    """Builds each compiled kernel's launcher (gcc; cached by Triton like the cubin). Needs libcuda."""
    try:
        from triton.backends.nvidia.driver import CudaLauncher, libcuda_dirs

        libcuda_dirs()
    except Exception as error:  # no driver here (the CPU dry run): the launchers are built at first launch
        return 0, f"launchers at first launch ({type(error).__name__}: {str(error).splitlines()[0][:60]})"
    for kernel in kernels:
        CudaLauncher(kernel.src, kernel.metadata)
    return len(kernels), ""


def run_worker(index: int, count: int, capability: int, sample: Optional[int]) -> Dict[str, object]:
    from tests.compile_only import _cpu_seconds, compile_only

    first_seen: Dict[tuple, int] = {}

    def mine(key: tuple) -> bool:
        rank = first_seen.setdefault(key, len(first_seen))
        return rank % count == index and (sample is None or rank < sample)

    started, cpu_started = time.perf_counter(), _cpu_seconds()
    with compile_only(capability, read_resources=False, select=mine) as log:
        for _, run in workloads():
            run()
    compile_s, cpu_s = time.perf_counter() - started, _cpu_seconds() - cpu_started
    kernels = list({id(launch.compiled): launch.compiled for launch in log.launches if launch.compiled is not None}.values())
    launcher_started = time.perf_counter()
    launchers, launcher_note = _build_launchers(kernels)
    return dict(worker=index, compiled=len(log), specialisations=len(first_seen), compile_s=compile_s,
                compiler_s=log.compile_seconds, compiler_cpu_s=log.compile_cpu_seconds,
                cpu_s=cpu_s, launchers=launchers, launcher_s=time.perf_counter() - launcher_started,
                launcher_note=launcher_note)


def run_parallel(workers: int, capability: int, sample: Optional[int]) -> Dict[str, object]:
    """Starts ``workers`` processes (one Triton cache: the default, or TRITON_CACHE_DIR) and sums them up."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        outputs = [Path(folder) / f"worker{index}.json" for index in range(workers)]
        processes = [subprocess.Popen([sys.executable, "-m", "benchmarks.precompile", "--worker", str(index),
                                       "--workers", str(workers), "--capability", str(capability),
                                       "--json", str(output)] + (["--sample", str(sample)] if sample else []))
                     for index, output in enumerate(outputs)]
        codes = [process.wait() for process in processes]
        results = [json.loads(output.read_text()) for output, code in zip(outputs, codes) if code == 0]
    compiled = sum(result["compiled"] for result in results)
    return dict(workers=workers, failed_workers=sum(code != 0 for code in codes), capability=capability,
                compiled=compiled, specialisations=max((result["specialisations"] for result in results), default=0),
                wall_s=time.perf_counter() - started, worker_cpu_s=sum(result["cpu_s"] for result in results),
                # CPU seconds of Triton's compiler and ptxas per specialisation, and of running every workload's
                # launchers in one worker: what a free core of this machine takes, whatever else shares it
                seconds_per_specialisation=sum(result["compiler_cpu_s"] for result in results) / max(compiled, 1),
                recording_s=max((result["cpu_s"] - result["compiler_cpu_s"] for result in results), default=0.0),
                wall_s_per_specialisation=sum(result["compiler_s"] for result in results) / max(compiled, 1),
                launchers=sum(result["launchers"] for result in results),
                launcher_note=next((result["launcher_note"] for result in results if result["launcher_note"]), ""))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precompile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--capability", type=int, default=90, help="CUDA compute capability x10 (H100/H200: 90)")
    parser.add_argument("--sample", type=int, help="compile only the first N specialisations (count them all)")
    parser.add_argument("--json", type=Path, help="write the counts and seconds here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # one worker process
    args = parser.parse_args(argv)
    if args.worker is not None:
        result = run_worker(args.worker, args.workers, args.capability, args.sample)
    else:
        result = run_parallel(args.workers, args.capability, args.sample)
        print(f"precompile: {result['compiled']} of {result['specialisations']} Triton specialisations compiled for "
              f"sm_{args.capability} in {result['workers']} worker(s): "
              f"{result['wall_s']:.1f} s wall, {result['seconds_per_specialisation']:.2f} s per specialisation "
              f"per core; {result['launchers'] or result['launcher_note'] or 'no'} launchers"
              + (f"; {result['failed_workers']} worker(s) FAILED" if result["failed_workers"] else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if result.get("failed_workers") else 0


if __name__ == "__main__":
    sys.exit(main())
