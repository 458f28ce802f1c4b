"""Measured backend choice (simmim_fast.tuning, simmim_fast.tuning_table) on the CPU, with fake backends
whose costs advance a fake clock and some of which are numerically wrong.

Run as ``python -m torch.distributed.run --nproc_per_node=2 -m tests.test_tuning OUTPUT`` it is the
worker of the rank-0 broadcast test.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import simmim_fast as sf
from simmim_fast import _tracing, dispatch, info, ops, reference, tolerances, tuning, tuning_table
from simmim_fast.backends import ALL_OPS, Backend, import_error, registry
from simmim_fast.backends import _registry as registered_backends
from simmim_fast.train.distributed import Runtime

CPU = torch.device("cpu")


class FakeClock:
    """Seconds advance only when a fake backend runs: timings are exact and chosen by the test."""

    now = 0.0

    def start(self):
        return self.now

    def elapsed(self, started):
        return self.now - started


CLOCK = FakeClock()
CALLED = []  # names of the fake backends that ran, in order


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class FakeBackend(Backend):
    """The reference's computation at a chosen cost, optionally off in the output or the gradients, or raising."""

    def __init__(self, name, cost, ops=("attention",), output_error=0.0, grad_error=0.0, raises=False):
        self.name, self.ops, self.cost = name, ops, cost
        self.output_error, self.grad_error, self.raises = output_error, grad_error, raises
        self.description = f"test backend costing {cost} s"

    def implementation(self, op):
        plain = reference.OPS[op]

        def run(**args):
            CALLED.append(self.name)
            CLOCK.now += self.cost
            if self.raises:
                raise RuntimeError("this kernel does not compile here")
            out = plain(**args)
            out = out + out.detach() * self.output_error  # off in the value only: the gradients stay exact
            return _ScaleGrad.apply(out, 1.0 + self.grad_error) if self.grad_error else out
        return run


FAKES = (
    FakeBackend("reference", 10.0, ops=ALL_OPS),  # a costed stand-in: the clock must see every candidate
    FakeBackend("off_output", 1.0, output_error=1e-2),
    FakeBackend("off_grads", 1.0, grad_error=1e-2),
    FakeBackend("broken", 0.5, raises=True),
    FakeBackend("slow", 5.0),
    FakeBackend("fast", 2.0),
)


def install_fakes(monkeypatch, tune_dir, lazy=False):
    """The fakes as the CPU's auto-mode backends, the fake clock, a private cache folder."""
    registry()  # build the real registry first: it is built only when empty
    for fake in FAKES:
        monkeypatch.setitem(registered_backends, fake.name, fake)
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", tuple(fake.name for fake in FAKES))
    monkeypatch.setattr(tuning, "clock_for", lambda device: CLOCK)
    monkeypatch.setattr(tuning, "WARMUP_CALLS", 1)  # the fake clock needs no warm-up; fewer calls, faster tests
    monkeypatch.setattr(tuning, "TIMED_SAMPLES", 3)
    monkeypatch.setattr(tuning, "CALLS_PER_SAMPLE", 2)
    monkeypatch.setattr(tuning, "_spent", {"seconds": 0.0, "reported": False})
    monkeypatch.delenv(tuning.BUDGET_VAR, raising=False)
    monkeypatch.setattr(tuning_table, "LAZY_DEVICE_TYPES", ("cpu",) if lazy else ())
    monkeypatch.setitem(tuning_table._lazy_state, "frozen", False)
    monkeypatch.setenv(tuning_table.TUNE_DIR_VAR, str(tune_dir))
    monkeypatch.delenv(tuning_table.TUNE_VAR, raising=False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    tuning_table.forget()
    CALLED.clear()


@pytest.fixture(autouse=True)
def forget_tables():
    yield
    tuning_table.forget()  # no test's table outlives it


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    install_fakes(monkeypatch, tmp_path / "tuning")
    return tmp_path / "tuning"


def tiny_vit():
    model = sf.build_simmim("vit-tiny")
    images = torch.randn(2, 3, 64, 64)
    mask = sf.MaskGenerator(64, 16, model.patch_size, 0.6).generate(2)
    return model, images, mask


def attention_args(tokens=7, requires_grad=True):
    q, k, v = (torch.randn(2, 2, tokens, 16, requires_grad=requires_grad) for _ in range(3))
    return dict(q=q, k=k, v=v, bias=torch.randn(2, tokens, tokens, requires_grad=requires_grad), scale=None,
                dropout_p=0.0)


def test_tune_keeps_the_fastest_backend_that_passes_numerics(fakes):
    model, images, mask = tiny_vit()
    report = sf.tune(model, images, mask)
    # Only attention has several backends here; every block of the ViT calls it at one signature.
    assert [outcome.op for outcome in report.outcomes] == ["attention"]
    outcome = report.outcomes[0]
    assert outcome.backend == "fast"
    assert outcome.seconds == {"reference": 10.0, "slow": 5.0, "fast": 2.0}  # the median of single calls
    # Faster candidates that are wrong, in the output or only in a gradient, or that raise, are never chosen.
    assert set(outcome.failures) == {"off_output", "off_grads", "broken"}
    assert "output: err" in outcome.failures["off_output"] and "grad of q" not in outcome.failures["off_output"]
    assert "grad of q: err" in outcome.failures["off_grads"] and "output" not in outcome.failures["off_grads"]
    assert outcome.failures["broken"] == "raised RuntimeError: this kernel does not compile here"
    assert "3 candidate(s) failed" in report.summary() and "attention -> fast x1" in report.summary()
    assert len(report.failure_lines()) == 3

    # Auto mode now takes it at that signature, and the conservative first choice elsewhere.
    recorded = []
    with dispatch.recording(lambda op, args: recorded.append((op, dict(args)))):
        model(images, mask)
    attention_calls = [args for op, args in recorded if op == "attention"]
    assert dispatch.select("attention", attention_calls[0]).name == "fast"
    assert dispatch.select("attention", attention_args()).name == "reference"

    # A second tune reads the cache: nothing is run again.
    tuning_table.forget()
    CALLED.clear()
    again = sf.tune(model, images, mask)
    assert again.outcomes[0].from_cache and again.outcomes[0].backend == "fast"
    assert set(CALLED) == {"fast", "reference"}  # the recording forward only: the table's choice for attention
    assert sf.tune(model, images, mask, retune=True).outcomes[0].from_cache is False


def _oracle_out_of_memory(monkeypatch):
    """The reference raises an out-of-memory error in float64 only (the oracle), as a big batch's fp64
    logits do on a GPU; returns the list of the batch sizes the oracle was tried at."""
    plain, tried = reference.OPS["attention"], []

    def attention(q, k, v, *rest, **kwargs):
        if q.dtype == torch.float64:
            tried.append(q.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return plain(q, k, v, *rest, **kwargs)
    monkeypatch.setitem(reference.OPS, "attention", attention)
    return tried


def test_a_failing_signature_is_recorded_and_measured_once(monkeypatch, tmp_path, capsys):
    """Before: nothing was recorded when no backend passed, so every later call tuned again."""
    install_fakes(monkeypatch, tmp_path, lazy=True)
    tried = _oracle_out_of_memory(monkeypatch)
    args = attention_args()
    for _ in range(5):
        ops.attention(**args)
    assert len(tried) == 1 and capsys.readouterr().err.count("could not tune attention") == 1
    assert set(CALLED) == {"reference"}  # the untuned default ran every call; no candidate was timed
    entry = tuning_table.table(CPU)[tuning_table.signature("attention", args)]
    assert entry["backend"] is None and "OutOfMemoryError" in entry["failed"]
    # In a new process (the table read back from disk), still never measured again.
    tuning_table.forget()
    ops.attention(**args)
    assert len(tried) == 1 and "tune" not in capsys.readouterr().err


def test_the_oracle_runs_on_a_slice_of_the_batch(fakes, monkeypatch):
    """The float64 oracle (and the numerics) see ORACLE_SAMPLES samples; the timed calls the whole batch."""
    seen = {"float64": set(), "timed": set()}
    plain = reference.OPS["attention"]

    def attention(q, k, v, *rest, **kwargs):
        seen["float64" if q.dtype == torch.float64 else "timed"].add(q.shape[0])
        return plain(q, k, v, *rest, **kwargs)
    monkeypatch.setitem(reference.OPS, "attention", attention)
    q, k, v = (torch.randn(6, 2, 7, 16, requires_grad=True) for _ in range(3))
    outcome = tuning.measure(tuning.Call.capture("attention", dict(q=q, k=k, v=v, bias=None)))
    assert outcome.backend == "fast" and set(outcome.failures) == {"off_output", "off_grads", "broken"}
    assert seen["float64"] == {tuning.ORACLE_SAMPLES} and 6 in seen["timed"]
    # Window attention slices whole images: ORACLE_SAMPLES x the windows per image.
    windows, tokens = 4, 9
    q, k, v = (torch.randn(3 * windows, 2, tokens, 8) for _ in range(3))
    call = tuning.Call.capture("window_attention", dict(q=q, k=k, v=v, bias=torch.randn(2, tokens, tokens),
                                                        window_mask=torch.zeros(windows, tokens, tokens)))
    assert call.batch_slice().args["q"].shape[0] == tuning.ORACLE_SAMPLES * windows


def test_memory_is_released_after_a_failed_candidate(fakes, monkeypatch):
    """empty_cache runs once each failed candidate's frames are gone (not inside the except, where the
    traceback still holds its tensors)."""
    released = []
    monkeypatch.setattr(tuning, "_release_memory", lambda device: released.append(len(CALLED)))
    outcome = tuning.measure(tuning.Call.capture("attention", attention_args()))
    assert set(outcome.failures) == {"off_output", "off_grads", "broken"}
    assert len(released) == 4  # after each of the three failed candidates, and once at the end


def test_a_cuda_error_ends_the_process_after_recording_the_signature(fakes, monkeypatch):
    """A sticky device fault (simulated: torch.AcceleratorError, as CUDA raises it) poisons the context:
    one line naming the candidate and how to exclude it, the signature recorded as failed first."""
    def illegal_access(**args):
        CALLED.append("faulty")
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    faulty = FakeBackend("faulty", 0.1)
    monkeypatch.setattr(faulty, "implementation", lambda op: illegal_access)
    monkeypatch.setitem(registered_backends, "faulty", faulty)
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("reference", "slow", "faulty", "fast"))
    model, images, mask = tiny_vit()
    with pytest.raises(SystemExit) as ended:
        sf.tune(model, images, mask)
    line = str(ended.value)
    assert "\n" not in line and "'faulty'" in line and "illegal memory access" in line
    assert line.endswith("set SIMMIM_FAST_BACKEND=attention=reference")
    tuning_table.forget()  # the next run reads it from disk: nothing is measured at that signature
    (entry,) = tuning_table.table(CPU).values()
    assert entry["backend"] is None and entry["failed"] == "CUDA error in faulty"
    CALLED.clear()
    again = sf.tune(model, images, mask)
    assert again.outcomes[0].from_cache and "faulty" not in CALLED
    assert not tuning.is_sticky_device_error(torch.OutOfMemoryError("CUDA out of memory"))
    assert tuning.is_sticky_device_error(RuntimeError("Triton Error [CUDA]: unspecified launch failure"))


def test_the_tuning_budget_stops_measuring(monkeypatch, tmp_path, capsys):
    install_fakes(monkeypatch, tmp_path, lazy=True)
    monkeypatch.setenv(tuning.BUDGET_VAR, "0")
    for tokens in (5, 6, 7):
        ops.attention(**attention_args(tokens=tokens))
    assert set(CALLED) == {"reference"} and not list(tmp_path.iterdir())  # nothing measured nor recorded
    assert capsys.readouterr().err.count(f"tuning budget ({tuning.BUDGET_VAR}=0 s) is spent") == 1
    model, images, mask = tiny_vit()
    assert sf.tune(model, images, mask).outcomes == []
    monkeypatch.setenv(tuning.BUDGET_VAR, "soon")
    with pytest.raises(ValueError, match="SIMMIM_FAST_TUNE_BUDGET_S must be a number of seconds"):
        tuning.budget_s()


def test_other_ranks_wait_for_rank_0_a_bounded_time():
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.HashStore()
    with pytest.raises(RuntimeError, match="rank 3: rank 0 did not finish tuning the kernels within 0 s"):
        tuning.wait_for_rank_0(store, "ready", 0.2, rank=3)
    store.set("ready", "1")
    tuning.wait_for_rank_0(store, "ready", 0.2, rank=3)
    assert timedelta(seconds=tuning.budget_s() + tuning.RANK_0_WAIT_MARGIN_S) > timedelta(seconds=tuning.budget_s())


def test_timing_runs_back_to_back_calls_in_the_inputs_layout(fakes, monkeypatch):
    """Each sample is CALLS_PER_SAMPLE calls between one start and one elapsed of the clock (a full queue,
    as in training), on inputs with the strides of the call (q, k, v: views of one fused qkv buffer)."""
    starts, strides = [], set()
    monkeypatch.setattr(CLOCK, "start", lambda: starts.append(1) or CLOCK.now)
    plain = reference.OPS["attention"]

    def attention(q, k, v, *rest, **kwargs):
        if q.dtype == torch.float32 and q.shape[0] == 4:
            strides.add(q.stride())
        return plain(q, k, v, *rest, **kwargs)
    monkeypatch.setitem(reference.OPS, "attention", attention)
    qkv = torch.randn(4, 7, 3, 2, 16).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d), as a ViT block splits it
    q, k, v = (tensor.requires_grad_() for tensor in qkv.unbind(0))
    call = tuning.Call.capture("attention", dict(q=q, k=k, v=v, bias=None))
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("reference", "fast"))
    call.candidates = ["reference", "fast"]
    outcome = tuning.measure(call)
    assert outcome.seconds == {"reference": 10.0, "fast": 2.0}  # per call
    assert len(starts) == 2 * tuning.TIMED_SAMPLES  # one pair of clock readings per sample, per candidate
    assert strides == {q.stride()} and not q.is_contiguous()


def test_signature_differs_by_tf32_settings_and_memory_format():
    args = attention_args()
    base = tuning_table.signature("attention", args)
    allow_tf32, precision = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = not allow_tf32
        tf32 = tuning_table.signature("attention", args)
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.set_float32_matmul_precision("medium" if precision != "medium" else "high")
        lower_precision = tuning_table.signature("attention", args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.set_float32_matmul_precision(precision)
    transposed = dict(args, q=args["q"].transpose(-1, -2).contiguous().transpose(-1, -2))
    strided = tuning_table.signature("attention", transposed)
    assert len({base, tf32, lower_precision, strided}) == 4
    assert tuning_table.signature("attention", args) == base
    assert "strides" in tuning_table.describe(strided) and "strides" not in tuning_table.describe(base)
    image = torch.randn(2, 3, 8, 8)
    embed = dict(image=image, mask=torch.zeros(2, 2, 2), weight=torch.randn(4, 3, 4, 4), bias=None,
                 mask_token=torch.zeros(1, 1, 4))
    channels_last = tuning_table.signature("masked_patch_embed", dict(embed, image=image.to(memory_format=torch.channels_last)))
    assert channels_last != tuning_table.signature("masked_patch_embed", embed)
    assert "image 2x3x8x8 float32 channels_last" in tuning_table.describe(channels_last)
    assert tuning_table.signature("attention", args, compiled=True) != base


def test_compiled_tuning_compares_each_candidate_compiled(fakes, monkeypatch):
    """tune(compiled=True): every candidate, the reference included, runs as torch.compile of the op
    alone; the entries are the compiled model's (an eager model does not read them)."""
    compiled = []

    def compile_standalone(implementation):
        def run(**args):
            compiled.append(CALLED[-1] if CALLED else None)
            return implementation(**args)
        compiled.append("compiled")
        return run
    monkeypatch.setattr(tuning, "compile_standalone", compile_standalone)
    model, images, mask = tiny_vit()
    report = sf.tune(model, images, mask, compiled=True)
    (outcome,) = report.outcomes
    assert outcome.backend == "fast" and dict(outcome.signature[4])["compiled"] is True
    assert compiled.count("compiled") == 6  # each of the six candidates, once
    eager = sf.tune(model, images, mask)
    assert not eager.outcomes[0].from_cache  # measured again, eagerly


def test_timing_is_warmup_then_median():
    costs = iter([100.0, 100.0, 3.0, 1.0, 2.0, 50.0, 4.0])  # two warm-up calls, then five timed ones
    clock = FakeClock()

    def run():
        clock.now += next(costs)
    assert tuning.median_seconds(run, clock, warmup=2, samples=5) == 3.0


def test_numerics_follow_the_autocast_of_the_call(fakes, monkeypatch):
    """Under bf16 autocast the allowance is torch's own bf16 error: a 1e-3 relative error passes
    there and fails in fp32."""
    monkeypatch.setattr(registry()["off_output"], "output_error", 1e-3)
    fp32 = tuning.measure(tuning.Call.capture("attention", attention_args()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = tuning.measure(tuning.Call.capture("attention", attention_args()))
    assert "off_output" in fp32.failures
    assert "off_output" not in bf16.failures and "off_output" in bf16.seconds
    assert bf16.signature[2] == "bfloat16" and fp32.signature[2] == ""


def test_lazy_tuning_on_the_first_eager_call_of_a_signature(monkeypatch, tmp_path, capsys):
    install_fakes(monkeypatch, tmp_path, lazy=True)
    args = attention_args()
    out = ops.attention(**args)
    torch.testing.assert_close(out, reference.attention(**args))  # the call itself still returns its result
    log = capsys.readouterr().err
    assert log.count("simmim_fast: tuned attention") == 1 and "-> fast" in log and "SIMMIM_FAST_TUNE=0" in log
    assert tuning_table.measured_choice("attention", args) == "fast"
    CALLED.clear()
    ops.attention(**args)
    assert CALLED == ["fast"] and capsys.readouterr().err == ""  # measured once per signature
    ops.attention(**attention_args(tokens=9))  # a new shape is a new signature
    assert "tuned attention" in capsys.readouterr().err
    # The measurement was saved: a new process (here: a cleared memory) uses it without measuring.
    tuning_table.forget()
    CALLED.clear()
    ops.attention(**args)
    assert CALLED == ["fast"]


def test_tune_knob_off_and_paused_means_no_measurement(monkeypatch, tmp_path, capsys):
    install_fakes(monkeypatch, tmp_path, lazy=True)
    monkeypatch.setenv(tuning_table.TUNE_VAR, "0")
    ops.attention(**attention_args())
    assert CALLED == ["reference"] and capsys.readouterr().err == ""
    assert not list(tmp_path.iterdir())
    monkeypatch.delenv(tuning_table.TUNE_VAR)
    CALLED.clear()
    with tuning_table.lazy_tuning_paused():
        ops.attention(**attention_args())
    assert CALLED == ["reference"]
    assert tuning_table.lazy_tuning_enabled("cpu")  # the pause ends with its block
    tuning_table.freeze()  # monkeypatched state: undone after the test
    ops.attention(**attention_args())
    assert CALLED == ["reference", "reference"]


def test_forced_backend_is_not_measured(monkeypatch, tmp_path):
    install_fakes(monkeypatch, tmp_path, lazy=True)
    with sf.use_backend("attention=slow"):
        ops.attention(**attention_args())
    assert CALLED == ["slow"] and not list(tmp_path.iterdir())


def test_while_compiling_the_table_is_used_and_nothing_is_timed(monkeypatch, tmp_path, capsys):
    install_fakes(monkeypatch, tmp_path, lazy=True)
    args = attention_args()

    def step(q, k, v, bias):
        return ops.attention(q, k, v, bias).sum()

    # No table: the conservative first backend, no measurement, one graph.
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(args["q"], args["k"], args["v"], args["bias"])
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    assert set(CALLED) == {"reference"} and "tuned" not in capsys.readouterr().err
    assert not list(tmp_path.iterdir())

    # With a table entry for the signature measured compiled, the compiled graph runs the measured backend.
    tuning_table.record(CPU, tuning_table.signature("attention", args, compiled=True), {"backend": "slow", "times_ms": {},
                                                                         "failures": {}})
    torch._dynamo.reset()
    CALLED.clear()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    compiled(args["q"], args["k"], args["v"], args["bias"]).backward()
    assert set(CALLED) == {"slow"}
    torch._dynamo.reset()


def test_the_table_lookup_is_a_constant_for_dynamo():
    """measured_choices and the import probe carry exactly the mark of torch.compiler.assume_constant_result."""
    def probe():
        return None
    torch.compiler.assume_constant_result(probe)
    assert vars(probe) == {_tracing.DYNAMO_CONSTANT_MARK: True}
    assert getattr(tuning_table.measured_choices, _tracing.DYNAMO_CONSTANT_MARK) is True
    assert getattr(import_error, _tracing.DYNAMO_CONSTANT_MARK) is True


def test_cache_round_trip_and_invalidation(fakes, monkeypatch):
    sig = tuning_table.signature("attention", attention_args())
    entry = {"backend": "fast", "times_ms": {"fast": 2.0}, "failures": {"off_output": "output: err 1 > 0"}}
    tuning_table.record(CPU, sig, entry)
    path = tuning_table.table_path(CPU)
    assert path.parent == fakes and path.exists() and [p.name for p in fakes.iterdir()] == [path.name]
    tuning_table.forget()
    assert tuning_table.lookup(CPU, sig) == "fast" and tuning_table.table(CPU)[sig] == entry

    # A file of the previous format (1: signatures without settings or memory layouts) is refused.
    current = path.read_text()
    path.write_text(json.dumps({**json.loads(current), "format": 1}))
    tuning_table.forget()
    with pytest.warns(UserWarning, match="ignoring the tuning cache"):
        assert tuning_table.lookup(CPU, sig) is None
    path.write_text(current)
    tuning_table.forget()
    # Another torch version or another device: another file, an empty table.
    with monkeypatch.context() as patched:
        patched.setattr(torch, "__version__", "9.9.9")
        assert tuning_table.table_path(CPU) != path and tuning_table.lookup(CPU, sig) is None
    monkeypatch.setitem(tuning_table._device_names, ("cpu", None), "another cpu")
    assert tuning_table.lookup(CPU, sig) is None
    # A file copied from another environment is refused as such.
    tuning_table.table_path(CPU).write_text(path.read_text())
    tuning_table.forget()
    with pytest.warns(UserWarning, match=f"ignoring the tuning cache.*expected format {tuning_table.FILE_FORMAT} for .*another cpu"):
        assert tuning_table.lookup(CPU, sig) is None


def test_kernel_config_round_trip_beside_the_op_choices(fakes):
    """A kernel's launch configuration (kernels/_autotune.py) is kept in the same file for later runs, read
    back at the same key (JSON lists back to tuples), invisible to the op lookups, listed by info."""
    key = (197, 64, True, False, "ieee", "torch.float32")
    config = {"kwargs": {"BLOCK_N": 128}, "num_warps": 8, "num_stages": 2}
    assert tuning_table.kernel_config(CPU, "module.kernel", key) is None
    tuning_table.record_kernel_config(CPU, "module.kernel", key, config)
    assert tuning_table.kernel_config(CPU, "module.kernel", key) == config  # the answer it remembered is replaced
    tuning_table.forget()
    assert tuning_table.kernel_config(CPU, "module.kernel", key) == config
    assert tuning_table.kernel_config(CPU, "module.kernel", key[:-1]) is None
    assert tuning_table.measured_choices("attention", "cpu", None) == ()
    assert "  kernel module.kernel at (197, 64, True, False, 'ieee', 'torch.float32'): " + str(config) in info.tuning_lines(CPU)


def test_corrupt_cache_is_ignored_with_a_warning_and_replaced(fakes):
    sig = tuning_table.signature("attention", attention_args())
    path = tuning_table.table_path(CPU)
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "entries": [{"signa')
    with pytest.warns(UserWarning, match="ignoring the tuning cache"):
        assert tuning_table.lookup(CPU, sig) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuning_table.record(CPU, sig, {"backend": "slow", "times_ms": {}, "failures": {}})
    assert json.loads(path.read_text())["entries"][0]["entry"]["backend"] == "slow"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_unwritable_cache_keeps_the_choice_in_memory(fakes):
    fakes.parent.joinpath("tuning").write_text("a file where the folder should be")
    sig = tuning_table.signature("attention", attention_args())
    with pytest.warns(UserWarning, match="could not write the tuning cache"):
        tuning_table.record(CPU, sig, {"backend": "slow", "times_ms": {}, "failures": {}})
    assert tuning_table.lookup(CPU, sig) == "slow"


def test_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(tuning_table.TUNE_DIR_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning_table.cache_dir() == tmp_path / "simmim_fast" / "tuning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tuning_table.cache_dir() == Path.home() / ".cache" / "simmim_fast" / "tuning"


def test_signature_follows_the_reference_order_shapes_dtypes_grads_and_autocast():
    args = attention_args()
    reordered = dict(reversed(list(args.items())))
    assert tuning_table.signature("attention", reordered) == tuning_table.signature("attention", args)
    with torch.no_grad():
        without_grad = attention_args(requires_grad=False)
    assert tuning_table.signature("attention", without_grad) != tuning_table.signature("attention", args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tuning_table.signature("attention", args)[2] == "bfloat16"
    described = tuning_table.describe(tuning_table.signature("attention", args))
    assert described == "q 2x2x7x16 float32 grad, k 2x2x7x16 float32 grad, v 2x2x7x16 float32 grad, " \
                        "bias 2x7x7 float32 grad, dropout_p=0.0; cpu, autocast off, eager, matmul_tf32=False, " \
                        "cudnn_tf32=True, float32_matmul_precision=highest"


def test_without_a_table_cuda_auto_takes_pytorch_first():
    """The first CUDA backend implementing each op is the untuned choice: SDPA for the attention ops,
    the reference composition for the rest; never a Triton kernel nobody has measured."""
    order = dispatch.AUTO_ORDER["cuda"]
    for op in ALL_OPS:
        first = next(name for name in order if op in registry()[name].ops)
        assert first == ("sdpa" if op in ("attention", "window_attention") else "reference"), op
    assert set(order) >= {"triton", "cuda", "xformers"}  # still measured by the tuner


def test_relative_tolerance_floor():
    """fp32: 1e-5 of the reference's magnitude, whatever that magnitude (a dBias summed over 64 images)."""
    reference_value = torch.full((4,), 100.0)
    close = reference_value + 5e-4
    assert tolerances.compare_to_torch_error(close, reference_value, reference_value).ok  # 5e-6 relative
    unit = torch.ones(4)
    assert not tolerances.compare_to_torch_error(unit + 5e-4, unit, unit).ok  # the same error on a unit quantity
    nan = tolerances.compare_to_torch_error(torch.full((4,), float("nan")), reference_value, reference_value)
    assert not nan.ok and "err nan" in str(nan)
    lowp = reference_value.bfloat16()
    assert tolerances.compare_to_torch_error(lowp, lowp, reference_value).bound == pytest.approx(8e-3 * 100)


def test_pretrain_hook_tunes_once_before_training(fakes, monkeypatch, capsys):
    """What ``simmim-fast pretrain`` runs on CUDA, here on the fakes: one line with the cost, the failures
    listed, and no RNG consumed."""
    monkeypatch.setattr(tuning_table, "LAZY_DEVICE_TYPES", ("cpu",))
    model, _, _ = tiny_vit()
    masks = sf.MaskGenerator(64, 16, model.patch_size, 0.6)
    rng = torch.get_rng_state()
    tuning.before_training(model, Runtime(CPU), 2, masks, None)
    assert torch.equal(torch.get_rng_state(), rng)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("kernel tuning: 1 op shape(s), 1 measured") and lines[0].endswith(" s")
    assert len([line for line in lines if "never chosen for attention" in line]) == 3
    monkeypatch.setenv(tuning_table.TUNE_VAR, "0")
    tuning.before_training(model, Runtime(CPU), 4, masks, None)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_pretrain_tunes_before_its_first_step(fakes, monkeypatch, tmp_path, capsys):
    from simmim_fast.train import pretrain
    from simmim_fast.train.scenes import render_scene
    from tests.test_train_run import options

    monkeypatch.setattr(tuning_table, "LAZY_DEVICE_TYPES", ("cpu",))  # what CUDA gets
    data = tmp_path / "images"
    data.mkdir()
    for index in range(8):
        render_scene(index, 72).save(data / f"{index}.png")
    summary = pretrain(options(tmp_path / "run", data, batch_size=4, steps=2, save_every=2, picture_count=2))
    assert len(summary["losses"]) == 2
    err = capsys.readouterr().err
    assert err.count("kernel tuning: 1 op shape(s), 1 measured") == 1
    assert "tuned attention [q 4x" not in err  # the steps (batch 4) found their signature measured already
    assert CALLED.count("fast") > CALLED.count("slow")  # the steps ran the measured choice


def test_info_prints_the_table(fakes):
    tuning_table.record(CPU, tuning_table.signature("attention", attention_args()),
                        {"backend": "fast", "times_ms": {"fast": 2.0, "slow": 5.0}, "failures": {"off_output": "x"}})
    printed = info.report()  # what ``python -m simmim_fast.info`` prints (tests/test_dispatch.py runs it)
    assert f"tuned choices on cpu ({tuning_table.table_path(CPU)})" in printed
    assert "attention            -> fast       fast 2 ms, slow 5 ms; off_output failed" in printed
    assert "at q 2x2x7x16 float32 grad" in printed
    assert not CALLED  # asking the dispatch at toy shapes measured nothing


# ---- rank 0's table on every rank (2 gloo processes) ------------------------------------------------


@pytest.mark.slow
def test_every_rank_takes_rank_0_table(tmp_path):
    """Rank 0 tunes (fakes, fake clock) and finds 'fast'; rank 1's own cache says 'slow' for the same
    signature. After the hook both run 'fast', and neither tunes again."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tests.test_tuning", str(tmp_path)]
    done = subprocess.run(command, cwd=Path(__file__).parent.parent, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0]["before"] == "reference" and results[1]["before"] == "slow"
    assert [r["after"] for r in results] == ["fast", "fast"]
    assert [r["new_shape"] for r in results] == ["reference", "reference"]  # frozen: no rank measures alone
    assert "kernel tuning: 1 op shape(s), 1 measured" in done.stderr


def _rank_worker(output: Path) -> None:
    from simmim_fast.train import distributed

    rank = int(os.environ["RANK"])
    monkeypatch = pytest.MonkeyPatch()
    install_fakes(monkeypatch, output / f"cache{rank}")
    torch.manual_seed(0)
    model, images, mask = tiny_vit()
    recorded = []
    with dispatch.recording(lambda op, args: recorded.append((op, dict(args)))):
        model(images, mask)
    attention = next(args for op, args in recorded if op == "attention")
    if rank == 1:  # a different, stale choice in rank 1's own cache
        tuning_table.record(CPU, tuning_table.signature("attention", attention), {"backend": "slow", "times_ms": {},
                                                                                  "failures": {}})
    before = dispatch.select("attention", attention).name
    monkeypatch.setattr(tuning_table, "LAZY_DEVICE_TYPES", ("cpu",))  # rank 0 tunes here as on CUDA
    runtime = distributed.start("cpu")
    tuning.before_training(model, runtime, 2, sf.MaskGenerator(64, 16, model.patch_size, 0.6), None)
    after = dispatch.select("attention", attention).name
    new_shape = dispatch.select("attention", attention_args(tokens=5)).name
    (output / f"rank{rank}.json").write_text(json.dumps({"before": before, "after": after, "new_shape": new_shape}))
    distributed.stop(runtime)


if __name__ == "__main__":
    _rank_worker(Path(sys.argv[1]))


def test_a_new_process_tunes_lazily_until_frozen():
    """The state a process starts with (the other tests monkeypatch it): neither frozen nor paused."""
    code = ("from simmim_fast import tuning_table as t; t.LAZY_DEVICE_TYPES = ('cpu',); "
            "print(t.lazy_tuning_enabled('cpu')); t.freeze(); print(t.lazy_tuning_enabled('cpu'))")
    env = {key: value for key, value in os.environ.items() if key != tuning_table.TUNE_VAR}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.split() == ["True", "False"]


def test_cache_writes_merge_other_processes_entries_and_leave_no_temporary(fakes, monkeypatch):
    """Each record re-reads the file and merges: another process's entry written meanwhile is kept on disk
    and enters this process's table; a second write into the existing folder is no error (no warning);
    a failed write leaves no temporary file; the file says format 2 (a new layout bumps FILE_FORMAT,
    and an older file is then refused: test_cache_round_trip_and_invalidation)."""
    config = {"kwargs": {}, "num_warps": 4, "num_stages": 2}
    tuning_table.record_kernel_config(CPU, "module.first", (1,), config)
    path, env = tuning_table.table_path(CPU), tuning_table.environment(CPU)
    on_disk = tuning_table.read_file(path, env)  # another process adds an entry behind this one's back
    on_disk[(tuning_table.KERNEL_CONFIG, "module.other", (2,))] = {"config": config}
    tuning_table.write_file(path, env, on_disk)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuning_table.record_kernel_config(CPU, "module.second", (3,), config)
    assert tuning_table.kernel_config(CPU, "module.other", (2,)) == config  # merged into this process's table
    assert json.loads(path.read_text())["format"] == 2
    assert {row["signature"][1] for row in json.loads(path.read_text())["entries"]} == {
        "module.first", "module.other", "module.second"}

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(tuning_table.os, "replace", failing_replace)
    with pytest.warns(UserWarning, match="could not write the tuning cache"):
        tuning_table.record_kernel_config(CPU, "module.third", (4,), config)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_kernel_config_answers_follow_an_installed_or_forgotten_table(fakes):
    """kernel_config memoises its answers (once per launch): installing rank 0's table, or forgetting the
    tables, must drop them, or a rank would keep launching its own remembered config (or none)."""
    config = {"kwargs": {}, "num_warps": 8, "num_stages": 2}
    key = (64, "torch.float16")
    assert tuning_table.kernel_config(CPU, "module.kernel", key) is None  # remembered: no choice
    tuning_table.install(CPU, {(tuning_table.KERNEL_CONFIG, "module.kernel", key): {"config": config}})
    assert tuning_table.kernel_config(CPU, "module.kernel", key) == config
    tuning_table.forget()  # nothing on disk: the installed table and its answers go
    assert tuning_table.kernel_config(CPU, "module.kernel", key) is None


def test_cache_folder_is_created_with_its_parents(fakes, monkeypatch):
    monkeypatch.setenv(tuning_table.TUNE_DIR_VAR, str(fakes / "not" / "there" / "yet"))
    tuning_table.forget()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "could not write the tuning cache" would fail here
        tuning_table.record_kernel_config(CPU, "module.kernel", (1,), {"kwargs": {}, "num_warps": 4, "num_stages": 2})
    assert tuning_table.table_path(CPU).exists()
