"""The GPU check's time budget: what each section of benchmarks/gpu_check.sh should take on the device,
predicted on a CPU from counted work and measured or stated per-unit costs. A model, not a measurement.

Counted here: the e2e rows of the headline (models x eager providers), the op signatures simmim_fast.tune
measures in each headline model (a forward recorded on meta tensors) and their candidates on CUDA, the
kernel-suite headline measurements, the tests of each test section (pytest --collect-only, passed in).
Measured on the machine that runs the dry run: Triton's compile seconds per specialisation and the
number of specialisations (benchmarks/precompile.py's JSON). Stated (not measurable without a GPU):
every constant below whose name ends in _S.

    python -m benchmarks.gpu_budget --precompile-json FILE [--tests-training N] [--tests-rest N] [--check]

prints the table of both parts; ``--check`` exits 1 when part 1's headline does not fit one call with
at least MIN_BENCHMARK_S of benchmarking (the gpu-check-dry-run lane runs it so).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# A task is lent 15 minutes of device time, every start and call together, and a machine's start takes a
# minute or more (the device tool's README, 2026-12): two 6-minute calls and a start fit, so a part that
# fails can be run again at once on the warm machine. gpu_check.sh stops its sections 10 s before CALL_S.
DEVICE_TIME_S = 900
MACHINE_START_S = 150
CALL_S = 360  # one device call (the tool allows 600 s)
assert MACHINE_START_S + 2 * CALL_S <= DEVICE_TIME_S
MIN_BENCHMARK_S = 180  # part 1 must leave at least this for its headline benchmarks
DEVICE_CORES = 16  # the H100/H200 machines' CPU cores: the precompile's worker processes
# Stated constants (device seconds), each a guess to be replaced by the first GPU run's log:
STARTUP_S = 25  # python, torch and CUDA initialisation, the toolchain line, nvidia-smi
WORKER_START_S = 10  # a precompile worker imports torch, triton and simmim_fast (16 at once)
GCC_LAUNCHER_S = 0.5  # gcc builds one Triton launcher (measured once by the review of issue 22, sm_90 host)
CEILINGS_S = 5  # the in-run copy bandwidth and matmul rate
E2E_ROW_S = 12  # one eager e2e row at batch 128: build, first step, warm-up, >= 2 s of timed steps
TUNE_CANDIDATE_S = 1.5  # simmim_fast.tune, per (signature, candidate): slice numerics, warm-up, 100 timed calls, autotune
INDUCTOR_MODEL_S = 60  # a cold torch.compile of a whole model on CUDA (no better evidence here)
INDUCTOR_OP_S = 6  # a cold torch.compile of one op alone (tune(compiled=True), per candidate)
KERNEL_MEASUREMENT_S = 1.5  # one (case, provider) of the kernel suite: three modes, warm-up, ~200 ms timed each
TEST_S = 1.5  # one GPU/kernel test, its own kernels' compiles included (not precompiled)
DATA_S, DECODE_S = 60, 45  # the input-pipeline suite and the pretrain --decode gpu smoke (their caps)
# Backends the device does not have (xformers is not installed there; csrc is built only on request).
ABSENT_ON_DEVICE = ("xformers", "cuda")
# transformers+compile and compile+cudagraphs: benchmarks only
GPU_CHECK_COMPILED_PROVIDERS = ("compile", "simmim_fast+compile", "simmim_fast+cudagraphs")


@dataclass
class Section:
    part: int
    name: str
    seconds: float
    how: str  # the arithmetic, in words
    benchmark: bool = False  # counts toward MIN_BENCHMARK_S


def tuned_signatures(preset: str, batch: int) -> Dict[str, int]:
    """op -> distinct call shapes of one forward of ``preset`` at ``batch`` images (on meta tensors)."""
    import torch

    from simmim_fast import MaskGenerator, build_simmim, dispatch, get_config

    config = get_config(preset)
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        model = build_simmim(config)
    size = config.DATA.IMG_SIZE
    images = torch.empty(batch, 3, size, size, device="meta")
    mask = MaskGenerator(size, config.DATA.MASK_PATCH_SIZE, model.patch_size, config.DATA.MASK_RATIO).generate(batch)
    shapes = set()

    def keep(op, args):
        shapes.add((op, tuple((name, tuple(value.shape)) for name, value in args.items() if isinstance(value, torch.Tensor))))
    with dispatch.recording(keep):
        model(images, mask.to("meta"))
    counts: Dict[str, int] = {}
    for op, _ in shapes:
        counts[op] = counts.get(op, 0) + 1
    return counts


def cuda_candidates(op: str) -> int:
    from simmim_fast import dispatch
    from simmim_fast.backends import registry

    known = registry()
    return sum(op in known[name].ops for name in dispatch.AUTO_ORDER["cuda"] if name not in ABSENT_ON_DEVICE)


def _tune_work(batch: int) -> Tuple[int, int]:
    """(signatures with >= 2 candidates, their candidates) over the headline models."""
    from benchmarks.e2e import GPU_MODELS

    signatures = candidates = 0
    for preset in GPU_MODELS.values():
        for op, count in tuned_signatures(preset, batch).items():
            if cuda_candidates(op) >= 2:
                signatures += count
                candidates += count * cuda_candidates(op)
    return signatures, candidates


def _e2e_rows(compiled: bool) -> int:
    from benchmarks import e2e

    providers = (GPU_CHECK_COMPILED_PROVIDERS if compiled
                 else [name for name in e2e.PROVIDERS if not e2e.is_compiled(name)])
    return sum(e2e.applies(name, preset) for name in providers for preset in e2e.GPU_MODELS.values())


def _kernel_measurements() -> int:
    from benchmarks.kernel_cases import all_cases
    from benchmarks.precompile import HEADLINE_KERNEL_OPS
    from simmim_fast.backends import registry

    """(case, provider) measurements of the eager kernel headline."""
    cases = [case for case in all_cases(smoke=False) if case.op in HEADLINE_KERNEL_OPS]
    providers = ("reference", "triton", "sdpa")
    return sum(name == "reference" or case.op in registry()[name].ops for case in cases for name in providers)


def predict(precompile: Dict[str, object], tests_training: Optional[int], tests_rest: Optional[int]) -> List[Section]:
    """Both parts' sections; a test section is left out where its test count is not given."""
    from benchmarks.precompile import HEADLINE_BATCH

    specialisations = int(precompile["specialisations"])
    per_specialisation = float(precompile["seconds_per_specialisation"])
    recording_s = float(precompile.get("recording_s", 0.0))  # each worker runs every workload's launchers
    precompile_s = (WORKER_START_S + recording_s
                    + math.ceil(specialisations / DEVICE_CORES) * (per_specialisation + GCC_LAUNCHER_S))
    precompile_how = (f"{specialisations} specialisations / {DEVICE_CORES} cores x ({per_specialisation:.2f} s measured "
                      f"+ {GCC_LAUNCHER_S} s gcc) + {recording_s:.0f} s measured recording + {WORKER_START_S} s start")
    signatures, candidates = _tune_work(HEADLINE_BATCH)
    eager_rows, compiled_rows = _e2e_rows(False), _e2e_rows(True)
    measurements = _kernel_measurements()
    sections = []
    for part in (1, 2):
        sections += [Section(part, "start, toolchain, CUDA", STARTUP_S, "stated"),
                     Section(part, "precompile (parallel)", precompile_s, precompile_how)]
    sections += [
        Section(1, "e2e headline, eager", CEILINGS_S + eager_rows * E2E_ROW_S + candidates * TUNE_CANDIDATE_S,
                f"{CEILINGS_S} s ceilings + {eager_rows} rows x {E2E_ROW_S} s + tune: {signatures} signatures, "
                f"{candidates} candidates x {TUNE_CANDIDATE_S} s", benchmark=True),
        Section(1, "kernel headline", measurements * KERNEL_MEASUREMENT_S,
                f"{measurements} (case, provider) x {KERNEL_MEASUREMENT_S} s", benchmark=True),
        Section(1, "training numerics tests", (tests_training or 0) * TEST_S, f"{tests_training} tests x {TEST_S} s"),
        # again first in part 2: part 1 gives them only what its benchmarks leave, which can be nothing
        Section(2, "training numerics tests", (tests_training or 0) * TEST_S,
                f"{tests_training} tests x {TEST_S} s, again: part 1 runs them in what its benchmarks leave"),
        Section(2, "e2e compiled", compiled_rows * (INDUCTOR_MODEL_S + E2E_ROW_S) + candidates * INDUCTOR_OP_S,
                f"{compiled_rows} rows x ({INDUCTOR_MODEL_S} s Inductor + {E2E_ROW_S} s) + tune(compiled): "
                f"{candidates} candidates x {INDUCTOR_OP_S} s", benchmark=True),
        Section(2, "other GPU and kernel tests", (tests_rest or 0) * TEST_S, f"{tests_rest} tests x {TEST_S} s"),
        Section(2, "data suite, decode smoke", DATA_S + DECODE_S, "their caps"),
    ]
    counted = {"training numerics tests": tests_training, "other GPU and kernel tests": tests_rest}
    return [s for s in sections if counted.get(s.name, 0) is not None]


def table(sections: List[Section]) -> Tuple[str, bool]:
    """The markdown table and whether part 1 fits: everything before its benchmarks, plus its benchmarks'
    prediction or MIN_BENCHMARK_S if more, within CALL_S."""
    lines = ["| part | section | predicted s | cumulative s | how |", "|---|---|---|---|---|"]
    fits = True
    for part in (1, 2):
        ours = [s for s in sections if s.part == part]
        total = 0.0
        for section in ours:
            total += section.seconds
            lines.append(f"| {part} | {section.name} | {section.seconds:.0f} | {total:.0f} | {section.how} |")
        first_benchmark = next(index for index, s in enumerate(ours) if s.benchmark)
        before_s = sum(s.seconds for s in ours[:first_benchmark])
        benchmark_s = sum(s.seconds for s in ours if s.benchmark)
        reserved_end = before_s + max(benchmark_s, MIN_BENCHMARK_S)
        verdict = (f"part {part}: {total:.0f} s predicted of a {CALL_S} s call; benchmarks start at {before_s:.0f} s, "
                   f"predicted {benchmark_s:.0f} s")
        if part == 1:
            fits = reserved_end <= CALL_S
            verdict += (f"; with >= {MIN_BENCHMARK_S} s reserved for them they end by {reserved_end:.0f} s: "
                        f"{'fits' if fits else 'DOES NOT FIT'}")
        else:
            verdict += "; what does not fit is cut by the sections' caps and listed as skipped"
        lines.append(f"| {part} | **total** | {total:.0f} | | {verdict} |")
    return "\n".join(lines), fits


def suite_budgets(sections: List[Section], part: int) -> Tuple[float, float]:
    """(kernel suite, e2e suite) seconds of a part's benchmarks: their predictions, scaled up together to
    fill at least MIN_BENCHMARK_S (the window gpu_check.sh reserves)."""
    kernel_s = sum(s.seconds for s in sections if s.part == part and s.benchmark and s.name.startswith("kernel"))
    e2e_s = sum(s.seconds for s in sections if s.part == part and s.benchmark and s.name.startswith("e2e"))
    scale = max(1.0, MIN_BENCHMARK_S / max(kernel_s + e2e_s, 1.0))
    return kernel_s * scale, e2e_s * scale


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_budget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precompile-json", type=Path, required=True, help="benchmarks/precompile.py --json output")
    parser.add_argument("--tests-training", type=int, help="tests in the training-numerics section")
    parser.add_argument("--tests-rest", type=int, help="tests in the other-tests section")
    parser.add_argument("--check", action="store_true", help="exit 1 if part 1 does not fit")
    parser.add_argument("--budgets", type=int, choices=(1, 2), help="print only 'KERNEL_S E2E_S', the part's suite budgets")
    args = parser.parse_args(argv)
    sections = predict(json.loads(args.precompile_json.read_text()), args.tests_training, args.tests_rest)
    if args.budgets:
        print(" ".join(f"{seconds:.0f}" for seconds in suite_budgets(sections, args.budgets)))
        return 0
    text, fits = table(sections)
    print(text)
    return 0 if fits or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
