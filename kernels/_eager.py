"""How each op's public function calls its torch.library custom op: through the op wherever something
traces or fakes tensors (torch.compile, AOTAutograd's backward, fake and meta tensors), and straight to
the same implementation, with the same autograd formula, in eager mode.

The custom op is what makes a kernel one opaque node for Dynamo (Triton's interpreter cannot be traced
into, and the launchers' autotuning and partial sums must not be). In eager mode its dispatch (schema
defaults, redispatch below autograd, Dynamo's disable wrapper, the generated autograd Function) costs
host time on every call and computes nothing: docs/kernels.md measures it.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch.library import CustomOpDef
from torch.utils._python_dispatch import _get_current_dispatch_mode


def _traced(first_input: torch.Tensor) -> bool:
    return (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or first_input.device.type == "meta")


# custom op -> the function it was built from (the op keeps it only privately)
_IMPLEMENTATIONS: Dict[CustomOpDef, Callable] = {}


def custom_op(name: str, implementation: Callable) -> CustomOpDef:
    """``torch.library.custom_op(name, implementation, mutates_args=())``, remembered with its
    implementation: the callers below take the op alone, so an op and its eager body cannot be mismatched."""
    op = torch.library.custom_op(name, implementation, mutates_args=())
    _IMPLEMENTATIONS[op] = implementation
    return op


def eager_or_op(op: CustomOpDef) -> Callable:
    """``op`` (a custom op without an autograd formula, such as a backward) when traced, else its
    implementation. Positional arguments only, the first a tensor."""
    implementation = _IMPLEMENTATIONS[op]

    def call(*inputs):
        return op(*inputs) if _traced(inputs[0]) else implementation(*inputs)
    return call


def eager_or_op_with_autograd(op: CustomOpDef, backward: Callable, setup_context: Callable) -> Callable:
    """Registers ``backward`` and ``setup_context`` as ``op``'s autograd formula and returns the op's
    caller: the op when traced; else its implementation under an autograd.Function with that same
    formula when some input requires grad (as the op's generated Function would), else the
    implementation itself."""
    implementation = _IMPLEMENTATIONS[op]
    op.register_autograd(backward, setup_context=setup_context)

    def forward(ctx, *inputs):
        output = implementation(*inputs)
        setup_context(ctx, inputs, output)
        return output

    # forward(ctx, ...), not a separate setup_context: with one, Function.apply binds the arguments
    # through inspect.signature on every call (about 10 us here)
    eager = type(f"Eager_{implementation.__name__}", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def call(*inputs):
        if _traced(inputs[0]):
            return op(*inputs)
        if torch.is_grad_enabled() and any(isinstance(value, torch.Tensor) and value.requires_grad for value in inputs):
            return eager.apply(*inputs)
        return implementation(*inputs)
    return call
