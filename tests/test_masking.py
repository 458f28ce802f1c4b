import math

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


# ---- strategies (simmim_fast.masking): exact counts, seeded determinism, statistics ---------------------

from simmim_fast.config import get_config  # noqa: E402
from simmim_fast.masking import STRATEGIES, bayer_matrix  # noqa: E402


def previous_random_masks(gen, batch, seed):
    """The random strategy as it was before strategies existed (argsort of uniform noise), transcribed."""
    noise = torch.rand(batch, gen.token_count, generator=torch.Generator().manual_seed(seed))
    coarse = torch.zeros(batch, gen.token_count, dtype=torch.long)
    coarse.scatter_(1, noise.argsort(dim=1)[:, : gen.mask_count], 1)
    coarse = coarse.view(batch, gen.rand_size, gen.rand_size)
    return coarse.repeat_interleave(gen.scale, 1).repeat_interleave(gen.scale, 2)


def test_default_strategy_is_the_original_bit_for_bit():
    gen = MaskGenerator(192, 32, 4, 0.6)
    assert gen.strategy == "random"
    assert torch.equal(gen.generate(32, generator=torch.Generator().manual_seed(3)), previous_random_masks(gen, 32, 3))
    np.random.seed(5)
    expected_idx = np.random.permutation(36)[:22]
    np.random.seed(5)
    coarse = gen()[::8, ::8].flatten()
    assert sorted(np.flatnonzero(coarse)) == sorted(expected_idx)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("size,mask_patch,model_patch,ratio", [(192, 32, 4, 0.6), (224, 16, 16, 0.4), (64, 16, 2, 0.75),
                                                               (96, 32, 4, 1.0)])
def test_every_strategy_masks_exactly_and_is_seeded(strategy, size, mask_patch, model_patch, ratio):
    gen = MaskGenerator(size, mask_patch, model_patch, ratio, strategy=strategy)
    a = gen.generate(24, generator=torch.Generator().manual_seed(1))
    b = gen.generate(24, generator=torch.Generator().manual_seed(1))
    c = gen.generate(24, generator=torch.Generator().manual_seed(2))
    assert a.shape == (24, size // model_patch, size // model_patch) and a.dtype == torch.long
    cells = (size // (model_patch if strategy == "patch" else mask_patch)) ** 2
    cell_pixels = gen.scale ** 2
    assert gen.mask_count == math.ceil(cells * ratio)
    assert (a.flatten(1).sum(1) == gen.mask_count * cell_pixels).all()
    assert torch.equal(a, b)
    if 0.0 < ratio < 1.0:
        assert not torch.equal(a, c)
    coarse = a[:, ::gen.scale, ::gen.scale]
    assert torch.equal(coarse.repeat_interleave(gen.scale, 1).repeat_interleave(gen.scale, 2), a)


def neighbour_agreement(masks):
    """Fraction of masked cells whose right neighbour is masked too: ~ratio for independent cells."""
    masked = masks[:, :, :-1].bool()
    return (masked & masks[:, :, 1:].bool()).sum().item() / masked.sum().item()


def test_strategy_statistics():
    g = torch.Generator().manual_seed(0)
    random = MaskGenerator(224, 16, 16, 0.4).generate(400, generator=g)
    block = MaskGenerator(224, 16, 16, 0.4, strategy="block").generate(400, generator=g)
    # every cell equally likely under random and patch: frequency 0.4 +- 5 standard errors
    frequency = random.float().mean(0)
    assert (frequency - 0.4).abs().max() < 5 * math.sqrt(0.4 * 0.6 / 400)
    # BEiT's blocks: masked cells cluster (random's agreement is about (count - 1) / (cells - 1) = 0.4)
    assert neighbour_agreement(random) < 0.45 < 0.6 < neighbour_agreement(block)
    # grid at 0.75: MAE's grid sampling, exactly one visible cell in every aligned 2x2, at one offset per sample
    grid = MaskGenerator(192, 32, 4, 0.75, strategy="grid").generate(50, generator=g)[:, ::8, ::8]
    visible = (grid == 0).nonzero()
    assert len(visible) == 50 * 9
    parities = {(sample, row % 2, col % 2) for sample, row, col in visible.tolist()}
    assert len(parities) == 50
    # grid at 0.5: a checkerboard
    half = MaskGenerator(192, 32, 4, 0.5, strategy="grid").generate(10, generator=g)[:, ::8, ::8]
    assert (half[:, 1:, :] != half[:, :-1, :]).all() and (half[:, :, 1:] != half[:, :, :-1]).all()
    # patch: independent model patches, not repeated cells
    patch = MaskGenerator(64, 16, 8, 0.5, strategy="patch").generate(200, generator=g)
    assert patch.shape == (200, 8, 8) and 0.4 < neighbour_agreement(patch) < 0.6


def test_bayer_matrix_is_a_permutation():
    matrix = bayer_matrix(8)
    assert sorted(matrix.flatten().tolist()) == list(range(64))
    assert matrix[:2, :2].tolist() == [[0, 32], [48, 16]]


def test_ratio_schedule_over_epochs():
    gen = MaskGenerator(192, 32, 4, 0.4, mask_ratio_end=0.8, total_epochs=5)
    assert [gen.ratio_at(epoch) for epoch in (0, 2, 4, 9)] == pytest.approx([0.4, 0.6, 0.8, 0.8])
    for epoch in range(5):
        masks = gen.generate(4, generator=torch.Generator().manual_seed(0), epoch=epoch)
        assert (masks[:, ::8, ::8].flatten(1).sum(1) == math.ceil(36 * gen.ratio_at(epoch))).all()
    np.random.seed(0)
    assert gen(epoch=4)[::8, ::8].sum() == math.ceil(36 * 0.8)


def test_strategy_from_config_and_bad_arguments():
    config = get_config("vit-tiny", [{"DATA": {"MASK_STRATEGY": "block", "MASK_RATIO_END": 0.75}}])
    gen = MaskGenerator.from_config(config, 8)
    assert (gen.strategy, gen.mask_ratio, gen.mask_ratio_end, gen.total_epochs) == ("block", 0.6, 0.75, 20)
    with pytest.raises(ValueError, match="mask strategy must be one of random, patch, block, grid"):
        MaskGenerator(192, 32, 4, strategy="blocks")
    with pytest.raises(ValueError, match="mask_ratio_end"):
        MaskGenerator(192, 32, 4, mask_ratio_end=1.2)


# ---- the constructor's contract and the strategies' algorithms, draw for draw (mutation audit) ---------

def test_defaults_are_the_originals():
    """MaskGenerator() is the original's MaskGenerator(192, 32, 4, 0.6): 6x6 cells of 8x8 patches, 22 masked."""
    gen = MaskGenerator()
    assert (gen.input_size, gen.mask_patch_size, gen.model_patch_size, gen.mask_ratio) == (192, 32, 4, 0.6)
    assert (gen.strategy, gen.mask_ratio_end, gen.total_epochs) == ("random", None, 1)
    np.random.seed(0)
    assert gen().shape == (48, 48) and gen().sum() == 22 * 64


@pytest.mark.parametrize("name", ["input_size", "mask_patch_size", "model_patch_size", "total_epochs"])
@pytest.mark.parametrize("value", [0, -32])
def test_sizes_below_one_are_refused_by_name(name, value):
    arguments = dict(input_size=64, mask_patch_size=16, model_patch_size=8, total_epochs=2, mask_ratio_end=0.8)
    with pytest.raises(ValueError, match=name):
        MaskGenerator(**{**arguments, name: value})


def test_one_is_a_valid_size_and_batch():
    gen = MaskGenerator(4, 2, 1, 0.5, total_epochs=1, mask_ratio_end=0.5)
    assert gen.generate(1).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="batch_size"):
        gen.generate(0)


def test_mask_ratio_end_errors_name_its_config_key():
    with pytest.raises(ValueError, match=r"^mask_ratio_end \(DATA.MASK_RATIO_END\) must be in \(0, 1\]"):
        MaskGenerator(192, 32, 4, 0.6, mask_ratio_end=0.0)


def test_schedule_starts_at_epoch_0_and_ends_at_the_last_epoch():
    """The defaults (epoch 0) give the start ratio; two epochs reach the end ratio at epoch 1; one epoch
    stays at the start ratio (no division by zero)."""
    gen = MaskGenerator(192, 32, 4, 0.4, mask_ratio_end=0.8, total_epochs=2)
    assert gen.mask_count == math.ceil(36 * 0.4) == gen.generate(1)[0, ::8, ::8].sum()
    np.random.seed(0)
    assert gen()[::8, ::8].sum() == math.ceil(36 * 0.4)
    assert gen.ratio_at(1) == pytest.approx(0.8) and gen.ratio_at(0) == pytest.approx(0.4)
    assert MaskGenerator(192, 32, 4, 0.4, mask_ratio_end=0.8, total_epochs=1).ratio_at(0) == pytest.approx(0.4)


def test_original_call_of_other_strategies_is_one_generated_sample():
    """gen() of a torch strategy is generate(1)[0] from torch's global RNG, one sample's draws per call."""
    gen = MaskGenerator(64, 16, 8, 0.5, strategy="patch")
    torch.manual_seed(0)
    called = [gen() for _ in range(2)]
    torch.manual_seed(0)
    generated = [gen.generate(1)[0].numpy() for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(called, generated))


class TorchDraws:
    """BEiT's random.uniform and random.randint (inclusive), drawn from a torch.Generator."""

    def __init__(self, generator):
        self.generator = generator

    def uniform(self, low, high):
        return low + (high - low) * torch.rand((), generator=self.generator).item()

    def randint(self, low, high):
        return int(torch.randint(low, high + 1, (), generator=self.generator))


def beit_block_mask(side, count, draws):
    """BEiT's MaskingGenerator (min_num_patches=4, min_aspect=0.3, 10 attempts per block), transcribed
    with its own names and constants, then our top-up of a sample whose attempts stall."""
    mask = torch.zeros(side, side, dtype=torch.long)
    log_aspect_ratio = (math.log(0.3), math.log(1 / 0.3))
    mask_count = 0
    while mask_count < count:
        max_mask_patches = count - mask_count
        delta = 0
        for _attempt in range(10):
            target_area = draws.uniform(4, max_mask_patches)
            aspect_ratio = math.exp(draws.uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < side and h < side:
                top = draws.randint(0, side - h)
                left = draws.randint(0, side - w)
                num_masked = int(mask[top: top + h, left: left + w].sum())
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            free = (mask.flatten() == 0).nonzero().flatten()
            mask.view(-1)[free[torch.randperm(len(free), generator=draws.generator)[:max_mask_patches]]] = 1
            break
        mask_count += delta
    return mask


@pytest.mark.parametrize("size,mask_patch,ratio", [(224, 16, 0.4), (192, 32, 0.9)])
def test_block_strategy_is_beits_algorithm_draw_for_draw(size, mask_patch, ratio):
    """14x14 cells at 0.4 (BEiT's setting) and 6x6 at 0.9, where attempts stall and the top-up runs."""
    gen = MaskGenerator(size, mask_patch, mask_patch, ratio, strategy="block")
    masks = gen.generate(24, generator=torch.Generator().manual_seed(3))
    draws = TorchDraws(torch.Generator().manual_seed(3))
    expected = torch.stack([beit_block_mask(gen.rand_size, gen.mask_count, draws) for _ in range(24)])
    assert torch.equal(masks, expected)


@pytest.mark.parametrize("size,mask_patch,ratio", [(192, 32, 0.6), (64, 8, 0.3), (224, 16, 0.75), (64, 32, 0.5)])
def test_grid_strategy_is_the_bayer_matrix_at_a_random_offset(size, mask_patch, ratio):
    """6x6, 8x8 (a power of two: the matrix's own side), 14x14 and 2x2 cells: each sample masks the cells of
    lowest value in the Bayer matrix of the least power-of-two side holding the grid, shifted (with wrap)
    by an offset per sample and axis drawn as randint(0, side, (B, 2, 1))."""
    gen = MaskGenerator(size, mask_patch, mask_patch, ratio, strategy="grid")
    masks = gen.generate(8, generator=torch.Generator().manual_seed(5)).flatten(1)
    cells = gen.rand_size
    side = 1
    while side < cells:
        side *= 2
    bayer = bayer_matrix(side)
    offsets = torch.randint(0, side, (8, 2, 1), generator=torch.Generator().manual_seed(5))
    for mask, (row_offset, col_offset) in zip(masks, offsets[:, :, 0].tolist()):
        values = torch.tensor([[bayer[(row + row_offset) % side, (col + col_offset) % side].item()
                                for col in range(cells)] for row in range(cells)]).flatten()
        expected = torch.zeros(cells * cells, dtype=torch.long)
        expected[values.argsort()[:gen.mask_count]] = 1
        assert torch.equal(mask, expected)


def test_errors_name_the_first_bad_argument_in_signature_order():
    with pytest.raises(ValueError, match="^input_size"):
        MaskGenerator(0, 0, 4)
    with pytest.raises(ValueError, match=r"^mask_ratio \(DATA.MASK_RATIO\)"):
        MaskGenerator(192, 32, 4, 0.0, mask_ratio_end=0.0)
