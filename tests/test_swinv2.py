"""Swin V2 as the successor SimMIM builds it: sizes and names, the successor's YAML unchanged, loss and
every gradient against a step-by-step transcription of its forward, windows past the kernel's limit."""
import pytest
import torch

import simmim_fast as sf
from simmim_fast import info
from simmim_fast.backends import registry
from simmim_fast.config import get_config
from simmim_fast.models.swinv2 import SwinTransformerV2ForSimMIM
from simmim_fast.train.configs import build_config
from successor_forward import successor_loss, swinv2_encoder, swinv2_parameter_count

# The successor's configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml, verbatim.
SUCCESSOR_YAML = """\
MODEL:
  TYPE: swinv2
  NAME: simmim_pretrain
  DROP_PATH_RATE: 0.1
  SIMMIM:
    NORM_TARGET:
      ENABLE: True
      PATCH_SIZE: 47
  SWINV2:
    EMBED_DIM: 128
    DEPTHS: [ 2, 2, 18, 2 ]
    NUM_HEADS: [ 4, 8, 16, 32 ]
    WINDOW_SIZE: 12
DATA:
  IMG_SIZE: 192
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
TAG: simmim_pretrain__swinv2_base__img192_window12__800ep
"""
# SwinTransformerV2ForSimMIM + SimMIM decoder of the successor for that YAML (its code, run once: the same
# number as successor_forward.swinv2_parameter_count, which counts its __init__s by hand).
SWINV2_BASE_PARAMETERS = 90_042_744


def test_successor_yaml_loads_unchanged_and_matches_the_preset(tmp_path):
    path = tmp_path / "simmim_pretrain__swinv2_base__img192_window12__800ep.yaml"
    path.write_text(SUCCESSOR_YAML)
    config = build_config(None, str(path))
    assert config.to_dict() == get_config("swinv2-base-192-w12").to_dict()
    with torch.device("meta"):  # sizes and names only: no memory, no init time
        model = sf.build_simmim(config)
    assert isinstance(model.encoder, SwinTransformerV2ForSimMIM)
    assert model.norm_target_patch_size == 47 and model.encoder_stride == 32
    params = sum(p.numel() for p in model.parameters())
    assert params == SWINV2_BASE_PARAMETERS == swinv2_parameter_count(192, 4, 128, [2, 2, 18, 2], [4, 8, 16, 32], 12)
    state = model.state_dict()
    shapes = {
        "encoder.layers.0.blocks.0.attn.logit_scale": (4, 1, 1),
        "encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight": (512, 2),
        "encoder.layers.0.blocks.0.attn.cpb_mlp.0.bias": (512,),
        "encoder.layers.0.blocks.0.attn.cpb_mlp.2.weight": (4, 512),
        "encoder.layers.0.blocks.0.attn.relative_coords_table": (1, 23, 23, 2),
        "encoder.layers.0.blocks.0.attn.relative_position_index": (144, 144),
        "encoder.layers.0.blocks.0.attn.q_bias": (128,),
        "encoder.layers.0.blocks.0.attn.v_bias": (128,),
        "encoder.layers.0.blocks.1.attn_mask": (16, 144, 144),
        "encoder.layers.0.downsample.reduction.weight": (256, 512),
        "encoder.layers.0.downsample.norm.weight": (256,),  # V2 normalises 2C after the reduction
        "encoder.layers.3.blocks.1.attn.relative_coords_table": (1, 11, 11, 2),  # 6x6 stage: window clamped
        "encoder.mask_token": (1, 1, 128),
        "decoder.0.weight": (3072, 1024, 1, 1),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert "encoder.layers.0.blocks.0.attn.qkv.bias" not in state
    assert "encoder.layers.0.blocks.0.attn.cpb_mlp.2.bias" not in state
    assert model.no_weight_decay_keywords() == {"encoder.cpb_mlp", "encoder.logit_scale",
                                                "encoder.relative_position_bias_table"}


def test_init_follows_the_successor():
    model = sf.build_simmim("swinv2-tiny")
    block = model.encoder.layers[1].blocks[1]
    for norm in (block.norm1, block.norm2):  # residual post-norm starts at zero
        assert not norm.weight.any() and not norm.bias.any()
    assert torch.equal(block.attn.logit_scale, torch.full_like(block.attn.logit_scale, torch.log(torch.tensor(10.0))))
    table = block.attn.relative_coords_table
    torch.testing.assert_close(table.abs().max(), torch.log2(torch.tensor(9.0)) / 3)  # offsets reach +-8 at the edge
    assert model.encoder.layers[0].downsample.norm.weight.shape == (64,)


VARIANTS = {
    "swinv2-tiny": {},  # norm target on (window 15), shifted windows, clamped last stage
    "raw-target-ape-no-patch-norm-no-qkv-bias": {"MODEL": {"SIMMIM": {"NORM_TARGET": {"ENABLE": False}},
                                                          "SWINV2": {"APE": True, "PATCH_NORM": False,
                                                                     "QKV_BIAS": False}}},
    "pretrained-windows": {"MODEL": {"SWINV2": {"PRETRAINED_WINDOW_SIZES": [8, 8, 6, 3]}}},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loss_and_grads_match_successor_transcription(variant):
    config = get_config("swinv2-tiny", [VARIANTS[variant]])
    torch.manual_seed(1)
    # float64: with logit scales up to 100 the softmax is sharp enough to amplify float32 rounding.
    model = sf.build_simmim(config).double()
    with torch.no_grad():  # every term non-trivial; some logit scales past the clamp at log(100)
        for name, param in model.named_parameters():
            param.normal_(0, 0.3)
            if name.endswith("logit_scale"):
                param.uniform_(1.0, 5.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64)
    mask = sf.MaskGenerator(64, 16, model.patch_size, 0.6).generate(2, generator=g)
    with sf.use_backend("reference"):
        loss = model(x, mask)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)
    expected = successor_loss(model, x, mask, swinv2_encoder)
    expected_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    for (name, _), got, want in zip(model.named_parameters(), grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9, msg=lambda m: f"{name}: {m}")
    clamped = [p for n, p in model.named_parameters() if n.endswith("logit_scale")]
    assert any((p > torch.log(torch.tensor(100.0))).any() for p in clamped)  # the clamp was exercised


def test_strict_state_dict_round_trip():
    source = sf.build_simmim("swinv2-tiny")
    target = sf.build_simmim("swinv2-tiny")
    result = sf.load_pretrained(target, source.state_dict())
    assert not result.missing_keys and not result.unexpected_keys


def test_large_windows_stay_on_the_fast_path():
    """Window 24 (576 tokens, a fine-tune size) stays on the fast path: the triton backend takes windows
    above 64 tokens on its flash kernels, and info prints where such windows go."""
    tokens = 24 * 24
    q = torch.zeros(2, 4, tokens, 32)
    args = dict(q=q, k=q, v=q, bias=torch.zeros(4, tokens, tokens), window_mask=None, scale=1.0, dropout_p=0.0)
    reasons = registry()["triton"].not_supported_reasons("window_attention", args)
    assert all("triton runs on" in reason for reason in reasons), reasons  # at most: these are CPU tensors
    text = info.report()
    assert f"window_attention, windows of 24x24 = {tokens} tokens" in text


@pytest.mark.interpreter
def test_triton_window_attention_matches_reference_on_swinv2():
    """The fused window attention on Swin V2's cosine q/k and CPB bias: loss and every gradient (logit_scale,
    cpb_mlp and q/v biases flow through the kernel's q and bias gradients). The decoder+loss stays on the
    reference (its kernel does not take the norm target yet)."""
    torch.manual_seed(1)
    model = sf.build_simmim("swinv2-tiny")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 64, 64, generator=g)  # one image: the interpreter is slow
    mask = sf.MaskGenerator(64, 16, model.patch_size, 0.6).generate(1, generator=g)
    results = []
    for backend in ("reference", "window_attention=triton,masked_patch_embed=triton"):
        with sf.use_backend(backend):
            loss = model(x, mask)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (want_loss, want_grads), (got_loss, got_grads) = results
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    for (name, _), got, want in zip(model.named_parameters(), got_grads, want_grads):
        scale = want.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")
