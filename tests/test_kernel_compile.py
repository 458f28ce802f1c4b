"""Every Triton kernel, compiled for the GPUs it is built for (sm_90 H100/H200, sm_80 A100) on this
CPU machine: the launchers run unchanged and each launch compiles with Triton's ptxas instead of
running (tests/compile_only.py). The interpreter lane checks the numbers; this checks what only
the GPU compiler sees:

- every op's forward and backward kernels lower and assemble, at the recipes' shapes in bf16,
  fp16 and fp32, and at the edges of what the dispatch sends to the attention kernels;
- each kernel has a config within the device's shared memory (the autotuner skips the others;
  a kernel with one config must fit);
- in 16-bit at the recipes' shapes, no config the launchers or the tuner's pruning can pick
  spills registers to local memory beyond a few bytes, and every tl.dot runs on tensor cores.
"""
import functools
import importlib
import os
import sys
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from benchmarks.kernel_cases import (SwinShape, VitShape, _attention_case, _window_attention_case, all_cases,
                                    envelope_cases)
from simmim_fast.backends import registry
from simmim_fast.backends.triton import KERNEL_ENTRY_POINTS
from tests import compile_only

pytestmark = [pytest.mark.compile,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="compiles for the GPU; the interpreter runs no compiler")]

REPO_ROOT = Path(__file__).resolve().parent.parent
SPILL_BYTES_ALLOWED = 64  # per thread; ptxas spills a few bytes at 255 registers where it costs nothing
REAL_CASES = all_cases(smoke=False)
ENVELOPE_CASES = envelope_cases()


def _case_id(case):
    return f"{case.op}[{case.name}]"


def _by_kernel(kernels):
    variants = defaultdict(list)
    for kernel in kernels:
        variants[kernel.kernel].append(kernel)
    return variants


def _check_compiled(case, dtype, capability, max_spill_bytes=None, tensor_cores=False):
    kernels = compile_only.compile_case(case, dtype, capability)
    names = {kernel.kernel for kernel in kernels}
    assert any("_fwd" in name for name in names) and any("_bwd" in name for name in names), \
        f"{case.op}: compiled {sorted(names)}; expected forward and backward kernels"
    _check_rules(kernels, capability, max_spill_bytes, tensor_cores)


def _describe(kernel):
    return (f"{kernel.kernel} ({kernel.constants}, warps={kernel.num_warps}, stages={kernel.num_stages}): "
            f"{kernel.registers} regs, {kernel.shared_bytes} B shared, {kernel.spill_bytes} B/thread spilled")


def _check_rules(kernels, capability, max_spill_bytes=None, tensor_cores=False):
    """Every kernel has a config within shared memory; with ``tensor_cores`` every config's dots are
    MMA; no config within shared memory spills more than ``max_spill_bytes``. Lists every breach."""
    limit = compile_only.MAX_SHARED_BYTES[capability]
    breaches = []
    for name, variants in _by_kernel(kernels).items():
        fitting = [kernel for kernel in variants if kernel.shared_bytes <= limit]
        if not fitting:
            breaches.append(f"{name}: every config needs more shared memory than sm_{capability}'s {limit} B: "
                            f"{sorted(kernel.shared_bytes for kernel in variants)}")
        if tensor_cores:
            breaches += [f"tl.dot without MMA: {_describe(kernel)}" for kernel in variants
                         if kernel.dots and not kernel.tensor_cores]
        if max_spill_bytes is not None:
            breaches += [f"spills > {max_spill_bytes} B/thread: {_describe(kernel)}" for kernel in fitting
                         if kernel.spill_bytes > max_spill_bytes]
    assert not breaches, "\n".join(breaches)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", REAL_CASES, ids=_case_id)
def test_recipe_shapes_compile_for_sm90(case, dtype):
    # fp32 keeps exact products on the FMA units, whose operands live in registers: some of its
    # tiles spill, which costs that (slower anyway) path speed, not correctness.
    low_precision = dtype != torch.float32
    _check_compiled(case, dtype, 90, max_spill_bytes=SPILL_BYTES_ALLOWED if low_precision else None,
                    tensor_cores=low_precision)


@pytest.mark.parametrize("case", REAL_CASES, ids=_case_id)
def test_recipe_shapes_compile_for_sm80(case):
    _check_compiled(case, torch.bfloat16, 80, tensor_cores=True)


@pytest.mark.parametrize("case", ENVELOPE_CASES, ids=_case_id)
def test_attention_envelope_compiles_for_sm90(case):
    _check_compiled(case, torch.bfloat16, 90)


def test_compile_only_reads_resources():
    """The harness itself: a kernel that must spill does, one that must not does not, and the
    launch compiled without running (the output stays as allocated)."""
    @triton.jit
    def _scale_by_sum_kernel(src_ptr, dst_ptr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        values = tl.load(src_ptr + offsets)
        tl.store(dst_ptr + offsets, values * tl.sum(values))  # every value stays live until the sum

    src, dst = torch.ones(1024), torch.zeros(1024)
    with compile_only.compile_only(90) as compiled:
        _scale_by_sum_kernel[(1,)](src, dst, BLOCK=1024)
        _scale_by_sum_kernel[(1,)](src, dst, BLOCK=16384, num_warps=1)  # 512 values per thread: local memory
    assert torch.equal(dst, torch.zeros(1024))
    small, huge = compiled
    assert small.kernel == "_scale_by_sum_kernel" and small.spill_bytes == 0 and 0 < small.registers <= 255
    assert not small.dots and not small.tensor_cores
    assert huge.spill_bytes > 0


# ---- the training configuration: what a first step compiles at each published recipe ----------

RECIPES = ["vit-base-224", "swin-base-192-w6", "swin-large-192-w12", "swinv2-base-192-w12"]
MAX_COMPILES_PER_RECIPE = 40  # with the ops' backward, ~2 min of ptxas on a host CPU at most


@functools.lru_cache(maxsize=None)
def _first_training_step(preset):
    return compile_only.compile_training_step(preset)


@pytest.mark.parametrize("preset", RECIPES)
def test_first_training_step_compiles_a_bounded_number_of_kernels(preset, summary_line):
    """fp32 parameters under bf16 autocast, forward and backward: every compile the autotuners and
    the launchers trigger, at most MAX_COMPILES_PER_RECIPE (kernels/_autotune.py's policy)."""
    compiled = _first_training_step(preset)
    per_kernel = Counter(kernel.kernel for kernel in compiled)
    summary_line(f"first training step {preset}: {len(compiled)} Triton compiles "
                 f"({', '.join(f'{name} {count}' for name, count in per_kernel.most_common())})")
    assert 0 < len(compiled) <= MAX_COMPILES_PER_RECIPE, \
        f"{preset}: {len(compiled)} compiles > {MAX_COMPILES_PER_RECIPE}: {dict(per_kernel)}"


@pytest.mark.parametrize("preset", RECIPES)
def test_training_specialisation_fits_sm90(preset):
    """The same rules as at the pure-dtype shapes above, on the kernels training really compiles
    (fp32 tensors, bf16 autocast dots): a config within shared memory, no fitting config spilling
    more than SPILL_BYTES_ALLOWED, every dot on tensor cores."""
    _check_rules(_first_training_step(preset), 90, max_spill_bytes=SPILL_BYTES_ALLOWED, tensor_cores=True)


def _kernel_modules():
    return [importlib.import_module(f"simmim_fast.kernels.{module}") for module, _ in KERNEL_ENTRY_POINTS.values()]


def _autotuners():
    return {f"{module.__name__}.{name}": tuner for module in _kernel_modules()
            for name, tuner in vars(module).items() if isinstance(tuner, Autotuner)}


def _tuning_keys(batch):
    """{autotuner: [its key values at each launch]} for every op's forward and backward at the smoke
    shapes with ``batch`` images, 6x6 windows (the split whole-window kernels) and shifted 12x12 ones
    (the flash kernels with a mask); the tuners record their keys and launch nothing."""
    keys = defaultdict(list)

    def record_key(self, *args, **kwargs):
        named = dict(zip(self.arg_names, args), **kwargs)
        keys[self].append({name: named[name] for name in self.keys if name in named})

    with compile_only.compile_only(90), mock.patch.object(Autotuner, "run", record_key), \
            mock.patch.object(JITFunction, "run", lambda *args, **kwargs: None):
        windows = [SwinShape(batch=batch, image=16 * window, patch=4, dim=32, heads=(1, 2, 4, 8), window=window,
                             mask_patch=4 * window) for window in (6, 12)]
        for case in all_cases(smoke=True, batch=batch) + [_window_attention_case(swin, stage=0) for swin in windows]:
            compile_only.run_case(case, torch.bfloat16, optional_grads=True)
    return keys


def test_autotuners_key_on_no_batch_size():
    """A new batch size must not start another round of compiles and timings: every autotuner's key
    is the same at 2 and 3 images (and every autotuner of simmim_fast.kernels was launched)."""
    tuners = _autotuners()
    two, three = _tuning_keys(2), _tuning_keys(3)
    names = {tuner: name for name, tuner in tuners.items()}
    assert set(two) == set(tuners.values()), f"not launched: {sorted(names[t] for t in set(tuners.values()) - set(two))}"
    varying = {names[tuner]: sorted({key for before, after in zip(two[tuner], three[tuner])
                                     for key in before if before[key] != after[key]})
               for tuner in two}
    assert not any(varying.values()), f"tuning keys that change with the batch: { {k: v for k, v in varying.items() if v} }"


# ---- batch 4096 at every published recipe: grids within CUDA's limits, no i32 offset that wraps ----

@functools.lru_cache(maxsize=None)
def _launches_at_max_batch(recipe):
    return [launch for _, compiled in compile_only.compile_at_max_batch(recipe) for launch in compiled.launches]


@pytest.mark.parametrize("recipe", list(compile_only.MAX_BATCH_RECIPES))
def test_max_batch_grids_fit_the_device(recipe):
    """Every op's forward and backward at 4096 images (meta tensors, compile only): every config's grid
    within x < 2**31, y and z <= 65535."""
    launches = _launches_at_max_batch(recipe)
    assert launches
    breaches = compile_only.grid_breaches(launches)
    assert not breaches, "\n".join(dict.fromkeys(breaches))


@pytest.mark.parametrize("recipe", list(compile_only.MAX_BATCH_RECIPES))
def test_max_batch_offsets_do_not_wrap_in_int32(recipe):
    """At 4096 images some tensors pass 2**31 elements: every offset that can get there must be
    computed in int64. Each compiled kernel's i32 arithmetic, bounded by interval analysis at the
    launch's arguments and grid (tests/int32_ranges.py), stays within i32."""
    launches = _launches_at_max_batch(recipe)
    assert any(launch.compiled is not None for launch in launches)
    breaches = compile_only.int32_breaches(launches)
    assert not breaches, "\n".join(breaches)


def test_int32_analysis_finds_a_wrapping_offset_and_passes_its_int64_fix():
    @triton.jit
    def _copy_rows_kernel(src_ptr, dst_ptr, row_stride, WIDE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        if WIDE:
            row = row.to(tl.int64)
        offsets = row * row_stride + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets))

    src = torch.empty(2 ** 20, 2 ** 12, device="meta")
    with compile_only.compile_only(90) as compiled:
        for wide in (False, True):
            _copy_rows_kernel[(src.shape[0],)](src, torch.empty_like(src), src.stride(0), WIDE=wide, BLOCK=64)
    narrow, wide = compile_only.int32_breaches(compiled.launches[:1]), compile_only.int32_breaches(compiled.launches[1:])
    assert len(narrow) == 1 and "arith.muli" in narrow[0] and "2**32.0" in narrow[0], narrow
    assert wide == []
    assert compile_only.grid_breaches(compiled.launches) == []
    assert compile_only.grid_breaches([compile_only.Launch("k", (1, 65536, 1), {}, None)])



@triton.jit
def _double_kernel(src_ptr, dst_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(dst_ptr + offsets, 2 * tl.load(src_ptr + offsets))


@torch.library.custom_op("simmim_fast_compile_test::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    _double_kernel[(1,)](x, out, BLOCK=x.numel())
    return out


@_double.register_fake
def _(x):
    return torch.empty_like(x)


def test_meta_tensors_reach_the_launchers_of_custom_ops():
    """The kernels are torch.library custom ops, whose fake runs on meta tensors: the harness swaps in
    their real implementation, so a meta launch still compiles (and only inside the harness)."""
    x = torch.empty(64, device="meta")
    with compile_only.compile_only(90) as compiled:
        _double(x)
        assert compiled.launches == []
        with compile_only.custom_ops_launch_on_meta([sys.modules[__name__]]):
            _double(x)
        assert [launch.kernel for launch in compiled.launches] == ["_double_kernel"]


# ---- a new batch size compiles nothing: no specialisation follows the batch ----------------------

# Odd token counts, where Triton's divisibility-by-16 and pointer-alignment specialisations of anything
# that grows with the batch would flip from one batch size to the next: ViT at 56 px in 8-pixel patches
# (49 tokens), Swin V2 at 112 px with 7x7 windows (49-token windows, a 7x7 decoder, the normalised target).
ODD_TOKEN_STEPS = {
    "vit-tiny 49 tokens": ("vit-tiny", {"DATA": {"IMG_SIZE": 56, "MASK_PATCH_SIZE": 8}}),
    "swinv2-tiny w7 112px": ("swinv2-tiny", {"DATA": {"IMG_SIZE": 112}, "MODEL": {"SWINV2": {"WINDOW_SIZE": 7}}}),
}
# Batches 1 (Triton specialises integers equal to 1) to 9 (every residue mod 4 and 8 twice), then a full
# batch and a ragged last one.
BATCH_SIZES = (*range(1, 10), 64, 37)


@pytest.mark.parametrize("steps", list(ODD_TOKEN_STEPS))
def test_no_recompile_after_the_first_step(steps):
    """A training step (meta tensors, compile only, each kernel's default config) at batch 1, then at
    every other batch of BATCH_SIZES: the later steps compile nothing."""
    preset, overrides = ODD_TOKEN_STEPS[steps]
    with compile_only.compile_only(90, every_config=False) as compiled:
        compile_only.training_step_on_meta(preset, BATCH_SIZES[0], [overrides])
        first_step = len(compiled)
        recompiled = []
        for batch in BATCH_SIZES[1:]:
            before = len(compiled)
            compile_only.training_step_on_meta(preset, batch, [overrides])
            recompiled += [f"batch {batch}: {_describe(kernel)}" for kernel in compiled[before:]]
    assert first_step > 0
    assert not recompiled, "\n".join(recompiled)


# ---- fp32 attention products: one TF32 rule for the whole-window and the flash kernels -----------

def _dot_precisions(case, dtype):
    """{kernel: {DOT_PRECISION}} of every autotuned launch of ``case``'s forward and backward, recorded
    instead of compiled or run."""
    precisions = defaultdict(set)

    def record(self, *args, **kwargs):
        precisions[self.base_fn.__name__].add(kwargs["DOT_PRECISION"])

    with compile_only.compile_only(90), mock.patch.object(Autotuner, "run", record):
        compile_only.run_case(case, dtype)
    return dict(precisions)


def test_fp32_window_attention_follows_allow_tf32():
    """fp32 window attention takes TF32 products exactly when torch's fp32 matmuls may
    (torch.backends.cuda.matmul.allow_tf32), in the whole-window kernels (T = 36) as in the flash ones
    (T = 144): one rule, kernels/_attention_operands.py dot_precision. 16-bit operands are unaffected."""
    cases = [_window_attention_case(SwinShape(batch=1, image=16 * window, patch=4, dim=64, heads=(2, 4, 8, 16),
                                              window=window, mask_patch=4 * window), stage=0) for window in (6, 12)]
    allowed = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow_tf32, fp32_precision in ((False, "ieee"), (True, "tf32")):
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            for case in cases:
                for dtype, expected in ((torch.float32, fp32_precision), (torch.bfloat16, "tf32")):
                    precisions = _dot_precisions(case, dtype)
                    assert len(precisions) >= 2 and all(found == {expected} for found in precisions.values()), \
                        f"{case.name} {dtype} allow_tf32={allow_tf32}: {precisions}"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


# ---- the dk/dv/dBias launch at the real arguments: batch groups only for a bias gradient ----------

def _dkdv_grid(batch, bias_gradient):
    """The grid of the dk/dv/dBias launch in ViT-B 224's attention backward at ``batch`` images (meta
    tensors, bf16 autocast as in training), recorded instead of compiled: the launcher's real sizing,
    not the interpreter's."""
    shape = VitShape(batch=batch, image=224, patch=16, dim=768, heads=12, mask_patch=32)
    arguments = compile_only._meta_arguments(lambda images: _attention_case(replace(shape, batch=images)), batch,
                                             torch.float32)
    for name in ("q", "k", "v"):
        arguments[name].requires_grad_()
    arguments["bias"].requires_grad_(bias_gradient)
    grids = {}

    def record(self, *args, **kwargs):
        grids[self.base_fn.__name__] = compile_only._grid(kwargs["grid"], dict(zip(self.arg_names, args)))

    with compile_only.compile_only(90), mock.patch.object(Autotuner, "run", record), \
            compile_only.custom_ops_launch_on_meta(), compile_only._meta_autocast(torch.bfloat16):
        out = registry()["triton"].implementation("attention")(**arguments)
        out.backward(torch.ones_like(out))
    return grids["_attention_bwd_dkdv_dbias_kernel"]


def test_dkdv_has_no_batch_groups_without_a_bias_gradient():
    """Without a bias gradient nothing is summed over the batch: one dk/dv program per (batch, head, key
    block), 128 * 12 * 4 at ViT-B b128, on more than 2 waves of 132 SMs. With one, the batch groups
    that bound dBias's partials stay (the control: fewer programs)."""
    programs = 128 * 12 * 4
    assert _dkdv_grid(128, bias_gradient=False) == (programs, 1, 1)
    assert _dkdv_grid(128, bias_gradient=True)[0] < programs


# ---- the static efficiency account (tests/kernel_account.py) ---------------------------------------

@functools.lru_cache(maxsize=None)
def _account(recipe):
    from tests import kernel_account

    return kernel_account.account(recipe)


def test_attention_launches_fill_two_waves_at_swin_l():
    """Swin-L 192 w12 b64's first training step: every attention launch has at least 2 waves of programs
    on 132 SMs at its compiled residency (its stage-3 dk/dv/dBias had 1.9 with dBias's partials capped
    at q's size), and the model's padding is the tile arithmetic: the forward's and dq's 16-row and
    16-key tails hold 144 tokens exactly (in whole 64-row, 64-key blocks, 192 x 192), and so do dk/dv's
    16-key tail and 16-query blocks (with 32-query blocks: 144 x 160)."""
    from tests import kernel_account

    rows = _account("Swin-L 192 w12 b64")
    assert {row.kernel for row in rows} >= set(kernel_account.MODELS)
    thin = [f"{row.kernel} {row.shape} {row.additive}: {row.programs} programs, {row.ctas_per_sm} CTAs/SM, "
            f"{row.waves:.2f} waves" for row in rows if row.waves < 2]
    assert not thin, "\n".join(thin)
    padding = {row.kernel: row.work.mma_executed / row.work.mma_useful for row in rows if "144" in row.shape}
    assert padding["_attention_fwd_kernel"] == padding["_attention_bwd_dq_kernel"] == 1.0
    assert padding["_attention_bwd_dkdv_dbias_kernel"] == 1.0


def test_attention_padding_at_vit_b_is_within_a_quarter():
    """ViT-B 224 b128's N = 197 (issue 23: MMA padding <= 1.25x): the forward's and dq's 16-row and
    16-key tails compute 208 x 208 (whole 64-blocks: 256 x 256, 1.69x), and so do dk/dv's 16-key tail and
    16-query blocks (with 32-query blocks: 208 x 224)."""
    from tests import kernel_account

    padding = {row.kernel: row.work.mma_executed / row.work.mma_useful
               for row in _account("ViT-B 224 b128") if row.kernel in kernel_account.MODELS}
    assert padding["_attention_fwd_kernel"] == padding["_attention_bwd_dq_kernel"] == pytest.approx(208 ** 2 / 197 ** 2)
    assert padding["_attention_bwd_dkdv_dbias_kernel"] == pytest.approx(208 ** 2 / 197 ** 2)
    assert max(padding.values()) <= 1.25


@pytest.mark.parametrize("recipe", ["ViT-B 224 b128", "Swin-L 192 w12 b64", "Swin V2-B 192 w12 b128"])
def test_attention_backward_is_pipelined_at_two_ctas_per_sm(recipe):
    """Issue 23: the dk/dv/dBias kernel (the backward's most register-hungry) at 2 resident CTAs per SM and
    pipelined (2 stages), with no spill, in every headline recipe that runs it (Swin-B's 36-token windows
    go to the window kernel), with and without the shift mask. Its
    32-query, 8-warp tiles held 1 CTA/SM at ViT-B (236 registers, 1 stage: 2 stages spilled) and with a
    shift mask (228 registers, 2 stages)."""
    rows = [row for row in _account(recipe) if row.kernel == "_attention_bwd_dkdv_dbias_kernel"]
    assert rows
    for row in rows:
        described = (f"{row.shape} {row.additive}: {row.num_warps} warps, {row.num_stages} stages, "
                     f"{row.registers} registers, {row.spill_bytes} B spilled, {row.ctas_per_sm} CTAs/SM")
        assert row.ctas_per_sm >= 2 and row.num_stages >= 2 and row.spill_bytes == 0, described


def test_swin_b_windows_at_the_tensor_core_floor():
    """Swin-B 192 w6 b128's 36-token windows (issue 23): a 32-row head and a 16-row tail block of rows and
    keys, 48 x 48 logits (the 16-row tensor-core floor, (48/36)^2 = 1.78x; one 64-block was 3.16x), with
    no spill, and at least 2 waves on 132 SMs."""
    rows = [row for row in _account("Swin-B 192 w6 b128") if row.kernel.startswith("_window")]
    assert {row.kernel for row in rows} == {"_window_attention_fwd_kernel", "_window_attention_bwd_kernel"}
    for row in rows:
        described = f"{row.kernel} {row.shape} {row.additive}"
        assert row.work.mma_executed / row.work.mma_useful == pytest.approx((48 / 36) ** 2), described
        assert row.spill_bytes == 0 and row.waves >= 2, described


def test_tuned_choices_of_every_kernel_round_trip_through_the_table(tmp_path, monkeypatch):
    """What an autotuner records after timing, under its key (sizes, flags, dtypes), is written to the
    tuning table's file and read back by a later process: on a GPU the first training step records one
    choice per kernel and key. tests.host_overhead drives every op through Triton's own autotuner (its
    cache holding the default, as after timing); a Triton dtype among the key arguments (the patch
    embedding's DOT_DTYPE) made json.dumps raise, which would have ended the first tuned step."""
    from simmim_fast import tuning_table
    from tests import host_overhead

    monkeypatch.setenv(tuning_table.TUNE_DIR_VAR, str(tmp_path))
    tuning_table.forget()
    try:
        host_overhead.measure(rounds=1, calls_per_round=1)
        recorded = tuning_table.export(torch.device("cpu"))
        tuning_table.forget()
        assert tuning_table.export(torch.device("cpu")) == recorded  # read back from the file
    finally:
        tuning_table.forget()
    kernels = {signature[1].rsplit(".", 1)[-1] for signature in recorded if signature[0] == tuning_table.KERNEL_CONFIG}
    tuned = {tuner.base_fn.__name__ for tuner in _autotuners().values() if len(tuner.configs) > 1}
    assert "_masked_patch_embed_fwd_kernel" in kernels and kernels <= tuned, (kernels, tuned)
