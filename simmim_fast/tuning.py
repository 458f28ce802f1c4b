"""Measured backend choice: ``simmim_fast.tune(model, images, mask)``.

For every op call of one model forward (recorded by the dispatch, so at the model's real shapes,
dtypes and autocast), every backend that can take it runs the same inputs forward and backward:

- numerics first: its output and every input gradient are compared with the reference's in the same
  precision and with the reference in float64 without autocast, by the one tolerance table
  (``simmim_fast.tolerances``). A backend that fails, or raises, is never chosen; why is reported.
- then time: warm-up calls (which absorb Triton's compile and autotuning), then the median of
  several forward+backward calls, by CUDA events on a GPU (``time.perf_counter`` elsewhere).

The fastest passing backend is recorded in the tuning table (``simmim_fast.tuning_table``: per device
name and torch/triton versions, cached on disk) that auto mode reads. The dispatch also calls
``tune_lazily`` for the first eager call at an unmeasured signature on CUDA, and ``simmim-fast
pretrain`` calls ``before_training``, where under DDP/FSDP every rank takes rank 0's table
(``use_rank_0_table``, also for your own distributed loop).
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import torch

from . import _checks, dispatch, reference, tolerances, tuning_table
from .backends import registry, tensors_of

WARMUP_CALLS = 3
TIMED_CALLS = 10
GRAD_OUTPUT_SEED = 0


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
    """GPU time between two events on the current stream, in seconds."""

    def start(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed(self, started: torch.cuda.Event) -> float:
        finished = torch.cuda.Event(enable_timing=True)
        finished.record()
        finished.synchronize()
        return started.elapsed_time(finished) / 1e3


def clock_for(device: torch.device) -> Clock:
    """The clock that times work on ``device`` (tests replace this to inject timings)."""
    return CudaEventClock() if device.type == "cuda" else PerfCounterClock()


def median_seconds(run: Callable[[], object], clock, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        started = clock.start()
        run()
        samples.append(clock.elapsed(started))
    return statistics.median(samples)


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
    def capture(cls, op: str, args: Dict[str, object]) -> "Call":
        device_type = tensors_of(args)[0].device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        needs_grad = tuple(name for name, value in args.items() if isinstance(value, torch.Tensor) and value.requires_grad)
        detached = {name: value.detach() if isinstance(value, torch.Tensor) else value for name, value in args.items()}
        return cls(op, detached, needs_grad, autocast, tuning_table.signature(op, args), dispatch.usable(op, args))

    @property
    def device(self) -> torch.device:
        return tensors_of(self.args)[0].device

    @property
    def precision(self) -> torch.dtype:
        """The dtype the op computes in: the autocast dtype, else its least precise floating input."""
        if self.autocast_dtype is not None:
            return self.autocast_dtype
        dtypes = {t.dtype for t in tensors_of(self.args) if t.dtype.is_floating_point}
        return min(dtypes, key=lambda dtype: torch.finfo(dtype).bits) if dtypes else torch.float32

    def autocast(self, enabled: bool = True):
        if enabled and self.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        if self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, enabled=False)
        return contextlib.nullcontext()


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
                    value = value.detach().clone().requires_grad_()
            self.inputs[name] = value
        self.leaves = [self.inputs[name] for name in call.needs_grad]
        self.grad_output: Optional[torch.Tensor] = None

    def __call__(self) -> Tuple[torch.Tensor, ...]:
        """(output, gradient of each input that needs one)."""
        grad_mode = torch.enable_grad() if self.leaves else torch.no_grad()
        with grad_mode, self.call.autocast(self.autocast):
            out = self.implementation(**self.inputs)
            if not self.leaves or not out.requires_grad:
                return (out.detach(), *(torch.zeros_like(leaf) for leaf in self.leaves))
            if self.grad_output is None:  # the same values for every backend: seeded, drawn in fp32
                generator = torch.Generator(out.device).manual_seed(GRAD_OUTPUT_SEED)
                self.grad_output = torch.randn(out.shape, generator=generator, device=out.device).to(out.dtype)
            grads = torch.autograd.grad(out, self.leaves, self.grad_output, allow_unused=True)
        return (out.detach(), *(torch.zeros_like(leaf) if grad is None else grad for grad, leaf in zip(grads, self.leaves)))


@dataclass
class Outcome:
    """What tuning one signature found: the choice, each passing backend's median time, each failure."""

    op: str
    signature: tuple
    backend: Optional[str]
    seconds: Dict[str, float] = field(default_factory=dict)
    failures: Dict[str, str] = field(default_factory=dict)
    from_cache: bool = False

    def entry(self) -> tuning_table.Entry:
        return {"backend": self.backend, "times_ms": {name: s * 1e3 for name, s in self.seconds.items()},
                "failures": self.failures}

    def line(self) -> str:
        times = ", ".join(f"{name} {s * 1e3:.3g} ms" for name, s in sorted(self.seconds.items(), key=lambda i: i[1]))
        failed = "".join(f"; {name} FAILED ({why})" for name, why in self.failures.items())
        return f"{self.op} [{tuning_table.describe(self.signature)}]: {times}{failed} -> {self.backend}"


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


def _raised(error: Exception, device: torch.device) -> str:
    if device.type == "cuda":
        torch.cuda.empty_cache()  # an OOM of one candidate must not starve the next
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"raised {type(error).__name__}: {first_line}"


def measure(call: Call, clock=None, warmup: Optional[int] = None, repeats: Optional[int] = None) -> Outcome:
    """Check then time every backend that can take ``call``; the fastest passing one is the choice
    (None when even the reference cannot run it, e.g. out of memory). ``warmup``/``repeats`` default to
    WARMUP_CALLS/TIMED_CALLS, ``clock`` to the device's."""
    clock = clock or clock_for(call.device)
    warmup = WARMUP_CALLS if warmup is None else warmup
    repeats = TIMED_CALLS if repeats is None else repeats
    outcome = Outcome(call.op, call.signature, None)
    plain = reference.OPS[call.op]
    try:
        oracle = _Runner(plain, call, dtype=torch.float64, autocast=False)()
        same_precision = _Runner(plain, call)()
    except Exception as error:
        outcome.failures["reference (the oracle)"] = _raised(error, call.device)
        return outcome
    known = registry()
    for name in call.candidates:
        try:
            runner = _Runner(known[name].implementation(call.op), call)
            why = _numerics_failure(call, runner(), same_precision, oracle)
            if why:
                outcome.failures[name] = why
                continue
            outcome.seconds[name] = median_seconds(runner, clock, warmup, repeats)
        except Exception as error:  # a backend that cannot run this call (compile error, OOM...) is not chosen
            outcome.failures[name] = _raised(error, call.device)
    if outcome.seconds:
        outcome.backend = min(outcome.seconds, key=outcome.seconds.get)
    return outcome


def tune_lazily(op: str, args: Dict[str, object]) -> str:
    """The dispatch's first eager call at an unmeasured signature: measure it, record it, log one line."""
    call = Call.capture(op, args)
    started = time.perf_counter()
    outcome = measure(call)
    if outcome.backend is None:  # every backend failed (the reference included): nothing to record
        tuning_table.log(f"could not tune {outcome.line()}; using {call.candidates[0]}")
        return call.candidates[0]
    tuning_table.record(call.device, call.signature, outcome.entry())
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


def record_calls(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor) -> List[Call]:
    """The op calls of one forward of ``model`` (the first per signature), without changing any RNG state."""
    calls: Dict[tuple, Call] = {}

    def keep(op, args):
        sig = tuning_table.signature(op, args)
        if sig not in calls:
            calls[sig] = Call.capture(op, args)

    devices = [torch.device(images.device).index or torch.cuda.current_device()] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), dispatch.recording(keep):
        model(images, mask)
    return list(calls.values())


def tune(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor, *, clock: Optional[Clock] = None,
         warmup: Optional[int] = None, repeats: Optional[int] = None, retune: bool = False) -> TuneReport:
    """Measure every backend that can take each op of ``model(images, mask)`` at these shapes, dtypes and
    the caller's autocast, and record the fastest that passes the numerics in the tuning table.

    Call it as you train (same batch size, autocast and grad mode). Signatures already in the table
    are kept unless ``retune``. ``clock`` (``start()`` / ``elapsed(started)`` in seconds) replaces the
    device's clock.
    """
    _checks.check_timeable(model, images, mask, warmup, repeats)
    started = time.perf_counter()
    outcomes = []
    for call in record_calls(model, images, mask):
        if len(call.candidates) < 2:
            continue
        cached = None if retune else tuning_table.lookup(call.device, call.signature)
        if cached in call.candidates:
            outcomes.append(Outcome(call.op, call.signature, cached, from_cache=True))
            continue
        outcome = measure(call, clock, warmup, repeats)
        if outcome.backend is not None:
            tuning_table.record(call.device, call.signature, outcome.entry())
        outcomes.append(outcome)
    return TuneReport(outcomes, time.perf_counter() - started, str(tuning_table.table_path(images.device)))


def use_rank_0_table(device: torch.device) -> None:
    """In a process group (DDP/FSDP), every rank takes rank 0's table for ``device`` and measures
    nothing more, so all ranks run the same kernels. Call it on every rank after rank 0 tuned (before
    FSDP shards the model: ``tune`` runs the model on rank 0 alone). A no-op outside a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    box = [tuning_table.export(device) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    tuning_table.install(device, box[0])
    tuning_table.freeze()


def before_training(model: torch.nn.Module, runtime, batch_size: int, mask_generator, amp_dtype: Optional[torch.dtype]
                    ) -> None:
    """``simmim-fast pretrain``'s tune, before the first step and before torch.compile traces.

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
            report = tune(model, images, mask)
        print(f"kernel tuning: {report.summary()}", file=sys.stderr)
        for line in report.failure_lines():
            print(f"kernel tuning: {line}", file=sys.stderr)
    use_rank_0_table(device)
