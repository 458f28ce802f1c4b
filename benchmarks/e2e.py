"""End-to-end SimMIM training steps: forward (bf16 autocast on CUDA), backward, fused AdamW step.

Providers: the model on the plain ops (what the original code runs), torch.compile of that, the
model on simmim_fast's automatic dispatch (on CUDA tuned first, as pretrain does: ``tune_s``; the
compiled provider tunes against Inductor's ops, ``tune(compiled=True)``), torch.compile of that, both
compiled again with CUDA graphs (mode reduce-overhead: no host time per op call), and
what users pick instead of us: Hugging Face transformers' masked-image-modeling models at the nearest
configuration (benchmarks/transformers_models.py), eager and compiled. Images/s, MFU against the
matmul rate measured in the same run (every provider credited with our model's FLOPs at that shape),
peak memory, and NVML telemetry per provider.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from simmim_fast import MaskGenerator, build_simmim, dispatch, get_config, tune
from simmim_fast.dispatch import use_backend
from simmim_fast.train.engine import CUDA_GRAPH_COMPILE_MODES, compile_for_training

from .device import Ceilings
from .flops import simmim_forward_flops, training_step_flops
from .report import error_reason
from .telemetry import Telemetry
from .timing import TimingPlan, benchmark
from .transformers_models import TransformersSimMIM, model_class_name

# provider -> (backend spec for use_backend, torch.compile mode or None for eager); the transformers
# providers run no op of ours. The +cudagraphs ones replay each compiled forward and backward as one CUDA
# graph (pretrain --compile reduce-overhead): no host time per op call.
PROVIDERS: Dict[str, Tuple[Optional[str], Optional[str]]] = {
    "reference": ("reference", None),
    "simmim_fast": (None, None),
    "transformers": ("reference", None),
    "transformers-beit": ("reference", None),
    "compile": ("reference", "default"),
    "simmim_fast+compile": (None, "default"),
    "transformers+compile": ("reference", "default"),
    "compile+cudagraphs": ("reference", "reduce-overhead"),
    "simmim_fast+cudagraphs": (None, "reduce-overhead"),
}


def is_compiled(provider: str) -> bool:
    """Whether ``provider`` runs under torch.compile (in any mode)."""
    return PROVIDERS[provider][1] is not None


def transformers_provider(provider: str) -> Optional[str]:
    """'transformers' for 'transformers+compile', the provider itself for the others of that family, else None."""
    family = provider.split("+")[0]
    return family if family.startswith("transformers") else None


def applies(provider: str, preset: str) -> bool:
    """Whether ``provider`` has a model for ``preset`` (transformers has no BEiT Swin)."""
    family = transformers_provider(provider)
    return family is None or model_class_name(family, preset) is not None
GPU_MODELS = {"vit-b16-224": "vit-base-224", "swin-b-192-w6": "swin-base-192-w6"}
CPU_MODELS = {"vit-tiny": "vit-tiny", "swin-tiny": "swin-tiny"}
GPU_BATCHES = (64, 128)
CPU_BATCHES = (8, 16)
SMOKE_BATCHES = (2,)
INPUT_SETS = 2
LEARNING_RATE = 1e-4  # any value: the step's cost does not depend on it


@dataclass
class E2EPlan:
    models: Dict[str, str]
    batches: Tuple[int, ...]
    timing: TimingPlan

    @classmethod
    def for_device(cls, device: torch.device, smoke: bool) -> "E2EPlan":
        if smoke:
            return cls(CPU_MODELS, SMOKE_BATCHES, dataclasses.replace(TimingPlan.smoke(), gpu_time_only=False))
        # The host's work is part of a training step: it is timed, not hidden as in the kernel suite.
        timing = TimingPlan(warmup_ms=0.0, min_warmup=3, target_ms=2000.0, min_reps=5, max_reps=30,
                            gpu_time_only=False)
        if device.type == "cuda":
            return cls(GPU_MODELS, GPU_BATCHES, timing)
        return cls(CPU_MODELS, CPU_BATCHES, timing)


def training_step(model, optimizer, device: torch.device,
                  compile_mode: Optional[str] = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    autocast = device.type == "cuda"  # bf16 autocast on the GPU as in mixed-precision training; fp32 on CPU
    cuda_graphs = compile_mode in CUDA_GRAPH_COMPILE_MODES

    def step(images, masks):
        if cuda_graphs:  # as the training loop: this replay may overwrite the last step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(images, masks)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


@contextlib.contextmanager
def recorded_backend_choices(choices: Dict[str, set]) -> Iterator[None]:
    """Collects op -> backends the dispatch picks inside the block (eager code only: it wraps
    ``dispatch.select``, which ``dispatch.call`` looks up at every call)."""
    original = dispatch.select

    def select(op, args):
        backend = original(op, args)
        choices.setdefault(op, set()).add(backend.name)
        return backend
    dispatch.select = select
    try:
        yield
    finally:
        dispatch.select = original


def _batch_inputs(preset: str, batch: int, device: torch.device, seed: int):
    config = get_config(preset)
    size = config.DATA.IMG_SIZE
    patch = config.MODEL.SWIN.PATCH_SIZE if config.MODEL.TYPE == "swin" else config.MODEL.VIT.PATCH_SIZE
    generator = torch.Generator(device=device).manual_seed(seed)
    images = torch.randn(batch, 3, size, size, device=device, generator=generator)
    masks = MaskGenerator(size, config.DATA.MASK_PATCH_SIZE, patch, config.DATA.MASK_RATIO)
    return images, masks.generate(batch, generator=generator, device=device)


def measure_training(model_name: str, preset: str, batch: int, provider: str, device: torch.device,
                     plan: TimingPlan, ceilings: Ceilings) -> Dict[str, object]:
    spec, compile_mode = PROVIDERS[provider]
    compiled = is_compiled(provider)
    torch.manual_seed(0)  # every provider trains the same initial weights
    model = build_simmim(preset).train()  # ours: also the FLOP count every provider is credited with
    family = transformers_provider(provider)
    trained = (TransformersSimMIM(model_class_name(family, preset), preset) if family else model).to(device).train()
    image_size = get_config(preset).DATA.IMG_SIZE
    optimizer = torch.optim.AdamW(trained.parameters(), lr=LEARNING_RATE, weight_decay=0.05,
                                  fused=device.type == "cuda")
    step = training_step(compile_for_training(trained, compile_mode), optimizer, device, compile_mode)
    inputs = [_batch_inputs(preset, batch, device, seed) for seed in range(INPUT_SETS)]
    calls = [lambda images=images, masks=masks: step(images, masks) for images, masks in inputs]
    choices: Dict[str, set] = {}
    tune_s = None
    if spec is None and device.type == "cuda":
        # Auto mode as a user's first run has it: simmim_fast.tune measures our kernels against PyTorch at
        # these shapes (as pretrain does before its first step), so its cost stays out of the first step.
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            tune(model, *inputs[0], compiled=compiled)
        tune_s = time.perf_counter() - started
    with use_backend(spec):
        # The first step includes torch.compile's compile time. Eager steps also say which backend
        # ran each op (a compiled step takes the same dispatch decisions when it is traced).
        recording = contextlib.nullcontext() if compiled else recorded_backend_choices(choices)
        started = time.perf_counter()
        with recording:
            loss = calls[0]().item()
        first_step_s = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with Telemetry(device) as telemetry:
            timing = benchmark(calls, device, plan)
    step_s = timing.median_ms * 1e-3
    step_flops = training_step_flops(model, image_size, batch)
    achieved_tflops = step_flops / step_s / 1e12
    datasheet_tflops = ceilings.datasheet.bf16_tflops
    row = dict(
        model=model_name, batch=batch, provider=provider, status="ok", reason="",
        step_ms_median=timing.median_ms, step_ms_p20=timing.p20_ms, step_ms_p80=timing.p80_ms,
        # CUDA: the host's time to enqueue a step (Python and launches; it waits too once the launch queue is
        # full, so it reads as host overhead only where it is below step_ms)
        host_ms_per_step=timing.host_ms, reps=timing.reps,
        images_per_s=batch / step_s, forward_gflops_per_image=simmim_forward_flops(model, image_size)["total"] / 1e9,
        achieved_tflops=achieved_tflops, mfu_vs_measured_matmul=achieved_tflops / ceilings.matmul_tflops,
        mfu_vs_datasheet=None if datasheet_tflops is None else achieved_tflops / datasheet_tflops,
        peak_mem_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        first_step_s=first_step_s, tune_s=tune_s, first_loss=loss,
        backends=(f"transformers {type(trained.model).__name__} ({trained.attention} attention)" if family else
                  ", ".join(f"{op}:{'/'.join(sorted(names))}" for op, names in sorted(choices.items()))))
    row.update(telemetry.summary())
    return row


def _release(device: torch.device, compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()  # drop the graphs and their guards: the next provider starts clean
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_e2e_suite(device: torch.device, plan: E2EPlan, ceilings: Ceilings, providers: Iterable[str],
                  deadline: float, after_each: Callable[[List[Dict[str, object]]], None] = lambda rows: None,
                  log: Callable[[str], None] = print) -> List[Dict[str, object]]:
    """Eager providers for every model and batch first (seconds each), then the compiled ones (a
    minute of compiling each), smallest batch first: a spent budget costs compiled results last.
    ``after_each(rows so far)`` runs after every measurement (run.py saves the results there)."""
    chosen = [name for name in PROVIDERS if name in set(providers)]
    rows: List[Dict[str, object]] = []
    for compiled in (False, True):
        for batch in plan.batches:
            for model_name, preset in plan.models.items():
                for provider in (name for name in chosen if is_compiled(name) == compiled and applies(name, preset)):
                    rows.append(_measure_or_record(model_name, preset, batch, provider, device, plan, ceilings,
                                                   deadline, log))
                    after_each(rows)
    return rows


def _measure_or_record(model_name: str, preset: str, batch: int, provider: str, device: torch.device,
                       plan: E2EPlan, ceilings: Ceilings, deadline: float, log: Callable[[str], None]):
    base = dict(model=model_name, batch=batch, provider=provider)
    if time.monotonic() > deadline:
        row = dict(base, status="skipped", reason="e2e suite time budget spent")
    else:
        try:
            row = measure_training(model_name, preset, batch, provider, device, plan.timing, ceilings)
        except Exception as error:  # OOM, a compile failure: record it, go on
            row = dict(base, status="error", reason=error_reason(error))
        _release(device, is_compiled(provider))
    if row["status"] == "ok":
        log(f"  {model_name:<14} b{batch:<4} {provider:<20} {row['images_per_s']:9.1f} img/s  "
            f"MFU {row['mfu_vs_measured_matmul']:.1%}  first step {row['first_step_s']:.1f} s")
    else:
        log(f"  {model_name:<14} b{batch:<4} {provider:<20} {row['status']}: {row['reason'][:120]}")
    return row
