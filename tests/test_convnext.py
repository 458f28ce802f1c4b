"""ConvNeXt as a SimMIM encoder: the published sizes and names, the mask token at stride 4, and loss and
every gradient against a plain transcription of ConvNeXt's forward."""
import functools

import pytest
import torch

import simmim_fast as sf
from simmim_fast.config import get_config
from simmim_fast.models.convnext import ConvNeXtForSimMIM
from successor_forward import convnext_encoder, successor_loss

# facebookresearch/ConvNeXt with its 1000-class head: ConvNeXt-T 28,589,128 and ConvNeXt-B 88,591,464
# parameters (the published 28.6M / 88.6M); the head is 768 * 1000 + 1000 and 1024 * 1000 + 1000.
PUBLISHED_BACKBONES = {"convnext-t-192": 28_589_128 - 769_000, "convnext-b-192": 88_591_464 - 1_025_000}
SIMMIM_PARAMETERS = {"convnext-t-192": 30_182_592, "convnext-b-192": 90_715_392}


@pytest.mark.parametrize("preset", list(PUBLISHED_BACKBONES))
def test_published_sizes_and_names(preset):
    with torch.device("meta"):
        model = sf.build_simmim(preset)
    encoder = model.encoder
    assert isinstance(encoder, ConvNeXtForSimMIM) and model.encoder_stride == 32 and model.patch_size == 4
    backbone = sum(p.numel() for name, p in encoder.named_parameters() if name != "mask_token")
    assert backbone == PUBLISHED_BACKBONES[preset]
    assert sum(p.numel() for p in model.parameters()) == SIMMIM_PARAMETERS[preset]
    dims = get_config(preset).MODEL.CONVNEXT.DIMS
    state = model.state_dict()
    shapes = {"encoder.downsample_layers.0.0.weight": (dims[0], 3, 4, 4), "encoder.downsample_layers.0.1.weight": (dims[0],),
              "encoder.downsample_layers.1.0.bias": (dims[0],), "encoder.downsample_layers.3.1.weight": (dims[3], dims[2], 2, 2),
              "encoder.stages.0.0.dwconv.weight": (dims[0], 1, 7, 7), "encoder.stages.2.8.gamma": (dims[2],),
              "encoder.stages.3.2.pwconv1.weight": (4 * dims[3], dims[3]), "encoder.norm.weight": (dims[3],),
              "encoder.mask_token": (1, 1, dims[0]), "decoder.0.weight": (32 * 32 * 3, dims[3], 1, 1)}
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert model.no_weight_decay() == {"encoder.mask_token"}


def test_loss_and_grads_match_transcription():
    config = get_config("convnext-tiny")
    torch.manual_seed(1)
    model = sf.build_simmim(config).double()
    with torch.no_grad():  # layer scales and norms far from their init so every term matters
        for param in model.parameters():
            param.normal_(0, 0.3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64)
    mask = sf.MaskGenerator(64, 16, model.patch_size, 0.6).generate(2, generator=g)
    assert mask.shape == (2, 16, 16)  # at the stem's stride 4
    with sf.use_backend("reference"):
        loss = model(x, mask)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)
    expected = successor_loss(model, x, mask, convnext_encoder)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    for (name, _), got, want in zip(model.named_parameters(), grads, torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_fully_masked_input_is_not_seen():
    model = sf.build_simmim("convnext-tiny").eval()
    mask = torch.ones(2, 16, 16, dtype=torch.long)
    a = model.encoder(torch.randn(2, 3, 64, 64), mask)
    b = model.encoder(torch.randn(2, 3, 64, 64), mask)
    assert a.shape == (2, 256, 2, 2)
    torch.testing.assert_close(a, b)


def test_bad_inputs_are_value_errors():
    model = sf.build_simmim("convnext-tiny")
    with pytest.raises(ValueError, match="mask must have shape"):
        model(torch.randn(2, 3, 64, 64), torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="multiple of ConvNeXt's output stride 32"):
        ConvNeXtForSimMIM(img_size=48, num_classes=0)
    with pytest.raises(ValueError, match="4 stages"):
        ConvNeXtForSimMIM(img_size=64, num_classes=0, depths=[1, 1, 1], dims=[8, 16, 32])


def test_activation_checkpointing_covers_convnext_blocks():
    from simmim_fast.train.loop import checkpoint_vit_blocks

    torch.manual_seed(0)
    plain = sf.build_simmim("convnext-tiny")
    checkpointed = sf.build_simmim("convnext-tiny")
    checkpointed.load_state_dict(plain.state_dict())
    checkpoint_vit_blocks(checkpointed)
    assert all(isinstance(block.forward, functools.partial) for stage in checkpointed.encoder.stages for block in stage)
    x = torch.randn(2, 3, 64, 64)
    mask = sf.MaskGenerator(64, 16, 4, 0.6).generate(2)
    grads = [torch.autograd.grad(model(x, mask), list(model.parameters())) for model in (plain, checkpointed)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
