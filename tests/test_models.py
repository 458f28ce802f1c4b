"""The drop-in API: shapes, parameter counts, names, init, loading, and loss parity with the original."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch

import simmim_fast as sf
from simmim_fast.config import get_config
from simmim_fast.models import swin
from discriminating import assert_discriminates, discriminating_weights, swapped_q_and_k
from original_forward import simmim_loss

swin_window_partition, swin_window_reverse = swin.window_partition, swin.window_reverse

MASK_CONFIGS = {"vit-tiny": None, "swin-tiny": None}


def tiny_batch(model, config, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = config.DATA.IMG_SIZE
    gen = sf.MaskGenerator(size, config.DATA.MASK_PATCH_SIZE, model.patch_size, config.DATA.MASK_RATIO)
    return torch.randn(batch, 3, size, size, generator=g), gen.generate(batch, generator=g)


def test_vit_base_matches_published_size():
    model = sf.build_simmim("vit-base-224")
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 1e6 - 86.3) < 0.05, params
    state = model.state_dict()
    assert len(state) == 190
    for key in ["encoder.cls_token", "encoder.mask_token", "encoder.patch_embed.proj.weight",
                "encoder.blocks.0.attn.q_bias", "encoder.blocks.0.attn.v_bias", "encoder.blocks.0.gamma_1",
                "encoder.blocks.11.gamma_2", "encoder.rel_pos_bias.relative_position_bias_table",
                "encoder.rel_pos_bias.relative_position_index", "encoder.norm.weight", "decoder.0.weight",
                "decoder.0.bias"]:
        assert key in state, key
    assert "encoder.pos_embed" not in state and "encoder.blocks.0.attn.k_bias" not in state
    assert state["encoder.rel_pos_bias.relative_position_bias_table"].shape == (27 * 27 + 3, 12)
    assert state["encoder.rel_pos_bias.relative_position_index"].shape == (197, 197)
    assert model.encoder_stride == 16 and state["decoder.0.weight"].shape == (768, 768, 1, 1)


def beit_vit_parameter_count(dim, depth, heads, patch, img=224, mlp_ratio=4):
    """VisionTransformerForSimMIM (BEiT layout: q/v biases, layer scale, a shared relative position bias)
    + SimMIM decoder, counted by hand."""
    grid = img // patch
    block = 2 * dim + 3 * dim * dim + 2 * dim + dim * dim + dim + 2 * dim  # norm1, qkv, q/v bias, proj, norm2
    block += dim * mlp_ratio * dim + mlp_ratio * dim + mlp_ratio * dim * dim + dim + 2 * dim  # fc1, fc2, gammas
    shared_bias = ((2 * grid - 1) ** 2 + 3) * heads
    embed = dim * 3 * patch * patch + dim + 2 * dim  # patch_embed.proj, cls_token, mask_token
    return embed + shared_bias + depth * block + 2 * dim + dim * patch * patch * 3 + patch * patch * 3


@pytest.mark.parametrize("preset,dim,depth,heads,patch,count", [
    ("vit-large-224", 1024, 24, 16, 16, 303_924_416),  # ViT-L/16
    ("vit-huge-224", 1280, 32, 16, 14, 631_246_732),   # ViT-H/14
])
def test_vit_large_and_huge_have_published_sizes(preset, dim, depth, heads, patch, count):
    with torch.device("meta"):
        model = sf.build_simmim(preset)
    encoder = model.encoder
    assert (encoder.embed_dim, len(encoder.blocks), encoder.blocks[0].attn.num_heads, encoder.patch_size) == (
        dim, depth, heads, patch)
    assert model.encoder_stride == patch
    assert sum(p.numel() for p in model.parameters()) == count == beit_vit_parameter_count(dim, depth, heads, patch)
    config = get_config(preset)
    assert config.DATA.MASK_PATCH_SIZE % patch == 0 and config.DATA.IMG_SIZE % config.DATA.MASK_PATCH_SIZE == 0


def test_swin_base_matches_published_size():
    model = sf.build_simmim("swin-base-192-w6")
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e6, 2) == 89.87, params
    state = model.state_dict()
    for key in ["encoder.mask_token", "encoder.patch_embed.proj.weight", "encoder.patch_embed.norm.weight",
                "encoder.layers.0.blocks.1.attn_mask", "encoder.layers.0.blocks.0.attn.relative_position_index",
                "encoder.layers.0.downsample.reduction.weight", "encoder.layers.2.blocks.17.mlp.fc2.bias",
                "encoder.norm.bias", "decoder.0.weight"]:
        assert key in state, key
    assert "encoder.layers.0.blocks.0.attn_mask" not in state  # unshifted blocks have no mask buffer
    assert "encoder.layers.3.blocks.1.attn_mask" not in state  # last stage: 6x6 == window, no shift
    assert "encoder.layers.0.downsample.reduction.bias" not in state
    assert model.encoder_stride == 32


def test_swin_shift_mask_and_window_clamp():
    model = sf.build_simmim("swin-tiny")
    blocks = [blk for layer in model.encoder.layers for blk in layer.blocks]
    shifted = [blk for blk in blocks if blk.shift_size > 0]
    assert shifted, "the tiny preset must exercise shifted windows"
    for blk in shifted:
        values = set(blk.attn_mask.unique().tolist())
        assert values == {0.0, -100.0}
        assert blk.attn_mask.shape == ((blk.input_resolution[0] // blk.window_size) ** 2,
                                       blk.window_size ** 2, blk.window_size ** 2)
    last = model.encoder.layers[-1].blocks[1]
    assert last.window_size == min(last.input_resolution) and last.shift_size == 0


def test_vit_init_follows_original():
    torch.manual_seed(0)
    enc = sf.VisionTransformerForSimMIM(img_size=32, patch_size=8, num_classes=0, embed_dim=64, depth=3,
                                        num_heads=4, use_abs_pos_emb=True)
    for param in [enc.cls_token, enc.mask_token, enc.pos_embed, enc.blocks[0].attn.qkv.weight]:
        assert param.abs().max() <= 0.02 + 1e-7  # truncated at +-std, not +-2
    fc1 = torch.cat([b.mlp.fc1.weight.flatten() for b in enc.blocks])
    fc2_last = enc.blocks[2].mlp.fc2.weight
    assert fc2_last.abs().max() <= 0.02 / math.sqrt(2 * 3) + 1e-7
    # A normal cut at +-1 std has std 0.5396 * std (not 0.02, as a +-2 cut would nearly give).
    assert abs(fc1.std().item() - 0.02 * 0.5396) < 5e-4


def test_forward_shapes_and_reconstruct():
    for preset in ("vit-tiny", "swin-tiny"):
        config = get_config(preset)
        model = sf.build_simmim(config)
        x, mask = tiny_batch(model, config)
        loss = model(x, mask)
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert model.reconstruct(x, mask).shape == x.shape
        features = model.encoder(x, mask)
        assert features.shape == (3, model.encoder.num_features, 64 // model.encoder_stride, 64 // model.encoder_stride)


VARIANTS = {
    "vit-tiny": {},
    "vit-abs-pos-per-block-rpb": {"MODEL": {"VIT": {"USE_APE": True, "USE_RPB": True, "USE_SHARED_RPB": False,
                                                    "INIT_VALUES": None}}},
    "vit-mean-pool-no-qkv-bias": {"MODEL": {"VIT": {"USE_MEAN_POOLING": True, "QKV_BIAS": False}}},
    "swin-tiny": {},
    "swin-ape-no-patch-norm": {"MODEL": {"SWIN": {"APE": True, "PATCH_NORM": False}}},
}


def partition_transposed(x, window_size):
    """window_partition with each window's rows and columns exchanged (the relative bias misplaced)."""
    return swin_window_partition(x, window_size).transpose(1, 2).contiguous()


def reverse_transposed(windows, window_size, height, width):
    return swin_window_reverse(windows.transpose(1, 2).contiguous(), window_size, height, width)


def planted_wrong_losses(model, x, mask):
    """(what is wrong, its loss) for plausible wrong versions of the model: the parity test must see them."""
    swapped = copy.deepcopy(model)
    swapped.load_state_dict(swapped_q_and_k(model.state_dict()))
    yield "q/k swapped", swapped(x, mask)
    no_scale = copy.deepcopy(model)
    for module in no_scale.modules():
        if hasattr(module, "scale") and hasattr(module, "qkv"):
            module.scale = 1.0
    yield "no attention scale", no_scale(x, mask)
    if not hasattr(model.encoder, "layers"):
        return
    assert any(block.shift_size > 0 for block in model.encoder.modules() if isinstance(block, swin.SwinTransformerBlock))
    off_by_one = copy.deepcopy(model)
    for block in off_by_one.encoder.modules():
        if isinstance(block, swin.SwinTransformerBlock) and block.shift_size > 0:
            block.shift_size -= 1
    yield "shift off by one", off_by_one(x, mask)
    unmasked = copy.deepcopy(model)
    for block in unmasked.encoder.modules():
        if isinstance(block, swin.SwinTransformerBlock):
            block.attn_mask = None
    yield "no shifted-window mask", unmasked(x, mask)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(swin, "window_partition", partition_transposed)
        patch.setattr(swin, "window_reverse", reverse_transposed)
        yield "windows transposed", model(x, mask)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loss_and_grads_match_original_computation(variant):
    preset = "vit-tiny" if variant.startswith("vit") else "swin-tiny"
    config = get_config(preset, [VARIANTS[variant]])
    # Gains near 1 with spread, large attention logits, real biases: every term matters (tests/README.md).
    model = discriminating_weights(sf.build_simmim(config), seed=1)
    x, mask = tiny_batch(model, config)
    with sf.use_backend("reference"):
        loss = model(x, mask)
        for wrong, wrong_loss in planted_wrong_losses(model, x, mask):
            assert_discriminates(wrong_loss, loss.detach(), rtol=2e-6, atol=0, name=wrong)
    # allow_unused: with mean pooling the original also never uses fc_norm in pretraining.
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    expected = simmim_loss(model, x, mask)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, expected, rtol=2e-6, atol=0)
    for (name, _), got, want in zip(model.named_parameters(), grads, expected_grads):
        assert (got is None) == (want is None), name
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_state_dict_round_trip_strict(tmp_path):
    config = get_config("swin-tiny")
    source = sf.build_simmim(config)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)  # the original checkpoint layout
    target = sf.build_simmim(config)
    result = sf.load_pretrained(target, path)
    assert not result.missing_keys and not result.unexpected_keys
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    sf.load_pretrained(target, source.state_dict())  # a bare state_dict works too
    bad = dict(source.state_dict())
    bad.pop("encoder.mask_token")
    with pytest.raises(RuntimeError, match="mask_token"):
        sf.load_pretrained(target, bad)


def test_build_simmim_accepts_nested_dict_and_attribute_objects():
    nested = get_config("vit-tiny").to_dict()
    from_dict = sf.build_simmim(nested)

    def to_namespace(tree):
        return SimpleNamespace(**{k: to_namespace(v) if isinstance(v, dict) else v for k, v in tree.items()})

    from_attrs = sf.build_simmim(to_namespace(nested))
    assert from_dict.state_dict().keys() == from_attrs.state_dict().keys()
    with pytest.raises(ValueError, match="MODEL.TYPE must be one of .*'convnext'.*'swinv2'.*got 'resnet'"):
        sf.build_simmim(get_config("vit-tiny", [{"MODEL": {"TYPE": "resnet"}}]))


def test_encoder_registry_owns_the_model_types():
    from simmim_fast.models.registry import encoder_types, register_encoder

    assert set(encoder_types()) == {"vit", "swin", "swinv2", "convnext"}
    with pytest.raises(ValueError, match="'vit' already has an encoder"):
        register_encoder("vit", object)(lambda config: {})


def test_no_weight_decay_sets_are_prefixed():
    vit = sf.build_simmim("vit-tiny")
    assert vit.no_weight_decay() == {"encoder.pos_embed", "encoder.cls_token"}
    swin = sf.build_simmim("swin-tiny")
    assert swin.no_weight_decay() == {"encoder.absolute_pos_embed", "encoder.mask_token"}
    assert swin.no_weight_decay_keywords() == {"encoder.relative_position_bias_table"}


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(ValueError, match="valid keys here: .*EMBED_DIM"):
        get_config("vit-tiny", [{"MODEL": {"VIT": {"EMBED_DIMS": 3}}}])
    with pytest.raises(ValueError, match="presets"):
        get_config("vit-huge")
