"""Pretraining pieces without a training run: schedule, weight-decay groups, config loading, data,
sampling order, checkpoint safety."""
import errno
import math
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import simmim_fast
from simmim_fast import checkpoint as checkpoint_module
from simmim_fast.checkpoint import load_checkpoint, save_atomic
from simmim_fast.config import checked_value, set_key
from simmim_fast.masking import MaskGenerator
from simmim_fast.train import checkpoints
from simmim_fast.train.configs import build_config, parse_assignment, read_yaml_config
from simmim_fast.train.data import (EpochSampler, FastCrop, ImageFiles, PretrainDataset, SimMIMTransform, find_images,
                                    crop_and_flip, random_resized_crop_box)
from simmim_fast.train.optim import LRSchedule, build_optimizer, build_schedule, param_groups, scaled_lrs
from simmim_fast.train.scenes import render_scene


# ---- learning rate ---------------------------------------------------------------------------------

def test_lr_scaling_by_global_batch_and_accumulation():
    config = simmim_fast.get_config("swin-base-192-w6")  # BASE 2e-4, WARMUP 1e-6, MIN 1e-5
    lrs = scaled_lrs(config, global_batch=2048, accumulation_steps=2)
    assert lrs == pytest.approx({"base": 2e-4 * 4 * 2, "warmup": 1e-6 * 4 * 2, "min": 1e-5 * 4 * 2})


def test_cosine_schedule_warmup_then_cosine_to_min():
    schedule = LRSchedule("cosine", base_lr=1.0, warmup_lr=0.1, min_lr=0.01, total_steps=100, warmup_steps=10)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(5) == pytest.approx(0.1 + 5 * 0.9 / 10)
    # after warmup: timm's cosine over all 100 steps (warmup included), as the original's t_in_epochs=False
    assert schedule(10) == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * 10 / 100)))
    assert schedule(50) == pytest.approx(0.01 + 0.5 * 0.99)
    assert schedule(100) == pytest.approx(0.01)
    values = [schedule(t) for t in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_multistep_schedule_from_epochs():
    config = simmim_fast.get_config("vit-base-224")  # multistep, GAMMA 0.1, MULTISTEPS [700], 10 warmup epochs
    schedule = build_schedule(config, {"base": 1e-3, "warmup": 1e-6, "min": 1e-5}, total_steps=800 * 5,
                              steps_per_epoch=5)
    assert schedule.warmup_steps == 50 and list(schedule.milestones) == [3500]
    assert schedule(0) == pytest.approx(1e-6)
    assert schedule(49) < 1e-3 < schedule(50) * 1.0001
    assert schedule(3499) == pytest.approx(1e-3)
    assert schedule(3500) == pytest.approx(1e-4)
    assert schedule(3999) == pytest.approx(1e-4)


def test_schedule_applied_to_optimizer():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(param_groups(model), lr=1.0)
    schedule = LRSchedule("cosine", base_lr=1.0, warmup_lr=0.0, min_lr=0.0, total_steps=4, warmup_steps=2)
    assert schedule.apply(optimizer, 1) == pytest.approx(0.5)
    assert [group["lr"] for group in optimizer.param_groups] == [0.5, 0.5]


def test_lr_scaling_takes_accumulation_steps_0_and_1_as_none():
    config = simmim_fast.get_config("swin-base-192-w6")  # the original's default ACCUMULATION_STEPS is 0
    for steps in (0, 1):
        assert scaled_lrs(config, global_batch=512, accumulation_steps=steps)["base"] == pytest.approx(2e-4)


def test_cosine_schedule_edges():
    # One step in all: the last rate is MIN_LR; past the end (a resumed run with more steps) it stays there.
    one = LRSchedule("cosine", base_lr=1.0, warmup_lr=0.1, min_lr=0.01, total_steps=1, warmup_steps=0)
    assert (one(0), one(1)) == (pytest.approx(1.0), pytest.approx(0.01))
    assert LRSchedule("cosine", 1.0, 0.1, 0.01, total_steps=0, warmup_steps=0)(0) == pytest.approx(1.0)  # no 0/0
    schedule = LRSchedule("cosine", base_lr=1.0, warmup_lr=0.1, min_lr=0.01, total_steps=100, warmup_steps=10)
    assert schedule(150) == pytest.approx(0.01)


def test_linear_schedule_warmup_then_down_to_1_percent():
    schedule = LRSchedule("linear", base_lr=2.0, warmup_lr=0.1, min_lr=0.5, total_steps=110, warmup_steps=10)
    assert schedule(0) == pytest.approx(0.1) and schedule(5) == pytest.approx(0.1 + 5 * 1.9 / 10)
    # the original's LinearLRScheduler: from the base rate at the end of warmup to 1% of it (MIN_LR unused)
    assert schedule(10) == pytest.approx(2.0)
    assert schedule(60) == pytest.approx(2.0 - 0.99 * 2.0 * 0.5)
    assert schedule(110) == pytest.approx(0.02) and schedule(200) == pytest.approx(0.02)
    # --steps no longer than the warmup: no division by zero; one step after it is the end
    assert LRSchedule("linear", 2.0, 0.1, 0.5, total_steps=10, warmup_steps=10)(10) == pytest.approx(2.0)
    assert LRSchedule("linear", 2.0, 0.1, 0.5, total_steps=11, warmup_steps=10)(11) == pytest.approx(0.02)


def test_step_schedule_decays_every_decay_steps_warmup_included():
    schedule = LRSchedule("step", base_lr=1.0, warmup_lr=0.1, min_lr=0.0, total_steps=100, warmup_steps=10,
                          decay_steps=30, decay_rate=0.5)
    assert schedule(10) == pytest.approx(1.0) and schedule(29) == pytest.approx(1.0)
    assert schedule(30) == pytest.approx(0.5) and schedule(65) == pytest.approx(0.25)
    # DECAY_EPOCHS shorter than one step after --steps shrank the epoch: decay every step
    for decay_steps in (0, 1):
        every = LRSchedule("step", 1.0, 0.1, 0.0, total_steps=10, warmup_steps=0, decay_steps=decay_steps,
                           decay_rate=0.5)
        assert every(3) == pytest.approx(0.125)


def test_multistep_schedule_compounds_gamma():
    schedule = LRSchedule("multistep", base_lr=1.0, warmup_lr=0.0, min_lr=0.0, total_steps=100, warmup_steps=0,
                          milestones=(20, 40), gamma=0.5)
    assert [schedule(t) for t in (19, 20, 39, 40, 99)] == pytest.approx([1.0, 0.5, 0.5, 0.25, 0.25])


def test_schedule_defaults_are_the_configs_and_its_state_round_trips():
    defaults = simmim_fast.get_config("vit-tiny").TRAIN.LR_SCHEDULER
    schedule = LRSchedule("multistep", 1.0, 0.0, 0.0, total_steps=100, warmup_steps=0, milestones=(20, 40))
    assert (schedule.decay_rate, schedule.gamma) == (defaults.DECAY_RATE, defaults.GAMMA)
    # saved in checkpoints and compared on resume: plain values, milestones a list
    state = schedule.state_dict()
    assert state == {"name": "multistep", "base_lr": 1.0, "warmup_lr": 0.0, "min_lr": 0.0, "total_steps": 100,
                     "warmup_steps": 0, "decay_steps": 0, "decay_rate": 0.1, "milestones": [20, 40], "gamma": 0.1}
    assert LRSchedule(**state) == LRSchedule("multistep", 1.0, 0.0, 0.0, 100, 0, milestones=[20, 40])


def test_schedule_applied_with_layer_decay_scales():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW([{"params": [model.weight], "lr_scale": 0.25}, {"params": [model.bias]}], lr=1.0)
    schedule = LRSchedule("cosine", base_lr=1.0, warmup_lr=0.0, min_lr=0.0, total_steps=4, warmup_steps=2)
    schedule.apply(optimizer, 1)
    assert [group["lr"] for group in optimizer.param_groups] == [0.125, 0.5]


# ---- weight decay ----------------------------------------------------------------------------------

class Decayable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.table = torch.nn.Parameter(torch.zeros(3, 4))
        self.token = torch.nn.Parameter(torch.zeros(1, 1, 4))
        self.bias_table_2d = torch.nn.Parameter(torch.zeros(2, 2))
        self.gamma = torch.nn.Parameter(torch.ones(4))

    def no_weight_decay(self):
        return {"token"}

    def no_weight_decay_keywords(self):
        return {"bias_table"}


def group_names(model):
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model)
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}


def test_weight_decay_rules():
    decayed, skipped = group_names(Decayable())
    assert decayed == {"proj.weight", "table"}
    # 1-D, ".bias", a no_weight_decay() name, a name containing a no_weight_decay_keywords() word
    assert skipped == {"proj.bias", "gamma", "token", "bias_table_2d"}


@pytest.mark.parametrize("preset", ["vit-tiny", "swin-tiny"])
def test_weight_decay_groups_of_the_models_match_the_original(preset):
    model = simmim_fast.build_simmim(preset)
    decayed, skipped = group_names(model)
    assert decayed | skipped == {name for name, _ in model.named_parameters()} and not decayed & skipped
    assert all(model.get_parameter(name).ndim > 1 and not name.endswith(".bias") for name in decayed)
    assert "decoder.0.weight" in decayed and "decoder.0.bias" in skipped
    # The original's outcomes, quirks included: SimMIM prefixes the encoder's keywords with "encoder.",
    # so they never match nested names and relative position tables are decayed; only Swin lists
    # mask_token in no_weight_decay().
    assert all(name in decayed for name in model.state_dict() if name.endswith("relative_position_bias_table"))
    if preset == "vit-tiny":
        assert {"encoder.cls_token", "encoder.blocks.0.gamma_1"} <= skipped
        assert {"encoder.mask_token", "encoder.blocks.0.attn.qkv.weight"} <= decayed
    else:
        assert "encoder.mask_token" in skipped
        assert "encoder.layers.0.blocks.0.attn.qkv.weight" in decayed


def test_adamw_settings_of_the_original():
    config = simmim_fast.get_config("vit-tiny")
    optimizer = build_optimizer(simmim_fast.build_simmim(config), config, lr=1e-3)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0]


def test_optimizer_choices_of_the_original(monkeypatch):
    config = simmim_fast.get_config("vit-tiny")
    model = torch.nn.Linear(2, 2)
    assert build_optimizer(model, config, lr=1e-3).defaults["fused"] is None
    assert build_optimizer(model, config, lr=1e-3, device_type="cuda").defaults["fused"] is True
    groups = [{"params": [model.weight], "lr_scale": 0.5}, {"params": [model.bias], "weight_decay": 0.0}]
    assert build_optimizer(model, config, lr=1e-3, groups=groups).param_groups[0]["lr_scale"] == 0.5
    sgd = build_optimizer(model, set_key(config, "TRAIN.OPTIMIZER.NAME", "SGD"), lr=1e-3)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] is True
    assert (sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.9, 0.05)
    with pytest.raises(ValueError, match="TRAIN.OPTIMIZER.NAME must be 'adamw' or 'sgd', got 'lamb'"):
        build_optimizer(model, set_key(config, "TRAIN.OPTIMIZER.NAME", "lamb"), lr=1e-3)
    # apex's FusedAdam (not installed here): AdamW-style decay with the config's settings
    made = {}
    fake = type(sys)("apex.optimizers")
    fake.FusedAdam = lambda groups, **settings: made.update(settings) or "fused adam"
    monkeypatch.setitem(sys.modules, "apex", type(sys)("apex"))
    monkeypatch.setitem(sys.modules, "apex.optimizers", fake)
    assert build_optimizer(model, config, lr=1e-3, kind="apex-fused-adam") == "fused adam"
    assert made == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05, "adam_w_mode": True}


def test_apex_optimizer_asked_for_but_missing_is_a_clear_error():
    config = simmim_fast.get_config("vit-tiny")
    try:
        from apex.optimizers import FusedAdam  # noqa: F401
        pytest.skip("apex is installed here")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="apex.optimizers.FusedAdam"):
        build_optimizer(torch.nn.Linear(2, 2), config, lr=1e-3, kind="apex-fused-adam")


# ---- config ----------------------------------------------------------------------------------------

ORIGINAL_VIT_YAML = """\
MODEL:
  TYPE: vit
  NAME: simmim_pretrain
  DROP_PATH_RATE: 0.1
  VIT:
    EMBED_DIM: 768
    DEPTH: 12
    NUM_HEADS: 12
    USE_APE: False
    USE_RPB: False
    USE_SHARED_RPB: True
    USE_MEAN_POOLING: False
DATA:
  IMG_SIZE: 224
  MASK_PATCH_SIZE: 32
  MASK_RATIO: 0.6
TRAIN:
  EPOCHS: 800
  WARMUP_EPOCHS: 10
  BASE_LR: 1e-4
  WARMUP_LR: 5e-7
  WEIGHT_DECAY: 0.05
  LR_SCHEDULER:
    NAME: 'multistep'
    GAMMA: 0.1
    MULTISTEPS: [700,]
PRINT_FREQ: 100
SAVE_FREQ: 5
TAG: simmim_pretrain__vit_base__img224__800ep
"""


def test_original_yaml_loads_like_the_preset(tmp_path):
    path = tmp_path / "simmim_pretrain__vit_base__img224__800ep.yaml"
    path.write_text(ORIGINAL_VIT_YAML)
    config = build_config(None, str(path))
    assert config.TRAIN.BASE_LR == 1e-4 and isinstance(config.TRAIN.WARMUP_LR, float)  # '1e-4' is a str to PyYAML
    assert config == simmim_fast.get_config("vit-base-224")


def test_yaml_base_files_come_first(tmp_path):
    (tmp_path / "base.yaml").write_text("DATA:\n  IMG_SIZE: 192\nTRAIN:\n  EPOCHS: 7\n")
    (tmp_path / "child.yaml").write_text("BASE: ['base.yaml']\nTRAIN:\n  EPOCHS: 9\n")
    tree = read_yaml_config(tmp_path / "child.yaml")
    assert tree == {"DATA": {"IMG_SIZE": 192}, "TRAIN": {"EPOCHS": 9}}


def test_set_overrides_and_flag_order():
    assert parse_assignment("TRAIN.BASE_LR=1e-4") == ("TRAIN.BASE_LR", 1e-4)
    assert parse_assignment("MODEL.SWIN.DEPTHS=[2, 2, 6, 2]") == ("MODEL.SWIN.DEPTHS", [2, 2, 6, 2])
    config = build_config("vit-tiny", None, ["DATA.BATCH_SIZE=8", "TRAIN.EPOCHS=3"], {"TRAIN.EPOCHS": 5,
                                                                                      "SEED": None})
    assert config.DATA.BATCH_SIZE == 8 and config.TRAIN.EPOCHS == 5 and config.SEED == 0


@pytest.mark.parametrize("default, value, expected", [
    (None, 0.5, 0.5), (0.1, None, None),  # QK_SCALE=0.5 over its None default; INIT_VALUES=None turns it off
    (1e-4, 2, 2.0), (True, False, False), (8, 16, 16), ("cosine", "linear", "linear"),
    ([2, 2], (2, 6, 2), [2, 6, 2]), ((0.9, 0.999), [0.8, 0.99], (0.8, 0.99)), ([], ["a"], ["a"]),
    ([0.5], [1, 2], [1.0, 2.0]),  # a one-element default types every element; ints widen inside lists too
])
def test_config_value_types_accepted(default, value, expected):
    result = checked_value(default, value, "KEY")
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize("default, value", [
    (1e-4, True), (1, True), (True, 1), (True, 1.0), (8, 8.0), (8, "8"), ("cosine", 1), ([2, 2], [2, "a"]),
    ([2, 2], 2), (2, [2]),
])
def test_config_value_types_refused(default, value):
    with pytest.raises(ValueError, match=r"type mismatch for config key 'KEY(\[1\])?': expected"):
        checked_value(default, value, "KEY")


def test_bad_config_key_lists_valid_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'TRAIN.BASE_LRR'.*BASE_LR.*WARMUP_LR"):
        build_config("vit-tiny", None, ["TRAIN.BASE_LRR=1"])
    path = tmp_path / "bad.yaml"
    path.write_text("DATA:\n  IMG_SIZ: 64\n")
    with pytest.raises(ValueError, match=r"'DATA.IMG_SIZ'.*IMG_SIZE"):
        build_config(None, str(path))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_assignment("TRAIN.BASE_LR")
    with pytest.raises(ValueError, match="--preset"):
        build_config(None, None)


# ---- data ------------------------------------------------------------------------------------------

def write_images(folder: Path, count: int, size: int = 80) -> None:
    """ImageFolder-style class folders of small scene PNGs/JPEGs."""
    for index in range(count):
        target = folder / f"class_{index % 3}" / f"img_{index}.{'png' if index % 2 else 'jpg'}"
        target.parent.mkdir(parents=True, exist_ok=True)
        render_scene(index, size).save(target)


def test_random_resized_crop_box_stays_in_range():
    generator = torch.Generator().manual_seed(0)
    for width, height in [(96, 96), (300, 120), (50, 200)]:
        for _ in range(50):
            left, top, crop_w, crop_h = random_resized_crop_box(width, height, generator)
            assert 0 <= left and left + crop_w <= width and 0 <= top and top + crop_h <= height
            area = crop_w * crop_h / (width * height)
            assert area <= 1.0 + 1e-9


def test_pretraining_crop_area_stays_in_the_original_scale_range():
    """The original's RandomResizedCrop(scale=(0.67, 1)): the crop keeps 67% to 100% of the pixels and
    reaches both ends; fine-tuning's (0.08, 1) would give areas down to 8%. Areas up to 0.75 are never
    rejected (0.75 x 4/3 <= 1), so at least their uniform share 0.08/0.33 of the draws lands there."""
    generator = torch.Generator().manual_seed(0)
    areas = torch.tensor([crop_w * crop_h / 200 ** 2 for (_, _, crop_w, crop_h), _ in
                          (crop_and_flip(200, 200, generator) for _ in range(2000))])
    assert areas.min() >= 0.67 * 0.99  # rounding the sides to whole pixels moves the area by < 1% at 200 px
    assert areas.min() < 0.675 and areas.max() > 0.99
    assert ((areas >= 0.67 * 0.99) & (areas < 0.75)).float().mean() > 0.08 / 0.33 - 0.03


def test_crop_box_follows_its_draws_in_order():
    """Each try draws the area fraction, then the log aspect ratio, uniformly from the low end of the
    range up (torchvision's uniform_(scale[0], scale[1])); an accepted box then draws left and top,
    each uniform over 0..slack. Replaying the draws pins that mapping: a swapped range has the same
    distribution but other crops from the same seed (the prepared store's crops match the original
    files' only draw for draw)."""
    width, height, checked = 240, 200, 0
    log_low, log_high = math.log(3 / 4), math.log(4 / 3)
    for seed in range(300):
        replay = torch.Generator().manual_seed(seed)
        u_area, u_ratio, u_left, u_top = (float(torch.rand((), generator=replay, dtype=torch.float64))
                                          for _ in range(4))
        fraction, aspect = 0.67 + 0.33 * u_area, math.exp(log_low + (log_high - log_low) * u_ratio)
        area = width * height * fraction
        if math.sqrt(area * aspect) > width - 1 or math.sqrt(area / aspect) > height - 1:
            continue  # the first try may be rejected: only boxes that fit with room to spare are replayed
        left, top, crop_w, crop_h = random_resized_crop_box(width, height, torch.Generator().manual_seed(seed))
        assert crop_w * crop_h / (width * height) == pytest.approx(fraction, rel=0.015)  # whole-pixel sides
        assert crop_w / crop_h == pytest.approx(aspect, rel=0.015)
        for offset, slack, draw in ((left, width - crop_w, u_left), (top, height - crop_h, u_top)):
            assert offset == min(int(draw * (slack + 1)), slack)
        checked += 1
    assert checked > 100


def test_crop_offsets_cover_every_position_evenly():
    """Left and top are uniform over 0..slack, both ends included (torchvision's randint(0, slack + 1))."""
    generator = torch.Generator().manual_seed(0)
    # scale 0.5 and ratio 2 (1/2) on a 100 x 100 image: a box of the image's full width (height), taken
    # at the first try (torchvision's crop_w <= width), so top (left) is the only freedom
    for ratio, free in ((2.0, 1), (0.5, 0)):
        offsets = torch.tensor([random_resized_crop_box(100, 100, generator, scale=(0.5, 0.5),
                                                        ratio=(ratio, ratio))[free] for _ in range(4000)])
        counts = torch.bincount(offsets, minlength=51).float() / len(offsets)
        assert offsets.min() == 0 and offsets.max() == 50 and len(counts) == 51
        assert counts.max() < 2.2 / 51 and counts.min() > 0.3 / 51  # even, no end doubled or left out


def test_crop_falls_back_to_the_centre_clamped_to_the_ratio_range():
    """After 10 rejected tries (20 draws, no more): the centre, the whole image if its ratio is in
    range, else the widest (tallest) box of the extreme ratio; never an empty box when the area rounds
    to no pixel, but a one-pixel box is a box."""
    generator, replay = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    random_resized_crop_box(50, 50, generator, scale=(2.0, 3.0))
    for _ in range(20):
        torch.rand((), generator=replay, dtype=torch.float64)
    next_draw = torch.rand((), generator=generator, dtype=torch.float64)
    assert next_draw == torch.rand((), generator=replay, dtype=torch.float64)
    assert random_resized_crop_box(10, 10, generator, scale=(0.01, 0.01), ratio=(1.0, 1.0))[2:] == (1, 1)
    assert random_resized_crop_box(1001, 9, generator) == (494, 0, 12, 9)  # 9 x 4/3, centred
    assert random_resized_crop_box(9, 1001, generator) == (0, 494, 9, 12)  # 9 / (3/4)
    assert random_resized_crop_box(101, 99, generator, scale=(2.0, 3.0)) == (0, 0, 101, 99)  # never fits
    # one side rounds to 0 px (1 px of area, ratio 1/16 or 16): refused, the clamped centre box instead
    assert random_resized_crop_box(10, 10, generator, scale=(0.01, 0.01), ratio=(1 / 16, 1 / 16)) == (4, 0, 1, 10)
    assert random_resized_crop_box(10, 10, generator, scale=(0.01, 0.01), ratio=(16.0, 16.0)) == (0, 4, 10, 1)


def test_crop_flips_half_of_the_samples():
    generator = torch.Generator().manual_seed(0)
    flips = [crop_and_flip(64, 64, generator)[1] for _ in range(2000)]
    assert 0.45 < sum(flips) / len(flips) < 0.55


def test_transform_shapes_normalisation_and_mask():
    image = render_scene(3)
    mask_generator = MaskGenerator(224, 32, 16, 0.6)  # ViT-224: 14 x 14 tokens
    transform = SimMIMTransform(224, mask_generator)
    sample = transform(image, torch.Generator().manual_seed(1))
    tensor, mask = sample["image"], sample["mask"]
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    assert tensor.min() < -0.5 and tensor.max() > 0.5  # normalised, not [0, 1]
    assert mask.shape == (14, 14) and int(mask.sum()) == math.ceil(49 * 0.6) * 4
    swin_mask = SimMIMTransform(192, MaskGenerator(192, 32, 4, 0.6))(image, torch.Generator())["mask"]
    assert swin_mask.shape == (48, 48)


def test_samples_are_a_function_of_seed_epoch_and_index(tmp_path):
    write_images(tmp_path, 4)
    dataset = PretrainDataset(ImageFiles(find_images(tmp_path)), FastCrop(64), seed=5)
    first, again, other_epoch = dataset[(0, 2)], dataset[(0, 2)], dataset[(1, 2)]
    assert torch.equal(first["image"], again["image"])
    assert not torch.equal(first["image"], other_epoch["image"])


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    write_images(tmp_path, 6)
    (tmp_path / "class_0" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "class_1" / "empty.png").write_bytes(b"")
    files = find_images(tmp_path)
    dataset = PretrainDataset(ImageFiles(files), FastCrop(64), seed=0)
    bad = {index for index, path in enumerate(files) if path.name in ("truncated.jpg", "empty.png")}
    seen = set()
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        for index in range(len(dataset)):
            sample = dataset[(0, index)]
            assert sample["image"].shape == (3, 64, 64)
            seen.update(i for i in sample["unreadable"].tolist() if i >= 0)
    assert seen == bad


def test_only_unreadable_files_is_a_clear_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"junk")
    dataset = PretrainDataset(ImageFiles(find_images(tmp_path)), FastCrop(64), seed=0)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="unreadable images in a row"):
        dataset[(0, 0)]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no image files"):
        find_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        find_images(tmp_path / "missing")


def test_two_ranks_cover_the_one_process_batches():
    """With 2 processes at half the batch, each global batch holds the same samples as 1 process's."""
    dataset = list(range(37))
    single = list(EpochSampler(dataset, world_size=1, rank=0, seed=3))
    ranks = [list(EpochSampler(dataset, world_size=2, rank=r, seed=3)) for r in range(2)]
    for step in range(len(ranks[0]) // 4):
        global_batch = sorted(single[8 * step: 8 * step + 8])
        assert sorted(ranks[0][4 * step: 4 * step + 4] + ranks[1][4 * step: 4 * step + 4]) == global_batch


def test_sampler_resumes_mid_epoch():
    sampler = EpochSampler(list(range(20)), world_size=1, rank=0, seed=0)
    sampler.set_position(2)
    full = list(sampler)
    sampler.set_position(2, skip=8)
    assert list(sampler) == full[8:] and len(sampler) == 12 and full[0][0] == 2


# ---- checkpoints -----------------------------------------------------------------------------------

def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_step_0000001.pth"
    save_atomic({"model": {"w": torch.ones(3)}, "epoch": 1}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_checkpoint_bytes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    """Without the fsync a power cut after os.replace can leave an empty file under the final name
    (the rename reaches the disk before the data): the temp file's complete bytes go to disk first."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", str(source), os.stat(source).st_size))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = save_atomic({"model": {"w": torch.ones(100)}}, tmp_path / "ckpt.pth")
    monkeypatch.undo()
    assert [kind for kind, _, _ in events] == ["fsync", "replace"], events
    (_, synced, synced_size), (_, renamed, renamed_size) = events
    assert synced == renamed and synced_size == renamed_size == path.stat().st_size  # the whole file, flushed


def test_save_atomic_flushes_before_the_fsync_whatever_torch_save_does(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(torch, "save", lambda obj, file: file.write(b"x" * 100))  # a writer that leaves a buffer
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_size))
    save_atomic({}, tmp_path / "ckpt.pth")
    assert synced == [100]


def test_save_atomic_makes_missing_folders(tmp_path):
    path = save_atomic({"w": torch.ones(2)}, tmp_path / "run" / "nested" / "ckpt.pth")
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))
    save_atomic({"w": torch.zeros(2)}, path)  # the folder exists now: overwritten, no error
    assert torch.equal(load_checkpoint(path)["w"], torch.zeros(2))


def test_save_atomic_errors_and_their_cleanup(tmp_path, monkeypatch):
    refused = OSError(errno.EXDEV, "cross-device link")

    def fail(*args):
        raise refused

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError) as raised:
        save_atomic({"w": torch.ones(2)}, tmp_path / "ckpt.pth")
    assert raised.value is refused and not list(tmp_path.iterdir())  # the temp file removed
    monkeypatch.setattr(os, "open", fail)  # no temp file was made: nothing to remove, the error unchanged
    with pytest.raises(OSError) as raised:
        save_atomic({"w": torch.ones(2)}, tmp_path / "ckpt.pth")
    assert raised.value is refused
    monkeypatch.undo()
    # torch's zip writer on a full disk raises a RuntimeError with the ENOSPC only in its chain: that OSError,
    # naming the file, is raised instead. A RuntimeError without an OSError behind it stays itself.
    def zip_writer_fails(obj, file):
        raise RuntimeError("[enforce fail at inline_container.cc:672]") from cause

    monkeypatch.setattr(torch, "save", zip_writer_fails)
    cause = OSError(errno.ENOSPC, "full")
    with pytest.raises(OSError, match=r"No space left on device \(writing .*ckpt.pth\)") as raised:
        save_atomic({"w": torch.ones(2)}, tmp_path / "ckpt.pth")
    assert raised.value.errno == errno.ENOSPC
    cause = None
    with pytest.raises(RuntimeError, match="enforce fail"):
        save_atomic({"w": torch.ones(2)}, tmp_path / "ckpt.pth")
    assert not list(tmp_path.iterdir())


def test_save_finds_the_os_error_anywhere_in_the_chain():
    full = OSError(errno.ENOSPC, "full")
    for link in ("__cause__", "__context__"):
        outer, middle = RuntimeError("zip writer"), RuntimeError("inner")
        setattr(outer, link, middle)
        middle.__context__ = full
        assert checkpoint_module._cause_in_chain(outer) is full
    looped_a, looped_b = RuntimeError("a"), RuntimeError("b")
    looped_a.__context__, looped_b.__context__ = looped_b, looped_a  # a cycle ends the search
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the search loops forever on a cycle"))
    signal.setitimer(signal.ITIMER_REAL, 5)  # a failure, not a hang
    try:
        assert checkpoint_module._cause_in_chain(looped_a) is None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    no_errno = RuntimeError("outer")
    no_errno.__context__ = OSError("no errno")
    assert checkpoint_module._cause_in_chain(no_errno) is None


def test_load_checkpoint_refuses_pickled_objects_unless_trusted(tmp_path):
    path = tmp_path / "original.pth"
    torch.save({"model": {"w": torch.ones(2)}, "config": Path("yacs")}, path)  # an object besides tensors
    for read in (load_checkpoint, checkpoint_module.read_checkpoint_file):
        with pytest.raises(checkpoint_module.CheckpointReadError, match=r"pickled Python objects.*trust_checkpoint"):
            read(path)
    assert checkpoint_module.read_checkpoint_file(path, trust=True)["config"] == Path("yacs")
    path.write_bytes(b"\x80\x02garbage")
    for trust in (False, True):
        with pytest.raises(checkpoint_module.CheckpointReadError, match=r"not a readable checkpoint \(not a torch"):
            load_checkpoint(path, trust_checkpoint=trust)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        checkpoint_module.read_checkpoint_file(tmp_path / "missing.pth")


def test_load_checkpoint_names_the_first_line_of_the_reason(tmp_path, monkeypatch):
    for raised, reason in [(RuntimeError("zip archive broken\nmore detail"), "zip archive broken"),
                           (EOFError(), "EOFError")]:
        monkeypatch.setattr(torch, "load", lambda *args, **kwargs: (_ for _ in ()).throw(raised))
        (tmp_path / "torn.pth").write_bytes(b"PK\x03\x04 torn")
        with pytest.raises(checkpoint_module.CheckpointReadError) as error:
            load_checkpoint(tmp_path / "torn.pth")
        assert str(error.value) == f"{tmp_path / 'torn.pth'} is not a readable checkpoint (cut short or corrupt: {reason})"


def test_load_pretrained_is_strict_and_refuses_objects_by_default(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="Missing key"):
        simmim_fast.load_pretrained(model, {"weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="holds a dict of dict, int, not model weights"):
        simmim_fast.load_pretrained(model, {"epoch": 3, "optimizer": {}})  # a checkpoint without its model
    path = tmp_path / "original.pth"
    torch.save({"model": model.state_dict(), "config": Path("yacs")}, path)
    with pytest.raises(checkpoint_module.CheckpointReadError):
        simmim_fast.load_pretrained(model, path)
    assert not simmim_fast.load_pretrained(model, path, trust_checkpoint=True).missing_keys


def test_keep_last_counts_good_checkpoints_and_resume_never_picks_a_bad_one(tmp_path, capsys):
    state = {"format": checkpoints.CHECKPOINT_FORMAT, **{key: 0 for key in checkpoints.RESUMABLE_KEYS[
        checkpoints.CHECKPOINT_FORMAT]}}
    for step in (5, 10, 15, 20):
        save_atomic({**state, "step": step}, checkpoints.checkpoint_path(tmp_path, step))
    for step in (25, 30, 35):  # written after the run went bad: newer, but never preferred
        save_atomic({**state, "step": step}, checkpoints.bad_checkpoint_path(tmp_path, step))
    checkpoints.keep_last(tmp_path, 2)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["ckpt_step_0000015.pth", "ckpt_step_0000020.pth"]
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path, bad=True)] == [
        "bad_ckpt_step_0000030.pth", "bad_ckpt_step_0000035.pth"]
    path, resumed = checkpoints.read_resume_checkpoint("auto", tmp_path)
    assert path.name == "ckpt_step_0000020.pth" and resumed["step"] == 20
    assert checkpoints.read_resume_checkpoint("auto", tmp_path / "fresh") == (None, None)
    with pytest.raises(FileNotFoundError):
        checkpoints.read_resume_checkpoint(str(tmp_path / "nope.pth"), tmp_path)
    for good in checkpoints.list_checkpoints(tmp_path):  # only bad ones left: say so, never continue them silently
        good.unlink()
    with pytest.raises(ValueError, match="no readable good checkpoint, only 2 written after the run went bad"):
        checkpoints.read_resume_checkpoint("auto", tmp_path)


def test_all_finite_sees_one_bad_value_in_any_floating_tensor_of_a_state():
    model = {"w": torch.randn(64, 64), "steps": torch.tensor(3)}
    optimizer = {"state": {0: {"exp_avg": torch.randn(64, 64), "step": torch.tensor(2.0)}}, "param_groups": [{"lr": 1}]}
    assert checkpoints.all_finite(model, optimizer)
    for bad in (float("nan"), float("inf"), -float("inf")):
        optimizer["state"][0]["exp_avg"][17, 5] = bad
        assert not checkpoints.all_finite(model, optimizer)
    optimizer["state"][0]["exp_avg"][17, 5] = 0.0
    model["w"] = model["w"].to(torch.bfloat16)
    model["w"][63, 63] = float("nan")
    assert not checkpoints.all_finite(model, optimizer)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    state = checkpoints.capture_rng(torch.device("cpu"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    save_atomic({"rng": state}, tmp_path / "rng.pth")
    checkpoints.restore_rng(load_checkpoint(tmp_path / "rng.pth")["rng"], torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_resume_with_an_incompatible_config_is_refused():
    saved = simmim_fast.get_config("vit-tiny").to_dict()
    checkpoint = {"format": checkpoints.CHECKPOINT_FORMAT, "config": saved}
    changed_lr = build_config("vit-tiny", None, ["TRAIN.BASE_LR=1e-3"]).to_dict()
    assert set(checkpoints.check_resumable(checkpoint, changed_lr, Path("c.pth"))) == {"TRAIN.BASE_LR"}
    other_model = build_config("vit-tiny", None, ["MODEL.VIT.DEPTH=2", "DATA.IMG_SIZE=128"]).to_dict()
    with pytest.raises(ValueError, match=r"incompatible.*DATA.IMG_SIZE: checkpoint 64, now 128.*MODEL.VIT.DEPTH"):
        checkpoints.check_resumable(checkpoint, other_model, Path("c.pth"))



def test_partial_checkpoint_writes_are_removed_even_when_one_vanishes_meanwhile(tmp_path, monkeypatch):
    """The temp files of killed checkpoint writes go; one already gone between the listing and its removal
    (another process cleaning the same folder) is no error, and the rest still go."""
    partials = [tmp_path / ".ckpt_step_0000003.pth.abc.tmp", tmp_path / ".ckpt_step_0000004.pth.def.tmp"]
    for partial in partials:
        partial.write_bytes(b"half")
    vanished = tmp_path / ".ckpt_step_0000002.pth.xyz.tmp"
    real_glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: [vanished, *real_glob(self, pattern)])
    assert checkpoints.remove_partial_writes(tmp_path) == [vanished, *partials]
    assert not any(partial.exists() for partial in partials)


def test_checkpoint_retention_tolerates_a_checkpoint_removed_meanwhile(tmp_path, monkeypatch):
    """keep_last deletes all but the newest good checkpoints; one that another process removed between the
    listing and the deletion is no error, and the others still go."""
    for step in (2, 3, 4):
        checkpoints.checkpoint_path(tmp_path, step).write_bytes(b"c")
    vanished = checkpoints.checkpoint_path(tmp_path, 1)
    real_glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: [vanished, *real_glob(self, pattern)])
    checkpoints.keep_last(tmp_path, 1)
    monkeypatch.undo()
    assert [path.name for path in checkpoints.list_checkpoints(tmp_path)] == ["ckpt_step_0000004.pth"]


def test_an_empty_checkpoint_file_is_named_as_such(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(checkpoint_module.CheckpointReadError, match=r"empty\.pth is not a readable checkpoint \(an empty file\)"):
        load_checkpoint(tmp_path / "empty.pth")


def test_checkpoint_key_differences_show_the_first_four_of_each_kind():
    text = checkpoint_module.key_differences([f"m{index}" for index in range(5)], ["u0"], [])
    assert text == "missing: m0, m1, m2, m3 ... (5); unexpected: u0 (1)"


def test_all_finite_looks_inside_nested_state():
    """Optimizer states nest tensors in dicts in lists (param_groups, state per parameter): a NaN at any
    depth is found; integer tensors (steps) and non-tensors are not checked."""
    nan, ok = torch.tensor([1.0, float("nan")]), torch.ones(2)
    assert checkpoints.all_finite({"state": {0: {"exp_avg": ok, "step": torch.tensor(3)}}}, [ok, (ok, 1.5)])
    assert not checkpoints.all_finite({"state": {0: {"exp_avg": nan}}})
    assert not checkpoints.all_finite({"groups": [{"params": [0]}, (ok, nan)]})
    assert not checkpoints.all_finite(ok, {"inf": torch.tensor(float("inf"))})


@pytest.mark.parametrize("kind,present,named", [
    (checkpoints.CHECKPOINT_FORMAT, (), "model, optimizer, lr_scheduler, scaler ..."),
    (checkpoints.CHECKPOINT_FORMAT, checkpoints._COMMON_KEYS, "unreadable, history:"),
    (checkpoints.FINETUNE_FORMAT, checkpoints._COMMON_KEYS, "classes, evaluations:"),
])
def test_an_incomplete_training_checkpoint_names_what_it_lacks_in_order(tmp_path, kind, present, named):
    save_atomic({"format": kind, **{key: 0 for key in present}}, tmp_path / "ckpt.pth")
    with pytest.raises(checkpoint_module.CheckpointReadError, match=f"ckpt.pth lacks {named}"):
        checkpoints.read_training_checkpoint(tmp_path / "ckpt.pth", kind)


def test_a_checkpoint_from_a_gpu_or_tpu_resumes_its_rng_on_the_cpu(monkeypatch):
    """A checkpoint written on CUDA or XLA carries that device's generator state too: resumed on the CPU,
    those entries are left alone (no CUDA or torch_xla call) and the host generators are restored."""
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *args: pytest.fail("CUDA's generator set on a CPU run"))
    saved = checkpoints.to_cpu(checkpoints.capture_rng(torch.device("cpu")))
    expected = torch.rand(4)
    checkpoints.restore_rng({**saved, "cuda": torch.zeros(16, dtype=torch.uint8), "xla": 5}, torch.device("cpu"))
    assert torch.equal(torch.rand(4), expected)
