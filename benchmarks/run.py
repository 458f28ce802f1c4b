"""Benchmark CLI.

    python -m benchmarks.run --suite {kernels,e2e,all} [--smoke] [--ops OP ...] [--providers NAME ...]
                             [--dtype bf16|fp32] [--flush-l2] [--out DIR] [--compare OLD_DIR]
    python -m benchmarks.run --compare OLD_DIR --against NEW_DIR     (no run: compare two folders)
    python -m benchmarks.run --suite data [--smoke] [--data-folder DIR] [--data-workers N]   (input pipeline)

Results go to benchmarks/results/<device-slug>/<date>-<commit>/ (``--smoke``: runs/benchmarks-smoke/,
which git ignores: smoke numbers are not benchmark results). ``--compare`` prints every measurement
more than 5% slower than in OLD_DIR and exits 1 if there is any.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import torch

from simmim_fast.backends import ALL_OPS

from . import e2e, kernels
from .device import environment, l2_cache_bytes, measure_ceilings, results_folder
from .report import annotate_e2e_rows, annotate_kernel_rows, find_regressions, load_results, write_results
from .timing import TimingPlan

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ALL_PROVIDERS = tuple(dict.fromkeys(kernels.PROVIDERS + tuple(e2e.PROVIDERS)))
COMPILED_PROVIDERS = tuple(name for name in e2e.PROVIDERS if e2e.is_compiled(name))
# A cold torch.compile of these graphs took 30-80 s on the 2-core CI machine (measured), more than a
# smoke run may take: --smoke leaves the compiled providers out unless --providers names them.
SMOKE_LEAVES_OUT = "compile providers left out of --smoke: a cold torch.compile takes > 30 s on a 2-core CPU"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("kernels", "e2e", "all", "data"), default="all",
                        help="all = kernels + e2e; data (the input pipeline, benchmarks/data.py) runs alone")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 reps: checks that every path runs")
    parser.add_argument("--ops", nargs="+", choices=ALL_OPS, help="kernel suite: only these ops")
    parser.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS,
                        help=f"only these (each suite takes the ones it knows); kernels: "
                             f"{', '.join(kernels.PROVIDERS)}; e2e: {', '.join(e2e.PROVIDERS)}")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="kernel inputs (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--flush-l2", action="store_true", help="write 2x the L2 before every timed kernel call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kernel-budget-s", type=float, default=float("inf"),
                        help="stop starting kernel measurements after this long (the rest are recorded as skipped)")
    parser.add_argument("--e2e-budget-s", type=float, default=float("inf"), help="the same for the e2e suite")
    parser.add_argument("--e2e-batches", type=int, nargs="+", help="e2e suite: only these batch sizes (default: "
                        f"{' '.join(map(str, e2e.GPU_BATCHES))} on CUDA, {' '.join(map(str, e2e.CPU_BATCHES))} on the CPU)")
    parser.add_argument("--out", type=Path, help="results folder (default: see above)")
    parser.add_argument("--data-folder", type=Path, help="data suite: a folder of JPEGs (default: a generated "
                                                        "ImageNet-like one, kept under runs/benchmarks-data/)")
    parser.add_argument("--data-workers", type=int, default=1, help="data suite: DataLoader processes")
    parser.add_argument("--compare", type=Path, metavar="OLD_DIR", help="report > 5%% regressions against OLD_DIR")
    parser.add_argument("--against", type=Path, metavar="NEW_DIR",
                        help="with --compare: compare this existing results folder instead of running")
    args = parser.parse_args(argv)
    if args.against is not None and args.compare is None:
        parser.error("--against needs --compare OLD_DIR")
    return args


def compare(old_folder: Path, new_results: Dict) -> int:
    old = load_results(old_folder)
    if old["environment"]["device"] != new_results["environment"]["device"]:
        print(f"warning: comparing runs on different devices ({old['environment']['device']} vs "
              f"{new_results['environment']['device']})")
    regressions, compared = find_regressions(old, new_results)
    print(f"compared {compared} measurements with {old_folder}: {len(regressions)} regression(s) > 5%")
    for line in regressions:
        print("  REGRESSION " + line)
    return 1 if regressions else 0


def selected_providers(args: argparse.Namespace, suite_providers) -> List[str]:
    if args.providers:
        return [name for name in suite_providers if name in args.providers]
    if args.smoke:
        return [name for name in suite_providers if name not in COMPILED_PROVIDERS]
    return list(suite_providers)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.against is not None:
        return compare(args.compare, load_results(args.against))
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = environment(device)
    if args.suite == "data":
        return run_data(args, device, env)
    print(f"benchmarks on {env['device']} (torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
          f"commit {env['git_commit']}{' dirty' if env['git_dirty'] else ''})")
    ceilings = measure_ceilings(device, env["device"], args.smoke)
    print(f"ceilings: copy {ceilings.copy_gbps:.0f} GB/s, matmul {ceilings.matmul_tflops:.1f} TFLOP/s "
          f"(datasheet: {ceilings.datasheet.matched or 'no entry'})")
    kernel_providers = selected_providers(args, kernels.PROVIDERS)
    e2e_providers = selected_providers(args, e2e.PROVIDERS)
    settings = dict(suite=args.suite, smoke=args.smoke, dtype=str(dtype).replace("torch.", ""), flush_l2=args.flush_l2,
                    ops=args.ops, kernel_providers=kernel_providers, e2e_providers=e2e_providers,
                    float32_matmul_precision=torch.get_float32_matmul_precision())
    if args.smoke and not args.providers:
        settings["note"] = SMOKE_LEAVES_OUT
    results = dict(environment=env, ceilings=asdict(ceilings), settings=settings, kernels=[], e2e=[])
    folder = args.out or results_folder(device, args.smoke)

    def save(suite: str, rows: List[Dict]) -> None:
        """After every measurement, so that a run killed at its time cap keeps what it measured."""
        results[suite] = rows
        if suite == "kernels":
            annotate_kernel_rows(rows, results["ceilings"])
        else:
            annotate_e2e_rows(rows)
        write_results(folder, results, kernels.PROVIDERS, plots=False)

    if args.suite in ("kernels", "all"):
        print("kernel suite:")
        plan = TimingPlan.smoke() if args.smoke else TimingPlan(flush_l2=args.flush_l2)
        deadline = time.monotonic() + args.kernel_budget_s
        kernels.run_kernel_suite(device, dtype, plan, l2_cache_bytes(device), args.smoke, kernel_providers, args.ops,
                                 deadline, after_each=lambda rows: save("kernels", rows))
    if args.suite in ("e2e", "all"):
        print("e2e suite:")
        deadline = time.monotonic() + args.e2e_budget_s
        e2e_plan = e2e.E2EPlan.for_device(device, args.smoke)
        if args.e2e_batches:
            e2e_plan = dataclasses.replace(e2e_plan, batches=tuple(args.e2e_batches))
        e2e.run_e2e_suite(device, e2e_plan, ceilings, e2e_providers, deadline,
                          after_each=lambda rows: save("e2e", rows))
    written = write_results(folder, results, kernels.PROVIDERS)
    print(f"results: {folder} ({', '.join(path.name for path in written)})")
    if args.compare is not None:
        return compare(args.compare, results)
    return 0


def run_data(args: argparse.Namespace, device: torch.device, env: Dict) -> int:
    import os

    import PIL

    from . import data

    folder = args.out or results_folder(device, args.smoke)
    plan = data.DataPlan.for_run(args.smoke)
    work = Path("runs") / "benchmarks-data" / ("smoke" if args.smoke else "full")
    work.mkdir(parents=True, exist_ok=True)
    settings = dict(suite="data", smoke=args.smoke, workers=args.data_workers, pillow=PIL.__version__,
                    cpu_count=os.cpu_count(), folder=str(args.data_folder or work / "imagenet-like"), plan=vars(plan))
    print(f"data suite on {os.cpu_count()} CPU(s), Pillow {PIL.__version__}, device {device}:")
    results = dict(environment=env, settings=settings, data=[])

    def save(rows: List[Dict]) -> None:
        results["data"] = rows
        settings["images"] = len(data.find_images(settings["folder"]))
        data.write_data_results(folder, results)
    data.run_data_suite(args.data_folder, work, plan, args.data_workers, device, after_each=save)
    print(f"results: {folder} (data.json, data.csv, data.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
