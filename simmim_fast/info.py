"""``python -m simmim_fast.info``: versions, devices, backends, which backend each op would use, and the
measured choices of the tuning table."""
from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Dict, List, Tuple

import torch

from . import dispatch, tuning_table
from .backends import ALL_OPS, registry

OPTIONAL_PACKAGES = ("triton", "xformers", "apex", "torch_xla", "numpy", "nvidia-ml-py")
# Swin V2 fine-tunes with windows of 16-24: 24x24 = 576 tokens, on the flash kernels in Triton.
LARGE_WINDOW = 24


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def sample_inputs(op: str, device: str, dtype: torch.dtype, tokens: int = 16) -> Dict[str, object]:
    """Tiny, valid inputs for ``op`` (meta-free: real tensors so the reasons see real devices); ``tokens``:
    the attention ops' sequence (window) length."""
    def t(*shape):
        return torch.zeros(shape, device=device, dtype=dtype)

    mask = torch.zeros(1, 2, 2, device=device, dtype=torch.long)
    if op == "mask_token_blend":
        return dict(tokens=t(1, 4, 32), mask=mask, mask_token=t(1, 1, 32))
    if op == "masked_patch_embed":
        return dict(image=t(1, 3, 16, 16), mask=mask, weight=t(32, 3, 8, 8), bias=t(32), mask_token=t(1, 1, 32),
                    pos_embed=None, norm_weight=None, norm_bias=None, norm_eps=1e-5)
    if op in ("attention", "window_attention"):
        q = t(2, 2, tokens, 32)
        return dict(q=q, k=q, v=q, bias=t(2, tokens, tokens), **({"window_mask": None} if op == "window_attention" else {}),
                    scale=None, dropout_p=0.0)
    if op == "masked_l1_loss":
        return dict(reconstruction=t(1, 3, 16, 16), target=t(1, 3, 16, 16), mask=mask, patch_size=8, in_chans=3,
                    shuffle_stride=1)
    if op == "masked_decoder_loss":
        return dict(features=t(1, 32, 1, 1), mask=mask, weight=t(768, 32, 1, 1), bias=t(768),
                    target=t(1, 3, 16, 16), encoder_stride=16, patch_size=8, in_chans=3)
    raise KeyError(op)


def choice(op: str, args: Dict[str, object]) -> Tuple[str, List[Tuple[str, List[str]]]]:
    """(chosen backend or error, [(backend, reasons)]) for one call."""
    try:
        with tuning_table.lazy_tuning_paused():  # sample shapes: ask, never measure
            chosen = dispatch.select(op, args).name
    except dispatch.BackendError as error:
        chosen = f"ERROR: {error}"
    return chosen, dispatch.explain(op, args)


def choices(device: str, dtype: torch.dtype) -> List[Tuple[str, str, List[Tuple[str, List[str]]]]]:
    """(op, chosen backend or error, [(backend, reasons)]) for every op on ``device``."""
    return [(op, *choice(op, sample_inputs(op, device, dtype))) for op in ALL_OPS]


def choice_lines(label: str, op: str, chosen: str, explained) -> List[str]:
    lines = [f"  {label:<20} {chosen}"]
    for name, reasons in explained:
        if name != chosen and reasons and f"does not implement {op}" not in reasons[0]:
            lines.append(f"  {'':<20}   not {name}: {'; '.join(reasons)}")
    return lines


def tuning_lines(device: torch.device) -> List[str]:
    """The measured choices for ``device`` (its cache file), one line per op signature."""
    path = tuning_table.table_path(device)
    entries = tuning_table.table(device)
    lines = [f"tuned choices on {device} ({path}{'' if path.exists() else ', not written yet'}):"]
    if not entries:
        lines.append("  none: auto takes the first backend of AUTO_ORDER that can run each op "
                     f"({', '.join(dispatch.AUTO_ORDER.get(device.type, dispatch.DEFAULT_ORDER))})")
    for sig, entry in entries.items():
        if sig[0] == tuning_table.KERNEL_CONFIG:
            lines.append(f"  kernel {sig[1]} at {sig[2]}: {entry['config']}")
            continue
        times = ", ".join(f"{name} {ms:.3g} ms" for name, ms in sorted(entry["times_ms"].items(), key=lambda i: i[1]))
        failed = "".join(f"; {name} failed" for name in entry["failures"])
        choice = entry["backend"] or f"default (tuning failed: {entry.get('failed', '?')})"
        lines.append(f"  {sig[0]:<20} -> {choice:<10} {times}{failed}")
        lines.append(f"  {'':<20}    at {tuning_table.describe(sig)}")
    return lines


def report() -> str:
    lines = [
        f"simmim_fast {importlib.metadata.version('simmim_fast') if _installed() else '(not installed)'}",
        f"python {platform.python_version()} on {platform.machine()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
    ]
    lines += [f"{name} {package_version(name)}" for name in OPTIONAL_PACKAGES]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"cuda:{index} {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("CUDA device: none")
    lines.append(f"{dispatch.ENV_VAR}={os.environ.get(dispatch.ENV_VAR, '(unset: auto)')}"
                 f"  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    lines.append(f"{tuning_table.TUNE_VAR}={os.environ.get(tuning_table.TUNE_VAR, '(unset: 1)')}"
                 f"  {tuning_table.TUNE_DIR_VAR}={os.environ.get(tuning_table.TUNE_DIR_VAR, '(unset)')}"
                 f"  tuning cache: {tuning_table.cache_dir()}")
    lines.append("")
    lines.append("backends:")
    for name, backend in registry().items():
        missing = backend.unavailable_reasons()
        status = "available" if not missing else "unavailable: " + "; ".join(missing)
        lines.append(f"  {name:<10} {status}")
        lines.append(f"  {'':<10} {backend.description}; ops: {', '.join(backend.ops)}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        lines.append("")
        lines.append(f"op -> backend on {device} ({str(dtype).replace('torch.', '')}):")
        for op, chosen, explained in choices(device, dtype):
            lines += choice_lines(op, op, chosen, explained)
        for label, op, args in recipe_cases(device, dtype):
            lines.append(f"  {label}:")
            lines += choice_lines("", op, *choice(op, args))
    for device in ["cpu"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]:
        lines.append("")
        lines.extend(tuning_lines(torch.device(device)))
    return "\n".join(lines)


def recipe_cases(device: str, dtype: torch.dtype):
    """(label, op, inputs): calls of the Swin V2 recipes that some backends refuse, and where they go."""
    tokens = LARGE_WINDOW ** 2
    yield (f"window_attention, windows of {LARGE_WINDOW}x{LARGE_WINDOW} = {tokens} tokens (Swin V2 at fine-tune "
           f"sizes; Triton takes windows above 64 tokens on its flash kernels)", "window_attention",
           sample_inputs("window_attention", device, dtype, tokens))
    yield ("masked_decoder_loss with the normalised target (NORM_TARGET, window 47)", "masked_decoder_loss",
           dict(sample_inputs("masked_decoder_loss", device, dtype), norm_target_patch_size=47))


def _installed() -> bool:
    try:
        importlib.metadata.version("simmim_fast")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
