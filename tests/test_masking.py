import numpy as np
import pytest
import torch

from simmim_fast import MaskGenerator


@pytest.mark.parametrize("args,shape,count", [
    ((192, 32, 4, 0.6), (48, 48), 22),   # Swin-192: 6x6 coarse cells, ceil(36*0.6)=22
    ((224, 32, 16, 0.6), (14, 14), 30),  # ViT-224: 7x7 coarse cells, ceil(49*0.6)=30
    ((64, 16, 8, 0.5), (8, 8), 8),
])
def test_original_and_batched_masks_have_exact_counts(args, shape, count):
    gen = MaskGenerator(*args)
    scale = gen.scale
    assert gen.mask_count == count and gen.mask_shape == shape
    np.random.seed(0)
    mask = gen()
    assert mask.shape == shape and mask.dtype.kind == "i"
    assert mask.sum() == count * scale * scale
    batch = gen.generate(16, generator=torch.Generator().manual_seed(0))
    assert batch.shape == (16, *shape)
    assert (batch.flatten(1).sum(1) == count * scale * scale).all()  # exact count per sample
    # each coarse cell is constant: the mask is a repeated coarse grid
    coarse = batch[:, ::scale, ::scale]
    assert torch.equal(coarse.repeat_interleave(scale, 1).repeat_interleave(scale, 2), batch)


def test_batched_masks_are_deterministic_and_differ_per_sample():
    gen = MaskGenerator(192, 32, 4, 0.6)
    a = gen.generate(8, generator=torch.Generator().manual_seed(7))
    b = gen.generate(8, generator=torch.Generator().manual_seed(7))
    c = gen.generate(8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(m.flatten().tolist()) for m in a}) > 1


def test_ratio_extremes_and_bad_arguments():
    assert MaskGenerator(64, 16, 8, 1.0).generate(2).float().mean() == 1
    assert MaskGenerator(64, 16, 8, 0.01).generate(2).sum() == 2 * 4  # at least one 2x2 cell per sample
    with pytest.raises(ValueError, match=r"mask_ratio \(DATA.MASK_RATIO\) must be in \(0, 1\].*loss of exactly 0"):
        MaskGenerator(64, 16, 8, 0.0)  # no masked patch: SimMIM's loss would be 0 and nothing would train
    with pytest.raises(ValueError, match="multiple of mask_patch_size"):
        MaskGenerator(100, 32, 4)
    with pytest.raises(ValueError, match="multiple of model_patch_size"):
        MaskGenerator(192, 32, 5)
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskGenerator(192, 32, 4, 1.5)
