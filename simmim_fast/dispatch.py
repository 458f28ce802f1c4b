"""The one place that picks a backend for each op call, and says why others were not taken.

Auto mode considers the backends of ``AUTO_ORDER[device type]`` that have no reasons against the
inputs. When several can take the call it uses the one measured fastest at the call's signature
(``simmim_fast.tuning_table``, filled by ``simmim_fast.tune``); a first eager call at a new signature
on CUDA is measured then and there (``simmim_fast.tuning``; ``SIMMIM_FAST_TUNE=0`` turns that off).
Without a measurement (and always while torch.compile traces, where nothing is timed) it takes the
first of them in ``AUTO_ORDER``: PyTorch's own ops. A forced choice comes from ``use_backend(...)``
(a context manager, innermost wins) or else from the environment variable ``SIMMIM_FAST_BACKEND``:

- ``SIMMIM_FAST_BACKEND=triton``: every op that triton implements must run on triton (an error
  listing the reasons if it cannot); ops it does not implement at all stay on auto.
- ``SIMMIM_FAST_BACKEND=attention=sdpa,masked_l1_loss=cuda``: per-op choices; other ops auto.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from . import tuning_table
from .backends import ALL_OPS, Backend, device_types, registry, tensors_of

ENV_VAR = "SIMMIM_FAST_BACKEND"

# The backends auto mode may use per device type. The first that can take a call is the choice
# without a measurement: on CUDA PyTorch's (SDPA for the attention ops, the reference composition
# for the rest), as our kernels win only where the tuner has measured them winning.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("sdpa", "reference", "triton", "cuda", "xformers"),
    "xla": ("xla", "reference"),
    "cpu": ("reference",),
}
DEFAULT_ORDER = ("reference",)

_local = threading.local()
# Callbacks that see every op call (the tuner's recording forward); a plain list so Dynamo reads it.
_recorders: List[Callable[[str, Dict[str, object]], None]] = []
# What measures an unmeasured signature at its first eager call: simmim_fast.tuning.tune_lazily, which
# registers itself (tuning imports this module, never the reverse). It returns a backend name, or None
# for the untuned default.
_lazy_tuner: List[Callable[[str, Dict[str, object]], Optional[str]]] = []


def set_lazy_tuner(tuner: Callable[[str, Dict[str, object]], Optional[str]]) -> None:
    _lazy_tuner[:] = [tuner]


class BackendError(RuntimeError):
    """A forced backend cannot run an op; the message lists every reason."""


def parse_spec(spec: Optional[str]) -> Tuple[Optional[str], Dict[str, str]]:
    """'triton' -> ('triton', {}); 'attention=sdpa,masked_l1_loss=cuda' -> (None, {...})."""
    if not spec or spec.strip() in ("", "auto"):
        return None, {}
    spec = spec.strip()
    known = registry()
    if "=" not in spec:
        if spec not in known:
            raise BackendError(f"unknown backend {spec!r} in {ENV_VAR}; known: {', '.join(known)} (or 'auto')")
        return spec, {}
    per_op = {}
    for item in spec.split(","):
        op, _, name = (part.strip() for part in item.partition("="))
        if op not in ALL_OPS:
            raise BackendError(f"unknown op {op!r} in backend spec {spec!r}; ops: {', '.join(ALL_OPS)}")
        if name not in known:
            raise BackendError(f"unknown backend {name!r} for {op}; known: {', '.join(known)}")
        per_op[op] = name
    return None, per_op


def _active_spec() -> Optional[str]:
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return os.environ.get(ENV_VAR)


@contextlib.contextmanager
def use_backend(spec: Optional[str]) -> Iterator[None]:
    """Force a backend (same syntax as SIMMIM_FAST_BACKEND) inside a ``with`` block; None/'auto' = auto."""
    parse_spec(spec)  # fail on a typo at the ``with``, not at the first op
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(spec or "auto")
    try:
        yield
    finally:
        stack.pop()


def forced_backend_name(op: str) -> Optional[str]:
    whole, per_op = parse_spec(_active_spec())
    if op in per_op:
        return per_op[op]
    if whole is not None and op in registry()[whole].ops:
        return whole
    return None


def auto_candidates(args: Mapping[str, object]) -> Tuple[str, ...]:
    devices = device_types(args)
    device = next(iter(devices)) if len(devices) == 1 else "mixed"
    return AUTO_ORDER.get(device, DEFAULT_ORDER)


def explain(op: str, args: Mapping[str, object]) -> List[Tuple[str, List[str]]]:
    """(backend, reasons against it) for every backend, in auto order first."""
    known = registry()
    order = list(auto_candidates(args)) + [name for name in known if name not in auto_candidates(args)]
    return [(name, known[name].reasons(op, args)) for name in order]


def usable(op: str, args: Mapping[str, object]) -> List[str]:
    """The auto-mode backends that can run ``op`` on ``args``, in ``AUTO_ORDER``."""
    known = registry()
    return [name for name in auto_candidates(args) if not known[name].reasons(op, args)]


def select(op: str, args: Mapping[str, object]) -> Backend:
    known = registry()
    forced = forced_backend_name(op)
    if forced is not None:
        reasons = known[forced].reasons(op, args)
        if reasons:
            raise BackendError(f"backend {forced!r} was forced for {op} but cannot run it: " + "; ".join(reasons))
        return known[forced]
    names = usable(op, args)
    if not names:
        details = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in explain(op, args))
        raise BackendError(f"no backend can run {op} on these inputs ({details})")
    if len(names) > 1:
        measured = tuning_table.measured_choice(op, args)
        if measured in names:
            return known[measured]
        if (measured is None and _lazy_tuner and not torch.compiler.is_compiling() and not _recorders
                and tuning_table.lazy_tuning_enabled(tensors_of(args)[0].device.type)):
            return known[_lazy_tuner[0](op, dict(args)) or names[0]]
    return known[names[0]]


@contextlib.contextmanager
def recording(callback: Callable[[str, Dict[str, object]], None]) -> Iterator[None]:
    """``callback(op, args)`` sees every op call inside the block (no lazy tuning meanwhile)."""
    _recorders.append(callback)
    try:
        yield
    finally:
        _recorders.remove(callback)


def call(op: str, args: Dict[str, object]) -> Any:
    if _recorders:
        _recorders[-1](op, args)
    return select(op, args).implementation(op)(**args)
