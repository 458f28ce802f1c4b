"""``simmim-fast pretrain``: the original SimMIM pretraining recipe on one device or under torchrun.

One optimizer step = ``accumulation steps`` micro-batches of ``batch size`` images per process. The
step's loss is the mean over micro-batches and processes; a bad one (non-finite, or a spike) skips the
step (docs/long-runs.md).
"""
from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .. import tuning
from .._checks import check_writable_folder
from ..checkpoint import fitting_state_dict
from ..config import build_simmim, check_hyperparameters
from ..masking import MaskGenerator
from ..models.convnext import Block as ConvNeXtBlock
from ..models.layers import activation_checkpoint
from ..models.vit import Block as VitBlock
from . import checkpoints, distributed, pictures, xla_spmd
from .configs import build_config, given_texts
from .data import FastCrop, PretrainDataset, build_loader, open_image_source
from .device_batches import StepMasks, normalize
from .engine import (RunOptions, TrainingSteps, check_forced_backend, check_options, compile_for_training,
                     kernel_backend, resolve_amp, seed_everything, xla_sync)
from .gpu_decode import GpuJpegCrop, resolve_decode
from .monitor import Monitor
from .optim import LRSchedule, build_optimizer, build_schedule, scaled_lrs
from .profiling import StepProfile


@dataclass
class PretrainOptions(RunOptions):
    """The command line of ``simmim-fast pretrain`` (see ``simmim_fast.cli``); None = config/preset value."""

    grad_checkpoint: bool = False
    save_every: Optional[int] = None
    keep_last: int = 3
    picture_every: Optional[int] = None
    picture_count: int = 8
    optimizer: str = "adamw"
    decode: Optional[str] = None
    profile: bool = False


def checkpoint_vit_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing for ViT and ConvNeXt blocks (Swin does it itself from TRAIN.USE_CHECKPOINT);
    the forward is replaced on the instance, so parameter names and checkpoints stay the original's."""
    for module in model.modules():
        if isinstance(module, (VitBlock, ConvNeXtBlock)):
            module.forward = functools.partial(activation_checkpoint, type(module).forward.__get__(module))


class Pretraining(TrainingSteps):
    """The state of one run; ``run()`` trains to the last step and returns a summary dict."""

    def __init__(self, options: PretrainOptions, runtime: distributed.Runtime):
        self.options = options
        self.runtime = runtime
        self.config = build_config(options.preset, options.config, options.set, flags={
            "DATA.DATA_PATH": options.data, "DATA.BATCH_SIZE": options.batch_size,
            "DATA.NUM_WORKERS": options.num_workers, "DATA.DECODE": options.decode, "TRAIN.EPOCHS": options.epochs,
            "TRAIN.ACCUMULATION_STEPS": options.accum_steps, "SEED": options.seed,
            "TRAIN.USE_CHECKPOINT": True if options.grad_checkpoint else None, "OUTPUT": options.output})
        config = self.config
        check_hyperparameters(config, given=given_texts(options.set))
        self.output = Path(config.OUTPUT or Path("runs") / config.TAG)
        check_writable_folder("--output", self.output)  # before any work
        self.device = runtime.device
        self.amp_dtype = resolve_amp(options.amp, self.device)
        self.xla = xla_spmd.XlaTraining(runtime, options) if runtime.is_xla else None
        # The same initial weights on every rank (FSDP shards them, it does not broadcast them), then a
        # different random stream per rank (drop path), as the original seeds SEED + rank.
        seed_everything(config.SEED)
        self.model = build_simmim(config).to(self.device)  # the SimMIM itself: checkpoints and pictures use it
        seed_everything(config.SEED + runtime.rank)
        if self.xla:
            xla_spmd.seed(config.SEED)
        if config.TRAIN.USE_CHECKPOINT:
            checkpoint_vit_blocks(self.model)
        mask_generator = MaskGenerator.from_config(config, self.model.patch_size)
        check_forced_backend(lambda: self.model(
            torch.zeros(1, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE, device=self.device),
            mask_generator.generate(1, device=self.device)), self.device, self.amp_dtype)
        # Before DDP/FSDP wrap the model (rank 0 runs it alone) and before torch.compile traces it.
        tuning.before_training(self.model, runtime, config.DATA.BATCH_SIZE, mask_generator, self.amp_dtype,
                               compiled=options.compile is not None)
        self.train_model = distributed.wrap(self.model, runtime, options.fsdp)
        if options.fsdp:
            from torch.distributed.fsdp import register_fsdp_forward_method

            register_fsdp_forward_method(self.model, "reconstruct")
        self.train_model = compile_for_training(self.train_model, options.compile)

        self.mask_generator = mask_generator
        self.dataset = PretrainDataset(open_image_source(config.DATA.DATA_PATH), FastCrop(config.DATA.IMG_SIZE),
                                       seed=config.SEED)
        self.gpu_decode = self._gpu_decode(config.DATA.DECODE)
        # Per process: under XLA SPMD one process loads the batches of all its host's devices.
        self.batch_size = config.DATA.BATCH_SIZE * runtime.devices_per_process
        self.loader = build_loader(
            self.gpu_decode.dataset() if self.gpu_decode else self.dataset, self.batch_size, runtime.world_size,
            runtime.rank, config.SEED, config.DATA.NUM_WORKERS,
            pin_memory=config.DATA.PIN_MEMORY and self.device.type == "cuda",
            collate_fn=self.gpu_decode.collate if self.gpu_decode else None)
        self.accumulation = max(config.TRAIN.ACCUMULATION_STEPS, 1)
        self.images_per_step = self.batch_size * runtime.world_size * self.accumulation
        self.step_masks = StepMasks(mask_generator, self.device, config.SEED, runtime.world_size, runtime.rank,
                                    self.batch_size, self.accumulation)
        self.data_wait_fraction = 0.0  # of the last logged interval's time, spent waiting for batches
        micro_batches_per_epoch = self.loader.sampler.samples_per_epoch // self.batch_size
        self.steps_per_epoch = micro_batches_per_epoch // self.accumulation
        if self.steps_per_epoch == 0:
            raise ValueError(f"an epoch has {micro_batches_per_epoch} batches, fewer than --accum-steps "
                             f"{self.accumulation}; lower it or add images")
        if options.steps is not None:  # the whole schedule, compressed into --steps
            self.total_steps = options.steps
            schedule_epoch = self.total_steps / config.TRAIN.EPOCHS
        else:
            self.total_steps = config.TRAIN.EPOCHS * self.steps_per_epoch
            schedule_epoch = self.steps_per_epoch

        lrs = scaled_lrs(config, self.batch_size * runtime.world_size, self.accumulation)
        self.optimizer = build_optimizer(self.model, config, lrs["base"], options.optimizer, self.device.type)
        self.schedule = build_schedule(config, lrs, self.total_steps, schedule_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.clip_grad = config.TRAIN.CLIP_GRAD or math.inf
        self.clip_each_micro_batch = config.TRAIN.CLIP_EACH_MICRO_BATCH

        self.log_every = options.log_every or config.PRINT_FREQ
        self.save_every = options.save_every or config.SAVE_FREQ * self.steps_per_epoch
        self.picture_every = options.picture_every or self.save_every

        # Progress, restored on resume.
        self.step = 0
        self.epoch = 0
        self.samples_into_epoch = 0  # global count, all processes
        self.start_health()
        self.unreadable: set = set()
        self.history: Dict[str, List] = {"step": [], "loss": []}

    def _gpu_decode(self, choice: str) -> Optional[GpuJpegCrop]:
        """The GPU decoder when DATA.DECODE asks for it and it can run; else None (the CPU path), with
        the reason: one line on stderr for an explicit gpu, the description line for auto."""
        decode, reason = resolve_decode(choice, self.device, self.dataset.source)
        self.decode_note = f"decode {decode}" + (f" ({choice}: {reason})" if reason else "")
        if reason and choice == "gpu" and self.runtime.is_main:
            print(f"warning: --decode gpu: {reason}; decoding on the CPU", file=sys.stderr)
        if decode == "cpu":
            return None
        return GpuJpegCrop(self.config.DATA.IMG_SIZE, self.device, self.dataset.source, self.config.SEED)

    # ---- checkpoints -------------------------------------------------------------------------------

    def _state_dicts(self):
        """(model, optimizer) state dicts, on the device; with FSDP gathered in full on the CPU (all ranks
        take part); from XLA on the CPU in one transfer, refused if a step since the start was non-finite."""
        if self.xla:
            return self.xla.state_to_cpu((self.model.state_dict(), self.optimizer.state_dict()))
        if self.options.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.model, options=full),
                    get_optimizer_state_dict(self.model, self.optimizer, options=full))
        return self.model.state_dict(), self.optimizer.state_dict()

    def save(self) -> Optional[Path]:
        """Rank 0 writes; every rank takes part (RNG states, unreadable files, FSDP's gathered weights)."""
        rng = checkpoints.gathered_rng(self.device, self.runtime)
        self._gather_unreadable()
        if not (self.runtime.is_main or self.options.fsdp):
            return None
        model_state, optimizer_state = self._state_dicts()
        if not self.runtime.is_main:
            return None
        return self.write_checkpoint({
            "model": model_state, "optimizer": optimizer_state, "lr_scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "step": self.step, "config": self.config.to_dict(),
            "data": {"epoch": self.epoch, "samples_into_epoch": self.samples_into_epoch, "seed": self.config.SEED,
                     "world_size": self.runtime.world_size, "images_per_step": self.images_per_step},
            "rng": rng, "nonfinite_skipped": self.nonfinite_skipped, "unreadable": sorted(self.unreadable),
            "history": self.history}, kind=checkpoints.CHECKPOINT_FORMAT)

    def resume(self) -> Optional[Path]:
        # As the original: with TRAIN.AUTO_RESUME (on by default) a run continues from its output folder.
        resume = self.options.resume or ("auto" if self.config.TRAIN.AUTO_RESUME else None)
        path, state = checkpoints.read_resume_checkpoint(resume, self.output)
        if path is None:
            return None
        changes = checkpoints.check_resumable(state, self.config.to_dict(), path)
        if self.options.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, fitting_state_dict(self.model, state["model"], path), options=full)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=full)
        else:
            checkpoints.restore_training_state(self.model, self.optimizer, state, path)
        self.unreadable = set(state["unreadable"])
        self.history = {key: list(values) for key, values in state["history"].items()}
        self.restore_progress(state, path)
        exact = state["data"]["world_size"] == self.runtime.world_size and \
            state["data"]["images_per_step"] == self.images_per_step
        if self.runtime.is_main:
            print(f"resumed from {path} at step {self.step} (epoch {self.epoch})", file=sys.stderr)
            if changes:
                print("settings changed since that checkpoint: " + "; ".join(
                    f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items()), file=sys.stderr)
            if not exact:
                print("the processes or batch size changed: the run continues, but not sample-for-sample",
                      file=sys.stderr)
            self._report_schedule_change(state.get("lr_scheduler"))
        return path

    def _report_schedule_change(self, saved: Optional[Dict[str, Any]]) -> None:
        """A resumed run follows the schedule of its current settings (a longer --steps stretches it):
        say so, with the learning rate it jumps to, rather than change it silently."""
        current = self.schedule.state_dict()
        if not saved or saved == current:
            return
        changed = ", ".join(f"{key} {saved.get(key)!r} -> {value!r}" for key, value in current.items()
                            if saved.get(key) != value)
        print(f"warning: the learning-rate schedule differs from the checkpoint's ({changed}): the LR of step "
              f"{self.step + 1} is {self.schedule(self.step):.3e} instead of {LRSchedule(**saved)(self.step):.3e}",
              file=sys.stderr)

    # ---- one optimizer step ------------------------------------------------------------------------

    def train_step(self, batches) -> Dict[str, Any]:
        """The step's micro-batches with their masks (drawn on the device for the whole global step)."""
        step_masks = self.step_masks.for_step(self.epoch, self.samples_into_epoch // self.images_per_step)
        return self.optimizer_step(list(zip(batches, step_masks)), lambda batch_and_mask: self.train_model(
            normalize(self._pixels(batch_and_mask[0])), batch_and_mask[1]))

    def _xla_train_step(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """One step from the parallel loader's sharded (batch, accumulation, ...) pixels and masks."""
        result = self.optimizer_step(range(self.accumulation), lambda index: self.train_model(
            normalize(inputs["image"][:, index]), inputs["mask"][:, index]))
        self.xla.note_step(result)
        return result

    def _host_steps(self):
        """Each step's uint8 crops and masks, stacked (batch, accumulation, ...), for XLA's parallel loader."""
        masks = StepMasks(self.mask_generator, torch.device("cpu"), self.config.SEED, self.runtime.world_size,
                          self.runtime.rank, self.batch_size, self.accumulation)
        return xla_spmd.host_steps(self, ("image",), lambda epoch, step: {
            "mask": torch.stack(masks.for_step(epoch, step), 1)})

    def _pixels(self, batch) -> torch.Tensor:
        """A micro-batch's (B, 3, S, S) uint8 crops on the device."""
        if self.gpu_decode:
            return self.gpu_decode.crops(batch)
        return batch["image"].to(self.device, non_blocking=True)

    # ---- the run -----------------------------------------------------------------------------------

    def _record_unreadable(self, batches) -> None:
        for batch in batches:
            found = batch["unreadable"]
            self.unreadable.update(found[found >= 0].tolist())

    def _gather_unreadable(self) -> None:
        """Every process's unreadable files, before they are saved or reported."""
        if self.runtime.distributed:
            every = [None] * self.runtime.world_size
            torch.distributed.all_gather_object(every, sorted(self.unreadable))
            self.unreadable = set().union(*every)

    def _pictures(self, picture_batch) -> Optional[Path]:
        """The reconstruction grid (with FSDP every rank runs the model; rank 0 writes)."""
        if not (self.runtime.is_main or self.options.fsdp):
            return None
        images, masks = (tensor.to(self.device) for tensor in picture_batch)
        with self._autocast():
            panels = pictures.reconstruction_panels(self.model, images, masks)
        if not self.runtime.is_main:
            return None
        folder = self.output / "pictures"
        path = pictures.save_grid(panels, folder / f"reconstruction_step_{self.step:07d}.png",
                                  title=f"step {self.step}/{self.total_steps}")
        pictures.save_grid(panels, folder / "reconstruction_latest.png", title=f"step {self.step}/{self.total_steps}")
        if self.history["step"]:
            pictures.save_loss_curve(self.history["step"], self.history["loss"], self.output / "loss_curve.png")
        return path

    def _train(self) -> Dict[str, Any]:
        if self.runtime.is_main:
            checkpoints.remove_partial_writes(self.output)
        monitor = Monitor(self.output, self.total_steps, self.step, self.device, enabled=self.runtime.is_main)
        monitor.message(self.describe())
        picture_batch = pictures.picture_batch(self.dataset, self.options.picture_count, self.mask_generator)
        profile = StepProfile(self.device, self.output) if self.options.profile and self.runtime.is_main else None
        if self.xla:
            xla_steps = self.xla.steps(self._host_steps(), ranks={"image": 5, "mask": 4})
        else:
            batches = self._batches()
        window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
        first_window = True
        pending: List[Dict[str, Any]] = []  # XLA: steps whose values are still on the device
        latest = self.output / "pictures" / "reconstruction_latest.png"
        last_picture = latest if latest.exists() else None  # a resumed, already finished run
        try:
            while self.step < self.total_steps:
                if profile:
                    profile.before_step()
                wait_start = time.perf_counter()
                if self.xla:
                    inputs, host_step = next(xla_steps)
                    window_wait += time.perf_counter() - wait_start
                    if host_step.epoch != self.epoch:
                        self.epoch, self.samples_into_epoch = host_step.epoch, 0
                    result = self._xla_train_step(inputs)
                    self.unreadable.update(host_step.unreadable)
                    xla_sync()
                else:
                    micro = [next(batches) for _ in range(self.accumulation)]
                    window_wait += time.perf_counter() - wait_start
                    result = self.train_step(micro)
                    self._record_unreadable(micro)  # after: GPU decoding adds the files it redid on the CPU
                self.step += 1
                self.samples_into_epoch += self.images_per_step
                window_steps += 1
                result.update(step=self.step, epoch=self.epoch)
                pending.append(result)
                saving = self.step % self.save_every == 0 or self.step == self.total_steps
                # Every step is judged before a checkpoint is written (XLA reads its losses then, too).
                if self.runtime.is_xla and self.step % self.log_every and not saving:
                    monitor.advance(self.step)
                else:
                    elapsed = time.perf_counter() - window_start
                    rate = window_steps * self.images_per_step / max(elapsed, 1e-9)
                    self.data_wait_fraction = window_wait / max(elapsed, 1e-9)
                    if not first_window:  # the first one includes the workers' start
                        monitor.record_data_wait(window_wait, elapsed, self.step)
                    first_window = False
                    if self.xla:  # the rows' device values in one transfer
                        pending = xla_spmd.batched_to_cpu(pending)
                    for row in pending:
                        self._log(row, rate, monitor)
                    pending.clear()
                    window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
                if saving:
                    self.save()
                if self.step % self.picture_every == 0 or self.step == self.total_steps:
                    last_picture = self._pictures(picture_batch) or last_picture
        finally:
            if profile:
                profile.close()
            if self.xla:
                self.xla.close()
            monitor.close()
        self.confirm_last_checkpoint()
        self._gather_unreadable()
        return self._finish(last_picture)

    def _log(self, result: Dict[str, Any], rate: float, monitor: Monitor) -> None:
        loss = float(result["loss"])
        bad = self.judge_step(result["step"], loss, result["skipped"], monitor)
        row = {"step": result["step"], "epoch": result["epoch"], "loss": loss, "lr": result["lr"],
               "grad_norm": None if result["grad_norm"] is None else float(result["grad_norm"]),
               "images_per_s": rate, "time": time.time(), "nonfinite_skipped": self.nonfinite_skipped,
               "unreadable_files": len(self.unreadable), "data_wait_fraction": self.data_wait_fraction}
        if self.scaler is not None:
            row["loss_scale"] = self.scaler.get_scale()
        if bad:
            row["bad"] = bad
        on_schedule = result["step"] % self.log_every == 0
        monitor.step(row, with_device_stats=on_schedule)
        self.stop_if_diverged(result["step"], bad)
        if bad:
            return
        self.history["step"].append(result["step"])
        self.history["loss"].append(loss)
        if on_schedule and not sys.stderr.isatty():
            monitor.message(f"step {row['step']}/{self.total_steps} epoch {row['epoch']} loss {loss:.4f} "
                            f"lr {row['lr']:.3e} grad_norm {row['grad_norm']:.3f} {rate:.1f} img/s "
                            f"data wait {self.data_wait_fraction:.0%}")

    def describe(self) -> str:
        config = self.config
        return (f"SimMIM {config.MODEL.TYPE} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params), "
                f"{len(self.dataset)} images"
                f"{' (embedded scenes)' if not config.DATA.DATA_PATH else ' from ' + str(config.DATA.DATA_PATH)}, "
                f"{config.DATA.IMG_SIZE}px, mask {config.DATA.MASK_RATIO:.0%} of {config.DATA.MASK_PATCH_SIZE}px "
                f"patches; {self.runtime.world_size} process(es) x batch {self.batch_size}{self._per_device()} x "
                f"accumulation {self.accumulation} = {self.images_per_step} images/step; {self.total_steps} steps "
                f"({self.steps_per_epoch}/epoch); peak lr {self.schedule.base_lr:.3e}; device {self.device}, "
                f"amp {self.amp_dtype or 'off'}{self.compile_note()}; {self.decode_note}; output {self.output}")

    def _per_device(self) -> str:
        """XLA SPMD: how the process's batch splits over its host's devices."""
        devices = self.runtime.devices_per_process
        return f" ({devices} XLA devices x {self.batch_size // devices})" if self.runtime.spmd else ""

    def _finish(self, last_picture: Optional[Path]) -> Dict[str, Any]:
        summary = {"output": self.output, "steps": self.step, "losses": list(self.history["loss"]),
                   "nonfinite_skipped": self.nonfinite_skipped, "unreadable_files": len(self.unreadable),
                   "checkpoints": checkpoints.list_checkpoints(self.output), "picture": last_picture,
                   "loss_curve": self.output / "loss_curve.png"}
        if self.runtime.is_main:
            lines = [f"done: {self.step} steps, checkpoints in {self.output}"]
            if self.history["loss"]:
                lines.append(f"loss {self.history['loss'][0]:.4f} (first step) -> {self.history['loss'][-1]:.4f} (last)")
            if self.unreadable:
                examples = ", ".join(self.dataset.source.describe(i) for i in sorted(self.unreadable)[:3])
                lines.append(f"skipped {len(self.unreadable)} unreadable image file(s), e.g. {examples}")
            if self.nonfinite_skipped:
                lines.append(f"skipped {self.nonfinite_skipped} step(s) with a bad loss (non-finite or a spike)")
            if last_picture is not None:
                lines.append(f"pictures: {last_picture} (and {self.output / 'pictures'}/), "
                             f"loss curve: {summary['loss_curve']}")
            print("\n".join(lines), file=sys.stderr)
        return summary


def pretrain(options: PretrainOptions) -> Dict[str, Any]:
    """Run a pretraining (see ``PretrainOptions``); returns a summary (output folder, losses, files)."""
    check_options(options)  # before the device starts (XLA's runtime, a process group)
    with kernel_backend(options.backend):
        runtime = distributed.start(options.device)
        try:
            return Pretraining(options, runtime).run()
        finally:
            distributed.stop(runtime)
