"""A training step through our kernels is safe to capture in a CUDA graph (``pretrain --compile
reduce-overhead`` replays each compiled forward and backward as one graph, our ops' launches inside it).

While a stream captures, the host may not wait for the GPU (``.item()``, ``.tolist()``, ``bool(tensor)``)
nor copy from pageable host memory (``torch.tensor(data, device="cuda")``); and whatever the host derives
from tensor values, or a CPU tensor used as an operand (a 0-dim CPU tensor mixes with CUDA ones), is frozen
into the graph at capture and silently reused by every replay. So: a whole training step of each recipe
on meta tensors (nothing computes), every op on the Triton launchers as in training (the eager entry,
compile-only: launches logged, nothing compiled), and
- no ATen op in the step reads device data on the host or takes in a tensor built from host data;
- every ATen op's tensors, and every Triton launch's tensor arguments, are on the step's device.
On meta tensors the host reads also fail outright; the names make the failure say which call it was.
And the compiled step's graphs, as AOTAutograd hands them to Inductor, hold nothing for which Inductor
would leave a graph out of CUDA graphs. The real capture and replay on a GPU: tests/test_gpu_cuda_graphs.py.
"""
import contextlib
import importlib
import os
import traceback
from unittest import mock

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._inductor.utils import get_first_incompatible_cudagraph_node
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests import compile_only
from tests.test_graph_breaks import KERNEL_OP_NAMESPACE, model_and_batch
from tests.test_kernel_compile import RECIPES

pytestmark = [pytest.mark.compile,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="the compile-only harness needs Triton's CUDA backend, not the interpreter")]

# ATen ops that wait for the device and read its data on the host (.item(), bool(), int(), float(),
# a data-dependent size), or take a tensor built from host data in (torch.tensor, as_tensor, from_numpy).
HOST_ROUND_TRIPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
                    "_unique2", "lift_fresh", "lift_fresh_copy", "_pin_memory"}
# Python-level constructors from host data: torch.tensor(data, device=...) makes a meta tensor without an
# ATen op, and on CUDA copies from pageable host memory.
HOST_DATA_CONSTRUCTORS = [(torch, "tensor"), (torch, "as_tensor"), (torch, "from_numpy"), (torch.Tensor, "new_tensor")]
_eager = importlib.import_module("simmim_fast.kernels._eager")


def _caller() -> str:
    """The innermost simmim_fast line on the stack: where the offending call is."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if f"{os.sep}simmim_fast{os.sep}" in frame.filename or f"{os.sep}kernels{os.sep}" in frame.filename:
            return f"{os.path.basename(frame.filename)}:{frame.lineno}"
    return "outside simmim_fast"


class HostSideCalls(TorchDispatchMode):
    """Records the ATen ops of ``recording()``'s block that could not be captured, or would be frozen, in a
    CUDA graph (a dispatch mode, not a torch-function one: autograd's engine runs the backward under it too),
    and its calls of HOST_DATA_CONSTRUCTORS."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type
        self.offences = []
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.calls += 1
        if name in HOST_ROUND_TRIPS:  # recorded first: on meta tensors most of them raise
            self.offences.append(f"{name}() at {_caller()}")
        out = func(*args, **kwargs)
        devices = {t.device.type for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
        if devices - {self.device_type}:
            self.offences.append(f"{name} with tensors on {sorted(devices)} at {_caller()}")
        return out

    def _constructor(self, name, original):
        def construct(*args, **kwargs):
            self.offences.append(f"{name}() at {_caller()}")
            return original(*args, **kwargs)
        return construct

    @contextlib.contextmanager
    def recording(self):
        """The mode, and the constructors from host data replaced by recording ones."""
        with contextlib.ExitStack() as stack:
            for owner, name in HOST_DATA_CONSTRUCTORS:
                stack.enter_context(mock.patch.object(owner, name, self._constructor(name, getattr(owner, name))))
            stack.enter_context(self)
            yield


@pytest.mark.parametrize("preset", RECIPES)
def test_training_step_host_code_is_capturable(preset):
    recorder = HostSideCalls("meta")
    # Meta inputs, and tensors under a dispatch mode, take the eager entry here (as CUDA tensors do in
    # training), not the custom op: the mode then sees the launchers' own ops, forward and backward.
    with compile_only.compile_only(90, read_resources=False, select=lambda launch_key: False) as log, \
            mock.patch.object(_eager, "_traced", lambda first_input: False):
        compile_only.training_step_on_meta(preset, batch=8, around_step=recorder.recording)
    assert log.launches and recorder.calls > 0
    assert not recorder.offences, f"{preset}: " + "; ".join(dict.fromkeys(recorder.offences))
    off_device = sorted({f"{launch.kernel}({name}) on {value.device}" for launch in log.launches
                         for name, value in launch.arguments.items()
                         if isinstance(value, torch.Tensor) and value.device.type != "meta"})
    assert not off_device, f"{preset}: Triton launches with tensors off the step's device: {off_device}"


@pytest.mark.parametrize("preset", ["vit-tiny", "swin-tiny", "swinv2-tiny"])
def test_compiled_step_graphs_are_cuda_graph_ready(preset):
    """The forward and backward graphs of ``torch.compile(model, fullgraph=True)``, every op on our kernels
    (compile-only launches on CPU tensors): Inductor's own test finds no op it will not capture
    (cudagraph_unsafe tags, RNG-state helpers, data-dependent sizes), no input is mutated other than the
    static ones (parameters, buffers: CUDA graphs keep their addresses), and each graph calls our ops
    (which Inductor captures as they are, their launches included)."""
    graphs = []

    def inspect(graph_module, example_inputs):
        metadata = torch._guards.TracingContext.get().fw_metadata
        mutated = {index for index, info in enumerate(metadata.input_info) if info.mutates_data or info.mutates_metadata}
        graphs.append((graph_module, get_first_incompatible_cudagraph_node(graph_module),
                       sorted(mutated - set(metadata.static_input_indices))))
        return make_boxed_func(graph_module.forward)

    model, images, mask = model_and_batch(preset, torch.device("cpu"))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=inspect, bw_compiler=inspect))
    with compile_only.compile_only(90, read_resources=False, select=lambda launch_key: False), \
            compile_only.triton_everywhere():
        compiled(images, mask).backward()
    torch._dynamo.reset()
    assert len(graphs) == 2, f"{len(graphs)} graphs: expected one forward and one backward"
    for kind, (graph_module, refused_node, mutated_inputs) in zip(("forward", "backward"), graphs):
        assert refused_node is None, f"{kind}: Inductor would not capture {refused_node.target} in a CUDA graph"
        assert not mutated_inputs, f"{kind}: inputs {mutated_inputs} (not parameters or buffers) are mutated"
        assert any(str(node.target).startswith(f"{KERNEL_OP_NAMESPACE}.") for node in graph_module.graph.nodes), \
            f"{kind}: no {KERNEL_OP_NAMESPACE} op in the graph"
