"""Measured backend choice: ``simmim_fast.tune(model, images, mask)``.

For every op call of one model forward (recorded by the dispatch, so at the model's real shapes,
dtypes, memory layouts and autocast), every backend that can take it runs the same inputs forward and
backward:

- numerics first, on a slice of the batch (ORACLE_SAMPLES samples, so that the float64 oracle's memory
  stays small whatever the batch): its output and every input gradient are compared with the reference's
  in the same precision and with the reference in float64 without autocast, by the one tolerance table
  (``simmim_fast.tolerances``). A backend that fails, or raises, is never chosen; why is recorded.
- then time, at the full batch and in the regime of training: warm-up calls (which absorb Triton's
  compile and autotuning), then the median over several samples of CALLS_PER_SAMPLE back-to-back
  forward+backward calls between one pair of events on the op's device and stream (the queue is kept
  full, so host launch latency is hidden as it is in a training step); ``time.perf_counter`` off CUDA.
- ``compiled=True`` (``simmim-fast pretrain --compile``): every candidate runs as ``torch.compile`` of
  that op alone, so a kernel is chosen only where it beats what Inductor makes of the reference op.
  Fusion across op boundaries is not counted: the whole-step benchmark stays the arbiter.

The fastest passing backend is recorded in the tuning table (``simmim_fast.tuning_table``: per device
name and torch/triton versions, cached on disk) that auto mode reads. A signature where nothing could be
measured (even the reference failed, e.g. out of memory) is recorded as failed with its reason and is
never measured again in that environment: auto takes its untuned default there. A CUDA error while a
candidate runs (which poisons the process's CUDA context) is recorded the same way, then ends the
process with one line naming the candidate. Tuning stops after ``SIMMIM_FAST_TUNE_BUDGET_S`` seconds
per process (what is left runs on the defaults, and is measured by a later run).

The dispatch calls ``tune_lazily`` for the first eager call at an unmeasured signature on CUDA, and
``simmim-fast pretrain`` calls ``before_training``, where under DDP/FSDP every rank takes rank 0's
table (``use_rank_0_table``, also for your own distributed loop), waiting for it a bounded time.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import torch

from . import _checks, dispatch, reference, tolerances, tuning_table
from .backends import registry, tensors_of

WARMUP_CALLS = 3
TIMED_SAMPLES = 10
CALLS_PER_SAMPLE = 10  # back to back between one pair of events: the GPU never waits for the host
GRAD_OUTPUT_SEED = 0
ORACLE_SAMPLES = 2  # the batch slice the numerics run on (one ViT-B fp64 logits tensor: 3.7 MB per sample)
# The batch-major arguments of each op (sliced for the numerics); the others are shared by the batch.
BATCH_ARGUMENTS = {
    "mask_token_blend": ("tokens", "mask"),
    "masked_patch_embed": ("image", "mask"),
    "attention": ("q", "k", "v"),
    "window_attention": ("q", "k", "v"),
    "masked_l1_loss": ("reconstruction", "target", "mask"),
    "masked_decoder_loss": ("features", "mask", "target"),
}
BUDGET_VAR = "SIMMIM_FAST_TUNE_BUDGET_S"
DEFAULT_BUDGET_S = 300.0
RANK_0_WAIT_MARGIN_S = 120.0  # beyond the budget: the forward that records the calls, the cache write
_spent = {"seconds": 0.0, "reported": False}  # tuning time of this process, against the budget


def budget_s() -> float:
    """Seconds of tuning allowed per process (``SIMMIM_FAST_TUNE_BUDGET_S``, default 300)."""
    text = os.environ.get(BUDGET_VAR, "").strip()
    if not text:
        return DEFAULT_BUDGET_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{BUDGET_VAR} must be a number of seconds >= 0, got {text!r}")
    return value


def _budget_spent() -> bool:
    if _spent["seconds"] < budget_s():
        return False
    if not _spent["reported"]:
        _spent["reported"] = True
        tuning_table.log(f"the tuning budget ({BUDGET_VAR}={budget_s():g} s) is spent: the signatures not "
                         f"measured yet run on their defaults in this process (a later run measures them)")
    return True


class Clock(Protocol):
    """What tune() times with: ``elapsed(start())`` is the seconds between the two calls."""

    def start(self) -> Any: ...

    def elapsed(self, started: Any) -> float: ...


class PerfCounterClock:
    """Host wall time; right for the CPU, where an op's work is done when the call returns."""

    def start(self) -> float:
        return time.perf_counter()

    def elapsed(self, started: float) -> float:
        return time.perf_counter() - started


class CudaEventClock:
    """GPU time between two events on ``device``'s current stream (the one its kernels launch on), in seconds."""

    def __init__(self, device: torch.device):
        self.device = device

    def _record(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start(self) -> torch.cuda.Event:
        return self._record()

    def elapsed(self, started: torch.cuda.Event) -> float:
        finished = self._record()
        finished.synchronize()
        return started.elapsed_time(finished) / 1e3


def clock_for(device: torch.device) -> Clock:
    """The clock that times work on ``device`` (tests replace this to inject timings)."""
    return CudaEventClock(device) if device.type == "cuda" else PerfCounterClock()


def median_seconds(run: Callable[[], object], clock, warmup: int, samples: int, calls_per_sample: int = 1) -> float:
    """Seconds per call: the median over ``samples`` of ``calls_per_sample`` back-to-back calls, after
    ``warmup`` calls."""
    for _ in range(warmup):
        run()
    measured = []
    for _ in range(samples):
        started = clock.start()
        for _ in range(calls_per_sample):
            run()
        measured.append(clock.elapsed(started) / calls_per_sample)
    return statistics.median(measured)


@dataclass
class Call:
    """One op call to measure: its inputs (detached), which need gradients, its autocast dtype, its
    signature and the backends that can take it, all as they were at the call."""

    op: str
    args: Dict[str, object]
    needs_grad: Tuple[str, ...]
    autocast_dtype: Optional[torch.dtype]
    signature: tuple
    candidates: List[str]

    @classmethod
    def capture(cls, op: str, args: Dict[str, object], compiled: bool = False) -> "Call":
        device_type = tensors_of(args)[0].device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        needs_grad = tuple(name for name, value in args.items() if isinstance(value, torch.Tensor) and value.requires_grad)
        detached = {name: value.detach() if isinstance(value, torch.Tensor) else value for name, value in args.items()}
        return cls(op, detached, needs_grad, autocast, tuning_table.signature(op, args, compiled),
                   dispatch.usable(op, args))

    @property
    def device(self) -> torch.device:
        return tensors_of(self.args)[0].device

    @property
    def compiled(self) -> bool:
        return dict(self.signature[4])["compiled"]

    @property
    def precision(self) -> torch.dtype:
        """The dtype the op computes in: the autocast dtype, else its least precise floating input."""
        if self.autocast_dtype is not None:
            return self.autocast_dtype
        dtypes = {t.dtype for t in tensors_of(self.args) if t.dtype.is_floating_point}
        return min(dtypes, key=lambda dtype: torch.finfo(dtype).bits) if dtypes else torch.float32

    def batch_slice(self, samples: int = ORACLE_SAMPLES) -> "Call":
        """The same call on its first ``samples`` samples (windows of ``samples`` images for window attention)."""
        rows = samples
        if self.op == "window_attention" and self.args.get("window_mask") is not None:
            rows = samples * self.args["window_mask"].shape[0]
        args = {name: value[:rows] if name in BATCH_ARGUMENTS[self.op] else value for name, value in self.args.items()}
        return replace(self, args=args)

    def autocast(self, enabled: bool = True):
        if enabled and self.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        if self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, enabled=False)
        return contextlib.nullcontext()


def _copy_in_layout(tensor: torch.Tensor) -> torch.Tensor:
    """A copy with ``tensor``'s strides, even where it is a view with gaps (q of a fused qkv buffer):
    the kernels are timed on the memory layout they meet in training."""
    copy = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)
    return copy.copy_(tensor)


class _Runner:
    """Runs one implementation on fresh copies of a call's inputs, forward and (if any input needs it) backward."""

    def __init__(self, implementation: Callable, call: Call, dtype: Optional[torch.dtype] = None,
                 autocast: bool = True):
        self.implementation, self.call, self.autocast = implementation, call, autocast
        self.inputs = {}
        for name, value in call.args.items():
            if isinstance(value, torch.Tensor):
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
                if name in call.needs_grad:
                    value = _copy_in_layout(value).requires_grad_()
            self.inputs[name] = value
        self.leaves = [self.inputs[name] for name in call.needs_grad]
        self.grad_output: Optional[torch.Tensor] = None

    def _forward_backward(self):
        """(output, gradients or None) as a training step computes them, nothing more (what is timed)."""
        grad_mode = torch.enable_grad() if self.leaves else torch.no_grad()
        with grad_mode, self.call.autocast(self.autocast):
            out = self.implementation(**self.inputs)
            if not self.leaves or not out.requires_grad:
                return out, None
            if self.grad_output is None:  # the same values for every backend: seeded, drawn in fp32
                generator = torch.Generator(out.device).manual_seed(GRAD_OUTPUT_SEED)
                self.grad_output = torch.randn(out.shape, generator=generator, device=out.device).to(out.dtype)
            return out, torch.autograd.grad(out, self.leaves, self.grad_output, allow_unused=True)

    def timed(self) -> None:
        self._forward_backward()

    def __call__(self) -> Tuple[torch.Tensor, ...]:
        """(output, gradient of each input that needs one)."""
        out, grads = self._forward_backward()
        grads = grads or (None,) * len(self.leaves)
        return (out.detach(), *(torch.zeros_like(leaf) if grad is None else grad for grad, leaf in zip(grads, self.leaves)))


@dataclass
class Outcome:
    """What tuning one signature found: the choice, each passing backend's median time, each failure,
    and when nothing could be chosen, why (``failed``)."""

    op: str
    signature: tuple
    backend: Optional[str]
    seconds: Dict[str, float] = field(default_factory=dict)
    failures: Dict[str, str] = field(default_factory=dict)
    from_cache: bool = False
    failed: str = ""

    def entry(self) -> tuning_table.Entry:
        entry: tuning_table.Entry = {"backend": self.backend, "times_ms": {name: s * 1e3 for name, s in self.seconds.items()},
                                     "failures": self.failures}
        if self.failed:
            entry["failed"] = self.failed
        return entry

    def line(self) -> str:
        times = ", ".join(f"{name} {s * 1e3:.3g} ms" for name, s in sorted(self.seconds.items(), key=lambda i: i[1]))
        failed = "".join(f"; {name} FAILED ({why})" for name, why in self.failures.items())
        return f"{self.op} [{tuning_table.describe(self.signature)}]: {times}{failed} -> {self.backend or 'default'}"


def _numerics_failure(call: Call, fast_results, torch_results, oracle_results) -> str:
    """'' when the output and every gradient are within the tolerance table, else the failing errors."""
    names = ["output"] + [f"grad of {name}" for name in call.needs_grad]
    failed = []
    for name, fast, same_precision, oracle in zip(names, fast_results, torch_results, oracle_results):
        if fast.shape != oracle.shape:
            failed.append(f"{name}: shape {tuple(fast.shape)}, expected {tuple(oracle.shape)}")
            continue
        comparison = tolerances.compare_to_torch_error(fast, same_precision, oracle, name, call.precision)
        if not comparison.ok:
            failed.append(str(comparison))
    return "; ".join(failed)


def describe_error(error: BaseException) -> str:
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"raised {type(error).__name__}: {first_line}"


# How CUDA reports a fault that poisons the context (every later call fails): torch's
# AcceleratorError, or the text of a CUDA or Triton launch error. An out-of-memory error is not one.
_STICKY_ERROR_TEXTS = ("CUDA error", "Triton Error [CUDA]", "illegal memory access", "device-side assert",
                       "unspecified launch failure")


def is_sticky_device_error(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _STICKY_ERROR_TEXTS)


def _release_memory(device: torch.device) -> None:
    """After a failed candidate, outside its ``except`` (whose traceback still held its tensors), so that
    an out-of-memory candidate does not starve the next one."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compile_standalone(implementation: Callable) -> Callable:
    """One op as ``torch.compile`` makes it when it meets it alone (tests replace this)."""
    return torch.compile(implementation, dynamic=False)


def _synchronize(device: torch.device) -> None:
    """So that an asynchronous CUDA error surfaces while the candidate that caused it is the one running."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _oracle_results(call: Call):
    """(float64 reference, same-precision reference) on the batch slice."""
    plain, sliced = reference.OPS[call.op], call.batch_slice()
    return _Runner(plain, sliced, dtype=torch.float64, autocast=False)(), _Runner(plain, sliced)()


def _measure_candidate(call: Call, implementation: Callable, oracle, same_precision, clock, warmup: int,
                       samples: int) -> Tuple[Optional[float], str]:
    """(seconds per call, '') for a candidate that passes the numerics on the batch slice, else (None, why).
    Its tensors die with this frame."""
    if call.compiled:
        implementation = compile_standalone(implementation)
    why = _numerics_failure(call, _Runner(implementation, call.batch_slice())(), same_precision, oracle)
    if why:
        return None, why
    seconds = median_seconds(_Runner(implementation, call).timed, clock, warmup, samples, CALLS_PER_SAMPLE)
    _synchronize(call.device)
    return seconds, ""


def _end_process_on_device_error(call: Call, outcome: Outcome, name: str, error: BaseException) -> None:
    """A fault that poisons the CUDA context: later candidates and training would fail, blamed on the
    wrong code. The signature is recorded as failed (the next run takes the default there), then one line."""
    outcome.failures[name] = describe_error(error)
    outcome.failed = f"CUDA error in {name}"
    tuning_table.record(call.device, call.signature, outcome.entry())
    default = call.candidates[0]
    raise SystemExit(
        f"simmim_fast: CUDA error while tuning {call.op} on the {name!r} backend ({describe_error(error)}); recorded "
        f"as failed in {tuning_table.table_path(call.device)} so the next run takes {default!r} there; to exclude "
        f"{name!r} for {call.op} everywhere, set {dispatch.ENV_VAR}={call.op}={default}")


def measure(call: Call, clock=None, warmup: Optional[int] = None, repeats: Optional[int] = None) -> Outcome:
    """Check then time every backend that can take ``call``; the fastest passing one is the choice
    (None, with ``failed`` saying why, when even the reference cannot run it, e.g. out of memory).
    ``warmup``/``repeats`` default to WARMUP_CALLS/TIMED_SAMPLES, ``clock`` to the device's."""
    clock = clock or clock_for(call.device)
    warmup = WARMUP_CALLS if warmup is None else warmup
    repeats = TIMED_SAMPLES if repeats is None else repeats
    outcome = Outcome(call.op, call.signature, None)
    on_device = torch.cuda.device(call.device) if call.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        try:
            oracle, same_precision = _oracle_results(call)
        except Exception as error:
            if is_sticky_device_error(error):
                _end_process_on_device_error(call, outcome, "reference (the oracle)", error)
            outcome.failures["reference (the oracle)"] = describe_error(error)
        else:
            known = registry()
            for name in call.candidates:
                try:
                    seconds, why = _measure_candidate(call, known[name].implementation(call.op), oracle,
                                                      same_precision, clock, warmup, repeats)
                except Exception as error:  # a backend that cannot run this call (compile error, OOM...) is not chosen
                    if is_sticky_device_error(error):
                        _end_process_on_device_error(call, outcome, name, error)
                    why = describe_error(error)
                if why:
                    outcome.failures[name] = why
                    _release_memory(call.device)
                else:
                    outcome.seconds[name] = seconds
            del oracle, same_precision
    _release_memory(call.device)
    if outcome.seconds:
        outcome.backend = min(outcome.seconds, key=outcome.seconds.get)
    else:
        outcome.failed = "; ".join(f"{name}: {why}" for name, why in outcome.failures.items()) or "no candidate"
    return outcome


def _timed_measure(call: Call, clock=None, warmup=None, repeats=None) -> Outcome:
    """measure(), its time counted against the process's budget, its outcome recorded (failed ones too)."""
    started = time.perf_counter()
    try:
        outcome = measure(call, clock, warmup, repeats)
    finally:
        _spent["seconds"] += time.perf_counter() - started
    tuning_table.record(call.device, call.signature, outcome.entry())
    return outcome


def tune_lazily(op: str, args: Dict[str, object]) -> Optional[str]:
    """The dispatch's first eager call at an unmeasured signature: measure it, record it, log one line.
    The measured backend, or None for the untuned default (tuning failed, or the budget is spent)."""
    if _budget_spent():
        return None
    call = Call.capture(op, args)
    started = time.perf_counter()
    outcome = _timed_measure(call)
    if outcome.backend is None:
        tuning_table.log(f"could not tune {outcome.line()}; recorded as failed: {call.candidates[0]} from now on")
        return None
    tuning_table.log(f"tuned {outcome.line()} in {time.perf_counter() - started:.2f} s "
                     f"({tuning_table.TUNE_VAR}=0 turns this off)")
    return outcome.backend


@dataclass
class TuneReport:
    """What ``tune`` did: one outcome per distinct op signature of the forward, and its cost."""

    outcomes: List[Outcome]
    seconds: float
    path: str

    def summary(self) -> str:
        measured = sum(not o.from_cache for o in self.outcomes)
        choices: Dict[str, Dict[str, int]] = {}
        for outcome in self.outcomes:
            per_op = choices.setdefault(outcome.op, {})
            per_op[outcome.backend] = per_op.get(outcome.backend, 0) + 1
        picked = "; ".join(f"{op} -> " + ", ".join(f"{name or 'untuned'} x{count}" for name, count in per_op.items())
                           for op, per_op in choices.items())
        failed = sum(len(o.failures) for o in self.outcomes if not o.from_cache)
        return (f"{len(self.outcomes)} op shape(s), {measured} measured, {len(self.outcomes) - measured} from the "
                f"cache ({self.path}); {picked or 'nothing to choose'}; {failed} candidate(s) failed; "
                f"{self.seconds:.1f} s")

    def failure_lines(self) -> List[str]:
        return [f"never chosen for {o.op} [{tuning_table.describe(o.signature)}]: {name}: {why}"
                for o in self.outcomes if not o.from_cache for name, why in o.failures.items()]


def record_calls(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor, compiled: bool = False) -> List[Call]:
    """The op calls of one forward of ``model`` (the first per signature), without changing any RNG state."""
    calls: Dict[tuple, Call] = {}

    def keep(op, args):
        sig = tuning_table.signature(op, args, compiled)
        if sig not in calls:
            calls[sig] = Call.capture(op, args, compiled)

    devices = [torch.device(images.device).index or torch.cuda.current_device()] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), dispatch.recording(keep):
        model(images, mask)
    return list(calls.values())


def tune(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor, *, clock: Optional[Clock] = None,
         warmup: Optional[int] = None, repeats: Optional[int] = None, retune: bool = False,
         compiled: bool = False) -> TuneReport:
    """Measure every backend that can take each op of ``model(images, mask)`` at these shapes, dtypes,
    memory layouts and the caller's autocast and TF32 settings, and record the fastest that passes the
    numerics in the tuning table (failed signatures too: they are not measured again).

    Call it as you train (same batch size, autocast and grad mode); ``compiled=True`` when you train
    under torch.compile: the table a compiled model reads is measured against the reference op compiled
    by Inductor (each op alone: fusion across ops is not counted). Signatures already in the table are
    kept unless ``retune``. ``clock`` (``start()`` / ``elapsed(started)`` in seconds) replaces the
    device's clock. Measuring stops when the process's budget (``SIMMIM_FAST_TUNE_BUDGET_S``) is spent.
    """
    _checks.check_timeable(model, images, mask, warmup, repeats)
    started = time.perf_counter()
    outcomes = []
    for call in record_calls(model, images, mask, compiled):
        if len(call.candidates) < 2:
            continue
        cached = None if retune else tuning_table.lookup(call.device, call.signature)
        if cached == tuning_table.UNTUNABLE or cached in call.candidates:
            outcomes.append(Outcome(call.op, call.signature, tuning_table.table(call.device)[call.signature]["backend"],
                                    from_cache=True))
            continue
        if _budget_spent():
            break
        outcomes.append(_timed_measure(call, clock, warmup, repeats))
    return TuneReport(outcomes, time.perf_counter() - started, str(tuning_table.table_path(images.device)))


def wait_for_rank_0(store, key: str, timeout_s: float, rank: int) -> None:
    """Rank ``rank`` waits until rank 0 set ``key`` in the process group's store, at most ``timeout_s``,
    then stops with a message that says why (not the collective's own timeout, which can be 30 minutes)."""
    try:
        store.wait([key], timedelta(seconds=timeout_s))
    except Exception as error:  # the store's timeout error type differs between torch versions
        raise RuntimeError(
            f"rank {rank}: rank 0 did not finish tuning the kernels within {timeout_s:.0f} s ({BUDGET_VAR}="
            f"{budget_s():g} s plus {RANK_0_WAIT_MARGIN_S:g} s); is rank 0 alive? Set {tuning_table.TUNE_VAR}=0 "
            f"to train on the table already on disk, or raise {BUDGET_VAR} ({describe_error(error)})") from error


_shared_tables = {"count": 0}  # use_rank_0_table calls so far: each has its own store key


def use_rank_0_table(device: torch.device) -> None:
    """In a process group (DDP/FSDP), every rank takes rank 0's table for ``device`` and measures
    nothing more, so all ranks run the same kernels. Call it on every rank after rank 0 tuned (before
    FSDP shards the model: ``tune`` runs the model on rank 0 alone). The other ranks wait for rank 0 at
    most the tuning budget plus a margin. A no-op outside a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    _shared_tables["count"] += 1
    key = f"simmim_fast/tuning_table_ready/{_shared_tables['count']}"
    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 0:
        store.set(key, "1")
    else:
        wait_for_rank_0(store, key, budget_s() + RANK_0_WAIT_MARGIN_S, dist.get_rank())
    box = [tuning_table.export(device) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    tuning_table.install(device, box[0])
    tuning_table.freeze()


def before_training(model: torch.nn.Module, runtime, batch_size: int, mask_generator, amp_dtype: Optional[torch.dtype],
                    compiled: bool = False) -> None:
    """``simmim-fast pretrain``'s tune, before the first step and before torch.compile traces
    (``compiled``: the run trains under torch.compile, so its table is measured against Inductor's ops).

    Rank 0 tunes (on CUDA, unless ``SIMMIM_FAST_TUNE=0``) at the run's batch size and autocast with
    synthetic images (no data is consumed, no RNG advanced); then every rank takes rank 0's table.
    """
    device = runtime.device
    if runtime.is_main and device.type in tuning_table.LAZY_DEVICE_TYPES and tuning_table.tuning_enabled():
        generator = torch.Generator(device).manual_seed(0)
        size = mask_generator.input_size
        images = torch.randn(batch_size, 3, size, size, generator=generator, device=device)
        mask = mask_generator.generate(batch_size, generator=generator, device=device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            report = tune(model, images, mask, compiled=compiled)
        print(f"kernel tuning: {report.summary()}", file=sys.stderr)
        for line in report.failure_lines():
            print(f"kernel tuning: {line}", file=sys.stderr)
    use_rank_0_table(device)


dispatch.set_lazy_tuner(tune_lazily)
