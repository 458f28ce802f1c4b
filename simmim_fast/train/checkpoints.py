"""Training checkpoints in the original layout ({'model', 'optimizer', 'lr_scheduler', 'epoch',
'config', ...}) plus what a bit-exact resume needs: scaler, step, data position and every RNG."""
from __future__ import annotations

import random
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from ..checkpoint import CheckpointReadError, load_checkpoint, save_atomic

CHECKPOINT_FORMAT = "simmim_fast.pretrain/1"
CHECKPOINT_PATTERN = re.compile(r"^ckpt_step_(\d+)\.pth$")
PARTIAL_WRITE_GLOB = ".ckpt_step_*.pth.*.tmp"  # what a process killed inside save_atomic leaves behind
# Settings a checkpoint cannot be continued with once changed: the model and what its input is.
RESUME_MUST_MATCH = ("MODEL", "DATA.IMG_SIZE", "DATA.MASK_PATCH_SIZE", "DATA.MASK_RATIO")


def checkpoint_path(output: Path, step: int) -> Path:
    return Path(output) / f"ckpt_step_{step:07d}.pth"


def list_checkpoints(output: Path) -> List[Path]:
    """Checkpoints in ``output``, oldest step first."""
    found = [(int(match.group(1)), path) for path in Path(output).glob("ckpt_step_*.pth")
             if (match := CHECKPOINT_PATTERN.match(path.name))]
    return [path for _, path in sorted(found)]


def remove_partial_writes(output: Path) -> List[Path]:
    """Delete the temp files of checkpoint writes that were killed (they are never complete checkpoints)."""
    found = sorted(Path(output).glob(PARTIAL_WRITE_GLOB))
    for partial in found:
        partial.unlink(missing_ok=True)
    return found


def keep_last(output: Path, count: int) -> None:
    if count > 0:
        for stale in list_checkpoints(output)[:-count]:
            stale.unlink(missing_ok=True)


def to_cpu(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, Mapping):
        return {key: to_cpu(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(value) for value in tree)
    return tree


def capture_rng(device: torch.device) -> Dict[str, Any]:
    """This process's RNG states as tensors and plain containers (loadable with weights_only=True)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "xla":
        from . import xla_spmd

        state["xla"] = xla_spmd.rng_state()
    return state


def gathered_rng(device: torch.device, runtime) -> List[Dict[str, Any]]:
    """Every process's RNG states, in rank order (all processes take part)."""
    if not runtime.distributed:
        return [capture_rng(device)]
    states = [None] * runtime.world_size
    torch.distributed.all_gather_object(states, capture_rng(device))
    return [to_cpu(state) for state in states]


def restore_rng(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if device.type == "xla" and "xla" in state:
        from . import xla_spmd

        xla_spmd.restore_rng(state["xla"])


def save_checkpoint(path: Path, state: Dict[str, Any], kind: str = CHECKPOINT_FORMAT) -> Path:
    return save_atomic({"format": kind, **state}, path)


def find_resume_checkpoint(resume: Optional[str], output: Path) -> Optional[Path]:
    """--resume auto: the newest checkpoint in the output folder (None: start fresh); else a path."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(output)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
    return path


def read_resume_checkpoint(resume: Optional[str], output: Path) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """(path, state) to resume from, or (None, None) to start fresh. With ``auto`` an unreadable newest
    checkpoint (a torn copy, a bad disk) is skipped with a warning for the previous one; a --resume path
    that is not a readable checkpoint is an error naming it (continuing from another one would surprise)."""
    if resume != "auto":
        path = find_resume_checkpoint(resume, output)
        return (path, read_checkpoint(path)) if path is not None else (None, None)
    found = list_checkpoints(output)
    for path in reversed(found):
        try:
            return path, read_checkpoint(path)
        except CheckpointReadError as error:
            print(f"warning: skipping {error}; trying the previous checkpoint", file=sys.stderr)
    if found:  # starting over here would mix a new run with the old run's files
        raise ValueError(f"none of the {len(found)} checkpoint(s) in {output} is readable; give another --output "
                         "to start over, or --resume a good copy")
    return None, None


def _flatten(tree: Mapping, prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def config_differences(saved: Mapping, current: Mapping) -> Dict[str, tuple]:
    """{dotted key: (saved, current)} for every setting that differs."""
    old, new = _flatten(saved), _flatten(current)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def check_resumable(checkpoint: Mapping, config: Mapping, path: Path, kind: str = CHECKPOINT_FORMAT) -> Dict[str, tuple]:
    """Raise if the checkpoint's model or input settings differ from ``config``; return the other changes.
    ``kind``: the training checkpoint format expected (pretraining's by default)."""
    if checkpoint.get("format") != kind:
        raise ValueError(f"{path} is not a simmim-fast training checkpoint (no resumable state); "
                         "load its weights with simmim_fast.load_pretrained instead")
    changes = config_differences(checkpoint["config"], config)
    blocking = {key: change for key, change in changes.items()
                if any(key == prefix or key.startswith(prefix + ".") for prefix in RESUME_MUST_MATCH)}
    if blocking:
        listed = "; ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in blocking.items())
        raise ValueError(f"cannot resume from {path}: the config is incompatible ({listed})")
    return changes


def read_checkpoint(path: Path) -> Dict[str, Any]:
    return load_checkpoint(path, map_location="cpu")
