"""A kernel config that changes the summation order is chosen once and shared (kernels/_autotune.py):
two ranks whose own timings prefer different configs compute the same bits once they take rank 0's
table, and the table's choice is what both run; with no shared choice, a frozen process takes the
default rather than timing. The control, in the same run: the two preferred configs, each rank on its
own, give different bits (else equal bits would prove nothing)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import triton
import triton.language as tl

from conftest import kernel_device
from simmim_fast import tuning, tuning_table
from simmim_fast.kernels import _autotune

pytestmark = pytest.mark.interpreter

# configs[0] (BLOCK 32) is the default; rank 0's timing prefers 64, rank 1's 16.
_CONFIGS = [triton.Config({"BLOCK": block}) for block in (32, 16, 64)]
PREFERRED = {0: 64, 1: 16}


@_autotune.autotune(_CONFIGS, key=["n"])
@triton.jit
def _blocked_sum(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """One sum whose order follows BLOCK: BLOCK running partial sums, then their tree."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


def _blocked_sum_bits(x: torch.Tensor) -> bytes:
    out = torch.empty(1, device=x.device, dtype=torch.float32)
    _blocked_sum[(1,)](x, out, x.numel())
    return out.cpu().numpy().tobytes()


def _rank(rank: int, init_file: str, tune_dir: str) -> None:
    os.environ[tuning_table.TUNE_DIR_VAR] = os.path.join(tune_dir, str(rank))  # no table shared on disk
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    device = kernel_device()
    timed = []

    def bench(*args, config, **meta):  # this rank's timing: its preferred block is the fastest
        timed.append(config.kwargs["BLOCK"])
        return 0.0 if config.kwargs["BLOCK"] == PREFERRED[rank] else 1.0

    _autotune.autotune_enabled = lambda: True  # the interpreter has no timer: this rank's timings are bench's
    _blocked_sum._bench = bench
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(device)  # the same values on both ranks
    local = _blocked_sum_bits(x)  # the control: each rank times and takes its own preference
    assert _blocked_sum.best_config.kwargs["BLOCK"] == PREFERRED[rank] and sorted(timed) == [16, 32, 64]
    own = [None, None]
    dist.all_gather_object(own, local)
    assert own[0] != own[1], "the two configs give the same bits: the test cannot tell sharing apart"

    tuning.use_rank_0_table(device)  # rank 0's table (its choice at n=4096) on both ranks, no more timing
    timed.clear()
    shared = _blocked_sum_bits(x)
    assert _blocked_sum.best_config.kwargs["BLOCK"] == PREFERRED[0] and shared == own[0] and not timed
    unseen = _blocked_sum_bits(x[:4000])  # a key rank 0 never met: the default on every rank, not timed
    assert _blocked_sum.best_config.kwargs["BLOCK"] == 32 and not timed
    results = [None, None]
    dist.all_gather_object(results, (shared, unseen))
    assert results[0] == results[1]
    dist.destroy_process_group()


def test_ranks_with_different_preferences_compute_the_same_bits(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path / "tuning")), nprocs=2)


def test_a_process_with_tuning_off_runs_the_shared_choice(tmp_path):
    """SIMMIM_FAST_AUTOTUNE=0 (read at import, so in a fresh process) times nothing, but a key the table
    names runs the table's config (rank 0's choice, 64), not the default (32): a rank started with
    tuning off computes the other ranks' bits. A key the table does not name runs the default."""
    script = textwrap.dedent("""
        import torch
        from conftest import kernel_device
        from simmim_fast import tuning_table
        from simmim_fast.kernels import _autotune
        from test_shared_kernel_config import _CONFIGS, _blocked_sum, _blocked_sum_bits

        device = kernel_device()
        x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(device)
        kernel = f"{_blocked_sum.base_fn.__module__}.{_blocked_sum.base_fn.__name__}"
        rank_0_choice = next(config for config in _CONFIGS if config.kwargs["BLOCK"] == 64)
        tuning_table.record_kernel_config(device, kernel, (4096, str(x.dtype), "torch.float32"),
                                          _autotune.config_json(rank_0_choice))
        shared = _blocked_sum_bits(x)
        assert _blocked_sum.best_config.kwargs["BLOCK"] == 64, _blocked_sum.best_config
        out = torch.empty(1, device=device)
        _blocked_sum.fn[(1,)](x, out, x.numel(), BLOCK=64)
        assert shared == out.cpu().numpy().tobytes()
        _blocked_sum_bits(x[:4000])
        assert _blocked_sum.best_config.kwargs["BLOCK"] == 32
    """)
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, SIMMIM_FAST_AUTOTUNE="0", **{tuning_table.TUNE_DIR_VAR: str(tmp_path)})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tests), str(tests.parent), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
