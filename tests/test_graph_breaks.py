"""torch.compile sees a whole SimMIM as one graph with every op forced onto the triton kernels: each
op is a torch.library custom op (fake implementation + registered autograd), so Dynamo traces through
it, and none hides behind torch.compiler.disable (a graph break per call: 12 per ViT-B forward).

Run where the kernels run (tests/conftest.py's device: CUDA, or the CPU under TRITON_INTERPRET=1),
on the tiny presets: the same ops, the same registrations as the published models.
"""
import pytest
import torch

import simmim_fast as sf
from simmim_fast.config import get_config

pytestmark = pytest.mark.interpreter

PRESETS = ["vit-tiny", "swin-tiny"]
KERNEL_OP_NAMESPACE = "simmim_fast_triton"  # torch.ops.simmim_fast_triton.*: the kernels' registrations


def model_and_batch(preset, device):
    """The preset's model and a batch of 2 (``batch_of(model, preset, device, 0)``)."""
    torch.manual_seed(0)
    model = sf.build_simmim(get_config(preset)).to(device)
    return (model, *batch_of(model, preset, device, 0))


def batch_of(model, preset, device, seed):
    """2 images and their masks for ``model`` (of ``preset``), drawn from ``seed``."""
    config = get_config(preset)
    generator = torch.Generator(device).manual_seed(seed)
    size = config.DATA.IMG_SIZE
    images = torch.randn(2, 3, size, size, device=device, generator=generator)
    masks = sf.MaskGenerator(size, config.DATA.MASK_PATCH_SIZE, model.patch_size, config.DATA.MASK_RATIO)
    return images, masks.generate(2, generator=generator)


@pytest.mark.parametrize("preset", PRESETS)
def test_forward_is_one_graph(preset, device):
    model, images, mask = model_and_batch(preset, device)
    torch._dynamo.reset()
    with sf.use_backend("triton"):
        try:
            explanation = torch._dynamo.explain(model)(images, mask)
        except Exception as error:  # an op that is no torch.library op: Dynamo walks into its launcher
            pytest.fail(f"Dynamo could not trace the forward (it entered an op's implementation instead of "
                        f"stopping at a {KERNEL_OP_NAMESPACE} op): {type(error).__name__}: {str(error)[:400]}")
    reasons = [f"{reason.reason} at {reason.user_stack[-1] if reason.user_stack else '?'}"
               for reason in explanation.break_reasons]
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), "\n".join(reasons)
    ours = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes
            if str(node.target).startswith(f"{KERNEL_OP_NAMESPACE}.")}
    assert ours, f"the graph calls no {KERNEL_OP_NAMESPACE} op: Dynamo traced into the kernels' Python"


@pytest.mark.parametrize("preset", PRESETS)
def test_forward_and_backward_compile_as_one_graph(preset, device):
    """fullgraph=True raises at the first break; the compiled step gives eager's loss and gradients."""
    model, images, mask = model_and_batch(preset, device)

    def loss_and_grads(step):
        model.zero_grad(set_to_none=True)
        with sf.use_backend("triton"):
            loss = step(images, mask)
            loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters() if p.grad is not None]

    eager = loss_and_grads(model)
    torch._dynamo.reset()
    compiled = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert len(compiled) == len(eager)
    for fast, expected in zip(compiled, eager):
        torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-6)
