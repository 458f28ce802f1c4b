"""Backends: each implements some of the ops and says why it cannot take given inputs.

A backend's implementation of op X has exactly the signature of ``simmim_fast.reference.X``.
``unavailable_reasons()`` covers the whole backend (package missing, extension not built);
``not_supported_reasons(op, args)`` the given inputs (device, dtype, sizes). An empty list means yes.
Backends import their optional packages lazily, inside these methods, never at import time.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Mapping, Sequence

import torch

from .._tracing import constant_while_tracing

ALL_OPS = (
    "mask_token_blend",
    "masked_patch_embed",
    "attention",
    "window_attention",
    "masked_l1_loss",
    "masked_decoder_loss",
)


_IMPORT_ERRORS: Dict[str, str] = {}  # a plain dict, not lru_cache: Dynamo reads it as a constant when compiling


@constant_while_tracing  # importlib cannot be traced: under torch.compile the probe runs eagerly
def import_error(module: str) -> str:
    """'' when ``module`` imports, else why not (a broken install may raise anything, not only ImportError)."""
    if module not in _IMPORT_ERRORS:
        try:
            importlib.import_module(module)
            _IMPORT_ERRORS[module] = ""
        except Exception as error:
            _IMPORT_ERRORS[module] = f"{module} is not importable ({type(error).__name__}: {error})"
    return _IMPORT_ERRORS[module]


def tensors_of(args: Mapping[str, object]) -> List[torch.Tensor]:
    return [value for value in args.values() if isinstance(value, torch.Tensor)]


def device_types(args: Mapping[str, object]) -> set:
    return {t.device.type for t in tensors_of(args)}


def floating_dtypes(args: Mapping[str, object]) -> set:
    return {t.dtype for t in tensors_of(args) if t.dtype.is_floating_point}


class Backend:
    """Base class: subclasses set ``name``, ``ops`` and override the two reason methods."""

    name: str = ""
    ops: Sequence[str] = ()
    description: str = ""

    def unavailable_reasons(self) -> List[str]:
        return []

    def not_supported_reasons(self, op: str, args: Mapping[str, object]) -> List[str]:
        return []

    def implementation(self, op: str) -> Callable:
        raise NotImplementedError

    def reasons(self, op: str, args: Mapping[str, object]) -> List[str]:
        """Everything that stops this backend from running ``op`` on ``args``."""
        if op not in self.ops:
            return [f"{self.name} does not implement {op}"]
        missing = self.unavailable_reasons()
        if missing:
            return missing
        return self.not_supported_reasons(op, args)


_registry: Dict[str, Backend] = {}


def registry() -> Dict[str, Backend]:
    """name -> backend, built on first use (a plain global: torch.compile traces it without warnings)."""
    if _registry:
        return _registry
    from .cuda import CudaBackend
    from .reference import ReferenceBackend
    from .sdpa import SdpaBackend
    from .triton import TritonBackend
    from .xformers import XformersBackend
    from .xla import XlaBackend

    for backend in (ReferenceBackend(), TritonBackend(), CudaBackend(), SdpaBackend(), XformersBackend(), XlaBackend()):
        _registry[backend.name] = backend
    return _registry
