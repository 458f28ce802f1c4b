"""Per-op microbenchmarks: every op at its real shapes, forward / backward / forward+backward, on
every provider a user could pick: eager PyTorch, torch.compile of it, and each simmim_fast backend.

A provider whose backend reports reasons against the inputs is recorded as skipped with them; one
that raises is recorded as an error. Neither stops the run.
"""
from __future__ import annotations

import inspect
import math
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch

from simmim_fast import ops, reference
from simmim_fast.backends import registry
from simmim_fast.dispatch import use_backend

from .kernel_cases import MODES, Case, all_cases, nbytes, traffic
from .report import error_reason
from .timing import TimingPlan, benchmark, peak_memory_bytes

PROVIDERS = ("reference", "compile", "triton", "cuda", "sdpa", "xformers")
BASELINES = ("reference", "compile")  # what users run without simmim_fast; every other is a backend
# Run order: cheap providers first so the budget, if it runs out, costs only torch.compile results.
RUN_ORDER = ("reference", "triton", "cuda", "sdpa", "xformers", "compile")
MAX_INPUT_SETS = 8


def provider_function(provider: str, op: str) -> Callable[..., object]:
    plain = reference.OPS[op]
    if provider == "reference":
        return plain  # what a user would write: no dispatch, no input checks
    if provider == "compile":
        # Dynamo caches graphs per code object: start each case clean so no case can hit the
        # recompile limit and silently fall back to eager. Static shapes: never the slower
        # dynamic-shape recompile.
        torch._dynamo.reset()
        return torch.compile(plain, dynamic=False)
    public = getattr(ops, op)
    spec = f"{op}={provider}"

    def dispatched(**args):
        with use_backend(spec):
            return public(**args)
    return dispatched


def skip_reasons(provider: str, op: str, args: Dict[str, object]) -> List[str]:
    """The backend's reasons, asked as the dispatch asks: with every argument, defaults filled in."""
    if provider in BASELINES:
        return []
    bound = inspect.signature(reference.OPS[op]).bind(**args)
    bound.apply_defaults()
    return registry()[provider].reasons(op, bound.arguments)


def input_set_count(args: Dict[str, object], l2_bytes: int) -> int:
    """Enough rotated input sets that together they are at least twice the L2 (2 at least)."""
    set_bytes = nbytes(*(value for value in args.values() if isinstance(value, torch.Tensor)))
    return max(2, min(MAX_INPUT_SETS, math.ceil(2 * l2_bytes / max(set_bytes, 1.0))))


def _with_grads(args: Dict[str, object], grad_names: Iterable[str]) -> Dict[str, object]:
    for name in grad_names:
        args[name].requires_grad_(True)
    return args


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.detach().double().abs().max().item()
    return (actual.detach().double() - expected.detach().double()).abs().max().item() / max(scale, 1e-12)


def _measurement_row(case: Case, provider: str, mode: str, dtype: torch.dtype, **fields) -> Dict[str, object]:
    row = dict(op=case.op, case=case.name, provider=provider, mode=mode, dtype=str(dtype).replace("torch.", ""),
               status="ok", reason="")
    row.update(fields)
    return row


def measure_provider(case: Case, provider: str, device: torch.device, dtype: torch.dtype, plan: TimingPlan,
                     l2_bytes: int) -> List[Dict[str, object]]:
    """Rows for every mode of one (case, provider); skip/error rows instead of exceptions."""
    probe = case.build(device, dtype, 0)
    reasons = skip_reasons(provider, case.op, probe)
    if reasons:
        return [_measurement_row(case, provider, mode, dtype, status="skipped", reason="; ".join(reasons))
                for mode in MODES]
    sets = [_with_grads(case.build(device, dtype, seed), case.grad_names)
            for seed in range(input_set_count(probe, l2_bytes))]
    del probe
    function = provider_function(provider, case.op)

    def clear_grads(i: int) -> None:
        for name in case.grad_names:
            sets[i % len(sets)][name].grad = None

    started = time.perf_counter()
    outputs = [function(**args) for args in sets]  # first call compiles for "compile"; not timed
    grad_outputs = [torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out) for out in outputs]
    backward_error = ""
    try:
        outputs[0].backward(grad_outputs[0], retain_graph=True)  # compiles the backward too
    except Exception as error:  # the forward's numbers still stand
        backward_error = error_reason(error)
    first_call_s = time.perf_counter() - started
    with torch.no_grad():
        error = _relative_error(outputs[0], reference.OPS[case.op](**sets[0]))

    calls = {
        "forward": [lambda args=args: function(**args) for args in sets],
        "backward": [lambda out=out, grad=grad: out.backward(grad, retain_graph=True)
                     for out, grad in zip(outputs, grad_outputs)],
        "forward+backward": [lambda args=args, grad=grad: function(**args).backward(grad)
                             for args, grad in zip(sets, grad_outputs)],
    }
    rows = []
    for mode in MODES:
        if backward_error and mode != "forward":
            rows.append(_measurement_row(case, provider, mode, dtype, status="error", reason=backward_error))
            continue
        try:
            timing = benchmark(calls[mode], device, plan, before_each=clear_grads, l2_bytes=l2_bytes)
            clear_grads(0)
            peak = peak_memory_bytes(device, calls[mode][0])
        except Exception as failure:
            rows.append(_measurement_row(case, provider, mode, dtype, status="error", reason=error_reason(failure)))
            continue
        moved, flops = traffic(case.op, sets[0], mode)
        seconds = timing.median_ms * 1e-3
        rows.append(_measurement_row(
            case, provider, mode, dtype, median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
            reps=timing.reps, host_ms_per_call=timing.host_ms, input_sets=len(sets),
            peak_mem_mb=None if peak is None else peak / 2 ** 20,
            bytes=moved, flops=flops, gbps=moved / seconds / 1e9, tflops=flops / seconds / 1e12 if flops else None,
            max_rel_error_vs_reference=error, first_call_s=first_call_s))
    return rows


def _log_row(row: Dict[str, object], logged_reasons: set, log: Callable[[str], None]) -> None:
    """Every measurement; each distinct skip or error reason of a provider only once."""
    if row["status"] == "ok":
        rate = f"{row['gbps']:8.1f} GB/s" + (f"  {row['tflops']:7.2f} TFLOP/s" if row["tflops"] is not None else "")
        log(f"  {row['op']:<20} {row['case']:<36} {row['provider']:<9} {row['mode']:<16} {row['median_ms']:9.4f} ms"
            f"  {rate}")
    elif (row["provider"], row["reason"]) not in logged_reasons:
        logged_reasons.add((row["provider"], row["reason"]))
        log(f"  {row['provider']} {row['status']} ({row['op']}, and wherever else the same): {row['reason']}")


def run_kernel_suite(device: torch.device, dtype: torch.dtype, plan: TimingPlan, l2_bytes: int, smoke: bool,
                     providers: Iterable[str], op_names: Optional[Iterable[str]], deadline: float,
                     after_each: Callable[[List[Dict[str, object]]], None] = lambda rows: None,
                     log: Callable[[str], None] = print) -> List[Dict[str, object]]:
    """Every (case, provider) in RUN_ORDER; ``after_each(rows so far)`` runs after each of them."""
    cases = [case for case in all_cases(smoke) if op_names is None or case.op in set(op_names)]
    chosen = set(providers)
    rows: List[Dict[str, object]] = []
    logged_reasons: set = set()
    for provider in (name for name in RUN_ORDER if name in chosen):
        for case in cases:
            if provider not in BASELINES and case.op not in registry()[provider].ops:
                continue  # e.g. sdpa for the loss: not a candidate, not a skip
            if time.monotonic() > deadline:
                rows += [_measurement_row(case, provider, mode, dtype, status="skipped",
                                          reason="kernel suite time budget spent") for mode in MODES]
                continue
            try:
                new_rows = measure_provider(case, provider, device, dtype, plan, l2_bytes)
            except Exception as error:  # record, never crash the run (a bad kernel must not hide the rest)
                new_rows = [_measurement_row(case, provider, mode, dtype, status="error", reason=error_reason(error))
                            for mode in MODES]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for row in new_rows:
                _log_row(row, logged_reasons, log)
            rows += new_rows
            after_each(rows)
    return rows
