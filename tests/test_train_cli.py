"""The `simmim-fast` command end to end on CPU: embedded data, a few steps, every output file."""
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from simmim_fast.checkpoint import load_checkpoint
from simmim_fast.train.monitor import read_log
from simmim_fast.train.scenes import render_scene


def cli_prefix() -> list:
    """How a test starts `simmim-fast`: the console script of `pip install -e .`, else the module."""
    script = Path(sys.executable).with_name("simmim-fast")
    return [str(script)] if script.exists() else [sys.executable, "-m", "simmim_fast.cli"]


def run_command(*args) -> subprocess.CompletedProcess:
    """`simmim-fast ARGS` in a new process, whatever its exit status."""
    return subprocess.run(cli_prefix() + list(args), capture_output=True, text=True, timeout=600)


def command(*args):
    done = run_command(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_pretrain_then_reconstruct(tmp_path):
    out = tmp_path / "demo"
    done = command("pretrain", "--preset", "vit-tiny", "--output", str(out), "--steps", "16", "--batch-size", "16",
                   "--set", "TRAIN.BASE_LR=0.02", "--save-every", "8", "--picture-every", "8", "--keep-last", "1")
    rows = read_log(out / "log.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 17))
    assert {"loss", "lr", "grad_norm", "images_per_s", "epoch"} <= set(rows[0])
    first, last = [row["loss"] for row in rows[:4]], [row["loss"] for row in rows[-4:]]
    assert sum(last) / 4 < sum(first) / 4 - 0.03, (first, last)  # the loss visibly falls
    assert [p.name for p in out.glob("ckpt_*.pth")] == ["ckpt_step_0000016.pth"]  # --keep-last 1
    pictures = sorted(p.name for p in (out / "pictures").iterdir())
    assert pictures == ["reconstruction_latest.png", "reconstruction_step_0000008.png",
                        "reconstruction_step_0000016.png"]
    with Image.open(out / "pictures" / "reconstruction_latest.png") as grid:
        assert grid.width > 4 * 128 and grid.height > 8 * 128  # 8 rows of 4 enlarged 64px tiles
    assert (out / "loss_curve.png").stat().st_size > 10_000
    assert str(out / "pictures") in done.stderr and "loss_curve.png" in done.stderr  # says where they are
    assert "embedded scenes" in done.stdout + done.stderr

    images = tmp_path / "mine"
    images.mkdir()
    for index in range(3):
        render_scene(1000 + index, 120).save(images / f"{index}.jpg")
    command("reconstruct", "--checkpoint", str(out / "ckpt_step_0000016.pth"), "--images", str(images),
            "--out", str(tmp_path / "mine.png"))
    with Image.open(tmp_path / "mine.png") as grid:
        assert 3 * 128 < grid.height < 4 * 128
    assert load_checkpoint(out / "ckpt_step_0000016.pth")["config"]["MODEL"]["TYPE"] == "vit"
