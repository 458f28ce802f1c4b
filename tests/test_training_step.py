"""One training step of a whole SimMIM in the training configuration: fp32 parameters and images,
forward under autocast, backward. The triton backend against the reference backend: the loss and
every parameter gradient within twice the reference's own autocast error, both measured against the
reference in fp32 (tests/tolerances.py's rule).

On a GPU it is the published ViT-B 224, Swin-B 192 w6 and Swin V2-B 192 w12 (normalised target) models in bf16 (benchmarks/gpu_check.sh runs
these first); under the interpreter the tiny presets in fp16, since its bf16 tl.dot is wrong.
"""
import pytest
import torch

import simmim_fast as sf
from simmim_fast.config import get_config
from tests.tolerances import assert_within_torch_error

pytestmark = [pytest.mark.interpreter, pytest.mark.training]

# family -> (preset on a GPU, preset under the interpreter); batch on a GPU, under the interpreter
BATCH = (8, 2)
PRESETS = {"vit": ("vit-base-224", "vit-tiny"), "swin": ("swin-base-192-w6", "swin-tiny"),
           "swinv2": ("swinv2-base-192-w12", "swinv2-tiny")}  # Swin V2 with the normalised target (window 47, 15)


def loss_and_grads(model, images, mask, backend, autocast_dtype):
    """(loss, {name: gradient}) of one step; drop path draws the same numbers in every run."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with sf.use_backend(backend), torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32,
                                                 enabled=autocast_dtype is not None):
        loss = model(images, mask)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(PRESETS))
def test_step_within_reference_autocast_error(family, device):
    on_gpu = device.type == "cuda"
    config, batch = get_config(PRESETS[family][0 if on_gpu else 1]), BATCH[0 if on_gpu else 1]
    autocast_dtype = torch.bfloat16 if on_gpu else torch.float16
    torch.manual_seed(0)  # a fixed model: L1's sign makes the gradient error a count of sign flips
    model = sf.build_simmim(config).to(device)
    generator = torch.Generator(device).manual_seed(0)
    size = config.DATA.IMG_SIZE
    images = torch.randn(batch, 3, size, size, device=device, generator=generator)
    masks = sf.MaskGenerator(size, config.DATA.MASK_PATCH_SIZE, model.patch_size, config.DATA.MASK_RATIO)
    mask = masks.generate(batch, generator=generator)

    fast_loss, fast_grads = loss_and_grads(model, images, mask, "triton", autocast_dtype)
    torch_loss, torch_grads = loss_and_grads(model, images, mask, "reference", autocast_dtype)
    exact_loss, exact_grads = loss_and_grads(model, images, mask, "reference", None)

    assert fast_grads.keys() == torch_grads.keys() == exact_grads.keys()
    assert fast_loss.dtype == torch_loss.dtype
    assert torch.isfinite(fast_loss)
    # The floor is the compute dtype's (autocast's), whatever the dtype of the fp32 results.
    assert_within_torch_error(fast_loss, torch_loss, exact_loss, "loss", autocast_dtype)
    for name, exact in exact_grads.items():
        assert fast_grads[name].dtype == exact.dtype, name
        assert_within_torch_error(fast_grads[name], torch_grads[name], exact, f"grad of {name}", autocast_dtype)
