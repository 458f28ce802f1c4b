"""Checkpoints: atomic writes, original-layout loading ({'model': state_dict, ...})."""
from __future__ import annotations

import os
import pickle
import re
import secrets
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, List, Mapping, Optional, Union

import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]


class CheckpointReadError(ValueError):
    """A file that cannot be read as a checkpoint (truncated, corrupt, not a torch file, pickled objects)."""


def _cause_in_chain(error: BaseException) -> Optional[BaseException]:
    """The OSError or KeyboardInterrupt behind ``error``: torch.save reports a full disk, or a Ctrl-C that
    lands in one of its writes, as a RuntimeError from its zip writer ("[enforce fail at
    inline_container.cc]") with the real cause only in the chained exception."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt) or isinstance(error, OSError) and error.errno is not None:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _write_new_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` into a new file, flushed and fsynced; its mode follows the umask (os.open with
    0o666 applies it, where mkstemp would force 0600)."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


def write_atomic(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """``write(file)`` to a hidden temp file in the same folder, fsync, then rename: a crash or Ctrl-C
    never leaves a truncated file at ``path`` (the rename is atomic on POSIX) nor the temp file. The file
    gets the umask's usual mode (as every other output); a failed write removes its temp file and, when
    the system refused it (a full disk, a read-only folder), raises that OSError naming ``path`` instead
    of the writer's own error (torch.save's RuntimeError), and a Ctrl-C as the KeyboardInterrupt it is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        _write_new_file(temp, write)
        os.replace(temp, path)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        cause = _cause_in_chain(error)
        if isinstance(error, RuntimeError) and isinstance(cause, KeyboardInterrupt):
            raise cause from None
        if isinstance(error, RuntimeError) and cause is not None:
            raise OSError(cause.errno, f"{os.strerror(cause.errno)} (writing {path})") from error
        raise
    return path


def save_atomic(obj: Any, path: PathLike) -> Path:
    """torch.save through ``write_atomic``."""
    return write_atomic(path, lambda file: torch.save(obj, file))




def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _missing_parents(folder: Path) -> list:
    """The ancestors of ``folder`` that do not exist yet, outermost first."""
    return [parent for parent in reversed(folder.parents) if not parent.exists()]


def write_folder_atomic(target: PathLike, files: Mapping[str, bytes], replaceable: Iterable[str] = ()) -> Path:
    """``target`` holding exactly ``files`` (name -> bytes), all of them or none: they are written and
    fsynced in a hidden folder beside it (``.<name>.<random>.partial``), which is then renamed to
    ``target``. An existing ``target`` is replaced only if it holds nothing but names among
    ``replaceable`` (an earlier export; anything else is a ValueError, nothing written): it is renamed
    aside (``.<name>.<random>.replaced``), the new folder renamed in, the old one removed. A kill between
    those two renames leaves no ``target`` and the previous folder in the ``.replaced`` one; the next
    call removes such leftovers of ``target`` (and ``.partial`` ones). A failure (a full disk) removes
    what this call created, the parent folders included, and raises the OSError naming ``target``.
    The folder and its files get the umask's usual modes, as every other output."""
    target = Path(target)
    if target.exists():
        others = sorted(path.name for path in target.iterdir()) if target.is_dir() else [target.name]
        unknown = [name for name in others if name not in set(replaceable)] if target.is_dir() else others
        if unknown:
            raise ValueError(f"{target} exists and is not an earlier export (it holds {', '.join(unknown[:3])}); "
                             "give a new folder or an earlier export to replace")
    for leftover in target.parent.glob(f".{target.name}.*.partial") if target.parent.is_dir() else ():
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in target.parent.glob(f".{target.name}.*.replaced") if target.parent.is_dir() else ():
        shutil.rmtree(leftover, ignore_errors=True)
    created_parents = _missing_parents(target)
    staging = aside = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the renamed folder private
        for name, data in files.items():
            _write_new_file(staging / name, lambda file, data=data: file.write(data))
        _fsync_folder(staging)
        if target.exists():
            aside = target.parent / f".{target.name}.{secrets.token_hex(4)}.replaced"
            target.rename(aside)
            staging.rename(target)
            staging = None
            shutil.rmtree(aside)
        else:
            staging.rename(target)
            staging = None
        _fsync_folder(target.parent)
    except BaseException as error:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            if aside is not None and aside.exists() and not target.exists():
                aside.rename(target)  # the new folder did not make it: the earlier export stays
        for parent in reversed(created_parents):
            try:
                parent.rmdir()
            except OSError:
                break
        if isinstance(error, OSError) and error.errno is not None:
            raise OSError(error.errno, f"{os.strerror(error.errno)} (writing {target})") from error
        raise
    return target


def load_checkpoint(path: PathLike, map_location="cpu", trust_checkpoint: bool = False) -> Any:
    """``torch.load`` with weights_only=True (tensors, numbers, strings, containers only) unless
    ``trust_checkpoint``, which unpickles any object (the original trainer's checkpoints hold a yacs
    config) and so runs code from the file: trusted files only. A file that is not a readable
    checkpoint raises ``CheckpointReadError`` (a ValueError) naming it."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as error:
        refused_object = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if refused_object is None or trust_checkpoint:
            raise CheckpointReadError(f"{path} is not a readable checkpoint (not a torch.save file, or torn)") from None
        raise CheckpointReadError(
            f"{path} holds pickled Python objects besides tensors ({refused_object.group(1)}; the original "
            "SimMIM's checkpoints keep a yacs config); if you trust the file, load it with trust_checkpoint=True "
            "(on the command line --trust-checkpoint)") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, AttributeError, ImportError,
            ValueError, KeyError, IndexError, struct.error) as error:
        # A truncated or foreign file: torch reports it as any of these depending on where it breaks (a
        # cut in the zip's data records is an OSError "Invalid argument" from its reader).
        reason = "an empty file" if Path(path).stat().st_size == 0 else f"cut short or corrupt: {_first_line(error)}"
        raise CheckpointReadError(f"{path} is not a readable checkpoint ({reason})") from None


def _first_line(error: BaseException) -> str:
    """The error's first sentence (torch's zip reader appends a paragraph of advice)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]


def read_checkpoint_file(path: PathLike, trust: bool = False) -> Any:
    """``load_checkpoint`` of a path that must be a file (a missing one is named as such)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    return load_checkpoint(path, trust_checkpoint=trust)


def state_dict_of(checkpoint: Any, source: PathLike = "the checkpoint") -> Mapping[str, torch.Tensor]:
    """The state_dict inside an original checkpoint ({'model': ...}), or the mapping itself; else a
    ``CheckpointReadError`` naming ``source`` and what it holds instead."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        checkpoint = checkpoint["model"]
    if isinstance(checkpoint, Mapping) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    if isinstance(checkpoint, Mapping):
        found = f"a dict of {', '.join(sorted({type(v).__name__ for v in checkpoint.values()})) or 'nothing'}"
    else:
        found = f"a {type(checkpoint).__name__}"
    raise CheckpointReadError(f"{source} holds {found}, not model weights (a state_dict, or a checkpoint dict "
                              "with a 'model' state_dict)")


def key_differences(missing: List[str], unexpected: List[str], misshapen: List[str], shown: int = 4) -> str:
    """'missing: a, b ... (7); unexpected: ...; shape mismatch: ...': the first keys of each kind."""
    details = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshapen)):
        if keys:
            details.append(f"{label}: {', '.join(keys[:shown])}{' ...' if len(keys) > shown else ''} ({len(keys)})")
    return "; ".join(details)


def fitting_state_dict(model: nn.Module, state_dict: Any, source: PathLike) -> Mapping[str, torch.Tensor]:
    """``state_dict`` (or the one inside a checkpoint dict) when ``model.load_state_dict`` takes it strictly;
    else a ``CheckpointReadError`` naming ``source`` and the first keys that differ (torch's RuntimeError
    lists every key on many lines)."""
    target = model.state_dict()
    state_dict = state_dict_of(state_dict, source)
    misshapen = [f"{key} {tuple(value.shape)} vs the model's {tuple(target[key].shape)}"
                 for key, value in state_dict.items() if key in target and value.shape != target[key].shape]
    differences = key_differences([key for key in target if key not in state_dict],
                                  [key for key in state_dict if key not in target], misshapen)
    if differences:
        raise CheckpointReadError(f"{source} does not fit the model (another size or architecture?): {differences}")
    return state_dict


def load_pretrained(model: nn.Module, path_or_state_dict: Union[PathLike, Mapping[str, Any]], strict: bool = True,
                    trust_checkpoint: bool = False) -> Any:
    """Load an original SimMIM checkpoint (or a state_dict) into ``model``; strict by default.

    Files are read with weights_only=True; the original trainer's checkpoints pickle a yacs config and
    need ``trust_checkpoint=True``, which runs code from the file (trusted files only).
    """
    source = path_or_state_dict
    if isinstance(source, (str, os.PathLike)):
        source = load_checkpoint(source, trust_checkpoint=trust_checkpoint)
    return model.load_state_dict(state_dict_of(source), strict=strict)
