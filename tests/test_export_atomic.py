"""Exports appear as a whole or not at all (issue 21, item 5): a kill between two files, a full disk, an
existing folder, file modes; and a damaged probe feature cache is rebuilt. Plain lane (safetensors only)."""
import errno
import io
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("safetensors")

from simmim_fast import build_simmim, checkpoint, get_config  # noqa: E402
from simmim_fast.checkpoint import save_atomic  # noqa: E402
from simmim_fast.cli import main  # noqa: E402
from simmim_fast.downstream.data import write_scene_folder  # noqa: E402
from simmim_fast.downstream.export import export_checkpoint  # noqa: E402
from simmim_fast.downstream.probe import run_probes  # noqa: E402


def write_pretraining_checkpoint(path, preset):
    save_atomic({"model": build_simmim(preset).state_dict(), "config": get_config(preset).to_dict()}, path)
    return path


def folder_contents(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def hidden_leftovers(parent):
    return sorted(path.name for path in parent.iterdir() if path.name.startswith("."))


class Killed(BaseException):
    """What a SIGKILL would do mid-export, as far as this process can see: nothing after it runs."""


def failing_writer(monkeypatch, fail_on, error):
    """``checkpoint._write_new_file`` that writes half of ``fail_on`` (a big temporary file) and raises."""
    real = checkpoint._write_new_file

    def write(path, writer):
        if path.name == fail_on:
            content = io.BytesIO()
            writer(content)
            with open(path, "wb") as file:
                file.write(content.getvalue()[:len(content.getvalue()) // 2])
            raise error
        real(path, writer)

    monkeypatch.setattr(checkpoint, "_write_new_file", write)


def test_a_kill_between_files_keeps_the_earlier_export_whole(tmp_path, monkeypatch):
    """Today's bug: Swin weights beside an old BEiT config. The earlier (ViT) export stays byte for byte,
    and a staging folder a real kill leaves behind is removed by the next export."""
    out = tmp_path / "export"
    export_checkpoint(str(write_pretraining_checkpoint(tmp_path / "vit.pth", "vit-tiny")), "timm", str(out))
    before = folder_contents(out)
    swin = write_pretraining_checkpoint(tmp_path / "swin.pth", "swin-tiny")
    failing_writer(monkeypatch, "config.json", Killed())  # weights written, config not
    with pytest.raises(Killed):
        export_checkpoint(str(swin), "timm", str(out))
    assert folder_contents(out) == before
    assert hidden_leftovers(tmp_path) == []
    monkeypatch.undo()
    for leftover in (".export.killed.partial", ".export.killed.replaced"):  # what SIGKILL leaves: no except runs
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_bytes(b"x" * 1000)
    export_checkpoint(str(swin), "timm", str(out))
    assert json.loads((out / "config.json").read_text())["architecture"].startswith("swin")
    assert hidden_leftovers(tmp_path) == []


def test_full_disk_is_one_line_exit_1_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    source = write_pretraining_checkpoint(tmp_path / "vit.pth", "vit-tiny")
    failing_writer(monkeypatch, "model.safetensors", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    out = tmp_path / "new" / "deeper" / "export"
    status = main(["export", "--checkpoint", str(source), "--format", "transformers", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and "No space left on device" in err[0] and str(out) in err[0]
    assert not (tmp_path / "new").exists()  # no empty folders, no half-written temporary file
    assert hidden_leftovers(tmp_path) == []


def test_a_real_write_failure_in_a_real_process_is_one_line_exit_1_and_leaves_nothing(tmp_path):
    """The CLI in its own process whose files may not exceed 64 KB (RLIMIT_FSIZE: the kernel fails the
    write with EFBIG, as it fails one with ENOSPC on a full disk), replacing an earlier export."""
    source = write_pretraining_checkpoint(tmp_path / "vit.pth", "vit-tiny")
    out = tmp_path / "export"
    export_checkpoint(str(source), "timm", str(out))
    before = folder_contents(out)
    limited = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); "
               "from simmim_fast.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", limited, "export", "--checkpoint", str(source), "--format",
                           "transformers", "--out", str(out)], capture_output=True, text=True, timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(err) == 1 and "File too large" in err[0] and str(out) in err[0], done.stderr
    assert folder_contents(out) == before and hidden_leftovers(tmp_path) == []


def test_existing_folder_is_replaced_only_when_it_is_an_export(tmp_path, capsys):
    source = write_pretraining_checkpoint(tmp_path / "vit.pth", "vit-tiny")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    args = ["export", "--checkpoint", str(source), "--format", "timm", "--out", str(mine)]
    assert main(args) == 2 and "is not an earlier export" in capsys.readouterr().err
    assert folder_contents(mine) == {"notes.txt": b"keep me"}
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(source), "--format", "transformers", "--out", str(out)]) == 0
    assert "relative position bias: shared" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(source), "--format", "timm", "--out", str(out)]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["config.json", "layer_decay.json", "model.safetensors"]


@pytest.mark.parametrize("umask", [0o027, 0o022])
def test_export_modes_follow_the_umask(tmp_path, umask):
    source = write_pretraining_checkpoint(tmp_path / "swin.pth", "swin-tiny")
    previous = os.umask(umask)
    try:
        out = export_checkpoint(str(source), "transformers", str(tmp_path / "export"))
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {path.stat().st_mode & 0o777 for path in out.iterdir()} == {0o666 & ~umask}


def test_a_damaged_feature_cache_is_rebuilt_with_a_warning(tmp_path):
    data = write_scene_folder(tmp_path / "data", train_count=8, val_count=4)
    source = write_pretraining_checkpoint(tmp_path / "vit.pth", "vit-tiny")
    cache = tmp_path / "features"
    first = run_probes(str(source), str(data), linear=False, knn=True, k=3, cache_dir=str(cache))
    files = sorted(cache.iterdir())
    assert not first["features_cached"] and len(files) == 2
    files[0].write_bytes(files[0].read_bytes()[:200])  # torn
    torch.save({"features": torch.zeros(3, 5), "labels": torch.zeros(3, dtype=torch.long)}, files[1])  # stale
    with pytest.warns(UserWarning, match="rebuilding the feature cache") as caught:
        again = run_probes(str(source), str(data), linear=False, knn=True, k=3, cache_dir=str(cache))
    assert len(caught) == 2 and not again["features_cached"] and again["knn"] == first["knn"]
    assert run_probes(str(source), str(data), linear=False, knn=True, k=3, cache_dir=str(cache))["features_cached"]


def test_folder_writes_are_fsynced_in_order(tmp_path, monkeypatch):
    """A power cut must not leave the new name holding a folder whose entries never reached the disk:
    each file's bytes are fsynced, then the staging folder (its entries), then the rename, then the
    parent (the rename itself)."""
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(source, target):
        events.append(("rename", str(source)))
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    target = checkpoint.write_folder_atomic(tmp_path / "export", {"a.bin": b"1" * 10, "b.json": b"{}"})
    monkeypatch.undo()
    staging = events[-2][1]
    assert [kind for kind, _ in events] == ["fsync", "fsync", "fsync", "rename", "fsync"], events
    assert {path for _, path in events[:2]} == {f"{staging}/a.bin", f"{staging}/b.json"}
    assert events[2] == ("fsync", staging) and events[4] == ("fsync", str(tmp_path))
    assert folder_contents(target) == {"a.bin": b"1" * 10, "b.json": b"{}"}


def test_a_leftover_that_cannot_be_removed_does_not_stop_an_export(tmp_path):
    """Leftovers of an earlier killed export are removed best-effort: a stray *file* under a leftover's
    name (rmtree cannot remove it) is left, and the export is written."""
    strays = [tmp_path / ".export.0000.partial", tmp_path / ".export.0000.replaced"]
    for stray in strays:
        stray.write_bytes(b"not a folder")
    target = checkpoint.write_folder_atomic(tmp_path / "export", {"a.bin": b"1"})
    assert folder_contents(target) == {"a.bin": b"1"} and all(stray.exists() for stray in strays)


def test_folder_writes_leave_no_descriptor_open(tmp_path):
    open_descriptors = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    before = open_descriptors()
    for _ in range(3):  # a new export, then two replacing it
        checkpoint.write_folder_atomic(tmp_path / "export", {"a.bin": b"1", "b.bin": b"2"}, replaceable={"a.bin", "b.bin"})
    assert open_descriptors() == before


def test_a_failure_between_the_renames_puts_the_earlier_export_back(tmp_path, monkeypatch):
    """Replacing an export renames the old folder aside, then the new one in: a failure at the second
    rename leaves the old export under its name again (not nothing), and raises the failure."""
    target = checkpoint.write_folder_atomic(tmp_path / "export", {"a.bin": b"old"})
    real_rename = os.rename

    def rename(source, destination):
        if str(source).endswith(".partial"):
            raise OSError(errno.EIO, "I/O error")
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        checkpoint.write_folder_atomic(target, {"a.bin": b"new"}, replaceable={"a.bin"})
    monkeypatch.undo()
    assert folder_contents(target) == {"a.bin": b"old"} and hidden_leftovers(tmp_path) == []


def test_a_failed_cleanup_does_not_hide_the_write_error(tmp_path, monkeypatch):
    """When removing the half-written staging folder fails too, the error raised is still the write's."""
    failing_writer(monkeypatch, "b.bin", OSError(errno.ENOSPC, "No space left on device"))
    real_rmtree = checkpoint.shutil.rmtree

    def rmtree(path, ignore_errors=False, **kwargs):
        if not ignore_errors:
            raise OSError(errno.EBUSY, "busy")
        real_rmtree(path, ignore_errors=True, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.write_folder_atomic(tmp_path / "export", {"a.bin": b"1", "b.bin": b"2" * 1000})


def test_export_reads_weights_only_unless_trusted(tmp_path):
    """export_checkpoint unpickles nothing but tensors and containers by default (a checkpoint that pickles
    another object, as the original's yacs config, is refused by name and nothing is written); trust=True
    reads it."""
    import argparse

    path = tmp_path / "with_object.pth"
    save_atomic({"model": build_simmim("vit-tiny").state_dict(), "config": get_config("vit-tiny").to_dict(),
                 "args": argparse.Namespace(seed=0)}, path)
    with pytest.raises(ValueError, match="trust_checkpoint=True"):
        export_checkpoint(str(path), "timm", str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    assert (export_checkpoint(str(path), "timm", str(tmp_path / "trusted"), trust=True) / "model.safetensors").is_file()
