import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: runs Triton kernels; the CI lane sets TRITON_INTERPRET=1")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "compile: compiles the Triton kernels for sm_90/sm_80 without a GPU (lane compile)")
    config.addinivalue_line("markers", "csrc: the CUDA C++ extension (lane csrc; skipped where it is not built)")
    config.addinivalue_line("markers", "xla: torch_xla on its CPU device (lane xla; skipped without torch_xla)")
    config.addinivalue_line("markers", "slow: longer CPU tests (CLI runs, multi-process)")
    config.addinivalue_line("markers", "downstream: against the real timm/transformers (lane downstream)")
    # The Triton interpreter's own numpy deprecation noise (tens of thousands per lane), not ours.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:triton.*")


def pytest_collection_modifyitems(config, items):
    triton_runnable = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    skip_interp = pytest.mark.skip(reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "interpreter" in item.keywords and not triton_runnable:
            item.add_marker(skip_interp)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
