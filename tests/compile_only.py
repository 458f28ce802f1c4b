"""Compile the Triton kernels for a GPU that is not here, and read what they would use of it.

Inside ``compile_only(capability)`` every Triton launch compiles its kernel for that CUDA target
with Triton's own ptxas and runs nothing; an autotuned kernel compiles every config its pruning
keeps, since the tuner may pick any of them on the device. The launchers run unchanged on CPU
tensors, so their real block choices are what gets compiled. Each compiled kernel's resources
come from the cubin (cuobjdump): registers, shared memory, and local memory, which is a spill;
whether its products run on tensor cores comes from its PTX.

This catches what the interpreter cannot: code that does not lower for the GPU (tl.dot shapes,
layouts, dtypes) and tiles that would not fit in its shared memory or registers.
``python -m tests.compile_only`` prints the table for the real shapes of benchmarks/kernel_cases.py.

Meta tensors go through too (their data pointer is 0, aligned like a CUDA allocation), so a whole
training step (``compile_training_step``) and every op at batch 4096 (``compile_at_max_batch``;
``python -m tests.compile_only --max-batch`` prints its grid and int32 checks) compile without
computing or allocating anything. ``python -m tests.compile_only --account`` prints the attention
kernels' static efficiency account at the headline recipes (tests/kernel_account.py).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple
from unittest import mock

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, compute_cache_key

from benchmarks.kernel_cases import SwinShape, VitShape, recipe_cases
from simmim_fast import MaskGenerator, build_simmim, dispatch
from simmim_fast.backends import registry
from simmim_fast.backends.triton import KERNEL_ENTRY_POINTS
from simmim_fast.config import get_config
from tests.int32_ranges import int32_overflows

# Shared memory one block may opt into, per compute capability (CUDA programming guide, table 21).
MAX_SHARED_BYTES = {80: 166912, 90: 232448}
# The one device property the launchers ask torch.cuda for, their SM count: an H100 SXM, an A100.
SM_COUNT = {80: 108, 90: 132}
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@dataclass(frozen=True)
class KernelResources:
    kernel: str
    constants: str  # the constexpr arguments it was specialised for
    num_warps: int
    num_stages: int
    registers: int  # per thread
    shared_bytes: int  # static + dynamic, per block
    spill_bytes: int  # local memory + stack per thread: registers that did not fit
    dots: bool  # the kernel has tl.dot products
    tensor_cores: bool  # its PTX has MMA instructions (wgmma on sm_90, mma.sync): the dots use tensor cores


class _CompileOnlyDriver:
    """The part of Triton's driver that JITFunction.run asks before it compiles."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def _resources(kernel) -> KernelResources:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    registers, stack, static_shared, local = map(int, _RESOURCES.search(dump).groups())
    metadata = kernel.metadata
    names = kernel.src.fn.arg_names
    constants = ", ".join(f"{names[path[0]]}={value}" for path, value in kernel.src.constants.items()
                          if len(path) == 1 and names[path[0]].isupper())
    return KernelResources(metadata.name, constants, metadata.num_warps, metadata.num_stages, registers,
                           static_shared + metadata.shared, stack + local, dots="tt.dot" in kernel.asm["ttir"],
                           tensor_cores="mma" in kernel.asm["ptx"])


@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: Tuple[int, int, int]
    arguments: Dict[str, object]  # every argument by name: tensors, integers, constexprs
    compiled: Optional[object]  # Triton's CompiledKernel (its .asm holds the TTIR); None: not compiled


class CompileLog(list):
    """The resources of every kernel compiled, in compile order (one entry per compile: a launch the
    in-process cache already holds adds none), and ``launches``: every launch, with its grid."""

    def __init__(self):
        super().__init__()
        self.launches: List[Launch] = []
        self.compile_seconds = 0.0  # wall seconds in Triton's compiler (and ptxas) for the new specialisations
        self.compile_cpu_seconds = 0.0  # CPU seconds of the same: this process's and its children's (ptxas)


def _grid(grid, arguments) -> Tuple[int, int, int]:
    grid = tuple(grid(arguments) if callable(grid) else grid)
    return tuple(int(size) for size in grid) + (1,) * (3 - len(grid))


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (Triton runs ptxas as one)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def launch_key(function: JITFunction, args, kwargs) -> tuple:
    """Triton's own key of a launch (its specialisation: argument types, alignments, integers equal to 1
    or divisible by 16, constexprs, options), as JITFunction.run computes it; call it inside compile_only."""
    kwargs = dict(kwargs, debug=kwargs.get("debug", function.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    _, kernel_key_cache, _, _, binder = function.device_caches[driver.active.get_current_device()]
    _, specialization, options = binder(*args, **kwargs)
    return function.__qualname__, compute_cache_key(kernel_key_cache, specialization, options)


@contextlib.contextmanager
def compile_only(capability: int = 90, every_config: bool = True, read_resources: bool = True,
                 select: Optional[Callable[[tuple], bool]] = None) -> Iterator[CompileLog]:
    """Within it Triton launches compile for ``sm_<capability>`` and run nothing; yields the log the
    compiled kernels' resources and the launches are appended to. Output tensors of launches stay
    uninitialised. An autotuned launch compiles every config its pruning keeps, or with
    ``every_config=False`` the first one only (the others' launches are logged, not compiled).
    ``read_resources=False`` skips the cubin's resource report (the log then holds None per compile);
    ``select(launch_key)`` False: that launch is logged, not compiled (benchmarks/precompile.py splits
    the compiles of one workload across processes by it)."""
    log = CompileLog()
    touched = set()
    jit_run = JITFunction.run
    compiled_before = set()

    def compile_instead(self, *args, grid, warmup, **kwargs):
        arguments = dict(zip(self.arg_names, args), **kwargs)
        if select is not None and not select(launch_key(self, args, kwargs)):
            log.launches.append(Launch(self.__name__, _grid(grid, arguments), arguments, None))
            return None
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        touched.add(self)
        if id(kernel) not in compiled_before:  # a new specialisation: Triton compiled it for this launch
            log.compile_seconds += time.perf_counter() - started
            log.compile_cpu_seconds += _cpu_seconds() - cpu_started
            compiled_before.add(id(kernel))
            log.append(_resources(kernel) if read_resources else None)
        log.launches.append(Launch(kernel.metadata.name, _grid(grid, arguments), arguments, kernel))
        return kernel

    def compile_every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for index, config in enumerate(self.prune_configs(kwargs)):
            if every_config or index == 0:
                self.fn.run(*args, **kwargs, **config.all_kwargs())
            else:
                arguments = dict(self.nargs, **kwargs, **config.all_kwargs())
                log.launches.append(Launch(self.base_fn.__name__, _grid(kwargs["grid"], arguments), arguments, None))
        self.nargs = None

    device = types.SimpleNamespace(multi_processor_count=SM_COUNT[capability])
    previous_driver = driver._active  # None without a GPU: reset_active() would fail there
    driver.set_active(_CompileOnlyDriver(capability))
    try:
        with mock.patch.object(JITFunction, "run", compile_instead), \
                mock.patch.object(Autotuner, "run", compile_every_config), \
                mock.patch.object(torch.cuda, "get_device_properties", lambda *_: device):
            yield log
    finally:
        driver.set_active(previous_driver)
        for function in touched:  # drop kernels compiled for the absent device from the in-process caches
            function.device_caches.clear()


# Inputs whose gradient training never asks for, but a user may: their backward kernels exist too.
OPTIONAL_GRADS = ("image", "target")


def run_case(case, dtype: torch.dtype, seed: int = 0, optional_grads: bool = False) -> None:
    """Forward and backward of one benchmarks/kernel_cases.py case through our kernels, on CPU tensors;
    with ``optional_grads`` also the gradients of OPTIONAL_GRADS."""
    op = registry()["triton"].implementation(case.op)
    args = case.build(torch.device("cpu"), dtype, seed)
    # The normalised target gives the target no gradient (the dispatch sends that case to the reference).
    optional = [name for name in OPTIONAL_GRADS if name in args
                and not (name == "target" and args.get("norm_target_patch_size"))] if optional_grads else []
    for name in (*case.grad_names, *optional):
        args[name].requires_grad_()
    out = op(**args)
    out.backward(torch.ones_like(out))


def compile_case(case, dtype: torch.dtype, capability: int = 90, seed: int = 0) -> CompileLog:
    """Forward and backward of one benchmarks/kernel_cases.py case through our kernels, compile only."""
    with compile_only(capability) as compiled:
        run_case(case, dtype, seed)
    return compiled


@contextlib.contextmanager
def triton_everywhere():
    """Every op of the dispatch on the triton backend whatever the tensors' device: compile-only runs
    the launchers on CPU tensors, which the backend otherwise refuses without a GPU."""
    triton_backend = registry()["triton"]
    with mock.patch.object(dispatch, "select", lambda op, args: triton_backend):
        yield


@contextlib.contextmanager
def custom_ops_launch_on_meta(modules=None):
    """A torch.library custom op runs its fake implementation on meta tensors; here the custom ops of
    ``modules`` (default: simmim_fast.kernels') run their real one, so their launchers compile their
    kernels at shapes no host could allocate."""
    from torch.library import CustomOpDef

    if modules is None:
        modules = [importlib.import_module(f"simmim_fast.kernels.{module}") for module, _ in KERNEL_ENTRY_POINTS.values()]
    ops = {op for module in modules for op in vars(module).values() if isinstance(op, CustomOpDef)}
    with contextlib.ExitStack() as stack:
        for op in ops:
            stack.enter_context(mock.patch.object(op, "_abstract_fn", op._init_fn))
        yield


@contextlib.contextmanager
def _meta_autocast(dtype: torch.dtype):
    """torch has no autocast for the meta device; the launchers ask whether it is on for their
    tensors' device: here it is, to ``dtype``, as in training."""
    is_enabled, get_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype
    with mock.patch.object(torch, "is_autocast_enabled",
                           lambda *device: True if device == ("meta",) else is_enabled(*device)), \
            mock.patch.object(torch, "get_autocast_dtype",
                              lambda device: dtype if device == "meta" else get_dtype(device)):
        yield


def compile_training_step(preset: str, capability: int = 90) -> CompileLog:
    """A first training step of ``preset`` (simmim_fast.config) as it trains: fp32 parameters and
    images, forward under bf16 autocast, backward, every op on the triton kernels, compile only, at
    the preset's batch. On meta tensors: nothing between the kernels computes. Autocast has no meta
    device, so the launchers are told it is on (their one question); the layers between them then
    hand them fp32 where autocast would give bf16, which the launchers cast as autocast would (the
    attention operands) or take as fp32 anyway (LayerNorm outputs, images): cross-checked, the same
    kernels compile as in a step on CPU tensors under CPU autocast."""
    with compile_only(capability) as compiled:
        training_step_on_meta(preset)
    return compiled


def training_step_on_meta(preset: str, batch: Optional[int] = None, overrides: Iterable[Mapping] = (),
                          around_step: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
    """compile_training_step's step, at ``batch`` images (default: the preset's), inside a compile_only();
    ``overrides``: config mappings over the preset (simmim_fast.config.get_config); ``around_step()``: a
    context entered around the forward and backward only (not the model's construction)."""
    config = get_config(preset, overrides)
    torch.manual_seed(0)
    model = build_simmim(config).to("meta")
    batch, size = batch or config.DATA.BATCH_SIZE, config.DATA.IMG_SIZE
    images = torch.empty(batch, 3, size, size, device="meta")
    masks = MaskGenerator(size, config.DATA.MASK_PATCH_SIZE, model.patch_size, config.DATA.MASK_RATIO)
    mask = masks.generate(batch).to("meta")
    with triton_everywhere(), custom_ops_launch_on_meta(), _meta_autocast(torch.bfloat16), around_step():
        loss = model(images, mask)
        loss.backward()


# ---- every op at the largest batch of every published recipe (python -m tests.compile_only --max-batch) --

MAX_BATCH = 4096
MAX_BATCH_RECIPES = {
    "ViT-B 224": VitShape(batch=MAX_BATCH, image=224, patch=16, dim=768, heads=12, mask_patch=32),
    "ViT-B 384": VitShape(batch=MAX_BATCH, image=384, patch=16, dim=768, heads=12, mask_patch=32),
    "Swin-B 192 w6": SwinShape(batch=MAX_BATCH, image=192, patch=4, dim=128, heads=(4, 8, 16, 32), window=6,
                               mask_patch=32),
    "Swin-B 224 w7": SwinShape(batch=MAX_BATCH, image=224, patch=4, dim=128, heads=(4, 8, 16, 32), window=7,
                               mask_patch=32),
    "Swin-L 192 w12": SwinShape(batch=MAX_BATCH, image=192, patch=4, dim=192, heads=(6, 12, 24, 48), window=12,
                                mask_patch=32),
}
# CUDA's grid limits: x up to 2**31 - 1 blocks, y and z up to 65535.
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


def _meta_arguments(case_at_batch, batch: int, dtype: torch.dtype) -> Dict[str, object]:
    """The case's arguments at ``batch`` images as meta tensors (contiguous; nothing is allocated):
    every dimension that grows with the batch is found by building the case at 1 and 2 images."""
    one, two = case_at_batch(1).build(torch.device("cpu"), dtype, 0), case_at_batch(2).build(torch.device("cpu"), dtype, 0)
    arguments = {}
    for name, value in one.items():
        if isinstance(value, torch.Tensor):
            shape = [a + (b - a) * (batch - 1) for a, b in zip(value.shape, two[name].shape)]
            value = torch.empty(shape, dtype=value.dtype, device="meta")
        arguments[name] = value
    return arguments


def compile_at_max_batch(recipe: str, capability: int = 90):
    """[(case, CompileLog)] of every op's forward and backward at MAX_BATCH images of ``recipe`` in
    the training configuration (fp32 tensors, bf16 autocast), on meta tensors. Autotuned kernels
    compile their first config; every config's grid is logged."""
    shape = MAX_BATCH_RECIPES[recipe]
    results = []
    for index, case in enumerate(recipe_cases(shape)):
        arguments = _meta_arguments(lambda batch: recipe_cases(replace(shape, batch=batch))[index], MAX_BATCH,
                                    torch.float32)
        op = registry()["triton"].implementation(case.op)
        for name in case.grad_names:
            arguments[name].requires_grad_()
        with compile_only(capability, every_config=False) as compiled, custom_ops_launch_on_meta(), \
                _meta_autocast(torch.bfloat16):
            out = op(**arguments)
            out.backward(torch.ones_like(out))
        results.append((case, compiled))
    return results


def grid_breaches(launches: List[Launch]) -> List[str]:
    return [f"{launch.kernel}: grid {launch.grid} exceeds {GRID_LIMITS}" for launch in launches
            if any(size > limit for size, limit in zip(launch.grid, GRID_LIMITS))]


def int32_breaches(launches: List[Launch]) -> List[str]:
    """Every i32 operation of a compiled launch that can wrap at its arguments (tests/int32_ranges.py)."""
    breaches = []
    for launch in launches:
        if launch.compiled is None:
            continue
        tensors = [value for value in launch.arguments.values() if isinstance(value, torch.Tensor)]
        integers = {name: value for name, value in launch.arguments.items()
                    if isinstance(value, int) and not isinstance(value, bool)}
        index_tensors = [tensor for tensor in tensors if not tensor.is_floating_point()] or tensors
        largest_index = max((tensor.numel() for tensor in index_tensors), default=0)
        for problem in int32_overflows(launch.compiled.asm["ttir"], integers, launch.grid, largest_index):
            breaches.append(f"{launch.kernel}: {problem}")
    return list(dict.fromkeys(breaches))


def _print_max_batch() -> None:
    for recipe in MAX_BATCH_RECIPES:
        for case, compiled in compile_at_max_batch(recipe):
            largest = max((launch.grid for launch in compiled.launches), key=lambda grid: grid[0] * grid[1] * grid[2])
            breaches = list(dict.fromkeys(grid_breaches(compiled.launches) + int32_breaches(compiled.launches)))
            print(f"{recipe:15} {case.op + ' ' + case.name:60} {len(compiled.launches):3} launches, "
                  f"largest grid {largest}: {'ok' if not breaches else 'FAILS'}")
            for breach in breaches:
                print(f"    {breach}")


def _print_resources() -> None:
    from benchmarks.kernel_cases import all_cases

    header = (f"{'op / case':58} {'dtype':9} {'kernel':38} {'warps':>5} {'stages':>6} {'regs':>4} {'smem KiB':>8} "
              f"{'spill B':>7} dots")
    print(header)
    for case in all_cases(smoke=False):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for kernel in compile_case(case, dtype):
                print(f"{case.op + ' ' + case.name:58} {str(dtype)[6:]:9} {kernel.kernel:38} {kernel.num_warps:5} "
                      f"{kernel.num_stages:6} {kernel.registers:4} {kernel.shared_bytes / 1024:8.1f} "
                      f"{kernel.spill_bytes:7} {('mma' if kernel.tensor_cores else 'fma') if kernel.dots else '-'}")


def _print_account() -> None:
    from tests import kernel_account

    rows = [row for recipe in kernel_account.RECIPES for row in kernel_account.account(recipe)]
    print("Static model (compile-only, sm_90, 132 SMs; nothing timed): tests/kernel_account.py")
    print(kernel_account.format_table(rows))


if __name__ == "__main__":
    if sys.argv[1:] == ["--max-batch"]:
        _print_max_batch()
    elif sys.argv[1:] == ["--account"]:
        _print_account()
    elif sys.argv[1:]:
        sys.exit("usage: python -m tests.compile_only [--max-batch | --account]")
    else:
        _print_resources()
