"""Checkpoints: atomic writes, original-layout loading ({'model': state_dict, ...})."""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Mapping, Union

import torch
import torch.nn as nn


def save_atomic(obj: Any, path: Union[str, Path]) -> Path:
    """torch.save to a temp file in the same folder, fsync, then rename: a crash never leaves a
    truncated file at ``path`` (the rename is atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Union[str, Path], map_location="cpu") -> Any:
    """``torch.load`` with weights_only=True (tensors, numbers, strings, containers only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def read_checkpoint_file(path: Union[str, Path], trust: bool = False) -> Any:
    """A checkpoint file, weights only unless ``trust``: the original SimMIM's checkpoints hold a pickled
    yacs config, and unpickling runs code from the file, so that needs the user's word."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return load_checkpoint(path)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds pickled Python objects besides tensors (the original SimMIM's "
                         "checkpoints keep a yacs config); if you trust the file, add --trust-checkpoint "
                         f"({str(error).splitlines()[0]})") from None


def state_dict_of(checkpoint: Any) -> Mapping[str, torch.Tensor]:
    """The state_dict inside an original checkpoint ({'model': ...}), or the mapping itself."""
    if isinstance(checkpoint, Mapping) and "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        return checkpoint["model"]
    if isinstance(checkpoint, Mapping) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise ValueError("expected a state_dict or a checkpoint dict with a 'model' entry")


def load_pretrained(model: nn.Module, path_or_state_dict, strict: bool = True):
    """Load an original SimMIM checkpoint (or a state_dict) into ``model``; strict by default."""
    source = path_or_state_dict
    if isinstance(source, (str, Path)):
        source = load_checkpoint(source)
    return model.load_state_dict(state_dict_of(source), strict=strict)
