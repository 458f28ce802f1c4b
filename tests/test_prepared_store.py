"""A ``prepare-data`` store is verified when opened: each kind of damage is one line naming the damaged
file, exit 2, and nothing written (it used to be an IndexError, an UnboundLocalError, numpy's allow_pickle
message or a bare JSON error, some of them only in a DataLoader worker mid-run). And ``prepare-data``
itself: its own arguments named in its errors, a read-only destination refused as pretrain refuses one,
the leftovers of an interrupted run removed by the next."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from simmim_fast.cli import main
from simmim_fast.train.scenes import render_scene

from test_train_cli import run_command


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A jpeg and a raw store of 6 images, written once; each test damages a copy."""
    root = tmp_path_factory.mktemp("stores")
    (root / "src").mkdir()
    for index in range(6):
        render_scene(index, 80).save(root / "src" / f"{index}.png")
    for encoding in ("jpeg", "raw"):
        assert main(["prepare-data", str(root / "src"), str(root / encoding), "--max-side", "72",
                     "--format", encoding]) == 0
    return root


def rewrite_index(store, change):
    index = np.load(store / "index.npy")
    np.save(store / "index.npy", change(index))


def set_row(row, column, value):
    def change(index):
        index[row, column] = value
        return index
    return change


def truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


# (store, damage, the file the line names, what it says)
DAMAGE = [
    ("jpeg", lambda s: truncate(s / "index.npy", 100), "index.npy", "not a readable index"),
    ("jpeg", lambda s: truncate(s / "index.npy", 20), "index.npy", "not a readable index"),
    ("jpeg", lambda s: rewrite_index(s, lambda i: i.astype(np.float32)), "index.npy",
     "expected int64 rows of (shard, offset, length, width, height), got float32 (6, 5)"),
    ("jpeg", lambda s: rewrite_index(s, lambda i: i.astype(np.int32)), "index.npy", "got int32 (6, 5)"),
    ("jpeg", lambda s: rewrite_index(s, lambda i: i[:, :4]), "index.npy", "got int64 (6, 4)"),
    ("jpeg", lambda s: rewrite_index(s, lambda i: i.ravel()), "index.npy", "got int64 (30,)"),
    ("jpeg", lambda s: rewrite_index(s, lambda i: i[:5]), "index.npy", "5 rows, but prepared.json counts 6 images"),
    ("jpeg", lambda s: np.save(s / "index.npy", np.array([[0, 0, 1]] * 6, dtype=object), allow_pickle=True),
     "index.npy", "not a readable index (Object arrays cannot be loaded when allow_pickle=False)"),
    ("jpeg", lambda s: rewrite_index(s, set_row(3, 1, 1 << 40)), "index.npy",
     f"row 3 points at bytes {1 << 40}.."),
    ("jpeg", lambda s: rewrite_index(s, set_row(2, 1, -8)), "index.npy", "row 2 points at bytes -8.."),
    ("jpeg", lambda s: rewrite_index(s, set_row(1, 2, 0)), "index.npy", "row 1 points at bytes"),
    ("jpeg", lambda s: rewrite_index(s, set_row(4, 0, 1)), "index.npy", "row 4 names shard 1, but prepared.json counts 1"),
    ("jpeg", lambda s: truncate(s / "images-00000.bin", 1000), "index.npy", "of images-00000.bin, which holds 1000 bytes"),
    ("jpeg", lambda s: (s / "images-00000.bin").unlink(), "images-00000.bin", "missing (No such file or directory)"),
    ("jpeg", lambda s: (s / "index.npy").unlink(), "index.npy", "not a readable index (No such file or directory"),
    ("jpeg", lambda s: truncate(s / "prepared.json", 30), "prepared.json", "not a readable manifest"),
    ("jpeg", lambda s: (s / "prepared.json").write_bytes(b"\xff\xfe{"), "prepared.json", "not a readable manifest"),
    ("jpeg", lambda s: (s / "prepared.json").write_text("[1, 2]"), "prepared.json", "expected a JSON object, got list"),
    ("jpeg", lambda s: (s / "prepared.json").write_text('{"format": 1, "shards": 1}'), "prepared.json",
     "'images' must be a count >= 1, got None"),
    ("jpeg", lambda s: (s / "prepared.json").write_text('{"format": 1, "images": 6, "shards": 1, "encoding": "png"}'),
     "prepared.json", "unknown encoding 'png'"),
    ("raw", lambda s: rewrite_index(s, set_row(0, 3, 71)), "index.npy", "row 0: "),
    ("raw", lambda s: rewrite_index(s, lambda i: i[:, :3]), "index.npy", "got int64 (6, 3)"),
]


@pytest.mark.parametrize("encoding, damage, named, expected", DAMAGE,
                         ids=[f"{encoding}-{index}-{expected[:30]}" for index, (encoding, _, _, expected)
                              in enumerate(DAMAGE)])
def test_a_damaged_store_is_one_line_naming_the_file(encoding, damage, named, expected, stores, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(stores / encoding, store)
    damage(store)
    capsys.readouterr()
    output = tmp_path / "run"
    assert main(["pretrain", "--preset", "vit-tiny", "--data", str(store), "--steps", "1", "--batch-size", "2",
                 "--num-workers", "0", "--output", str(output)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"simmim-fast pretrain: error: {store / named}: "), lines[0]
    assert expected in lines[0] and "run prepare-data again" in lines[0], lines[0]
    assert not output.exists()


def test_an_undamaged_store_opens(stores):
    from simmim_fast.train.data import open_image_source

    for encoding in ("jpeg", "raw"):
        source = open_image_source(str(stores / encoding))
        assert len(source) == 6 and source.open(5).size == (72, 72)


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_rerun_removes_the_leftovers_of_an_interrupted_prepare_data(stores, tmp_path, capsys):
    """A kill leaves the staging folder beside DST (named with its host and process id); the next run into
    the same DST deletes it when that process is gone, and keeps a live one's and other folders."""
    host = socket.gethostname()
    interrupted = tmp_path / f".out.prepare-data.{host}.{dead_pid()}.k2j4x_"
    running = tmp_path / f".out.prepare-data.{host}.{os.getpid()}.a8d9f0"
    other = tmp_path / ".out.notes"
    for folder in (interrupted, running, other):
        folder.mkdir()
        (folder / "images-00000.bin").write_bytes(b"x" * 1000)
    assert main(["prepare-data", str(stores / "src"), str(tmp_path / "out"), "--max-side", "64"]) == 0
    assert f"removing {interrupted}, left by an interrupted run" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([running.name, other.name, "out"])


# prepare-data, killed (SIGKILL, as by kill -9 or the OOM killer) once its shards are written and
# before its index: np.save is the first write of the index.
KILLED_PREPARE_DATA = """
import os, signal, sys
import numpy as np
from simmim_fast.cli import main
np.save = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
sys.exit(main(sys.argv[1:]))
"""


def test_a_rerun_of_a_killed_prepare_data_removes_its_leftovers(stores, tmp_path):
    """Real processes: the killed one leaves its staging folder (shards, no index) and no DST; the rerun
    into the same DST deletes that folder, says so, and writes a store that opens."""
    argv = ["prepare-data", str(stores / "src"), str(tmp_path / "out"), "--max-side", "64"]
    killed = subprocess.run([sys.executable, "-c", KILLED_PREPARE_DATA, *argv], capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".out.prepare-data."), leftovers
    assert (leftovers[0] / "images-00000.bin").stat().st_size > 0 and not (leftovers[0] / "index.npy").exists()

    rerun = run_command(*argv)
    assert rerun.returncode == 0, rerun.stderr
    assert f"removing {leftovers[0]}, left by an interrupted run" in rerun.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    from simmim_fast.train.data import open_image_source

    assert len(open_image_source(str(tmp_path / "out"))) == 6


def test_a_damaged_store_in_a_real_process(stores, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(stores / "jpeg", store)
    rewrite_index(store, lambda index: index[:5])
    done = run_command("pretrain", "--preset", "vit-tiny", "--data", str(store), "--steps", "1", "--batch-size", "2",
                       "--num-workers", "0", "--output", str(tmp_path / "run"))
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.strip() == (f"simmim-fast pretrain: error: {store / 'index.npy'}: 5 rows, but prepared.json "
                                   "counts 6 images; the prepare-data store is damaged, run prepare-data again")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, expected", [
    (["{root}/missing", "{tmp}/out"], "SRC {root}/missing: no such directory"),
    (["{root}/raw", "{tmp}/out"], "SRC {root}/raw: no image files"),
    (["{root}/src", "{root}/src/0.png/out"], "{root}/src/0.png is not a folder"),
    (["{root}/src", "{root}/jpeg"], "DST {root}/jpeg already exists"),
])
def test_prepare_data_errors_name_its_own_arguments(argv, expected, stores, tmp_path, capsys):
    argv = [arg.format(root=stores, tmp=tmp_path) for arg in argv]
    assert main(["prepare-data", *argv, "--max-side", "64"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected.format(root=stores) in lines[0] and "--data" not in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_prepare_data_into_a_read_only_folder_is_exit_2_like_pretrain(stores, tmp_path, capsys, monkeypatch):
    """It used to be exit 1 naming its hidden staging folder. (Root writes anywhere: the permission is
    denied through os.access, which the check asks, so the test runs as root too.)"""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode))
    assert main(["prepare-data", str(stores / "src"), str(locked / "out"), "--max-side", "64"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"DST {locked / 'out'}: the folder {locked} is not writable" in lines[0], lines
    assert list(locked.iterdir()) == []
