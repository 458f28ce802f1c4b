"""The grids the launchers of kernels/ would launch, at batch sizes no CPU could run: the launchers run
unchanged on meta tensors (shapes, no memory) and every kernel launch is recorded instead of run.

CUDA caps grid axis 0 at 2^31 - 1 programs and axes 1 and 2 at 65535; ``assert_grids_fit`` checks each
recorded launch against that, and that it was made inside ``on_device_of`` (Triton launches on the current
CUDA device, not the tensors').
"""
from __future__ import annotations

import contextlib
from typing import List, Tuple
from unittest import mock

import triton

GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)
H100_SM_COUNT = 132
# Large enough that every grid axis with tokens or token blocks on it would pass 65535 (ViT-B decoder
# token blocks from batch ~21k), yet meta tensors make it free.
LARGE_BATCH = 32768
# The published recipes' shapes: (image, patch, embed dim, encoder stride, encoder output channels, patch_norm).
RECIPES = {
    "vit_b_224": (224, 16, 768, 16, 768, False),
    "vit_b_384": (384, 16, 768, 16, 768, False),
    "swin_b_192_w6": (192, 4, 128, 32, 1024, True),
    "swin_b_224_w7": (224, 4, 128, 32, 1024, True),
    "swin_l_192_w12": (192, 4, 192, 32, 1536, True),
}


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](...)`` records (kernel name, grid) and runs nothing."""

    def __init__(self, name, kernel, launches, device_guards):
        self.name, self.kernel, self.launches, self.device_guards = name, kernel, launches, device_guards

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if callable(grid):  # meta-parameters from the call and the default config, as the launch would see
                configs = getattr(self.kernel, "configs", None) or [triton.Config({})]
                resolved = grid({**kwargs, **configs[0].kwargs})
            else:
                resolved = grid
            self.launches.append((self.name, tuple(resolved), self.device_guards[0] > 0))
        return launch


@contextlib.contextmanager
def recorded_launches(*modules, sm_count: int = H100_SM_COUNT):
    """Within it the ``*_kernel`` launches of the given kernels/ modules are recorded into the yielded list,
    and their launchers see an H100's SM count."""
    launches: List[Tuple[str, tuple, bool]] = []
    device_guards = [0]  # how many on_device_of contexts are open

    @contextlib.contextmanager
    def counted_on_device_of(tensor):
        device_guards[0] += 1
        try:
            yield
        finally:
            device_guards[0] -= 1

    with contextlib.ExitStack() as stack:
        for module in modules:
            for name, value in vars(module).items():
                if name.endswith("_kernel") and hasattr(value, "__getitem__"):
                    recorder = _Recorder(name, value, launches, device_guards)
                    stack.enter_context(mock.patch.object(module, name, recorder))
            if hasattr(module, "sm_count"):
                stack.enter_context(mock.patch.object(module, "sm_count", lambda device: sm_count))
            if hasattr(module, "on_device_of"):
                stack.enter_context(mock.patch.object(module, "on_device_of", counted_on_device_of))
        yield launches


def assert_grids_fit(launches, expected_kernels):
    """Every expected kernel was launched, each launch on its tensors' device and within CUDA's grid limits."""
    launched = {name for name, _, _ in launches}
    assert set(expected_kernels) <= launched, f"launched {sorted(launched)}; expected {sorted(expected_kernels)}"
    for name, grid, on_tensors_device in launches:
        assert on_tensors_device, f"{name} launched outside on_device_of: it would run on the current CUDA device"
        assert 1 <= len(grid) <= 3 and all(size >= 1 for size in grid), f"{name}: grid {grid}"
        too_large = [axis for axis, size in enumerate(grid) if size > GRID_LIMITS[axis]]
        assert not too_large, f"{name}: grid {grid} passes CUDA's limit on axes {too_large} ({GRID_LIMITS})"
