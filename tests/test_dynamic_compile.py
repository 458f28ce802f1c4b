"""``torch.compile(model, dynamic=True)``: one compile serves every batch size (the last, smaller batch
of an evaluation, a fine-tune's varying batches), on the values eager gives; and a wrong input under
the compiled model is still the ValueError naming it. Plain PyTorch ops (the reference backend), Inductor
on the CPU: the two failures this caught were Dynamo formatting symbolic sizes in the input checks'
messages (str() of a size) and Swin's window_reverse dividing sizes as floats (which Inductor cannot order)."""
import pytest
import torch

import simmim_fast as sf
from simmim_fast.config import get_config


pytestmark = pytest.mark.compile  # Inductor's C++ builds: minutes on 2 cores


def test_one_compile_serves_every_batch_size():
    config = get_config("swinv2-tiny")  # the window ops, the normalised target and the shared input checks
    torch.manual_seed(0)
    model = sf.build_simmim(config)
    size = config.DATA.IMG_SIZE
    masks = sf.MaskGenerator(size, config.DATA.MASK_PATCH_SIZE, model.patch_size, config.DATA.MASK_RATIO)
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True)
    for batch in (5, 7):  # sizes no other dimension has (Dynamo would pair equal sizes)
        images, mask = torch.randn(batch, 3, size, size), masks.generate(batch)
        with sf.use_backend("reference"), torch.compiler.set_stance(
                "fail_on_recompile" if batch == 7 else "default"):
            loss = compiled(images, mask)
        with torch.no_grad(), sf.use_backend("reference"):
            torch.testing.assert_close(loss, model(images, mask), rtol=1e-5, atol=1e-6)
    with sf.use_backend("reference"), pytest.raises(ValueError, match=r"image must have 3 channels, got \(2, 4, "):
        compiled(torch.randn(2, 4, size, size), mask[:2])
