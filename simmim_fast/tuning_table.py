"""The table of measured backend choices that auto mode reads, and its cache on disk.

An entry says which backend won one op at one *signature*: the op, the device type, the autocast
dtype, every tensor argument's shape, dtype, requires_grad and memory layout, the other arguments'
values, and the settings that change what the same call computes or costs (TF32 for matmuls and cuDNN,
float32 matmul precision, eager or compiled). Entries belong to an *environment* (device name, torch and
triton versions): each environment is one JSON file in the cache folder, so a new GPU or a new
torch/triton starts with an empty table rather than trusting another's measurements.

An entry is a JSON object: ``backend`` (the choice; null when the signature's tuning failed: auto
then takes its untuned default and the signature is never measured again in that environment),
``times_ms``, ``failures`` (backend -> why it was not chosen) and, for a failed signature, ``failed``
(why). Readers ignore keys they do not know. A Triton kernel's launch configuration (tiles, warps,
stages: see simmim_fast/kernels/_autotune.py) is an entry too, at the signature ``(KERNEL_CONFIG,
kernel, key values)`` with ``config``: the one choice every rank and every later run takes.

Cache folder: ``$SIMMIM_FAST_TUNE_DIR``, else ``$XDG_CACHE_HOME/simmim_fast/tuning``, else
``~/.cache/simmim_fast/tuning``. Files are replaced atomically; a corrupt one is ignored with a warning.
``SIMMIM_FAST_TUNE=0`` turns off every automatic measurement (the lazy one of the dispatch and the one
``simmim-fast pretrain`` runs before its first step); a table already on disk is still used.

This module is read by the dispatch at every op call, also while torch.compile traces: ``signature``
builds plain tuples, and ``measured_choices`` runs outside the trace (its result is a constant of the
graph), so no file is read and nothing breaks the graph.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import inspect
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Tuple

import torch

from . import reference
from ._tracing import constant_while_tracing

TUNE_DIR_VAR = "SIMMIM_FAST_TUNE_DIR"
TUNE_VAR = "SIMMIM_FAST_TUNE"
FILE_FORMAT = 2  # 2: settings and memory layouts in the signature, failed signatures recorded
# Device types whose first eager call at a new signature is measured (the dispatch's lazy tuning).
LAZY_DEVICE_TYPES: Tuple[str, ...] = ("cuda",)

# The reference's parameter order: a signature lists arguments in it whatever order the caller used.
PARAMETER_NAMES = {op: tuple(inspect.signature(function).parameters) for op, function in reference.OPS.items()}

Signature = tuple
Entry = Dict[str, object]  # {"backend": name | None, "times_ms": {name: ms}, "failures": {name: why}, ...}
# What lookup() answers for a signature whose tuning failed: no backend name, so auto takes its default.
UNTUNABLE = "(tuning failed: default)"
KERNEL_CONFIG = "kernel config"  # sig[0] of a kernel's launch configuration (no op has this name)

_tables: Dict[Path, Dict[Signature, Entry]] = {}  # file -> its entries, read on first use
_device_names: Dict[Tuple[str, Optional[int]], str] = {}
_lazy_state = {"frozen": False, "paused": 0}
# kernel_config's answers: kernels ask at every launch, and table() costs ~30 us. Emptied whenever a table changes.
_kernel_configs: Dict[tuple, Optional[dict]] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@constant_while_tracing
def math_settings() -> Tuple[Tuple[str, object], ...]:
    """The process settings that change an op's float32 matmuls and convolutions (TF32 or not), hence
    its numerics and its speed: a table measured with TF32 on is not reused with it off."""
    return (("matmul_tf32", bool(torch.backends.cuda.matmul.allow_tf32)),
            ("cudnn_tf32", bool(torch.backends.cudnn.allow_tf32)),
            ("float32_matmul_precision", torch.get_float32_matmul_precision()))


def layout(tensor: torch.Tensor) -> str:
    """'' for a contiguous tensor, 'channels_last' for one, else its strides: kernels read each
    differently (a view of a fused qkv buffer is not a contiguous q)."""
    if tensor.is_contiguous():
        return ""
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strides " + "x".join(map(str, tensor.stride()))


def signature(op: str, args: Mapping[str, object], compiled: Optional[bool] = None) -> Signature:
    """(op, device type, autocast dtype or '', ((name, shape, dtype, requires_grad, layout) | (name, value), ...),
    (("compiled", bool), *math_settings())).

    ``compiled`` (default: whether torch.compile is tracing now): a compiled model's table is measured
    against torch.compile's version of the reference, an eager model's against eager PyTorch.
    Plain tuples of constants, built the same way in eager code and while torch.compile traces."""
    device_type = next(value for value in args.values() if isinstance(value, torch.Tensor)).device.type
    autocast = _dtype_name(torch.get_autocast_dtype(device_type)) if torch.is_autocast_enabled(device_type) else ""
    described = []
    for name in PARAMETER_NAMES[op]:
        value = args.get(name)
        if isinstance(value, torch.Tensor):
            described.append((name, tuple(value.shape), _dtype_name(value.dtype), value.requires_grad, layout(value)))
        else:
            described.append((name, value))
    compiled = torch.compiler.is_compiling() if compiled is None else compiled
    return (op, device_type, autocast, tuple(described), (("compiled", bool(compiled)), *math_settings()))


def describe(sig: Signature) -> str:
    """A signature as one short line: 'q 64x12x197x64 float32 grad, ..., scale=None; cuda, autocast bfloat16,
    eager, matmul_tf32=False, ...'."""
    op, device_type, autocast, described, settings = sig
    parts = []
    for item in described:
        if len(item) == 5:
            name, shape, dtype, requires_grad, tensor_layout = item
            parts.append(f"{name} {'x'.join(map(str, shape))} {dtype}{' grad' if requires_grad else ''}"
                         f"{' ' + tensor_layout if tensor_layout else ''}")
        elif item[1] is not None:
            parts.append(f"{item[0]}={item[1]}")
    named = dict(settings)
    rest = "".join(f", {key}={value}" for key, value in settings if key != "compiled")
    return (f"{', '.join(parts)}; {device_type}, autocast {autocast or 'off'}, "
            f"{'compiled' if named['compiled'] else 'eager'}{rest}")


def cache_dir() -> Path:
    if os.environ.get(TUNE_DIR_VAR):
        return Path(os.environ[TUNE_DIR_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "simmim_fast" / "tuning"


def device_name(device_type: str, index: Optional[int]) -> str:
    key = (device_type, index)
    if key not in _device_names:
        if device_type == "cuda":
            _device_names[key] = torch.cuda.get_device_name(index)
        else:
            _device_names[key] = device_type
    return _device_names[key]


@functools.lru_cache(maxsize=None)  # a metadata lookup takes ~0.3 ms, and kernels ask at every launch
def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def environment(device: torch.device) -> Dict[str, str]:
    """What a measurement is only valid for: the device's name and the torch and triton versions."""
    return {"device": device_name(device.type, device.index), "torch": torch.__version__,
            "triton": _version("triton")}


def table_path(device: torch.device) -> Path:
    env = environment(device)
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{env['device']}-torch{env['torch']}-triton{env['triton']}")
    return cache_dir() / f"{slug}.json"


def _as_tuples(value):
    """JSON lists back to the tuples that signatures are made of."""
    return tuple(_as_tuples(item) for item in value) if isinstance(value, list) else value


def read_file(path: Path, expected_environment: Mapping[str, str]) -> Dict[Signature, Entry]:
    """The entries of one cache file; {} when it is missing, and when it is corrupt or for another
    environment (with a warning: it is ignored, and replaced at the next save)."""
    if not path.exists():
        return {}
    try:
        content = json.loads(path.read_text())
        if content.get("format") != FILE_FORMAT or content.get("environment") != dict(expected_environment):
            raise ValueError(f"format {content.get('format')} for {content.get('environment')}, expected format "
                             f"{FILE_FORMAT} for {dict(expected_environment)}")
        return {_as_tuples(row["signature"]): row["entry"] for row in content["entries"]}
    except Exception as error:  # any malformed content: the table is a cache, never a reason to fail
        warnings.warn(f"ignoring the tuning cache {path}: {type(error).__name__}: {error}", stacklevel=2)
        return {}


def write_file(path: Path, env: Mapping[str, str], entries: Mapping[Signature, Entry]) -> None:
    """Atomic: a temporary file in the same folder, then renamed over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ",\n".join(json.dumps({"signature": sig, "entry": entry}) for sig, entry in entries.items())
    text = f'{{"format": {FILE_FORMAT}, "environment": {json.dumps(dict(env))}, "entries": [\n{rows}\n]}}\n'
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)  # one entry per line: readable, and diffable
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def table(device: torch.device) -> Dict[Signature, Entry]:
    """The in-memory table of ``device``'s environment, read from the cache on first use."""
    path = table_path(device)
    if path not in _tables:
        _tables[path] = read_file(path, environment(device))
    return _tables[path]


@constant_while_tracing
def measured_choices(op: str, device_type: str, index: Optional[int]) -> Tuple[Tuple[Signature, str], ...]:
    """(signature, backend) of every measured ``op`` on that device; a constant while torch.compile traces."""
    entries = table(torch.device(device_type, index))
    return tuple((sig, entry["backend"] or UNTUNABLE) for sig, entry in entries.items() if sig[0] == op)


def lookup(device: torch.device, sig: Signature) -> Optional[str]:
    """The backend measured fastest at exactly this signature on ``device``, UNTUNABLE where its tuning
    failed, or None where it was never measured."""
    for measured, backend in measured_choices(sig[0], device.type, device.index):
        if measured == sig:  # compared, not hashed: under torch.compile the shapes may be symbolic
            return backend
    return None


def measured_choice(op: str, args: Mapping[str, object]) -> Optional[str]:
    device = next(value for value in args.values() if isinstance(value, torch.Tensor)).device
    return lookup(device, signature(op, args))


def record(device: torch.device, sig: Signature, entry: Entry, save: bool = True) -> None:
    """Add an entry to the table and, with ``save``, to the cache file (merged with what other processes
    wrote meanwhile). A cache that cannot be written is reported once per path; the table still holds it."""
    entries = table(device)
    entries[sig] = entry
    _kernel_configs.clear()
    if not save:
        return
    path, env = table_path(device), environment(device)
    try:
        on_disk = read_file(path, env)
        on_disk[sig] = entry
        write_file(path, env, on_disk)
        entries.update(on_disk)
    except OSError as error:
        warnings.warn(f"could not write the tuning cache {path} ({error}); the choice holds for this process only",
                      stacklevel=2)


def kernel_config(device: torch.device, kernel: str, key: tuple) -> Optional[dict]:
    """The launch configuration recorded for ``kernel`` at ``key`` (the autotuner's key values), or None."""
    known = (device.type, device.index, kernel, key)
    if known not in _kernel_configs:
        entry = table(device).get((KERNEL_CONFIG, kernel, key))
        _kernel_configs[known] = entry["config"] if entry is not None else None
    return _kernel_configs[known]


def record_kernel_config(device: torch.device, kernel: str, key: tuple, config: dict) -> None:
    record(device, (KERNEL_CONFIG, kernel, key), {"config": config})


def export(device: torch.device) -> Dict[Signature, Entry]:
    return dict(table(device))


def install(device: torch.device, entries: Mapping[Signature, Entry]) -> None:
    """Replace ``device``'s table in this process (not on disk): how ranks take rank 0's choices."""
    _tables[table_path(device)] = dict(entries)
    _kernel_configs.clear()


def forget() -> None:
    """Drop the in-memory tables (they are read again from the cache folder at next use)."""
    _tables.clear()
    _kernel_configs.clear()


def tuning_enabled() -> bool:
    """Automatic measurements are allowed (``SIMMIM_FAST_TUNE`` is not 0)."""
    return os.environ.get(TUNE_VAR, "1").strip() != "0"


def lazy_tuning_enabled(device_type: str) -> bool:
    return (device_type in LAZY_DEVICE_TYPES and not _lazy_state["frozen"] and not _lazy_state["paused"]
            and tuning_enabled())


def freeze() -> None:
    """No more lazy tuning in this process, nor kernel autotuning: ranks that share rank 0's table must
    not each measure on their own, or they could pick different kernels or configs for a new shape."""
    _lazy_state["frozen"] = True


def frozen() -> bool:
    return _lazy_state["frozen"]


@contextlib.contextmanager
def lazy_tuning_paused() -> Iterator[None]:
    """No lazy tuning inside the block (``python -m simmim_fast.info`` asks the dispatch at toy shapes)."""
    _lazy_state["paused"] += 1
    try:
        yield
    finally:
        _lazy_state["paused"] -= 1


def log(message: str) -> None:
    print(f"simmim_fast: {message}", file=sys.stderr, flush=True)
