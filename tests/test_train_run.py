"""Training runs on CPU with a tiny ViT: resume, interrupted checkpoints, non-finite losses, fp16,
unreadable files, command-line errors."""
import json
import shutil

import pytest
import torch

import simmim_fast
from simmim_fast.checkpoint import load_checkpoint
from simmim_fast.cli import main
from simmim_fast.train import NonFiniteLossError, PretrainOptions, checkpoints, pretrain
from simmim_fast.train.monitor import read_log
from simmim_fast.train.scenes import render_scene

# A 1-block ViT on 64px images: a step takes tens of milliseconds on a CPU core.
TINY = ["MODEL.VIT.DEPTH=1", "MODEL.VIT.EMBED_DIM=48", "MODEL.VIT.NUM_HEADS=2"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for index in range(32):
        render_scene(index, 80).save(folder / f"scene_{index}.png")
    return folder


def options(output, data, **overrides) -> PretrainOptions:
    settings = dict(preset="vit-tiny", set=list(TINY), data=str(data), output=str(output), batch_size=8,
                    num_workers=0, steps=6, save_every=3, keep_last=0, picture_every=1000, picture_count=2)
    settings.update(overrides)
    return PretrainOptions(**settings)


def losses(output):
    return [row["loss"] for row in read_log(output / "log.jsonl")]


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, image_folder):
    """Stopping after step 3 and resuming gives the uninterrupted run's losses and weights, bit for bit
    (drop path on, so the RNG states matter; accumulation on, so the data position does). Two blocks:
    the drop path rates are linspace(0, rate, depth), so one block would have rate 0 and draw nothing."""
    settings = dict(set=TINY + ["MODEL.VIT.DEPTH=2", "MODEL.DROP_PATH_RATE=0.2"], accum_steps=2, batch_size=4)
    full = pretrain(options(tmp_path / "full", image_folder, **settings))
    assert len(full["losses"]) == 6

    def resume_from_step_3(folder):
        folder.mkdir()
        shutil.copy(tmp_path / "full" / "ckpt_step_0000003.pth", folder)
        return pretrain(options(folder, image_folder, resume="auto", **settings))

    # The control: the same resume without the saved random states gives other losses (drop path draws).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoints, "restore_rng", lambda state, device: None)
        unrestored = resume_from_step_3(tmp_path / "unrestored")
    assert unrestored["losses"][3:] != full["losses"][3:]

    resumed_dir = tmp_path / "resumed"
    resumed = resume_from_step_3(resumed_dir)
    assert resumed["losses"] == full["losses"]  # the first 3 come from the checkpoint's history
    assert losses(resumed_dir) == full["losses"][3:]
    final_full = load_checkpoint(tmp_path / "full" / "ckpt_step_0000006.pth")
    final_resumed = load_checkpoint(resumed_dir / "ckpt_step_0000006.pth")
    for name, tensor in final_full["model"].items():
        assert torch.equal(tensor, final_resumed["model"][name]), name


@pytest.mark.slow
def test_accumulation_and_activation_checkpointing_match_the_plain_step(tmp_path, image_folder):
    """2 micro-batches of 4 = one batch of 8 (same samples, same scaled LR); checkpointed blocks
    recompute the same activations."""
    plain = pretrain(options(tmp_path / "plain", image_folder, steps=3, batch_size=8))["losses"]
    accumulated = pretrain(options(tmp_path / "accum", image_folder, steps=3, batch_size=4, accum_steps=2))["losses"]
    checkpointed = pretrain(options(tmp_path / "ckpt", image_folder, steps=3, batch_size=8,
                                    grad_checkpoint=True))["losses"]
    assert accumulated == pytest.approx(plain, rel=1e-5)
    assert checkpointed == pytest.approx(plain, rel=1e-6)


def test_checkpoint_layout_loads_in_the_original_way(tmp_path, image_folder):
    pretrain(options(tmp_path, image_folder, steps=3))
    state = load_checkpoint(tmp_path / "ckpt_step_0000003.pth")  # weights_only=True
    assert {"model", "optimizer", "lr_scheduler", "epoch", "config", "scaler", "rng", "step"} <= set(state)
    model = simmim_fast.build_simmim(simmim_fast.config.merge(simmim_fast.get_config(), state["config"]))
    simmim_fast.load_pretrained(model, tmp_path / "ckpt_step_0000003.pth")


@pytest.mark.slow
def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, image_folder, monkeypatch):
    real_save = torch.save
    calls = []

    def save_then_die(obj, file, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the step-6 checkpoint: die half-way through writing it
            file.write(b"partial")
            raise KeyboardInterrupt("killed during torch.save")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain(options(tmp_path, image_folder))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.glob("*.pth")] == ["ckpt_step_0000003.pth"]
    assert not list(tmp_path.glob(".*.tmp"))
    assert load_checkpoint(tmp_path / "ckpt_step_0000003.pth")["step"] == 3
    finished = pretrain(options(tmp_path, image_folder, resume="auto"))
    assert finished["steps"] == 6 and len(losses(tmp_path)) == 6


@pytest.mark.slow
def test_non_finite_losses_are_skipped_then_stop(tmp_path, image_folder, monkeypatch):
    real_forward = simmim_fast.SimMIM.forward
    calls = []

    def nan_on_steps_2_and_3(self, x, mask):
        calls.append(1)
        loss = real_forward(self, x, mask)
        return loss * float("nan") if len(calls) in (2, 3) else loss

    monkeypatch.setattr(simmim_fast.SimMIM, "forward", nan_on_steps_2_and_3)
    summary = pretrain(options(tmp_path / "skip", image_folder, picture_every=6, picture_count=2))
    assert summary["nonfinite_skipped"] == 2 and len(summary["losses"]) == 4
    state = load_checkpoint(tmp_path / "skip" / "ckpt_step_0000006.pth")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert state["nonfinite_skipped"] == 2

    monkeypatch.setattr(simmim_fast.SimMIM, "forward", lambda self, x, mask: real_forward(self, x, mask) * float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer step\(s\) in a row had a bad loss since step 1 "
                                                 r"\(last: non-finite loss \(inf\)\).*There is no good checkpoint"):
        pretrain(options(tmp_path / "stop", image_folder, max_nonfinite=3))


def test_fp16_with_grad_scaler(tmp_path, image_folder):
    pretrain(options(tmp_path, image_folder, amp="fp16", steps=3))
    rows = read_log(tmp_path / "log.jsonl")
    assert len(rows) == 3 and all(row["loss_scale"] > 0 for row in rows)
    assert all(0 < row["loss"] < 2 for row in rows)
    scaler = load_checkpoint(tmp_path / "ckpt_step_0000003.pth")["scaler"]
    assert scaler["scale"] == rows[-1]["loss_scale"]


def test_unreadable_files_are_skipped_and_reported(tmp_path, image_folder, capsys):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data / "good")
    (data / "bad").mkdir()
    (data / "bad" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (data / "bad" / "empty.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="unreadable image"):
        summary = pretrain(options(tmp_path / "run", data, steps=2, batch_size=17, save_every=100))
    assert summary["unreadable_files"] == 2  # 34 files: one epoch of 2 x 17 reads each once
    assert "skipped 2 unreadable image file(s)" in capsys.readouterr().err


def test_command_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["pretrain", "--preset", "vit-tiny", "--data", str(tmp_path / "empty"), "--output", str(tmp_path)]) == 2
    assert "no image files" in capsys.readouterr().err
    assert main(["pretrain", "--preset", "vit-tiny", "--set", "DATA.MASK_RATO=0.5", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'DATA.MASK_RATO'" in err and "MASK_RATIO" in err and "IMG_SIZE" in err
    assert main(["pretrain", "--preset", "vit-tiny", "--backend", "tritonn", "--output", str(tmp_path)]) == 2
    assert "unknown backend 'tritonn'" in capsys.readouterr().err


def test_resume_with_another_model_is_refused(tmp_path, image_folder):
    pretrain(options(tmp_path, image_folder, steps=3))
    with pytest.raises(ValueError, match="incompatible.*MODEL.VIT.DEPTH"):
        pretrain(options(tmp_path, image_folder, steps=6, resume="auto", set=TINY + ["MODEL.VIT.DEPTH=2"]))


def test_reconstruct_refuses_pickled_objects_unless_trusted(tmp_path, image_folder):
    """The original's checkpoints keep a yacs config object: weights_only loading refuses them, with a way out."""
    import argparse

    from simmim_fast.train import reconstruct_images

    model = simmim_fast.build_simmim("vit-tiny")
    path = tmp_path / "original_style.pth"
    torch.save({"model": model.state_dict(), "config": argparse.Namespace(TAG="yacs stand-in")}, path)
    with pytest.raises(ValueError, match="--trust-checkpoint"):
        reconstruct_images(str(path), str(image_folder), str(tmp_path / "grid.png"), preset="vit-tiny")
    written = reconstruct_images(str(path), str(image_folder), str(tmp_path / "grid.png"), count=2,
                                 preset="vit-tiny", trust_checkpoint=True)
    assert written.exists()


def test_profile_traces_three_steps_after_the_first_two(tmp_path, image_folder):
    """--profile on the CPU: the torch profiler's Chrome trace of steps 3-5 in <output>/profile."""
    pretrain(options(tmp_path, image_folder, steps=6, save_every=6, profile=True))
    events = json.loads((tmp_path / "profile" / "trace.json").read_text())["traceEvents"]
    steps_traced = [event for event in events if event.get("name") == "Optimizer.step#AdamW.step"]
    assert len(steps_traced) == 3


@pytest.mark.parametrize("mode", ["fast", True])
def test_unknown_compile_mode_is_a_value_error_before_anything_is_written(tmp_path, image_folder, mode):
    """The library's own check (the CLI's argparse choices never let one through): a ValueError naming the
    modes, raised before the output folder exists."""
    with pytest.raises(ValueError, match="--compile .*expected one of default, reduce-overhead"):
        pretrain(options(tmp_path / "run", image_folder, compile=mode))
    assert not (tmp_path / "run").exists()
