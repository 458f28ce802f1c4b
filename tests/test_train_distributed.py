"""torchrun with 2 CPU processes (gloo) gives the same training as 1 process with the same global batch."""
import os
import subprocess
import sys

import pytest
import torch

from simmim_fast.checkpoint import load_checkpoint
from simmim_fast.train.monitor import read_log
from simmim_fast.train.scenes import render_scene

ARGS = ["--preset", "vit-tiny", "--set", "MODEL.VIT.DEPTH=2", "--set", "MODEL.VIT.EMBED_DIM=48",
        "--set", "MODEL.VIT.NUM_HEADS=2", "--set", "TRAIN.BASE_LR=0.05", "--steps", "4", "--num-workers", "0",
        "--picture-every", "1000", "--save-every", "4"]


def run(command, output):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command + ARGS + ["--output", str(output)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [row["loss"] for row in read_log(output / "log.jsonl")], load_checkpoint(output / "ckpt_step_0000004.pth")


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, sharding):
    data = tmp_path / "data"
    data.mkdir()
    for index in range(40):
        render_scene(index, 72).save(data / f"{index}.png")
    single_losses, single = run([sys.executable, "-m", "simmim_fast.train", "--data", str(data), "--batch-size", "8"],
                                tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "simmim_fast.train", "--data", str(data), "--batch-size", "4"]
    pair_losses, pair = run(torchrun + (["--fsdp"] if sharding == "fsdp" else []), tmp_path / "two")
    assert single_losses[0] > single_losses[-1]  # it trains
    assert pair_losses == pytest.approx(single_losses, rel=1e-5, abs=1e-6)
    # every rank's RNG states, gathered to rank 0's checkpoint: what a resumed rank restores
    assert len(pair["rng"]) == 2 and all(set(state) >= {"torch", "numpy", "python"} for state in pair["rng"])
    assert single["model"].keys() == pair["model"].keys()
    for name, tensor in single["model"].items():
        torch.testing.assert_close(pair["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
