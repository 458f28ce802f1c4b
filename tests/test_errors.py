"""Bad input is a ValueError naming what was expected, at the model and at each op."""
import copy

import numpy as np
import pytest
import torch

import simmim_fast as sf
from simmim_fast import ops


@pytest.fixture(scope="module")
def vit():
    return sf.build_simmim("vit-tiny")


@pytest.fixture(scope="module")
def swin():
    return sf.build_simmim("swin-tiny")


def good_inputs(model, batch=2):
    grid = 64 // model.patch_size
    return torch.randn(batch, 3, 64, 64), torch.randint(0, 2, (batch, grid, grid))


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_model_rejects_bad_inputs(which, vit, swin):
    model = vit if which == "vit" else swin
    x, mask = good_inputs(model)
    grid = mask.shape[-1]
    with pytest.raises(ValueError, match=r"image size \(32, 32\) does not match the model's img_size \(64, 64\)"):
        model(torch.randn(2, 3, 32, 32), mask)
    with pytest.raises(ValueError, match="must have 3 channels"):
        model(torch.randn(2, 1, 64, 64), mask)
    with pytest.raises(ValueError, match="floating"):
        model(x.to(torch.uint8), mask)
    with pytest.raises(ValueError, match=rf"mask must have shape \(2, {grid}, {grid}\)"):
        model(x, mask[:, :-1])
    with pytest.raises(ValueError, match=rf"mask must have shape \(2, {grid}, {grid}\)"):
        model(x, mask[:1])  # batch mismatch
    with pytest.raises(ValueError, match="only 0 and 1"):
        model(x, mask * 2)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(x[0], mask)
    assert torch.isfinite(model(x, mask.bool()))  # bool and float 0/1 masks are fine
    assert torch.isfinite(model(x, mask.float()))


@pytest.mark.parametrize("which", ["vit", "swin", "convnext"])
def test_model_rejects_inputs_it_cannot_run_on(which, vit, swin):
    """A batch of 0, a dtype other than the weights' outside autocast, a tensor on another device (meta
    included): a ValueError naming it, where torch raised a conv RuntimeError or ran on garbage."""
    model = {"vit": vit, "swin": swin}.get(which) or sf.build_simmim("convnext-tiny")
    x, mask = good_inputs(model)
    with pytest.raises(ValueError, match=r"at least one image, got a batch of 0 \(0, 3, 64, 64\)"):
        model(x[:0], mask[:0])
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        with pytest.raises(ValueError, match=f"image is {dtype} but the model's weights are torch.float32"):
            model(x.to(dtype), mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the ops cast the image themselves
        assert torch.isfinite(model(x.to(torch.bfloat16), mask))
    with pytest.raises(ValueError, match="image is on meta but the model is on cpu"):
        model(x.to("meta"), mask)
    with pytest.raises(ValueError, match="mask is on meta but the model is on cpu"):
        model(x, mask.to("meta"))
    with pytest.raises(ValueError, match="image is on cpu but the model is on meta"):
        copy.deepcopy(model).to("meta")(x, mask)


def test_classifier_rejects_a_batch_of_0_and_another_dtype():
    from simmim_fast.config import get_config
    from simmim_fast.downstream.models import build_classifier

    model = build_classifier(get_config("vit-tiny"), num_classes=3)
    with pytest.raises(ValueError, match="a batch of 0"):
        model(torch.randn(0, 3, 64, 64))
    with pytest.raises(ValueError, match="image is torch.float64 but the model's weights are torch.float32"):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))


def test_mask_generator_rejects_sizes_it_cannot_draw():
    for arguments, message in [((0, 32, 4), "input_size must be an integer >= 1, got 0"),
                               ((192, 0, 4), "mask_patch_size must be an integer >= 1, got 0"),
                               ((192, 32, 0), "model_patch_size must be an integer >= 1, got 0"),
                               ((192, -32, 4), "mask_patch_size must be an integer >= 1, got -32"),
                               ((192.0, 32, 4), "input_size must be an integer >= 1, got 192.0"),
                               ((192, 32, 4, "0.6"), r"mask_ratio \(DATA.MASK_RATIO\) must be in \(0, 1\], got 0.6"),
                               ((192, 32, 4, float("nan")), "must be in .0, 1., got nan")]:
        with pytest.raises(ValueError, match=message):
            sf.MaskGenerator(*arguments)
    generator = sf.MaskGenerator(64, 16, 8, 0.6)
    for batch in (-1, 0, 2.0):
        with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1, got {batch}"):
            generator.generate(batch)
    assert generator.generate(np.int64(2)).shape == (2, 8, 8)


def test_tune_refuses_inputs_it_cannot_time(vit):
    x, mask = good_inputs(vit)
    for images, masks, options, message in [
        (x.to("meta"), mask, {}, "cannot time images on the meta device"),
        (x, mask.to("meta"), {}, "cannot time mask on the meta device"),
        (x.tolist(), mask, {}, "needs images as a tensor, got list"),
        (x, mask, {"repeats": 0}, "repeats must be an integer >= 1, got 0"),
        (x, mask, {"warmup": -1}, "warmup must be an integer >= 0, got -1"),
    ]:
        with pytest.raises(ValueError, match=message):
            sf.tune(vit, images, masks, **options)
    with pytest.raises(ValueError, match="images is on cpu but the model is on meta"):
        sf.tune(copy.deepcopy(vit).to("meta"), x, mask)


def test_ops_reject_bad_inputs():
    image, mask = torch.randn(2, 3, 16, 16), torch.ones(2, 2, 2)
    with pytest.raises(ValueError, match="reconstruction must have shape"):
        ops.masked_l1_loss(torch.randn(2, 3, 8, 8), image, mask, 8, 3)
    with pytest.raises(ValueError, match="decoder output before PixelShuffle"):
        ops.masked_l1_loss(torch.randn(2, 3, 4, 4), image, mask, 8, 3, shuffle_stride=4)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 2, 2\)"):
        ops.masked_l1_loss(image, image, torch.ones(2, 4, 4), 8, 3)
    q = torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError, match=r"bias must have shape \(3, 5, 5\)"):
        ops.attention(q, q, q, torch.zeros(3, 5, 4))
    with pytest.raises(ValueError, match="share a dtype"):
        ops.attention(q, q.double(), q.double())
    with pytest.raises(ValueError, match="window_mask must be"):
        ops.window_attention(q, q, q, torch.zeros(3, 5, 5), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="not a multiple of the mask's window count"):
        ops.window_attention(q, q, q, torch.zeros(3, 5, 5), torch.zeros(3, 5, 5))
    tokens, token = torch.randn(2, 4, 6), torch.randn(1, 1, 6)
    with pytest.raises(ValueError, match=r"mask_token must have shape \(1, 1, 6\)"):
        ops.mask_token_blend(tokens, torch.ones(2, 2, 2), torch.randn(1, 1, 5))
    with pytest.raises(ValueError, match="cover L=4 tokens"):
        ops.mask_token_blend(tokens, torch.ones(2, 3, 3), token)
    weight = torch.randn(6, 3, 8, 8)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        ops.masked_patch_embed(torch.randn(2, 3, 12, 16), mask, weight, None, token)
    with pytest.raises(ValueError, match="patch positions only"):
        ops.masked_patch_embed(image, mask, weight, None, token, torch.zeros(1, 5, 6))
    with pytest.raises(ValueError, match="decoder.0, a 1x1 conv"):
        ops.masked_decoder_loss(torch.randn(2, 4, 1, 1), mask, torch.randn(768, 5, 1, 1), None, image, 16, 8, 3)


# ---- configs, checkpoints and constructors: the library's side of issue #13 ------------------------------

def test_set_values_are_typed_by_the_defaults():
    from simmim_fast.train.configs import build_config

    for assignment, expected in [("DATA.BATCH_SIZE=abc", "expected int (like the default 32), got str 'abc'"),
                                 ("TRAIN.BASE_LR=fast", "expected float (like the default 0.016), got str 'fast'"),
                                 ("DATA.IMG_SIZE=64.0", "expected int (like the default 64), got float 64.0"),
                                 ("DATA.PIN_MEMORY=1", "expected bool"),
                                 ("MODEL.VIT.DEPTH=true", "expected int (like the default 4), got bool True"),
                                 ("MODEL.SWIN.DEPTHS=[2, 'a']", r"'MODEL.SWIN.DEPTHS\[1\]': expected int")]:
        with pytest.raises(ValueError, match="type mismatch for config key .*" + expected.replace("(", r"\(")
                           .replace(")", r"\)")):
            build_config("vit-tiny", None, [assignment])
    config = build_config("vit-tiny", None, ["TRAIN.BASE_LR=1", "MODEL.SWIN.DEPTHS=(2, 2)",
                                             "MODEL.VIT.INIT_VALUES=null", "MODEL.SWIN.QK_SCALE=0.5"])
    assert config.TRAIN.BASE_LR == 1.0 and isinstance(config.TRAIN.BASE_LR, float)  # an int widens to float
    assert config.MODEL.SWIN.DEPTHS == [2, 2] and config.MODEL.VIT.INIT_VALUES is None
    assert config.MODEL.SWIN.QK_SCALE == 0.5  # a None default takes any type, as in yacs


def test_partial_nested_config_merges_onto_the_defaults():
    """The original YAMLs are partial overrides; build_simmim takes them (and complete original configs)."""
    from types import SimpleNamespace

    from simmim_fast.config import DEFAULTS, merge

    partial = {"MODEL": {"TYPE": "vit", "VIT": {"DEPTH": 1, "EMBED_DIM": 48, "NUM_HEADS": 2, "PATCH_SIZE": 8}},
               "DATA": {"IMG_SIZE": 64}}
    model = sf.build_simmim(partial)
    assert model.encoder.patch_size == 8 and len(model.encoder.blocks) == 1
    assert model.encoder.blocks[0].mlp.fc1.out_features == 4 * 48  # MLP_RATIO from the defaults
    complete = merge(DEFAULTS, partial).to_dict()
    complete.update(BASE=[""], AUG={"MIXUP": 0.8}, TEST={"CROP": True})  # the original's fine-tuning sections
    as_attributes = SimpleNamespace(**{key: SimpleNamespace(**value) if isinstance(value, dict) else value
                                       for key, value in complete.items()})
    assert sf.build_simmim(as_attributes).state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match=r"unknown config key 'MODEL.VIT.PATCH_SIZ'; valid keys here: .*PATCH_SIZE"):
        sf.build_simmim({"MODEL": {"TYPE": "vit", "VIT": {"PATCH_SIZ": 8}}})
    with pytest.raises(ValueError, match=r"unknown config key 'MODLE'"):
        sf.build_simmim({"MODLE": {"TYPE": "vit"}})


def test_swin_image_size_the_window_does_not_divide_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"stage token grids 12x12, 6x6, 3x3, 1x1; stage 1 \(12x12\) does not split "
                                         r"into 7x7 windows: use e.g. an img_size that is a multiple of 224"):
        sf.SwinTransformerForSimMIM(img_size=48, patch_size=4, num_classes=0, window_size=7)
    with pytest.raises(ValueError, match=r"stage 2 \(9x9\) does not split into 2x2 windows"):
        sf.SwinTransformerForSimMIM(img_size=72, patch_size=4, num_classes=0, embed_dim=8, window_size=2,
                                    num_heads=[1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"img_size \(66, 66\) must be a multiple of patch_size \(4, 4\)"):
        sf.SwinTransformerForSimMIM(img_size=66, patch_size=4, num_classes=0)
    with pytest.raises(ValueError, match="does not split into 7x7 windows"):
        sf.build_simmim({"MODEL": {"SWIN": {"PATCH_SIZE": 2, "WINDOW_SIZE": 7}}, "DATA": {"IMG_SIZE": 64}})
    with pytest.raises(ValueError, match=r"stage 3 \(3x3\) cannot halve into the next stage"):
        sf.SwinTransformerForSimMIM(img_size=48, patch_size=4, num_classes=0, window_size=6)
    # A stage no larger than the window is one window (here 24, 12, 6, then 3 tokens in a 3x3 window).
    assert sf.SwinTransformerForSimMIM(img_size=96, patch_size=4, num_classes=0, embed_dim=8, window_size=6,
                                       num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1])


class OriginalTrainerConfig:
    """Stands in for the yacs CfgNode the original trainer pickles into its checkpoints."""

    TAG = "simmim_pretrain"


def test_load_pretrained_reads_the_original_trainers_checkpoints_when_trusted(tmp_path):
    model = sf.build_simmim("vit-tiny")
    path = tmp_path / "ckpt_epoch_99.pth"
    torch.save({"model": model.state_dict(), "config": OriginalTrainerConfig(), "epoch": 99}, path)
    target = sf.build_simmim("vit-tiny")
    with pytest.raises(ValueError, match=r"OriginalTrainerConfig.*trust_checkpoint=True"):
        sf.load_pretrained(target, path)
    sf.load_pretrained(target, path, trust_checkpoint=True)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), model.state_dict().values()))
    (tmp_path / "torn.pth").write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match="torn.pth is not a readable checkpoint"):
        sf.load_pretrained(target, tmp_path / "torn.pth")
