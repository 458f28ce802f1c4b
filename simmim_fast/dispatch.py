"""The one place that picks a backend for each op call, and says why others were not taken.

Auto mode tries the backends of ``AUTO_ORDER[device type]`` in order and takes the first that has
no reasons against the inputs. A forced choice comes from ``use_backend(...)`` (a context manager,
innermost wins) or else from the environment variable ``SIMMIM_FAST_BACKEND``:

- ``SIMMIM_FAST_BACKEND=triton``: every op that triton implements must run on triton (an error
  listing the reasons if it cannot); ops it does not implement at all stay on auto.
- ``SIMMIM_FAST_BACKEND=attention=sdpa,masked_l1_loss=cuda``: per-op choices; other ops auto.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from .backends import ALL_OPS, Backend, device_types, registry

ENV_VAR = "SIMMIM_FAST_BACKEND"

# Preference per device type. Triton leads on CUDA as our kernels are built to win there; the
# benchmarks (benchmarks/) are the evidence, and this table is what to change when they say otherwise.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "sdpa", "xformers", "reference"),
    "xla": ("xla", "reference"),
    "cpu": ("reference",),
}
DEFAULT_ORDER = ("reference",)

_local = threading.local()


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


def select(op: str, args: Mapping[str, object]) -> Backend:
    known = registry()
    forced = forced_backend_name(op)
    if forced is not None:
        reasons = known[forced].reasons(op, args)
        if reasons:
            raise BackendError(f"backend {forced!r} was forced for {op} but cannot run it: " + "; ".join(reasons))
        return known[forced]
    for name in auto_candidates(args):
        if not known[name].reasons(op, args):
            return known[name]
    details = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in explain(op, args))
    raise BackendError(f"no backend can run {op} on these inputs ({details})")


def call(op: str, args: Dict[str, object]) -> Any:
    return select(op, args).implementation(op)(**args)
