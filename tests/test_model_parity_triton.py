"""Full-model parity: the tiny presets trained 20 AdamW steps on the triton backend (the interpreter on
CPU) give the same losses, step by step, as on the reference backend; the first step's loss and every
gradient agree tightly.

Later steps cannot agree to 1e-5: AdamW divides each gradient by its running RMS, so summation-order
noise in near-zero gradients (the bias tables', ~1e-7) becomes a full-size update. Measured: the
reference against itself with its 1x1 conv written as an equivalent einsum drifts 3.6e-4 (relative) in
20 steps of swin-tiny. LATER_STEPS_RTOL sits above that and far below what a wrong kernel gives."""
import numpy as np
import pytest
import torch

import simmim_fast as sf
from simmim_fast.config import get_config

pytestmark = pytest.mark.interpreter

STEPS = 20
BATCH = 2
LATER_STEPS_RTOL = 1e-3


def train(preset, backend, steps):
    config = get_config(preset)
    torch.manual_seed(0)
    model = sf.build_simmim(config)
    with torch.no_grad():  # non-zero biases so the bias paths carry signal from step one
        for name, param in model.named_parameters():
            if "relative_position_bias_table" in name:
                param.normal_(0, 0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    masks = sf.MaskGenerator(config.DATA.IMG_SIZE, config.DATA.MASK_PATCH_SIZE, model.patch_size,
                             config.DATA.MASK_RATIO)
    data = torch.Generator(torch.get_default_device()).manual_seed(1)  # the kernel device (tests/conftest.py)
    losses, first_grads = [], None
    with sf.use_backend(backend):
        for step in range(steps):
            size = config.DATA.IMG_SIZE
            x = torch.randn(BATCH, 3, size, size, generator=data)
            mask = masks.generate(BATCH, generator=data)
            loss = model(x, mask)
            optimizer.zero_grad()
            loss.backward()
            if step == 0:
                first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            optimizer.step()
            losses.append(loss.item())
    return np.array(losses), first_grads


@pytest.mark.parametrize("preset", ["vit-tiny", "swin-tiny"])
def test_triton_training_matches_reference(preset):
    ref_losses, ref_grads = train(preset, "reference", STEPS)
    fast_losses, fast_grads = train(preset, "triton", STEPS)
    assert ref_grads.keys() == fast_grads.keys()
    for name, want in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    np.testing.assert_allclose(fast_losses[0], ref_losses[0], rtol=1e-5)
    np.testing.assert_allclose(fast_losses, ref_losses, rtol=LATER_STEPS_RTOL)
    assert ref_losses[-5:].mean() < ref_losses[:5].mean()  # it trains
