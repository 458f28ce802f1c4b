"""The `simmim-fast` command end to end on CPU: embedded data, a few steps, every output file."""
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from simmim_fast.checkpoint import load_checkpoint
from simmim_fast.cli import main as cli_main
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


@pytest.mark.slow
def test_pretrain_compiled_for_cuda_graphs_trains_as_eager(tmp_path, capsys):
    """``--compile reduce-overhead`` (CUDA graphs on a GPU; on this CPU Inductor compiles without them), in
    this process so that Dynamo's counters show the model was compiled: the same losses step by step as the
    eager run, the run's header says so, and the checkpoint has the unwrapped model's keys (no torch.compile
    prefix). tests/test_gpu_cuda_graphs.py replays the graphs on a GPU."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    runs = {}
    for name, flags in (("eager", []), ("compiled", ["--compile", "reduce-overhead"])):
        out = tmp_path / name
        torch._dynamo.reset()
        counters.clear()
        assert cli_main(["pretrain", "--preset", "vit-tiny", "--output", str(out), "--steps", "3", "--batch-size",
                         "8", "--num-workers", "0", "--log-every", "1", *flags]) == 0
        captured = capsys.readouterr()
        runs[name] = ([row["loss"] for row in read_log(out / "log.jsonl")],
                      list(load_checkpoint(out / "ckpt_step_0000003.pth")["model"]),
                      captured.out + captured.err, counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    (eager_losses, eager_keys, eager_out, eager_graphs), (losses, keys, out, graphs) = runs["eager"], runs["compiled"]
    assert (eager_graphs, graphs) == (0, 1), "Dynamo compiled graphs: eager run, compiled run"
    assert "torch.compile reduce-overhead (no CUDA graphs on cpu)" in out and "torch.compile" not in eager_out
    assert losses == pytest.approx(eager_losses, rel=1e-5) and len(eager_losses) == 3
    assert keys == eager_keys
