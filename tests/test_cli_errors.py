"""Every user mistake at the command line is one line on stderr naming the bad value, exit status 2, and
nothing written: no output folder created, an existing run's files untouched. ``--debug`` gives the
traceback. Plus what a run does with a full disk, torn checkpoints and a changed schedule (issue #13)."""
import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simmim_fast.checkpoint import load_checkpoint, save_atomic
from simmim_fast.cli import main
from simmim_fast.train import checkpoints
from simmim_fast.train.scenes import render_scene

# A 1-block ViT on 64px images: a step takes tens of milliseconds on a CPU core.
TINY = ["--set", "MODEL.VIT.DEPTH=1", "--set", "MODEL.VIT.EMBED_DIM=48", "--set", "MODEL.VIT.NUM_HEADS=2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs of every kind, and an existing run folder whose files must survive every mistake."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "images").mkdir()
    for index in range(8):
        render_scene(index, 72).save(root / "images" / f"{index}.png")
    (root / "empty").mkdir()
    (root / "a_file.txt").write_text("not a folder, not a checkpoint, not YAML: [")
    (root / "malformed.yaml").write_text("DATA:\n  IMG_SIZE: 64\n   BATCH_SIZE: [8\n")
    (root / "run").mkdir()
    save_atomic({"format": checkpoints.CHECKPOINT_FORMAT, "step": 3}, checkpoints.checkpoint_path(root / "run", 3))
    (root / "run" / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return root


def snapshot(folder: Path):
    return {path.relative_to(folder): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(folder.rglob("*")) if path.is_file()}


def pretrain_args(files, output):
    return ["pretrain", "--preset", "vit-tiny", *TINY, "--data", str(files / "images"), "--batch-size", "4",
            "--num-workers", "0", "--output", str(output)]


# (extra arguments, what the one line must say). {root} is the inputs folder.
BAD_PRETRAIN_FLAGS = [
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--steps", "-3"], "--steps must be an integer >= 1, got -3"),
    (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["--epochs", "0", "--steps", "3"], "--epochs must be an integer >= 1, got 0"),
    (["--accum-steps", "-2"], "--accum-steps must be an integer >= 1, got -2"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--num-workers", "-1"], "--num-workers must be an integer >= 0, got -1"),
    (["--log-every", "0"], "--log-every must be an integer >= 1"),
    (["--save-every", "0"], "--save-every must be an integer >= 1"),
    (["--picture-every", "-5"], "--picture-every must be an integer >= 1"),
    (["--keep-last", "-1"], "--keep-last must be an integer >= 0"),
    (["--max-nonfinite", "0"], "--max-nonfinite must be an integer >= 1"),
    (["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    (["--preset", "vit-huge"], "argument --preset: invalid choice: 'vit-huge'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--amp", "fp32"], "argument --amp: invalid choice: 'fp32'"),
    (["--optimizer", "lamb"], "argument --optimizer: invalid choice: 'lamb'"),
    (["--decode", "nvjpeg"], "argument --decode: invalid choice: 'nvjpeg'"),
    (["--set", "DATA.DECODE=nvjpeg"], "--decode / DATA.DECODE must be one of cpu, gpu, auto, got 'nvjpeg'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--set", "DATA.BATCH_SIZE=abc"], "type mismatch for config key 'DATA.BATCH_SIZE': expected int"),
    (["--set", "TRAIN.BASE_LR=fast"], "type mismatch for config key 'TRAIN.BASE_LR': expected float"),
    (["--set", "TRAIN.BASE_LR=true"], "type mismatch for config key 'TRAIN.BASE_LR': expected float"),  # not 1.0
    (["--set", "DATA.IMG_SIZE=64.0"], "type mismatch for config key 'DATA.IMG_SIZE': expected int"),
    (["--set", "TRAIN.AUTO_RESUME=1"], "type mismatch for config key 'TRAIN.AUTO_RESUME': expected bool"),
    (["--set", "DATA.MASK_RATO=0.5"], "unknown config key 'DATA.MASK_RATO'; valid keys here:"),
    (["--set", "TRAIN.BASE_LR"], "--set expects KEY=VALUE"),
    (["--set", "DATA.IMG_SIZE=["], "--set DATA.IMG_SIZE=[: not valid YAML"),
    (["--set", "DATA.MASK_RATIO=0.0"], "mask_ratio (DATA.MASK_RATIO) must be in (0, 1], got 0.0"),
    (["--set", "TRAIN.EPOCHS=0"], "TRAIN.EPOCHS must be an integer >= 1, got 0"),
    (["--set", "TRAIN.ACCUMULATION_STEPS=-2"], "TRAIN.ACCUMULATION_STEPS must be an integer >= 0, got -2"),
    (["--set", "TRAIN.LR_SCHEDULER.NAME=exp"], "TRAIN.LR_SCHEDULER.NAME must be cosine, linear, step or multistep"),
    (["--preset", "swin-tiny", "--set", "MODEL.SWIN.WINDOW_SIZE=7"], "(32x32) does not split into 7x7 windows"),
    (["--config", "{root}/missing.yaml"], "missing.yaml: no such file"),
    (["--config", "{root}/malformed.yaml"], "malformed.yaml: not valid YAML"),
    (["--data", "{root}/empty"], "no image files"),
    (["--data", "{root}/missing"], "missing"),
    (["--backend", "tritonn"], "unknown backend 'tritonn'"),
    (["--fsdp"], "--fsdp needs several processes"),
    (["--compile=yes"], "argument --compile: ignored explicit argument 'yes'"),
    (["--grad-checkpoint=1"], "argument --grad-checkpoint: ignored explicit argument '1'"),
    (["--optimizer", "apex-fused-adam"], "--optimizer apex-fused-adam needs NVIDIA apex"),
    (["--resume", "{root}/missing.pth"], "missing.pth: no such checkpoint file"),
    (["--resume", "{root}/a_file.txt"], "a_file.txt is not a readable checkpoint"),
    (["--batch-size", "16"], "8 images give 8 per process, fewer than one batch of 16"),
    (["--accum-steps", "4"], "an epoch has 2 batches, fewer than --accum-steps 4"),
]
if not torch.cuda.is_available():
    BAD_PRETRAIN_FLAGS.append((["--device", "cuda"], "--device cuda but torch sees no CUDA device"))


def expect_one_line(err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("simmim-fast") and "error: " in lines[0] and expected in lines[0], lines[0]


@pytest.mark.parametrize("extra, expected", BAD_PRETRAIN_FLAGS, ids=[" ".join(a) for a, _ in BAD_PRETRAIN_FLAGS])
def test_bad_pretrain_flag_is_one_line_exit_2_and_writes_nothing(extra, expected, files, tmp_path, capsys):
    extra = [arg.format(root=files) for arg in extra]
    if "apex-fused-adam" in extra:
        try:
            import apex.optimizers  # noqa: F401
            pytest.skip("apex is installed here")
        except ImportError:
            pass
    fresh = tmp_path / "fresh"
    assert main(pretrain_args(files, fresh) + extra) == 2
    expect_one_line(capsys.readouterr().err, expected)
    assert not fresh.exists()

    before = snapshot(files / "run")
    assert main(pretrain_args(files, files / "run") + extra) == 2
    expect_one_line(capsys.readouterr().err, expected)
    assert snapshot(files / "run") == before


def test_output_that_is_a_file_is_one_line(files, capsys):
    assert main(pretrain_args(files, files / "a_file.txt")) == 2
    expect_one_line(capsys.readouterr().err, "a_file.txt is a file; give a folder")
    assert main(pretrain_args(files, files / "a_file.txt" / "run")) == 2
    expect_one_line(capsys.readouterr().err, "a_file.txt is a file; give a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_is_one_line(tmp_path, files, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main(pretrain_args(files, locked / "run")) == 2
    expect_one_line(capsys.readouterr().err, "is not writable")


BAD_RECONSTRUCT_FLAGS = [
    (["--checkpoint", "{root}/missing.pth"], "missing.pth"),
    (["--checkpoint", "{root}/a_file.txt"], "a_file.txt is not a readable checkpoint"),
    (["--checkpoint", "{root}/run/ckpt_step_0000003.pth", "--count", "0"], "--count must be an integer >= 1"),
    (["--checkpoint", "{root}/run/ckpt_step_0000003.pth", "--device", "gpu9"], "--device"),
    (["--checkpoint", "{root}/run/ckpt_step_0000003.pth", "--preset", "vit-tiny", "--images", "{root}/empty"],
     "no image files"),
    (["--checkpoint", "{root}/run/ckpt_step_0000003.pth", "--images", "{root}/missing"], "missing: no such directory"),
    (["--checkpoint", "{root}/run/ckpt_step_0000003.pth", "--out", "{root}/a_file.txt/grid.png"],
     "a_file.txt is a file; give a folder"),
    (["--checkpoint", "{root}/run/ckpt_step_0000003.pth", "--out", "{root}/grid.txt"], "not an image file name"),
    (["--checkpoint", "{root}/run/ckpt_step_0000003.pth", "--preset", "vit-huge"], "invalid choice: 'vit-huge'"),
    (["--checkpoint", "{root}/run/ckpt_step_0000003.pth", "--config", "{root}/malformed.yaml"], "not valid YAML"),
    (["--checkpoint", "{root}/run/ckpt_step_0000003.pth", "--seed", "x"], "invalid int value: 'x'"),
    (["--checkpoint", "{root}/run/ckpt_step_0000003.pth", "--trust-checkpoint=no"], "ignored explicit argument"),
]


@pytest.mark.parametrize("extra, expected", BAD_RECONSTRUCT_FLAGS, ids=[" ".join(a) for a, _ in BAD_RECONSTRUCT_FLAGS])
def test_bad_reconstruct_flag_is_one_line_exit_2_and_writes_nothing(extra, expected, files, tmp_path, capsys):
    argv = ["reconstruct", "--images", str(files / "images"), "--out", str(tmp_path / "grid.png")]
    assert main(argv + [arg.format(root=files) for arg in extra]) == 2
    expect_one_line(capsys.readouterr().err, expected)
    assert not (tmp_path / "grid.png").exists()


def test_an_error_raised_in_a_data_loader_worker_is_its_own_last_line():
    from simmim_fast.user_errors import describe

    raised_in_worker = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most "
                                  "recent call last):\n  File \"data.py\", line 9, in load\n    raise ValueError(x)\n"
                                  "ValueError: --data /x: every image file is unreadable\n")
    assert describe(raised_in_worker) == ("--data /x: every image file is unreadable", 2)
    assert describe(OSError(errno.ENOSPC, "No space left on device", "/run/log.jsonl")) == (
        "No space left on device: /run/log.jsonl", 1)
    assert describe(KeyError("bug")) is None  # a bug keeps its traceback


def test_debug_shows_the_traceback(files, tmp_path):
    with pytest.raises(ValueError, match="--steps must be an integer >= 1"):
        main(pretrain_args(files, tmp_path / "out") + ["--steps", "0", "--debug"])
    with pytest.raises(ValueError, match="type mismatch"):
        main(["--debug", *pretrain_args(files, tmp_path / "out"), "--set", "DATA.BATCH_SIZE=abc"])


def test_console_script_in_a_real_process(files, tmp_path):
    script = Path(sys.executable).with_name("simmim-fast")  # the console script of `pip install -e .`
    prefix = [str(script)] if script.exists() else [sys.executable, "-m", "simmim_fast.cli"]
    for extra, expected in [(["--config", str(files / "malformed.yaml")], "not valid YAML (mapping values are not allowed here at line 3, column 14)"),
                            (["--steps", "abc"], "invalid int value: 'abc'")]:
        done = subprocess.run(prefix + pretrain_args(files, tmp_path / "out") + extra, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and done.stdout == ""
        expect_one_line(done.stderr, expected)
        assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


# ---- what a run does when the machine or its files fail ------------------------------------------------

def run_args(files, output, steps):
    return pretrain_args(files, output) + ["--steps", str(steps), "--save-every", "2", "--keep-last", "0",
                                           "--picture-every", "1000"]


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(files, tmp_path, monkeypatch, capsys):
    """torch.save on a full disk raises its zip writer's RuntimeError, the ENOSPC only in the chain."""
    real_save = torch.save
    calls = []

    def save_on_a_disk_that_fills_up(obj, file, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, file, *args, **kwargs)
        file.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", save_on_a_disk_that_fills_up)
    out = tmp_path / "run"
    assert main(run_args(files, out, 4)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "ckpt_step_0000004.pth" in errors[0]
    assert [p.name for p in out.iterdir() if "ckpt" in p.name] == ["ckpt_step_0000002.pth"]  # no temp file
    assert load_checkpoint(out / "ckpt_step_0000002.pth")["step"] == 2


def test_torn_checkpoints_and_partial_writes_on_resume(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(files, out, 4)) == 0
    good = load_checkpoint(out / "ckpt_step_0000004.pth")["model"]
    # A kill inside save_atomic leaves its hidden temp file; a torn copy leaves a truncated checkpoint.
    leftover = out / ".ckpt_step_0000006.pth.0123abcd.tmp"
    leftover.write_bytes(b"partial")
    newest = out / "ckpt_step_0000004.pth"
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    assert main(run_args(files, out, 4)) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping {newest} is not a readable checkpoint" in err
    assert f"resumed from {out / 'ckpt_step_0000002.pth'} at step 2" in err
    assert not leftover.exists()
    resumed = load_checkpoint(newest)["model"]  # rewritten from step 2: the same weights, bit for bit
    assert all(torch.equal(resumed[name], tensor) for name, tensor in good.items())

    for path in checkpoints.list_checkpoints(out):
        path.write_bytes(b"garbage")
    assert main(run_args(files, out, 6)) == 2
    *warnings, error = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and all(line.startswith("warning: skipping") for line in warnings)
    expect_one_line(error, f"none of the 2 checkpoint(s) in {out} is readable")


def test_resume_with_more_steps_says_the_schedule_changed(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(files, out, 2)) == 0
    capsys.readouterr()
    assert main(run_args(files, out, 4)) == 0
    err = capsys.readouterr().err
    assert "warning: the learning-rate schedule differs from the checkpoint's (total_steps 2 -> 4" in err
    assert "the LR of step 3 is" in err


def test_checkpoints_follow_the_umask(tmp_path):
    for umask, mode in [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)]:
        previous = os.umask(umask)
        try:
            path = save_atomic({"w": torch.ones(2)}, tmp_path / f"ckpt_{umask:o}.pth")
        finally:
            os.umask(previous)
        assert path.stat().st_mode & 0o777 == mode


# The downstream commands follow the same rule (their count options share pretrain's checks).
BAD_DOWNSTREAM_FLAGS = [
    (["finetune", "--preset", "vit-tiny", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["finetune", "--preset", "vit-tiny", "--accum-steps", "-2"], "--accum-steps must be an integer >= 1, got -2"),
    (["finetune", "--preset", "vit-tiny", "--keep-last", "-1"], "--keep-last must be an integer >= 0, got -1"),
    (["finetune", "--preset", "vit-tiny", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["eval", "--preset", "vit-tiny", "--knn", "--k", "0"], "--k must be an integer >= 1, got 0"),
    (["eval", "--preset", "vit-tiny", "--linear", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["eval", "--preset", "vit-tiny", "--knn", "--temperature", "0"], "--temperature must be > 0"),
    (["export", "--checkpoint", "{root}/a_file.txt", "--format", "timm"], "not a readable checkpoint"),
]


@pytest.mark.parametrize("argv, expected", BAD_DOWNSTREAM_FLAGS, ids=[" ".join(a) for a, _ in BAD_DOWNSTREAM_FLAGS])
def test_bad_downstream_flag_is_one_line_exit_2_and_writes_nothing(argv, expected, files, tmp_path, capsys):
    output = tmp_path / "out"
    flag = "--out" if argv[0] == "export" else "--output"
    assert main([arg.format(root=files) for arg in argv] + [flag, str(output)]) == 2
    expect_one_line(capsys.readouterr().err, expected)
    assert not output.exists()
