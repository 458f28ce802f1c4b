"""SimMIM on an XLA device (torch_xla, PJRT_DEVICE=CPU in CI) against CPU eager.

The lane `bash tests/run.sh xla` runs these in .venv-xla; elsewhere torch_xla is absent and the
module is skipped. Checks: the full model's forward, backward and optimizer steps match eager; the
step compiles to one graph that is reused (no recompilation, no host sync splitting the step); no
aten op falls back to the CPU; activation checkpointing; dispatch picks the xla backend for XLA tensors;
the options XLA refuses or sets. `simmim-fast pretrain/finetune --device xla` (SPMD data parallelism,
docs/tpu.md) run in subprocesses with CPU_NUM_DEVICES=4 or 1 (SPMD mode and the device count are fixed
per process): 4 devices equal 1 at the same global batch (pretrain, finetune), exact resumes, no aten
fallback, compile and transfer counts, no non-finite checkpoint, the profiler's trace.
"""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch_xla = pytest.importorskip("torch_xla")
import torch_xla.debug.metrics as metrics  # noqa: E402

from simmim_fast import MaskGenerator, build_simmim, dispatch, get_config  # noqa: E402
from simmim_fast.cli import main as cli_main  # noqa: E402
from simmim_fast.train import xla_spmd  # noqa: E402
from simmim_fast.train.engine import resolve_amp  # noqa: E402
from simmim_fast.train.loop import checkpoint_vit_blocks  # noqa: E402
from simmim_fast.train.monitor import read_log  # noqa: E402
from simmim_fast.user_errors import EXIT_RUN_FAILED, EXIT_USER_MISTAKE  # noqa: E402

pytestmark = pytest.mark.xla

BATCH = 2
STEPS = 4
WARMUP_STEPS = 2  # step 1 creates the optimizer state, so its graph differs from the later steps'
# XLA's CPU backend reorders reductions and fuses elementwise work: agreement to fp32 rounding
# accumulated over the steps. SGD with momentum keeps parameter differences proportional to
# gradient differences; AdamW would turn a rounding-level gradient near zero into a full-lr step
# of either sign (the CLI lane runs AdamW on XLA).
LOSS_TOL = dict(rtol=1e-4, atol=1e-5)
PARAM_TOL = dict(rtol=1e-4, atol=1e-5)


def make_batches(config, model, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = config.DATA.IMG_SIZE
    masks = MaskGenerator(size, config.DATA.MASK_PATCH_SIZE, model.patch_size, config.DATA.MASK_RATIO)
    images = [torch.randn(BATCH, 3, size, size, generator=generator) for _ in range(steps)]
    return images, [masks.generate(BATCH, generator=generator) for _ in range(steps)]


def train_steps(model, images, masks, device, after_each_step=lambda step: None):
    """Optimizer steps as the training loop runs them; returns the losses and final parameters on the CPU."""
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.05)
    losses = []
    for step, (image, mask) in enumerate(zip(images, masks)):
        optimizer.zero_grad(set_to_none=True)
        loss = model(image.to(device), mask.to(device))
        loss.backward()
        optimizer.step()
        if device.type == "xla":
            torch_xla.sync()
        losses.append(loss.detach())
        after_each_step(step)
    return torch.stack([loss.cpu() for loss in losses]), {n: p.detach().cpu() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def xla_device():
    return torch_xla.device()


@pytest.mark.parametrize("preset", ["vit-tiny", "swin-tiny"])
def test_training_steps_match_cpu_eager_in_one_cached_graph(preset, xla_device):
    """Forward, backward and optimizer steps on XLA equal CPU eager; after the warm-up every step is
    one graph taken from the compilation cache (a host sync inside the step would cut it into two
    graphs, a shape change would compile anew); no aten::* counter (an op falling back to the CPU).
    The compile-cache counters are bumped synchronously at each sync (execution is asynchronous)."""
    config = get_config(preset)
    torch.manual_seed(0)
    model = build_simmim(config)
    images, masks = make_batches(config, model, STEPS)
    counts = []

    def record(_step):
        counts.append((metrics.counter_value("UncachedCompile") or 0, metrics.counter_value("CachedCompile") or 0))

    cpu_losses, cpu_params = train_steps(copy.deepcopy(model), images, masks, torch.device("cpu"))
    metrics.clear_all()
    xla_losses, xla_params = train_steps(copy.deepcopy(model), images, masks, xla_device, after_each_step=record)

    assert torch.isfinite(cpu_losses).all()
    torch.testing.assert_close(xla_losses, cpu_losses, **LOSS_TOL)
    assert cpu_params.keys() == xla_params.keys()
    for name, expected in cpu_params.items():
        torch.testing.assert_close(xla_params[name], expected, msg=lambda m: f"{preset} {name}: {m}", **PARAM_TOL)
    initial = dict(model.named_parameters())
    assert any(not torch.equal(initial[name].detach(), value) for name, value in cpu_params.items()), "nothing trained"

    graphs_per_step = [(new - new_before, cached - cached_before)
                       for (new_before, cached_before), (new, cached) in zip(counts, counts[1:])]
    after_warmup = graphs_per_step[WARMUP_STEPS - 1:]
    assert after_warmup == [(0, 1)] * (STEPS - WARMUP_STEPS), (
        f"(compiled, cached) graphs per step {graphs_per_step}: want one cached graph per step after warm-up")
    fallbacks = [name for name in metrics.counter_names() if name.startswith("aten::")]
    assert not fallbacks, f"ops fell back to the CPU: {fallbacks}"


@pytest.mark.parametrize("preset", ["vit-tiny", "swin-tiny"])
def test_activation_checkpointing_on_xla(preset, xla_device):
    """--grad-checkpoint on XLA (torch_xla's checkpoint; torch's failed there on ``torch.xla``): the
    checkpointed blocks give the loss and gradients of the plain model."""
    config = get_config(preset)
    torch.manual_seed(0)
    model = build_simmim(config)
    images, masks = make_batches(config, model, 1)
    checkpointed = copy.deepcopy(model)
    if preset == "vit-tiny":
        checkpoint_vit_blocks(checkpointed)
    else:
        for layer in checkpointed.encoder.layers:
            layer.use_checkpoint = True
    grads = []
    for candidate in (model, checkpointed):
        candidate.to(xla_device)
        loss = candidate(images[0].to(xla_device), masks[0].to(xla_device))
        loss.backward()
        torch_xla.sync()
        grads.append([loss.detach().cpu()] + [p.grad.cpu() for p in candidate.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 10
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, **PARAM_TOL)


def test_dispatch_picks_the_xla_backend(xla_device):
    q = torch.randn(2, 3, 5, 8, device=xla_device)
    args = {"q": q, "k": q, "v": q, "bias": None, "scale": None, "dropout_p": 0.0}
    assert dispatch.select("attention", args).name == "xla"
    assert dict(dispatch.explain("attention", args))["cuda"]  # not for XLA tensors, and says why


@pytest.mark.parametrize("flag", ["--compile", "--fsdp"])
def test_cli_refuses_compile_and_fsdp_on_xla(flag, tmp_path, capsys):
    """--compile (Inductor takes no XLA tensors) and --fsdp (the batch is already sharded over every device):
    one line, exit 2, nothing written."""
    output = tmp_path / "run"
    argv = ["pretrain", "--preset", "vit-tiny", "--device", "xla", "--steps", "1", "--num-workers", "0", flag,
            "--output", str(output)]
    assert cli_main(argv) == EXIT_USER_MISTAKE
    error = capsys.readouterr().err.strip()
    assert flag in error and "\n" not in error, error
    assert not output.exists()


def test_amp_auto_is_bf16_on_tpus_and_full_precision_on_the_cpu_stand_in(xla_device, monkeypatch):
    assert resolve_amp("auto", xla_device) is None
    monkeypatch.setattr(xla_spmd, "on_tpu", lambda: True)
    assert resolve_amp("auto", xla_device) is torch.bfloat16
    assert resolve_amp("off", xla_device) is None


def test_xla_matmul_precision_reaches_xla():
    """--xla-matmul-precision sets torch_xla's fp32 matmul precision; anything else is a ValueError."""
    import torch_xla.backends

    try:
        xla_spmd.set_matmul_precision("highest")
        assert torch_xla.backends.get_mat_mul_precision() == "highest"
    finally:
        torch_xla.backends.set_mat_mul_precision("default")
    with pytest.raises(ValueError, match="--xla-matmul-precision must be one of default, high, highest"):
        xla_spmd.set_matmul_precision("exact")


# ---- SPMD data parallelism over several devices (tests/xla_spmd_driver.py in a subprocess per device count) ----

DRIVER = Path(__file__).with_name("xla_spmd_driver.py")
SPMD_DEVICES = 4
SPMD_STEPS, SPMD_SAVE_AT = 4, 2
# The 4-device program sums the loss and gradients in another order than the 1-device one (per-device
# partial sums, then an all-reduce): agreement to fp32 rounding, measured <= 6e-7 in losses.
SPMD_TOL = dict(rtol=1e-6, atol=1e-6)


def run_in_subprocess(devices: int, runs, tmp_path: Path, name: str, statuses=None):
    """The driver's per-run results; each run is (argv, checkpoint to resume from or None); ``statuses``:
    the exit status of each run (default: all 0)."""
    spec, result = tmp_path / f"{name}.spec.json", tmp_path / f"{name}.result.json"
    spec.write_text(json.dumps([{"argv": argv, "resume_from": str(start) if start else None} for argv, start in runs]))
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices)}
    process = subprocess.run([sys.executable, str(DRIVER), str(spec), str(result)], env=env, capture_output=True,
                             text=True, timeout=1800)
    assert process.returncode == 0, process.stderr[-4000:]
    results = json.loads(result.read_text())
    assert [run["status"] for run in results] == (statuses or [0] * len(runs)), process.stderr[-4000:]
    return results


def pretrain_argv(preset: str, output: Path, devices: int, global_batch: int, steps: int, save_every: int,
                  *extra: str):
    return ["pretrain", "--preset", preset, "--device", "xla", "--batch-size", str(global_batch // devices),
            "--steps", str(steps), "--save-every", str(save_every), "--keep-last", "0", "--num-workers", "0",
            "--picture-every", "1000", "--output", str(output), *extra]


def final_weights(output: Path, step: int):
    return torch.load(output / f"ckpt_step_{step:07d}.pth", weights_only=True)["model"]


def log_values(output: Path, key: str):
    rows = read_log(output / "log.jsonl")
    return {row["step"]: row[key] for row in rows}


@pytest.mark.parametrize("preset", ["vit-tiny", "swin-tiny"])
def test_spmd_on_four_devices_equals_one_device_and_resumes(preset, tmp_path):
    """4 devices x batch 2 (SPMD, batch sharded on 'data') = 1 device x batch 8, step for step (losses,
    gradient norms, weights), and the 4-device run resumed from its step-2 checkpoint ends on the same
    weights as the run that went through. Drop path off: the sharded program draws other random numbers."""
    global_batch = 8
    straight, resumed, single = tmp_path / "four", tmp_path / "four_resumed", tmp_path / "one"
    four_runs = run_in_subprocess(SPMD_DEVICES, [
        (pretrain_argv(preset, straight, SPMD_DEVICES, global_batch, SPMD_STEPS, SPMD_SAVE_AT), None),
        (pretrain_argv(preset, resumed, SPMD_DEVICES, global_batch, SPMD_STEPS, SPMD_SAVE_AT),
         straight / f"ckpt_step_{SPMD_SAVE_AT:07d}.pth")], tmp_path, "four")
    one_run = run_in_subprocess(1, [(pretrain_argv(preset, single, 1, global_batch, SPMD_STEPS, SPMD_SAVE_AT), None)],
                                tmp_path, "one")
    # The CLI end to end (AdamW, clipping, the LR schedule, logging, checkpoints): no aten op ran on the CPU.
    assert four_runs[-1]["fallbacks"] == one_run[0]["fallbacks"] == [], (four_runs[-1], one_run[0]["fallbacks"])

    for key in ("loss", "grad_norm"):
        four, one = log_values(straight, key), log_values(single, key)
        assert sorted(four) == list(range(1, SPMD_STEPS + 1))
        torch.testing.assert_close(torch.tensor([four[step] for step in sorted(four)], dtype=torch.float64),
                                   torch.tensor([one[step] for step in sorted(four)], dtype=torch.float64),
                                   msg=lambda m: f"{preset} {key}, 4 devices vs 1: {m}", **SPMD_TOL)
        continued = log_values(resumed, key)
        assert sorted(continued) == list(range(SPMD_SAVE_AT + 1, SPMD_STEPS + 1)), "did not resume"
        assert all(continued[step] == four[step] for step in continued), f"{preset} {key} after resuming"
    four_weights, one_weights = final_weights(straight, SPMD_STEPS), final_weights(single, SPMD_STEPS)
    for name, value in four_weights.items():
        torch.testing.assert_close(value, one_weights[name], msg=lambda m: f"{preset} {name}: {m}", **PARAM_TOL)
        assert torch.equal(final_weights(resumed, SPMD_STEPS)[name], value), f"{preset} {name} after resuming"
    assert any(not torch.equal(value, final_weights(straight, SPMD_SAVE_AT)[name])
               for name, value in four_weights.items()), "nothing trained after the checkpoint"


@pytest.fixture(scope="module")
def drop_path_runs(tmp_path_factory):
    """vit-tiny with drop path 0.1 on 4 devices, 10 steps, AdamW, the cosine schedule, a checkpoint at step 5
    (the process's first run: its compile counts are the whole run's); then the same resumed from step 5,
    with --profile;
    then (same graphs) a learning rate that makes the weights overflow, checkpoints every 2 steps, a log
    line every 10."""
    tmp_path = tmp_path_factory.mktemp("drop_path")
    straight, resumed, diverged = tmp_path / "straight", tmp_path / "resumed", tmp_path / "diverged"
    extra = ("--set", "MODEL.DROP_PATH_RATE=0.1", "--log-every", "5")
    results = run_in_subprocess(SPMD_DEVICES, [
        (pretrain_argv("vit-tiny", straight, SPMD_DEVICES, 8, 10, 5, *extra), None),
        (pretrain_argv("vit-tiny", resumed, SPMD_DEVICES, 8, 10, 5, *extra, "--profile"),
         straight / "ckpt_step_0000005.pth"),
        (pretrain_argv("vit-tiny", diverged, SPMD_DEVICES, 8, 10, 2, "--set", "MODEL.DROP_PATH_RATE=0.1",
                       "--set", "TRAIN.BASE_LR=1e36", "--log-every", "10"), None),
    ], tmp_path, "drop_path", statuses=[0, 0, EXIT_RUN_FAILED])
    return straight, resumed, diverged, results


def test_spmd_resume_is_exact_with_drop_path(drop_path_runs):
    """XLA's generator is seeded and its state saved: the resumed run draws the same drop-path masks
    (before: torch.manual_seed did not reach it and checkpoints did not hold it)."""
    straight, resumed, _, _ = drop_path_runs
    assert log_values(resumed, "loss") == {step: value for step, value in log_values(straight, "loss").items()
                                           if step > 5}
    for name, value in final_weights(straight, 10).items():
        assert torch.equal(final_weights(resumed, 10)[name], value), name


def test_profile_on_xla_writes_xla_s_trace(drop_path_runs):
    """--profile on XLA: torch_xla's profiler traces steps 8-10 of the resumed run into <output>/profile."""
    _, resumed, _, _ = drop_path_runs
    traces = list((resumed / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces


def test_spmd_step_compiles_at_most_three_graphs_and_reads_nothing_back(drop_path_runs):
    """Over 10 steps with AdamW, the LR schedule, logging and a checkpoint: at most 3 graph compilations
    (the first step, the steps with optimizer state, one more); a step that neither logs nor saves moves
    nothing from the device to the host; the save (with the finite flag) and the log rows of a logging step
    are one batched transfer each."""
    _, _, _, results = drop_path_runs
    steps = results[0]["steps"]
    assert len(steps) == 10
    assert steps[-1]["compiled"] <= 3, [step["compiled"] for step in steps]
    # steps[k] is taken at step k+1's sync; steps 6-9 neither log nor save (5 and 10 do both).
    quiet = [steps[k + 1]["to_host"] - steps[k]["to_host"] for k in range(5, 8)]
    assert quiet == [0, 0, 0], quiet
    after_step_5 = steps[5]["to_host"] - steps[4]["to_host"]  # step 5's log rows and checkpoint, then step 6
    assert after_step_5 <= 2, after_step_5


def test_finetune_on_four_devices_equals_one_device(tmp_path):
    """finetune --device xla: 4 devices x batch 2 = 1 device x batch 8 (mixup and CutMix on, the batch
    sharded), in the training losses and the final evaluation."""
    def argv(output: Path, devices: int):
        return ["finetune", "--preset", "vit-tiny", "--device", "xla", "--batch-size", str(8 // devices),
                "--steps", "2", "--set", "TRAIN.EPOCHS=1", "--num-workers", "0", "--output", str(output)]

    run_in_subprocess(SPMD_DEVICES, [(argv(tmp_path / "four", SPMD_DEVICES), None)], tmp_path, "four")
    run_in_subprocess(1, [(argv(tmp_path / "one", 1), None)], tmp_path, "one")
    four, one = read_log(tmp_path / "four" / "log.jsonl"), read_log(tmp_path / "one" / "log.jsonl")
    four_losses = torch.tensor([row["loss"] for row in four if "eval" not in row], dtype=torch.float64)
    one_losses = torch.tensor([row["loss"] for row in one if "eval" not in row], dtype=torch.float64)
    assert len(four_losses) == 2
    torch.testing.assert_close(four_losses, one_losses, **SPMD_TOL)
    four_eval, one_eval = [row for row in four if "eval" in row][-1], [row for row in one if "eval" in row][-1]
    assert four_eval["val_images"] == one_eval["val_images"] == 256
    assert four_eval["top1"] == one_eval["top1"]
    assert math.isclose(four_eval["val_loss"], one_eval["val_loss"], rel_tol=1e-6)


def test_no_checkpoint_holds_a_non_finite_value_on_xla(drop_path_runs):
    """A diverging run (its loss goes NaN/inf between log lines): the finite flag, computed in the step's
    graph and read with the state, stops the save that would have written NaN/inf weights."""
    _, _, diverged, results = drop_path_runs
    for path in diverged.glob("ckpt_step_*.pth"):
        state = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point()), path.name
    # Log lines only at step 10: a stop before it is a refused save.
    assert len(results[2]["steps"]) < 10, "the run did not stop"


def test_a_checkpoints_xla_rng_state_restores_the_generator():
    """simmim_fast/train/checkpoints.py's restore_rng on XLA: a resumed run draws on the device what the
    uninterrupted run would have (the mask generator and dropout draw there)."""
    from simmim_fast.train import checkpoints

    device = torch_xla.device()
    xla_spmd.seed(5)
    saved = checkpoints.to_cpu(checkpoints.capture_rng(device))
    assert "xla" in saved
    expected = torch.rand(8, device=device).cpu()
    torch.rand(100, device=device).cpu()  # the generator moves on
    checkpoints.restore_rng(saved, device)
    assert torch.equal(torch.rand(8, device=device).cpu(), expected)
