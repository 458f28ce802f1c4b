"""A checkpoint's CUDA RNG state restores the CUDA generator (simmim_fast/train/checkpoints.py): a resumed
run draws on the GPU what the uninterrupted run would have (dropout, drop path, GPU-side masks)."""
import pytest
import torch

from simmim_fast.train import checkpoints

pytestmark = pytest.mark.gpu


def test_cuda_rng_state_round_trips_through_a_checkpoint():
    device = torch.device("cuda")
    torch.cuda.manual_seed(0)
    saved = checkpoints.to_cpu(checkpoints.capture_rng(device))
    assert "cuda" in saved
    expected = torch.rand(8, device=device)
    torch.rand(1000, device=device)  # the generator moves on
    checkpoints.restore_rng(saved, device)
    assert torch.equal(torch.rand(8, device=device), expected)
