import os

import pytest
import torch


def kernel_device() -> torch.device:
    """Where the Triton kernel tests run: natively on CUDA when there is a GPU, else on the CPU under
    TRITON_INTERPRET=1 (an interpreter run on a GPU machine stays on the CPU, as the interpreter wants)."""
    native = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    return torch.device("cuda" if native else "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on the `device` fixture's device: natively "
                                       "on CUDA, or on the CPU under TRITON_INTERPRET=1 (the CI lane)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "training: the training configuration (bf16 autocast); benchmarks/gpu_check.sh "
                                       "runs these first. Added to every gpu/interpreter test with a bfloat16 parameter")
    config.addinivalue_line("markers", "compile: compiles the Triton kernels for sm_90/sm_80 without a GPU, and "
                                       "torch.compile's Inductor on the CPU (lane compile)")
    config.addinivalue_line("markers", "csrc: the CUDA C++ extension (lane csrc; skipped where it is not built)")
    config.addinivalue_line("markers", "xla: torch_xla on its CPU device (lane xla; skipped without torch_xla)")
    config.addinivalue_line("markers", "slow: longer CPU tests (CLI runs, multi-process)")
    config.addinivalue_line("markers", "downstream: against the real timm/transformers (lane downstream)")
    # The Triton interpreter's own numpy deprecation noise (tens of thousands per lane), not ours.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:triton.*")


def _runs_in_bfloat16(item) -> bool:
    params = getattr(item, "callspec", None)
    return params is not None and any(value is torch.bfloat16 for value in params.params.values())


def pytest_collection_modifyitems(config, items):
    triton_runnable = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    skip_interp = pytest.mark.skip(reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "interpreter" in item.keywords and not triton_runnable:
            item.add_marker(skip_interp)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if ("gpu" in item.keywords or "interpreter" in item.keywords) and _runs_in_bfloat16(item):
            item.add_marker(pytest.mark.training)


_SUMMARY_LINES = []


@pytest.fixture
def summary_line():
    """``summary_line(text)``: printed at the end of the run, captured output or not (the compile
    lane's compile counts per recipe)."""
    return _SUMMARY_LINES.append


def pytest_terminal_summary(terminalreporter):
    if _SUMMARY_LINES:
        terminalreporter.section("measured by the tests")
        for line in _SUMMARY_LINES:
            terminalreporter.write_line(line)


@pytest.fixture
def device() -> torch.device:
    return kernel_device()


@pytest.fixture(autouse=True)
def _kernel_tests_on_their_device(request):
    """An `interpreter` test's tensor factories (torch.randn(...) with no device) create on the kernel
    device, so the same test runs natively on a GPU. There its fp32 checks (~1e-5 against the fp32
    reference) need exact fp32 products on both sides: no TF32 in torch's matmuls and convolutions,
    which the kernels follow."""
    target = kernel_device()
    if "interpreter" not in request.keywords or target.type == "cpu":
        yield
        return
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.device(target):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
