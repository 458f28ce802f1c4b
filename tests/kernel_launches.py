"""The grids the launchers of kernels/ would launch, at batch sizes no CPU could run: the launchers run
unchanged on meta tensors (shapes, no memory) and every kernel launch is recorded instead of run.

CUDA caps grid axis 0 at 2^31 - 1 programs and axes 1 and 2 at 65535; ``assert_grids_fit`` checks each
recorded launch against that.
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

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if callable(grid):  # meta-parameters from the call and the default config, as the launch would see
                configs = getattr(self.kernel, "configs", None) or [triton.Config({})]
                resolved = grid({**kwargs, **configs[0].kwargs})
            else:
                resolved = grid
            self.launches.append((self.name, tuple(resolved)))
        return launch


@contextlib.contextmanager
def recorded_launches(*modules, sm_count: int = H100_SM_COUNT):
    """Within it the ``*_kernel`` launches of the given kernels/ modules are recorded into the yielded list,
    and their launchers see an H100's SM count."""
    launches: List[Tuple[str, tuple]] = []
    with contextlib.ExitStack() as stack:
        for module in modules:
            for name, value in vars(module).items():
                if name.endswith("_kernel") and hasattr(value, "__getitem__"):
                    stack.enter_context(mock.patch.object(module, name, _Recorder(name, value, launches)))
            if hasattr(module, "sm_count"):
                stack.enter_context(mock.patch.object(module, "sm_count", lambda device: sm_count))
        yield launches


def assert_grids_fit(launches, expected_kernels):
    """Every expected kernel was launched, and every launch's grid fits CUDA's limits."""
    launched = {name for name, _ in launches}
    assert set(expected_kernels) <= launched, f"launched {sorted(launched)}; expected {sorted(expected_kernels)}"
    for name, grid in launches:
        assert 1 <= len(grid) <= 3 and all(size >= 1 for size in grid), f"{name}: grid {grid}"
        too_large = [axis for axis, size in enumerate(grid) if size > GRID_LIMITS[axis]]
        assert not too_large, f"{name}: grid {grid} passes CUDA's limit on axes {too_large} ({GRID_LIMITS})"
