"""kernels/_eager.py: an op called in eager mode goes straight to its implementation and autograd
formula (the custom op's dispatch costs host time and computes nothing: docs/kernels.md), while fake
tensors, which only the custom op's fake implementation can take, still go through the custom op
(Dynamo's tracing is checked by tests/test_graph_breaks.py and the ops' torch.compile tests).

Every op of benchmarks/kernel_cases.py at its smoke shape, forward and backward."""
from unittest import mock

import pytest
import torch
from torch.library import CustomOpDef
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.kernel_cases import all_cases
from conftest import kernel_device
from simmim_fast.backends import registry

pytestmark = pytest.mark.interpreter

ONE_CASE_PER_OP = list({case.op: case for case in all_cases(smoke=True)}.values())


def _entry_point(case):
    return registry()["triton"].implementation(case.op)


def _custom_op_calls():
    """(patch, the names of the custom ops called while it is active)."""
    called = []
    through_the_op = CustomOpDef.__call__

    def recording(self, *args, **kwargs):
        called.append(self._qualname)
        return through_the_op(self, *args, **kwargs)
    return mock.patch.object(CustomOpDef, "__call__", recording), called


@pytest.mark.parametrize("case", ONE_CASE_PER_OP, ids=lambda case: case.op)
def test_eager_calls_skip_the_custom_op_and_fake_tensors_take_it(case):
    op = _entry_point(case)
    arguments = case.build(kernel_device(), torch.float32, 0)
    for name in case.grad_names:
        arguments[name].requires_grad_()
    patch, called = _custom_op_calls()
    with patch:
        out = op(**arguments)
        out.backward(torch.ones_like(out))
    assert called == [], f"eager forward and backward went through the custom ops {called}"
    assert all(arguments[name].grad is not None for name in case.grad_names)

    fake_mode = FakeTensorMode()
    fake_arguments = {name: fake_mode.from_tensor(value.detach()) if isinstance(value, torch.Tensor) else value
                      for name, value in arguments.items()}
    with fake_mode, patch:
        fake_out = op(**fake_arguments)
    assert called and all(name.startswith("simmim_fast_triton::") for name in called), called
    assert fake_out.shape == out.shape and fake_out.dtype == out.dtype
