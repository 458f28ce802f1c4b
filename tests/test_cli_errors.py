"""Every user mistake at the command line is one line on stderr naming the bad value, exit status 2, and
nothing written: no output folder created, an existing run's files untouched. ``--debug`` gives the
traceback. Plus what a run does with a full disk, torn checkpoints and a changed schedule (issue #13)."""
import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch

from simmim_fast.checkpoint import load_checkpoint, save_atomic
from simmim_fast.cli import main
from simmim_fast.train import checkpoints
from simmim_fast.train.scenes import render_scene

from test_train_cli import run_command

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
    (["--set", "DATA.MASK_RATIO=0.0"], "DATA.MASK_RATIO must be in (0, 1], got 0.0"),
    (["--set", "TRAIN.EPOCHS=0"], "TRAIN.EPOCHS must be an integer >= 1, got 0"),
    (["--set", "TRAIN.ACCUMULATION_STEPS=-2"], "TRAIN.ACCUMULATION_STEPS must be an integer >= 0, got -2"),
    (["--set", "TRAIN.LR_SCHEDULER.NAME=exp"], "TRAIN.LR_SCHEDULER.NAME must be cosine, linear, step or multistep"),
    (["--preset", "swin-tiny", "--set", "MODEL.SWIN.WINDOW_SIZE=7"], "(32x32) does not split into 7x7 windows"),
    (["--config", "{root}/missing.yaml"], "missing.yaml: no such file"),
    (["--config", "{root}/empty"], "--config {root}/empty is a folder; give a YAML file"),
    (["--config", "{root}/malformed.yaml"], "malformed.yaml: not valid YAML"),
    (["--data", "{root}/empty"], "no image files"),
    (["--data", "{root}/missing"], "missing"),
    (["--backend", "tritonn"], "unknown backend 'tritonn'"),
    (["--fsdp"], "--fsdp needs several processes"),
    (["--compile=yes"], "argument --compile: invalid choice: 'yes' (choose from 'default', 'reduce-overhead'"),
    (["--grad-checkpoint=1"], "argument --grad-checkpoint: ignored explicit argument '1'"),
    (["--optimizer", "apex-fused-adam"], "--optimizer apex-fused-adam needs NVIDIA apex"),
    (["--resume", "{root}/missing.pth"], "missing.pth: no such checkpoint file"),
    (["--resume", "{root}/a_file.txt"], "a_file.txt is not a readable checkpoint"),
    (["--batch-size", "16"], "8 images give 8 per process, fewer than one batch of 16"),
    (["--accum-steps", "4"], "an epoch has 2 batches, fewer than --accum-steps 4"),
]
# Every hyperparameter is checked (one table, simmim_fast.config.HYPERPARAMETERS) before anything is written;
# the line names the key and the value as typed, not a batch-scaled one (-1e-3 used to say -7.8125e-06).
BAD_HYPERPARAMETERS = [
    ("TRAIN.BASE_LR=-1e-3", "TRAIN.BASE_LR must be a number >= 0, got -1e-3"),
    ("TRAIN.WARMUP_LR=-1e-6", "TRAIN.WARMUP_LR must be a number >= 0, got -1e-6"),
    ("TRAIN.MIN_LR=-1e-6", "TRAIN.MIN_LR must be a number >= 0, got -1e-6"),
    ("TRAIN.MIN_LR=0.5", "TRAIN.MIN_LR 0.5 must not exceed TRAIN.BASE_LR 0.016"),
    ("TRAIN.BASE_LR=.nan", "TRAIN.BASE_LR must be a finite number, got .nan"),
    ("TRAIN.WEIGHT_DECAY=.inf", "TRAIN.WEIGHT_DECAY must be a finite number, got .inf"),
    ("TRAIN.OPTIMIZER.BETAS=[0.9,.nan]", "TRAIN.OPTIMIZER.BETAS must hold only finite numbers, got [0.9,.nan]"),
    ("TRAIN.OPTIMIZER.BETAS=[0.9,1.0]", "TRAIN.OPTIMIZER.BETAS must be a list of 2 items each in [0, 1), got [0.9,1.0]"),
    ("TRAIN.OPTIMIZER.EPS=0.0", "TRAIN.OPTIMIZER.EPS must be a number > 0, got 0.0"),
    ("TRAIN.CLIP_GRAD=-1.0", "TRAIN.CLIP_GRAD must be a max norm > 0, or 0 / None for no clipping, got -1.0"),
    ("TRAIN.WEIGHT_DECAY=-0.05", "TRAIN.WEIGHT_DECAY must be a number >= 0, got -0.05"),
    ("TRAIN.WARMUP_EPOCHS=-1", "TRAIN.WARMUP_EPOCHS must be an integer >= 0, got -1"),
    ("TRAIN.LR_SCHEDULER.MULTISTEPS=[-5]", "TRAIN.LR_SCHEDULER.MULTISTEPS must be a list of items each an integer"),
    ("MODEL.DROP_PATH_RATE=1.5", "MODEL.DROP_PATH_RATE must be in [0, 1), got 1.5"),
    ("MODEL.DROP_PATH_RATE=-0.1", "MODEL.DROP_PATH_RATE must be in [0, 1), got -0.1"),
    ("MODEL.LABEL_SMOOTHING=1.0", "MODEL.LABEL_SMOOTHING must be in [0, 1), got 1.0"),
    ("DATA.IMG_SIZE=0", "DATA.IMG_SIZE must be an integer >= 1, got 0"),
    ("DATA.IMG_SIZE=72", "DATA.IMG_SIZE 72 must be a multiple of DATA.MASK_PATCH_SIZE 16"),
    ("DATA.MASK_PATCH_SIZE=0", "DATA.MASK_PATCH_SIZE must be an integer >= 1, got 0"),
    ("DATA.MASK_RATIO=1.5", "DATA.MASK_RATIO must be in (0, 1], got 1.5"),
    ("DATA.MASK_RATIO_END=0.0", "DATA.MASK_RATIO_END must be None (a fixed ratio) or in (0, 1], got 0.0"),
    ("SAVE_FREQ=0", "SAVE_FREQ must be an integer >= 1, got 0"),
]
BAD_PRETRAIN_FLAGS += [(["--set", assignment], expected) for assignment, expected in BAD_HYPERPARAMETERS]
if not torch.cuda.is_available():
    BAD_PRETRAIN_FLAGS.append((["--device", "cuda"], "--device cuda but torch sees no CUDA device"))
    if os.environ.get("TRITON_INTERPRET") != "1":  # fails at the first forward: used to leave log.jsonl behind
        BAD_PRETRAIN_FLAGS.append((["--backend", "triton"], "backend 'triton' was forced for"))


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
    expected = expected.format(root=files)
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
    (["--checkpoint", "{root}/run/ckpt_step_0000003.pth", "--images", "{root}/missing"],
     "--images {root}/missing: no such directory"),
    (["--checkpoint", "{root}/run/ckpt_step_0000003.pth", "--device", "meta"], "--device meta holds no data"),
]
if not torch.cuda.is_available():  # used to be a traceback
    BAD_RECONSTRUCT_FLAGS.append((["--checkpoint", "{root}/run/ckpt_step_0000003.pth", "--device", "cuda"],
                                  "--device cuda but torch sees no CUDA device; use --device cpu"))


@pytest.mark.parametrize("extra, expected", BAD_RECONSTRUCT_FLAGS, ids=[" ".join(a) for a, _ in BAD_RECONSTRUCT_FLAGS])
def test_bad_reconstruct_flag_is_one_line_exit_2_and_writes_nothing(extra, expected, files, tmp_path, capsys):
    argv = ["reconstruct", "--images", str(files / "images"), "--out", str(tmp_path / "grid.png")]
    assert main(argv + [arg.format(root=files) for arg in extra]) == 2
    expect_one_line(capsys.readouterr().err, expected.format(root=files))
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


# Each in its own process, as a user meets it: (arguments past the subcommand's usual ones, what the line
# says). Issue 21's hyperparameters name the key and the value as typed; the small cases name their own flag.
REAL_PROCESS_CASES = [
    (["--config", "{root}/malformed.yaml"], "not valid YAML (mapping values are not allowed here at line 3, column 14)"),
    (["--steps", "abc"], "invalid int value: 'abc'"),
    (["--set", "TRAIN.BASE_LR=-1e-3"], "TRAIN.BASE_LR must be a number >= 0, got -1e-3"),
    (["--set", "TRAIN.CLIP_GRAD=-1"], "TRAIN.CLIP_GRAD must be a max norm > 0, or 0 / None for no clipping, got -1"),
    (["--set", "MODEL.DROP_PATH_RATE=1.5"], "MODEL.DROP_PATH_RATE must be in [0, 1), got 1.5"),
    (["--set", "DATA.IMG_SIZE=0"], "DATA.IMG_SIZE must be an integer >= 1, got 0"),
    (["--config", "{root}/empty"], "--config {root}/empty is a folder; give a YAML file"),
]
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    REAL_PROCESS_CASES.append((["--backend", "triton"], "backend 'triton' was forced for"))


@pytest.mark.parametrize("extra, expected", REAL_PROCESS_CASES, ids=[" ".join(a) for a, _ in REAL_PROCESS_CASES])
def test_pretrain_mistake_in_a_real_process(extra, expected, files, tmp_path):
    """One line on stderr (no traceback, nothing on stdout), exit 2, and no run folder, so no log.jsonl."""
    done = run_command(*pretrain_args(files, tmp_path / "out") + [arg.format(root=files) for arg in extra])
    assert done.returncode == 2 and done.stdout == "", done
    expect_one_line(done.stderr, expected.format(root=files))
    assert "Traceback" not in done.stderr and list(tmp_path.iterdir()) == []


REAL_PROCESS_OTHER_COMMANDS = [
    (["reconstruct", "--checkpoint", "{root}/run/ckpt_step_0000003.pth", "--images", "{root}/missing", "--out",
      "{tmp}/grid.png"], "--images {root}/missing: no such directory"),
    (["prepare-data", "{root}/missing", "{tmp}/store", "--max-side", "64"], "SRC {root}/missing: no such directory"),
    (["finetune", "--preset", "vit-tiny", "--set", "MODEL.LABEL_SMOOTHING=1.0", "--output", "{tmp}/run"],
     "MODEL.LABEL_SMOOTHING must be in [0, 1), got 1.0"),
]
if not torch.cuda.is_available():  # used to be a traceback
    REAL_PROCESS_OTHER_COMMANDS.append(
        (["reconstruct", "--checkpoint", "{root}/run/ckpt_step_0000003.pth", "--images", "{root}/images", "--out",
          "{tmp}/grid.png", "--device", "cuda"], "--device cuda but torch sees no CUDA device; use --device cpu"))


@pytest.mark.parametrize("argv, expected", REAL_PROCESS_OTHER_COMMANDS,
                         ids=[f"{a[0]}: {e[:40]}" for a, e in REAL_PROCESS_OTHER_COMMANDS])
def test_other_command_mistake_in_a_real_process(argv, expected, files, tmp_path):
    done = run_command(*[arg.format(root=files, tmp=tmp_path) for arg in argv])
    assert done.returncode == 2 and done.stdout == "", done
    expect_one_line(done.stderr, expected.format(root=files))
    assert "Traceback" not in done.stderr and list(tmp_path.iterdir()) == []


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
    # The embedded scenes: 512 training images.
    (["eval", "--preset", "vit-tiny", "--knn", "--k", "600", "--cache-dir", "{root}/no_cache"],
     "--k 600 is more than the 512 training images"),
    (["eval", "--preset", "vit-tiny", "--knn", "--device", "meta"], "--device meta holds no data"),
    (["finetune", "--preset", "vit-tiny", "--backend", "tritonn"], "unknown backend 'tritonn'"),
    (["finetune", "--preset", "vit-tiny", "--output", "{root}/a_file.txt/run"], "a_file.txt is a file; give a folder"),
] + [(["finetune", "--preset", "vit-tiny", "--set", assignment], expected) for assignment, expected in [
    ("MODEL.LABEL_SMOOTHING=1.0", "MODEL.LABEL_SMOOTHING must be in [0, 1), got 1.0"),
    ("MODEL.DROP_PATH_RATE=1.5", "MODEL.DROP_PATH_RATE must be in [0, 1), got 1.5"),
    ("TRAIN.BASE_LR=-1e-3", "TRAIN.BASE_LR must be a number >= 0, got -1e-3"),
    ("TRAIN.CLIP_GRAD=-5.0", "TRAIN.CLIP_GRAD must be a max norm > 0, or 0 / None for no clipping, got -5.0"),
    ("TRAIN.LAYER_DECAY=0.0", "TRAIN.LAYER_DECAY must be in (0, 1], got 0.0"),
    ("AUG.MIXUP_PROB=1.5", "AUG.MIXUP_PROB must be in [0, 1], got 1.5"),
    ("AUG.REPROB=-0.25", "AUG.REPROB must be in [0, 1], got -0.25"),
    ("DATA.IMG_SIZE=60", "img_size (60, 60) must be a positive multiple of patch_size (8, 8)"),
]]
if not torch.cuda.is_available():
    BAD_DOWNSTREAM_FLAGS.append((["eval", "--preset", "vit-tiny", "--knn", "--device", "cuda"],
                                 "--device cuda but torch sees no CUDA device"))
    if os.environ.get("TRITON_INTERPRET") != "1":
        BAD_DOWNSTREAM_FLAGS.append((["finetune", "--preset", "vit-tiny", "--backend", "triton"],
                                     "backend 'triton' was forced for"))


@pytest.mark.parametrize("argv, expected", BAD_DOWNSTREAM_FLAGS, ids=[" ".join(a) for a, _ in BAD_DOWNSTREAM_FLAGS])
def test_bad_downstream_flag_is_one_line_exit_2_and_writes_nothing(argv, expected, files, tmp_path, capsys):
    output = tmp_path / "out"
    flag = "--out" if argv[0] == "export" else "--output"
    given = [arg.format(root=files) for arg in argv]
    assert main(given + ([] if flag in given else [flag, str(output)])) == 2
    expect_one_line(capsys.readouterr().err, expected)
    assert not output.exists()
    assert not (files / "no_cache").exists()  # eval's feature cache
