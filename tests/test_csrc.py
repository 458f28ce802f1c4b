"""The CUDA C++ extension (csrc/) as far as a machine without a GPU can check it.

The lane `bash tests/run.sh csrc` builds the extension against a CUDA build of torch and sets
SIMMIM_FAST_EXPECT_CSRC=1, so that a broken build fails here instead of skipping; elsewhere (CPU
torch, extension not built) the extension tests are skipped. Covered: every op is registered with
its schema and a CUDA kernel; the fake kernels and autograd give the right shapes and dtypes on meta
tensors (also under torch.compile); dispatch reports the backend available but for CUDA tensors
only. Everywhere: the wrappers' output dtype rule equals the reference's, and csrc/build.py's arch
and source handling. The numerics on a GPU are in tests/test_gpu_csrc.py.
"""
import importlib.util
import os
import pathlib
import shutil
import subprocess

import pytest
import torch

from simmim_fast import cuda_ops, dispatch, reference
from simmim_fast.backends import registry

LOAD_ERROR = cuda_ops.load_error()
EXPECTED = os.environ.get("SIMMIM_FAST_EXPECT_CSRC") == "1"

pytestmark = pytest.mark.csrc
needs_extension = pytest.mark.skipif(bool(LOAD_ERROR) and not EXPECTED,
                                     reason=f"CUDA extension unavailable: {LOAD_ERROR}")
BUILD_SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "build.py"

SCHEMAS = {
    "masked_l1_loss": "simmim_fast::masked_l1_loss(Tensor reconstruction, Tensor target, Tensor mask, "
                      "int patch_size, int in_chans, int shuffle_stride) -> (Tensor, Tensor)",
    "masked_l1_loss_backward": "simmim_fast::masked_l1_loss_backward(Tensor grad_loss, Tensor denominator, "
                               "Tensor reconstruction, Tensor target, Tensor mask, int patch_size, int in_chans, "
                               "int shuffle_stride) -> Tensor",
    "mask_token_blend": "simmim_fast::mask_token_blend(Tensor tokens, Tensor mask, Tensor mask_token) -> Tensor",
    "mask_token_blend_backward": "simmim_fast::mask_token_blend_backward(Tensor grad_out, Tensor mask, "
                                 "Tensor mask_token) -> (Tensor, Tensor)",
}
DIFFERENTIABLE_OPS = ("masked_l1_loss", "mask_token_blend")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@needs_extension
def test_extension_loads():
    assert LOAD_ERROR == ""


@needs_extension
def test_every_op_has_its_schema_and_kernels():
    assert set(SCHEMAS) == set(cuda_ops.OPS)
    for op, schema in SCHEMAS.items():
        overload = getattr(torch.ops.simmim_fast, op).default
        assert str(overload._schema) == schema
        for key in ("CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"simmim_fast::{op}", key), f"{op}: no {key} kernel"
    for op in DIFFERENTIABLE_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"simmim_fast::{op}", "Autograd"), op


def loss_inputs(dtype, stride, mask_dtype=torch.int64, batch=2, channels=3, size=32, patch=4):
    recon_shape = (batch, channels * stride * stride, size // stride, size // stride)
    recon = torch.empty(recon_shape, device="meta", dtype=dtype, requires_grad=True)
    target = torch.empty(batch, channels, size, size, device="meta", dtype=dtype)
    mask = torch.empty(batch, size // patch, size // patch, device="meta", dtype=mask_dtype)
    return recon, target, mask


@needs_extension
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("stride", [1, 8])
def test_masked_l1_loss_fake_kernels_and_autograd(dtype, stride):
    recon, target, mask = loss_inputs(dtype, stride)
    loss, denominator = torch.ops.simmim_fast.masked_l1_loss(recon, target, mask, 4, 3, stride)
    assert (loss.shape, loss.dtype, denominator.shape, denominator.dtype) == ((), torch.float32, (), torch.float32)

    target.requires_grad_(True)
    loss = cuda_ops.masked_l1_loss(recon, target, mask, 4, 3, stride)
    assert loss.shape == () and loss.dtype == torch.float32
    grad_recon, grad_target = torch.autograd.grad(loss, (recon, target))
    assert (grad_recon.shape, grad_recon.dtype) == (recon.shape, dtype)
    assert (grad_target.shape, grad_target.dtype) == (target.shape, dtype)


@needs_extension
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_mask_token_blend_fake_kernels_and_autograd(dtype):
    tokens = torch.empty(2, 49, 96, device="meta", dtype=dtype, requires_grad=True)
    mask_token = torch.empty(1, 1, 96, device="meta", dtype=dtype, requires_grad=True)
    mask = torch.empty(2, 7, 7, device="meta", dtype=torch.bool)
    out = cuda_ops.mask_token_blend(tokens, mask, mask_token)
    assert (out.shape, out.dtype) == (tokens.shape, dtype)
    grad_tokens, grad_mask_token = torch.autograd.grad(out.sum(), (tokens, mask_token))
    assert (grad_tokens.shape, grad_tokens.dtype) == (tokens.shape, dtype)
    assert (grad_mask_token.shape, grad_mask_token.dtype) == (mask_token.shape, dtype)


@needs_extension
def test_ops_trace_under_torch_compile_without_graph_breaks():
    """fullgraph=True fails on any graph break in the wrappers; aot_eager runs the fakes and the
    registered autograd through AOTAutograd."""
    def step(recon, target, mask, tokens, token_mask, mask_token):
        blended = cuda_ops.mask_token_blend(tokens, token_mask, mask_token)
        return cuda_ops.masked_l1_loss(recon, target, mask, 4, 3, 8) + blended.float().mean()

    recon, target, mask = loss_inputs(torch.bfloat16, 8)
    tokens = torch.empty(2, 64, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
    mask_token = torch.empty(1, 1, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
    token_mask = torch.empty(2, 64, device="meta", dtype=torch.int64)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(recon, target, mask, tokens, token_mask, mask_token)
    assert loss.shape == () and loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (recon, tokens, mask_token))
    assert [g.shape for g in grads] == [recon.shape, tokens.shape, mask_token.shape]


@pytest.mark.parametrize("pixels", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int64, torch.float32, torch.bfloat16])
def test_loss_dtype_is_the_references(pixels, mask_dtype):
    recon = torch.rand(1, 3, 8, 8).to(pixels)
    target = torch.rand(1, 3, 8, 8).to(pixels)
    mask = torch.randint(0, 2, (1, 2, 2)).to(mask_dtype)
    expected = reference.masked_l1_loss(recon, target, mask, 4, 3).dtype
    assert cuda_ops.loss_dtype(recon, target, mask) == expected


@needs_extension
def test_dispatch_reports_available_but_for_cuda_tensors_only():
    backend = registry()["cuda"]
    assert backend.unavailable_reasons() == []
    tokens, mask, mask_token = torch.randn(2, 4, 8), torch.ones(2, 4), torch.zeros(1, 1, 8)
    args = {"tokens": tokens, "mask": mask, "mask_token": mask_token}
    reasons = dict(dispatch.explain("mask_token_blend", args))["cuda"]
    assert len(reasons) == 1 and "CUDA tensors only" in reasons[0]
    assert dispatch.select("mask_token_blend", args).name == "reference"
    with dispatch.use_backend("cuda"), pytest.raises(dispatch.BackendError, match="CUDA tensors only"):
        dispatch.select("mask_token_blend", args)
    double = {"tokens": tokens.double(), "mask": mask, "mask_token": mask_token.double()}
    assert any("float32/float16/bfloat16" in reason for reason in backend.not_supported_reasons(
        "mask_token_blend", double))
    assert "does not implement" in backend.reasons("attention", {})[0]


def load_build_module():
    spec = importlib.util.spec_from_file_location("csrc_build", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_description(monkeypatch):
    build = load_build_module()
    assert build.cuda_archs("8.0;9.0") == build.cuda_archs("80,90") == ["80", "90"]
    assert build.cuda_archs("9.0a") == ["90a"]
    with pytest.raises(ValueError, match="SIMMIM_FAST_CUDA_ARCHS"):
        build.cuda_archs("sm_90")
    assert build.gencode_flags(["80", "90a"]) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90a,code=compute_90a"]
    monkeypatch.delenv(build.ARCHS_ENV_VAR, raising=False)
    assert build.cuda_archs() == ["80", "90"]  # the default covers A100 and H100
    assert all(pathlib.Path(path).is_file() for path in build.source_paths())
    assert build.source_paths(relative_to=BUILD_SCRIPT.parent.parent)[0] == "csrc/simmim_ops.cpp"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler (g++)")
def test_fast_divmod_equals_integer_division(tmp_path):
    """The loss kernel's 32-bit index math divides by multiply-high and shift (csrc/fast_divmod.cuh): built for
    the host, its quotients and remainders equal `/` and `%` over ~4 M pairs, edges and powers of two included."""
    binary = tmp_path / "fast_divmod_check"
    source = pathlib.Path(__file__).resolve().parent / "csrc_fast_divmod_check.cpp"
    subprocess.run(["g++", "-O2", "-std=c++17", "-I", str(BUILD_SCRIPT.parent), str(source), "-o", str(binary)],
                   check=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
