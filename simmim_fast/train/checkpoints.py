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

from ..checkpoint import CheckpointReadError, load_checkpoint, fitting_state_dict, save_atomic

CHECKPOINT_FORMAT = "simmim_fast.pretrain/1"
FINETUNE_FORMAT = "simmim_fast.finetune/1"
# Each training checkpoint format: what it is and what to do with it, for a file given to the wrong command.
FORMAT_DESCRIPTIONS = {
    CHECKPOINT_FORMAT: ("a simmim-fast pretraining checkpoint",
                        "continue it with simmim-fast pretrain --resume, fine-tune from it with finetune --pretrained"),
    FINETUNE_FORMAT: ("a simmim-fast fine-tuning checkpoint",
                      "continue it with simmim-fast finetune --resume; eval and export read its weights")}
# The entries each format must hold to be continued.
_COMMON_KEYS = ("model", "optimizer", "lr_scheduler", "scaler", "epoch", "step", "config", "data", "rng",
                "nonfinite_skipped")
RESUMABLE_KEYS = {CHECKPOINT_FORMAT: _COMMON_KEYS + ("unreadable", "history"),
                  FINETUNE_FORMAT: _COMMON_KEYS + ("classes", "evaluations")}
CHECKPOINT_PATTERN = re.compile(r"^ckpt_step_(\d+)\.pth$")
# A checkpoint written after its run went bad (docs/long-runs.md): the name is the mark, so that
# --resume auto and retention tell good from bad without opening a file.
BAD_CHECKPOINT_PATTERN = re.compile(r"^bad_ckpt_step_(\d+)\.pth$")
PARTIAL_WRITE_GLOB = ".*ckpt_step_*.pth.*.tmp"  # what a process killed inside save_atomic leaves behind
# Settings a checkpoint cannot be continued with once changed: the model and what its input is.
RESUME_MUST_MATCH = ("MODEL", "DATA.IMG_SIZE", "DATA.MASK_PATCH_SIZE", "DATA.MASK_RATIO")


def checkpoint_path(output: Path, step: int) -> Path:
    return Path(output) / f"ckpt_step_{step:07d}.pth"


def bad_checkpoint_path(output: Path, step: int) -> Path:
    return Path(output) / f"bad_{checkpoint_path(output, step).name}"


def list_checkpoints(output: Path, bad: bool = False) -> List[Path]:
    """Good checkpoints in ``output`` (or, with ``bad``, those marked bad), oldest step first."""
    pattern = BAD_CHECKPOINT_PATTERN if bad else CHECKPOINT_PATTERN
    found = [(int(match.group(1)), path) for path in Path(output).glob("*ckpt_step_*.pth")
             if (match := pattern.match(path.name))]
    return [path for _, path in sorted(found)]


def mark_bad(path: Path) -> Path:
    """Rename a good checkpoint to its bad name (its weights led to a bad loss)."""
    return Path(path).replace(Path(path).with_name(f"bad_{Path(path).name}"))


def remove_partial_writes(output: Path) -> List[Path]:
    """Delete the temp files of checkpoint writes that were killed (they are never complete checkpoints)."""
    found = sorted(Path(output).glob(PARTIAL_WRITE_GLOB))
    for partial in found:
        partial.unlink(missing_ok=True)
    return found


def keep_last(output: Path, count: int) -> None:
    """Delete all but the newest ``count`` good checkpoints, and all but the newest ``count`` bad ones (0:
    keep all): bad ones never push out a good one, so the last good checkpoint before a divergence stays."""
    if count > 0:
        for bad in (False, True):
            for stale in list_checkpoints(output, bad)[:-count]:
                stale.unlink(missing_ok=True)


def all_finite(*trees: Any) -> bool:
    """Whether every floating-point tensor in ``trees`` (nested dicts/lists, e.g. state dicts) is finite:
    one reduction per device and one host read, so it runs where the tensors are (CUDA, XLA, CPU)."""
    verdicts: Dict[torch.device, List[torch.Tensor]] = {}

    def visit(tree: Any) -> None:
        if isinstance(tree, torch.Tensor):
            if tree.is_floating_point() or tree.is_complex():
                verdicts.setdefault(tree.device, []).append(tree.isfinite().all())
        elif isinstance(tree, Mapping):
            for value in tree.values():
                visit(value)
        elif isinstance(tree, (list, tuple)):
            for value in tree:
                visit(value)

    for tree in trees:
        visit(tree)
    return all(bool(torch.stack(found).all()) for found in verdicts.values())


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


def read_resume_checkpoint(resume: Optional[str], output: Path, kind: str = CHECKPOINT_FORMAT
                           ) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """(path, state) to resume from, or (None, None) to start fresh. ``auto``: the newest good checkpoint
    in ``output`` that reads as a ``kind`` training checkpoint; the unreadable ones after it (a torn
    copy, a bad disk, any cut length) are skipped with a warning, and checkpoints marked bad are never
    chosen. A --resume path that is not a readable ``kind`` checkpoint is an error naming it."""
    if not resume:
        return None, None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
        return path, read_training_checkpoint(path, kind)
    found = list_checkpoints(output)
    for path in reversed(found):
        try:
            return path, read_training_checkpoint(path, kind)
        except CheckpointReadError as error:
            print(f"warning: skipping {error}; trying the previous checkpoint", file=sys.stderr)
    bad = list_checkpoints(output, bad=True)
    if bad:  # continuing a diverged run from its ruined state is never a silent default
        raise ValueError(f"{output} holds no readable good checkpoint, only {len(bad)} written after the run went bad "
                         f"(newest {bad[-1].name}); --resume one of them to continue anyway, or give another --output "
                         "to start over")
    if found:  # starting over here would mix a new run with the old run's files
        raise ValueError(f"none of the {len(found)} checkpoint(s) in {output} is readable; give another --output "
                         "to start over, or --resume a good copy")
    return None, None


def read_training_checkpoint(path: Path, kind: str = CHECKPOINT_FORMAT) -> Dict[str, Any]:
    """A checkpoint that a ``kind`` run can continue: a dict of that format with every entry it needs;
    else a ``CheckpointReadError`` saying what the file is."""
    state = read_checkpoint(path)
    if not isinstance(state, Mapping):
        raise CheckpointReadError(f"{path} holds a {type(state).__name__}, not a training checkpoint")
    found_kind = state.get("format")
    if found_kind != kind:
        expected = FORMAT_DESCRIPTIONS[kind][0]
        if found_kind in FORMAT_DESCRIPTIONS:
            what, use = FORMAT_DESCRIPTIONS[found_kind]
            raise CheckpointReadError(f"{path} is {what}, not {expected}; {use}")
        raise CheckpointReadError(f"{path} is not a simmim-fast training checkpoint (no resumable state, expected "
                                  f"{expected}); load its weights with simmim_fast.load_pretrained, or fine-tune "
                                  "from it with simmim-fast finetune --pretrained")
    missing = [key for key in RESUMABLE_KEYS[kind] if key not in state]
    if missing:
        raise CheckpointReadError(f"{path} lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: "
                                  f"not a complete {FORMAT_DESCRIPTIONS[kind][0]}")
    return dict(state)


def restore_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any],
                           path: Path) -> None:
    """Model and optimizer state from a checkpoint; a mismatch names ``path`` and the first keys that differ."""
    model.load_state_dict(fitting_state_dict(model, state["model"], path))
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as error:
        raise CheckpointReadError(f"{path}: its optimizer state does not fit this run's optimizer "
                                  f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None


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


def check_resumable(checkpoint: Mapping, config: Mapping, path: Path) -> Dict[str, tuple]:
    """Raise if the checkpoint's model or input settings differ from ``config``; return the other changes."""
    changes = config_differences(checkpoint["config"], config)
    blocking = {key: change for key, change in changes.items()
                if any(key == prefix or key.startswith(prefix + ".") for prefix in RESUME_MUST_MATCH)}
    if blocking:
        listed = "; ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in blocking.items())
        raise ValueError(f"cannot resume from {path}: the config is incompatible ({listed})")
    return changes


def read_checkpoint(path: Path) -> Dict[str, Any]:
    return load_checkpoint(path, map_location="cpu")
