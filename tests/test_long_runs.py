"""A long run never loses good work (issue 21, docs/long-runs.md): divergence keeps the good checkpoints and
stops with one line; every command that reads a checkpoint says in one line what is wrong with a damaged or
foreign one; one run per output folder; Ctrl-C is one line and exit 130."""
import hashlib
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from simmim_fast.checkpoint import load_checkpoint, write_atomic
from simmim_fast.cli import main
from simmim_fast.downstream.finetune import Finetuning
from simmim_fast.train import checkpoints, run_lock
from simmim_fast.train.scenes import render_scene

from test_train_cli import cli_prefix

# A 1-block ViT on 64px images: a step takes tens of milliseconds on a CPU core.
TINY = ["--set", "MODEL.VIT.DEPTH=1", "--set", "MODEL.VIT.EMBED_DIM=48", "--set", "MODEL.VIT.NUM_HEADS=2"]
COMMAND = cli_prefix()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Images, a labelled folder, and the checkpoints of a 2-step tiny pretraining."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "images").mkdir()
    for index in range(16):
        render_scene(index, 72).save(root / "images" / f"{index}.png")
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / "labelled" / split / label
            folder.mkdir(parents=True)
            for index in range(4):
                render_scene(index + (4 if label == "b" else 0), 72).save(folder / f"{index}.png")
    assert main(pretrain_args(root, root / "run") + ["--steps", "2", "--save-every", "1"]) == 0
    return root


def pretrain_args(inputs, output):
    return ["pretrain", "--preset", "vit-tiny", *TINY, "--data", str(inputs / "images"), "--batch-size", "8",
            "--num-workers", "0", "--picture-every", "1000", "--output", str(output)]


def finetune_args(inputs, output):
    return ["finetune", "--preset", "vit-tiny", *TINY, "--data", str(inputs / "labelled"), "--batch-size", "4",
            "--num-workers", "0", "--output", str(output)]


def strict_json(text: str):
    """json.loads that refuses the NaN/Infinity tokens Python writes by default (not JSON)."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def snapshot(folder: Path):
    return {path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("simmim-fast") and "Traceback" not in err, err
    return lines[0]


# ---- item 1: divergence ---------------------------------------------------------------------------------

def test_divergence_keeps_the_good_checkpoints_and_stops_naming_the_last_good_one(tmp_path):
    """The issue's scenario in real processes: 12 good steps, then a 1e6 learning rate. Before, --keep-last 2
    deleted steps 9 and 12 and kept the diverged 18 and 21."""
    inputs = tmp_path / "images"
    inputs.mkdir()
    for index in range(16):
        render_scene(index, 72).save(inputs / f"{index}.png")
    out = tmp_path / "div"
    args = COMMAND + ["pretrain", "--preset", "vit-tiny", *TINY, "--data", str(inputs), "--batch-size", "8",
                      "--save-every", "3", "--keep-last", "2", "--num-workers", "0", "--picture-every", "1000",
                      "--output", str(out)]
    first = subprocess.run(args + ["--steps", "12"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    good = {name: load_checkpoint(out / name)["model"] for name in ("ckpt_step_0000009.pth", "ckpt_step_0000012.pth")}

    diverged = subprocess.run(args + ["--steps", "30", "--set", "TRAIN.BASE_LR=1e6"], capture_output=True,
                              text=True, timeout=600)
    assert diverged.returncode == 1
    error = [line for line in diverged.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "Traceback" not in diverged.stderr, diverged.stderr
    assert error[0].startswith("simmim-fast pretrain: error: step 23: 10 optimizer step(s) in a row had a bad loss "
                               "since step 14"), error[0]
    assert f"The last good checkpoint is {out / 'ckpt_step_0000012.pth'}." in error[0]
    # The good checkpoints survive untouched; those written after the run went bad carry the mark.
    assert [p.name for p in checkpoints.list_checkpoints(out)] == list(good)
    assert all(torch.equal(load_checkpoint(out / name)["model"][key], value)
               for name, state in good.items() for key, value in state.items())
    assert [p.name for p in checkpoints.list_checkpoints(out, bad=True)] == ["bad_ckpt_step_0000018.pth",
                                                                              "bad_ckpt_step_0000021.pth"]
    for bad in checkpoints.list_checkpoints(out, bad=True):  # never a non-finite value in any checkpoint
        state = load_checkpoint(bad)
        assert checkpoints.all_finite(state["model"], state["optimizer"])
    rows = [strict_json(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 24)) and all("bad" in row for row in rows[13:])

    resumed = subprocess.run(args + ["--steps", "13"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'ckpt_step_0000012.pth'} at step 12" in resumed.stderr


@pytest.mark.parametrize("bad_value", [float("nan"), 1e4], ids=["nan", "spike"])
def test_fine_tuning_follows_the_same_rule(inputs, tmp_path, monkeypatch, capsys, bad_value):
    """From step 13 on every loss is bad (NaN, or 1e4 x: a spike). The checkpoint of step 12 gave the first
    bad loss, so it is marked bad after the fact; step 10's survives --keep-last 1 as the last good one."""
    real_loss = Finetuning._loss

    def loss_going_bad(self, batch, generator):
        loss = real_loss(self, batch, generator)
        return loss * bad_value if self.step >= 12 else loss

    monkeypatch.setattr(Finetuning, "_loss", loss_going_bad)
    out = tmp_path / "ft"
    # --epochs 15 over 30 steps: an evaluation and a checkpoint every 2 steps.
    status = main(finetune_args(inputs, out) + ["--steps", "30", "--epochs", "15", "--keep-last", "1",
                                                "--set", "AUG.MIXUP=0", "--set", "AUG.CUTMIX=0"])
    err = capsys.readouterr().err
    assert status == 1
    line = one_error_line("\n".join(line for line in err.splitlines() if "error:" in line))
    reason = "non-finite loss (nan)" if bad_value != 1e4 else "loss spike ("
    assert line.startswith("simmim-fast finetune: error: step 22: 10 optimizer step(s) in a row had a bad loss "
                           f"since step 13 (last: {reason}"), line
    assert f"The last good checkpoint is {out / 'ckpt_step_0000010.pth'}." in line
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["ckpt_step_0000010.pth"]
    assert [p.name for p in checkpoints.list_checkpoints(out, bad=True)] == ["bad_ckpt_step_0000020.pth"]
    for row in (out / "log.jsonl").read_text().splitlines():
        strict_json(row)


def test_a_non_finite_state_is_never_written(inputs, tmp_path, monkeypatch, capsys):
    """One NaN in the optimizer's state at a save (the losses still finite): the run stops, nothing written."""
    real_state_dict = torch.optim.AdamW.state_dict

    def state_with_a_nan(self):
        state = real_state_dict(self)
        next(iter(state["state"].values()))["exp_avg_sq"].view(-1)[3] = float("inf")
        return state

    out = tmp_path / "run"
    assert main(pretrain_args(inputs, out) + ["--steps", "2", "--save-every", "1"]) == 0
    monkeypatch.setattr(torch.optim.AdamW, "state_dict", state_with_a_nan)
    assert main(pretrain_args(inputs, out) + ["--steps", "4", "--save-every", "1"]) == 1
    line = one_error_line("\n".join(line for line in capsys.readouterr().err.splitlines() if "error:" in line))
    assert "step 3: the model or optimizer state holds a non-finite value; no checkpoint written" in line
    assert f"The last good checkpoint is {out / 'ckpt_step_0000002.pth'}." in line
    assert sorted(p.name for p in out.glob("*ckpt*")) == ["ckpt_step_0000001.pth", "ckpt_step_0000002.pth"]


# ---- item 3: every command that reads a checkpoint ------------------------------------------------------

def _cut(length):
    def make(good: Path, path: Path) -> None:
        data = good.read_bytes()
        path.write_bytes(data[:length if length >= 0 else len(data) + length])
    return make


def _saved(change):
    def make(good: Path, path: Path) -> None:
        torch.save(change(load_checkpoint(good)), path)
    return make


def _weights(change):
    return _saved(lambda state: {**state, "model": change(dict(state["model"]))})


FIRST_KEY = "encoder.patch_embed.proj.weight"
DAMAGE = {
    "cut at 0 B": (_cut(0), "is not a readable checkpoint"),
    "cut at 100 B": (_cut(100), "is not a readable checkpoint"),
    "cut at 5 KB": (_cut(5000), "is not a readable checkpoint"),
    "cut 1 KB short": (_cut(-1000), "is not a readable checkpoint"),
    "a list": (_saved(lambda state: [1, 2, 3]), "holds a list"),
    "missing key": (_weights(lambda model: {k: v for k, v in model.items() if k != FIRST_KEY}),
                    "does not fit the model (another size or architecture?): missing: "),
    "extra key": (_weights(lambda model: {**model, "encoder.bogus": torch.ones(2)}), "unexpected: "),
    "wrong shape": (_weights(lambda model: {**model, FIRST_KEY: model[FIRST_KEY][:24]}), "shape mismatch: "),
}
# Each command's argument list for checkpoint {ckpt}, writing under {out}.
READERS = {
    "pretrain --resume": lambda inputs, out: pretrain_args(inputs, out) + ["--steps", "3", "--resume", "{ckpt}"],
    "reconstruct": lambda inputs, out: ["reconstruct", "--checkpoint", "{ckpt}", "--images", str(inputs / "images"),
                                        "--out", str(out) + ".png"],
    "finetune --pretrained": lambda inputs, out: ["finetune", "--pretrained", "{ckpt}", "--data",
                                                  str(inputs / "labelled"), "--num-workers", "0", "--steps", "1",
                                                  "--output", str(out)],
    "eval": lambda inputs, out: ["eval", "--checkpoint", "{ckpt}", "--knn", "--data", str(inputs / "labelled"),
                                 "--cache-dir", str(out), "--output", str(out) + ".json"],
    "export": lambda inputs, out: ["export", "--checkpoint", "{ckpt}", "--format", "timm", "--out", str(out)],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("reader", list(READERS))
def test_a_damaged_checkpoint_is_one_line_naming_it_exit_2_nothing_written(inputs, tmp_path, capsys, reader, damage):
    make, expected = DAMAGE[damage]
    checkpoint = tmp_path / "damaged.pth"
    make(inputs / "run" / "ckpt_step_0000002.pth", checkpoint)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    argv = [arg.replace("{ckpt}", str(checkpoint)) for arg in READERS[reader](inputs, out)]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(checkpoint) in line and expected in line, line
    assert snapshot(tmp_path) == before  # nothing written, not even an empty folder


def test_another_commands_checkpoint_says_what_the_file_is(inputs, tmp_path, capsys):
    good = inputs / "run" / "ckpt_step_0000002.pth"
    fine_tune = tmp_path / "finetuned.pth"
    torch.save({**load_checkpoint(good), "format": checkpoints.FINETUNE_FORMAT, "classes": ["a", "b"],
                "evaluations": []}, fine_tune)
    out = tmp_path / "out"
    cases = [(pretrain_args(inputs, out) + ["--resume", str(fine_tune)],
              f"{fine_tune} is a simmim-fast fine-tuning checkpoint, not a simmim-fast pretraining checkpoint; "
              "continue it with simmim-fast finetune --resume"),
             (finetune_args(inputs, out) + ["--resume", str(good)],
              f"{good} is a simmim-fast pretraining checkpoint, not a simmim-fast fine-tuning checkpoint; continue it "
              "with simmim-fast pretrain --resume, fine-tune from it with finetune --pretrained"),
             (["reconstruct", "--checkpoint", str(fine_tune), "--images", str(inputs / "images"), "--out",
               str(out) + ".png"], f"{fine_tune} is a simmim-fast fine-tuning checkpoint: a classifier without")]
    for argv, expected in cases:
        assert main(argv) == 2
        line = one_error_line(capsys.readouterr().err)
        assert expected in line, line
        assert not out.exists() and not Path(str(out) + ".png").exists()


@pytest.mark.parametrize("length", [0, 100, 5000, -1000, -1])
def test_auto_resume_skips_a_newest_checkpoint_cut_at_any_length(inputs, tmp_path, capsys, length):
    for name in ("ckpt_step_0000001.pth", "ckpt_step_0000002.pth"):
        (tmp_path / name).write_bytes((inputs / "run" / name).read_bytes())
    _cut(length)(inputs / "run" / "ckpt_step_0000002.pth", tmp_path / "ckpt_step_0000002.pth")
    path, state = checkpoints.read_resume_checkpoint("auto", tmp_path)
    assert path.name == "ckpt_step_0000001.pth" and state["step"] == 1
    assert capsys.readouterr().err.startswith(f"warning: skipping {tmp_path / 'ckpt_step_0000002.pth'} is not a "
                                              "readable checkpoint")


def test_a_cut_checkpoint_in_a_real_process_is_one_line_exit_2(inputs, tmp_path):
    """Before: `simmim-fast reconstruct: error: Invalid argument` for a 5 KB cut (torch's zip reader's OSError)."""
    checkpoint = tmp_path / "cut.pth"
    _cut(5000)(inputs / "run" / "ckpt_step_0000002.pth", checkpoint)
    done = subprocess.run(COMMAND + ["reconstruct", "--checkpoint", str(checkpoint), "--images",
                                     str(inputs / "images"), "--out", str(tmp_path / "grid.png")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert one_error_line(done.stderr).startswith(f"simmim-fast reconstruct: error: {checkpoint} is not a readable "
                                                  "checkpoint")
    assert not (tmp_path / "grid.png").exists()


# ---- items 6 and 7: one run per folder; Ctrl-C ----------------------------------------------------------

def test_ctrl_c_inside_torch_save_is_a_keyboard_interrupt_and_leaves_no_file(tmp_path):
    """torch.save's zip writer turns an exception in a write into its RuntimeError ("enforce fail at
    inline_container.cc"): before, a Ctrl-C landing in a checkpoint write was a traceback, exit 1."""
    class InterruptedFile:
        def __init__(self, file):
            self.file, self.writes = file, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            return self.file.write(data)

        def flush(self):
            self.file.flush()

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "ckpt.pth", lambda file: torch.save({"w": torch.ones(1000)}, InterruptedFile(file)))
    assert list(tmp_path.iterdir()) == []


def test_a_second_run_into_a_held_folder_is_refused_and_ctrl_c_is_one_line(inputs, tmp_path, capsys):
    """Two real processes: the second is refused naming the first (pid, host); SIGINT ends the first with one
    line, exit 130, no temp files, every log row whole; the lock goes with the process."""
    out = tmp_path / "run"
    # SIGINT back to its default in the child: a suite started as a background job (`cmd &`) has it ignored,
    # which the child would inherit, and then Ctrl-C would not reach it.
    holder = subprocess.Popen(COMMAND + pretrain_args(inputs, out) + ["--steps", "100000", "--save-every", "1"],
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("ckpt_step_*.pth")) and time.monotonic() < deadline and holder.poll() is None:
            time.sleep(0.2)  # until it trains and holds the folder (a checkpoint is written after the lock)
        assert f"pid {holder.pid} on {socket.gethostname()}" in (out / run_lock.LOCK_NAME).read_text()
        for second in (pretrain_args(inputs, out) + ["--steps", "3"], finetune_args(inputs, out) + ["--steps", "1"]):
            assert main(second) == 2  # this test's process is the second one
            line = one_error_line(capsys.readouterr().err)
            assert f"{out} is in use by another run (pid {holder.pid} on {socket.gethostname()}, started " in line

        holder.send_signal(signal.SIGINT)
        _, err = holder.communicate(timeout=120)
    finally:
        holder.kill()
    assert holder.returncode == 130
    line = one_error_line("\n".join(line for line in err.splitlines() if line.startswith("simmim-fast")))
    assert "Traceback" not in err and line.startswith("simmim-fast pretrain: interrupted at step "), err
    assert "no checkpoint is written on interrupt: the newest checkpoint is" in line
    assert line.endswith("(--resume auto continues from it)")
    assert not list(out.rglob("*.tmp"))
    for row in (out / "log.jsonl").read_text().splitlines():
        strict_json(row)
    newest = checkpoints.list_checkpoints(out)[-1]
    assert str(newest) in line and load_checkpoint(newest)["step"] >= 1
    with run_lock.holding(out, is_main=True):  # released by the process's end
        pass
