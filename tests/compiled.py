"""torch.compile over our custom ops: Dynamo must treat them as opaque (it cannot trace into a kernel,
interpreted or compiled), so a whole forward + backward compiles as one graph and gives eager's numbers."""
from __future__ import annotations

import torch

from tests.tolerances import assert_close_cpu


def assert_compiled_matches_eager(fn, *inputs):
    """``fn(*inputs)`` returns one tensor; compiled with ``backend="aot_eager", fullgraph=True`` (an error on any
    graph break), its output and the gradients of the inputs that require grad match eager's."""
    def run(function):
        leaves = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
                  for x in inputs]
        out = function(*leaves)
        out.backward(torch.ones_like(out) if out.dim() == 0 else torch.linspace(-1, 1, out.numel()).view_as(out))
        return out.detach(), [x.grad for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]

    torch._dynamo.reset()
    compiled_out, compiled_grads = run(torch.compile(fn, backend="aot_eager", fullgraph=True))
    eager_out, eager_grads = run(fn)
    assert compiled_out.dtype == eager_out.dtype
    assert_close_cpu(compiled_out, eager_out, "compiled output", compiled_out.dtype)
    assert len(compiled_grads) == len(eager_grads) > 0
    for index, (compiled, eager) in enumerate(zip(compiled_grads, eager_grads)):
        assert_close_cpu(compiled, eager, f"compiled gradient {index}", compiled.dtype)
