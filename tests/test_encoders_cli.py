"""Each encoder added after the original trains from the CLI on the embedded data (CPU, a few steps), with a
non-default masking strategy and ratio schedule set through --set."""
import pytest

from simmim_fast.checkpoint import load_checkpoint
from simmim_fast.train.monitor import read_log
from test_train_cli import command


@pytest.mark.slow
@pytest.mark.parametrize("preset,model_type,strategy", [("swinv2-tiny", "swinv2", "block"),
                                                        ("convnext-tiny", "convnext", "grid")])
def test_pretrain_steps_from_the_cli(tmp_path, preset, model_type, strategy):
    out = tmp_path / preset
    command("pretrain", "--preset", preset, "--steps", "2", "--batch-size", "8", "--num-workers", "0",
            "--output", str(out), "--save-every", "2", "--picture-every", "100",
            "--set", f"DATA.MASK_STRATEGY={strategy}", "--set", "DATA.MASK_RATIO_END=0.75")
    rows = read_log(out / "log.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["loss"] > 0 for row in rows)
    config = load_checkpoint(out / "ckpt_step_0000002.pth")["config"]
    assert config["MODEL"]["TYPE"] == model_type and config["DATA"]["MASK_STRATEGY"] == strategy
