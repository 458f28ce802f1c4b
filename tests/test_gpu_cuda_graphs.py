"""Our ops inside CUDA graphs, as ``pretrain --compile reduce-overhead`` runs them (the host side is
checked on the CPU by tests/test_cuda_graph_ready.py):

- every op of benchmarks/kernel_cases.py (smoke shapes, fp32), forward and backward captured once with
  ``torch.cuda.graph`` and replayed on new input values (masks at other positions): the replay gives what
  an eager call on those values gives (nothing of the captured inputs was frozen into the graph). Our
  kernels and configs are the same, so the same bits are expected; the check allows the table's floor, as
  torch's own kernels between ours may pick other algorithms while a stream captures;
- a whole training step of the tiny models under ``torch.compile(mode="reduce-overhead")``, every op on
  our kernels: Inductor captures its graphs (no skip), and the replayed steps' losses and gradients
  match the eager model's on the same inputs.
"""
from unittest import mock

import pytest
import torch
from torch._dynamo.utils import counters

import simmim_fast as sf
from benchmarks.kernel_cases import all_cases
from simmim_fast.backends import registry
from simmim_fast.tolerances import COMPILED_FP32_FLOOR, FLOOR, relative_error
from tests.test_graph_breaks import batch_of, model_and_batch

pytestmark = pytest.mark.gpu

CASES = all_cases(smoke=True)
WARMUP_CALLS = 2  # on a side stream before capture, as torch.cuda.graph's documentation asks (tuning, allocator)


def _forward_backward(op, arguments, grad_names):
    """The op's output and the gradients of ``grad_names`` (set to None first: the graph owns them)."""
    for name in grad_names:
        arguments[name].grad = None
    out = op(**arguments)
    out.backward(torch.ones_like(out))
    return out.detach(), [arguments[name].grad for name in grad_names]


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.op}-{case.name}")
def test_op_replays_in_a_cuda_graph(case, dtype):
    device = torch.device("cuda")
    op = registry()["triton"].implementation(case.op)
    static = case.build(device, dtype, 0)
    for name in case.grad_names:
        static[name].requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            _forward_backward(op, static, case.grad_names)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_out, captured_grads = _forward_backward(op, static, case.grad_names)
    graph.replay()
    first_out = captured_out.clone()

    fresh = case.build(device, dtype, 1)
    with torch.no_grad():
        for name, value in fresh.items():
            if isinstance(value, torch.Tensor):
                static[name].copy_(value)
    graph.replay()
    replayed = [captured_out] + list(captured_grads)
    for name in case.grad_names:
        fresh[name].requires_grad_()
    eager_out, eager_grads = _forward_backward(op, fresh, case.grad_names)
    # The captured inputs' output differs from the new one (a masked count does not: the ratio is fixed).
    assert not torch.equal(captured_out, first_out), "the replay repeats the captured inputs' output"
    for index, (replay, eager) in enumerate(zip(replayed, [eager_out] + eager_grads)):
        what = "output" if index == 0 else f"gradient of {case.grad_names[index - 1]}"
        error = relative_error(replay, eager)
        assert error <= FLOOR[dtype], f"{what}: the replay differs from an eager call on the same inputs ({error:.3g})"


@pytest.mark.parametrize("preset", ["vit-tiny", "swin-tiny"])
def test_compiled_training_steps_replay_cuda_graphs(preset):
    device = torch.device("cuda")
    model, *first_batch = model_and_batch(preset, device)
    batches = [first_batch] + [batch_of(model, preset, device, seed) for seed in (1, 2, 3)]  # warm-up, record, 2 replays
    captures = []
    capture_begin = torch.cuda.CUDAGraph.capture_begin

    def counted_capture_begin(graph, *args, **kwargs):
        captures.append(graph)
        return capture_begin(graph, *args, **kwargs)

    def losses_and_grads(step, cuda_graphs):
        results = []
        for images, mask in batches:
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            model.zero_grad(set_to_none=True)
            loss = step(images, mask)
            loss.backward()
            results.append([loss.detach().clone()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
        return results

    with sf.use_backend("triton"):
        eager = losses_and_grads(model, cuda_graphs=False)
        torch._dynamo.reset()
        counters.clear()
        with mock.patch.object(torch.cuda.CUDAGraph, "capture_begin", counted_capture_begin):
            replayed = losses_and_grads(torch.compile(model, mode="reduce-overhead", fullgraph=True), cuda_graphs=True)
    torch._dynamo.reset()
    assert counters["inductor"]["cudagraph_skips"] == 0, "Inductor left a graph out of CUDA graphs (see its log)"
    assert len(captures) >= 2, f"{len(captures)} CUDA graph captures: expected the forward's and the backward's"
    for step, (fast_step, eager_step) in enumerate(zip(replayed, eager)):
        assert len(fast_step) == len(eager_step)
        for index, (fast, expected) in enumerate(zip(fast_step, eager_step)):
            error = relative_error(fast, expected)
            assert error <= COMPILED_FP32_FLOOR, \
                f"step {step} {'loss' if index == 0 else f'gradient {index}'}: relative error {error:.3g}"
