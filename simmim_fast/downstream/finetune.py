"""``simmim-fast finetune``: the original SimMIM fine-tuning recipe on a labelled folder (or the
labelled embedded scenes), on one device or under torchrun (DDP).

The model comes from --preset/--config, or from the pretraining checkpoint's own config; the recipe
for its type (ViT: per-block relative position bias, mean pooling, layer decay 0.65; Swin: layer decay
0.9; both drop path 0.1, 100 epochs, 20 warm-up, base LR 1.25e-3) follows, then --config, --set and the
flags. Steps, accumulation, AMP, clipping, checkpoints and the log are pretraining's (``train.engine``,
``train.checkpoints``, ``train.monitor``). Top-1/top-5 on the validation split after every epoch and at
the end go to log.jsonl and metrics.json.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..checkpoint import read_checkpoint_file, state_dict_of
from ..config import DEFAULTS, PRESETS, Config, merge, set_key, to_config
from ..train import checkpoints, distributed, xla_spmd
from ..train.configs import parse_assignment, read_yaml_config
from ..train.data import build_loader, sample_seed
from ..train.engine import (NonFiniteLossError, RunOptions, TrainingSteps, check_options, kernel_backend,
                            resolve_amp, seed_everything, xla_sync)
from ..train.monitor import Monitor
from ..train.optim import build_optimizer, build_schedule, scaled_lrs, skips_weight_decay
from .augment import Mixup
from .data import EvalSet, FinetuneTransform, TrainingSet, open_splits
from .models import build_classifier, load_into

CHECKPOINT_KIND = "simmim_fast.finetune/1"

# The original config's fine-tuning sections (absent from pretraining's DEFAULTS), same names and values.
FINETUNE_SECTIONS = {
    "AUG": {"COLOR_JITTER": 0.4, "AUTO_AUGMENT": "rand-m9-mstd0.5-inc1", "REPROB": 0.25, "REMODE": "pixel",
            "RECOUNT": 1, "MIXUP": 0.8, "CUTMIX": 1.0, "CUTMIX_MINMAX": None, "MIXUP_PROB": 1.0,
            "MIXUP_SWITCH_PROB": 0.5, "MIXUP_MODE": "batch"},
    "TEST": {"CROP": True},
}
# The published fine-tuning YAMLs, by model type.
RECIPES = {
    "vit": {"MODEL": {"DROP_PATH_RATE": 0.1, "VIT": {"USE_RPB": True, "USE_SHARED_RPB": False,
                                                      "USE_MEAN_POOLING": True}},
            "TRAIN": {"EPOCHS": 100, "WARMUP_EPOCHS": 20, "BASE_LR": 1.25e-3, "WARMUP_LR": 2.5e-7, "MIN_LR": 2.5e-7,
                      "WEIGHT_DECAY": 0.05, "LAYER_DECAY": 0.65, "LR_SCHEDULER": {"NAME": "cosine"}}},
    "swin": {"MODEL": {"DROP_PATH_RATE": 0.1},
             "TRAIN": {"EPOCHS": 100, "WARMUP_EPOCHS": 20, "BASE_LR": 1.25e-3, "WARMUP_LR": 2.5e-7, "MIN_LR": 2.5e-7,
                       "WEIGHT_DECAY": 0.05, "LAYER_DECAY": 0.9, "LR_SCHEDULER": {"NAME": "cosine"}}},
}
# Per pretraining preset: what its fine-tuning changes beyond the type's recipe.
PRESET_CHANGES = {
    "swin-base-192-w6": {"DATA": {"IMG_SIZE": 224}, "MODEL": {"SWIN": {"WINDOW_SIZE": 7}}},
    "swin-large-192-w12": {"DATA": {"IMG_SIZE": 224}, "MODEL": {"SWIN": {"WINDOW_SIZE": 14}}},
    # CPU-sized: a short run at the tiny batch (peak LR = BASE_LR x 32/512).
    "vit-tiny": {"TRAIN": {"EPOCHS": 10, "WARMUP_EPOCHS": 1, "BASE_LR": 1.6e-2, "WARMUP_LR": 1e-5, "MIN_LR": 1e-5,
                           "LAYER_DECAY": 0.75}, "PRINT_FREQ": 10, "SAVE_FREQ": 5, "TAG": "vit_tiny_finetune"},
    "swin-tiny": {"TRAIN": {"EPOCHS": 10, "WARMUP_EPOCHS": 1, "BASE_LR": 1.6e-2, "WARMUP_LR": 1e-5, "MIN_LR": 1e-5,
                            "LAYER_DECAY": 0.9}, "PRINT_FREQ": 10, "SAVE_FREQ": 5, "TAG": "swin_tiny_finetune"},
}


@dataclass
class FinetuneOptions(RunOptions):
    """The command line of ``simmim-fast finetune``; None = config/preset value (no FSDP: it stays off)."""

    pretrained: Optional[str] = None
    keep_last: int = 2
    trust_checkpoint: bool = False


def preset_of(model_section) -> Optional[str]:
    """The pretraining preset whose MODEL section a checkpoint's config has, if any."""
    for name, preset in PRESETS.items():
        if merge(to_config(DEFAULTS["MODEL"]), preset["MODEL"]) == merge(to_config(DEFAULTS["MODEL"]), model_section):
            return name
    return None


def finetune_config(options: FinetuneOptions, checkpoint_config: Optional[Dict[str, Any]]) -> Config:
    """Defaults (+ AUG, TEST), the model (preset, or the pretraining checkpoint's), the recipe for its
    type and preset, then --config, --set and the flags."""
    config = to_config({**DEFAULTS, **FINETUNE_SECTIONS})
    preset = options.preset
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        model, data = PRESETS[preset]["MODEL"], PRESETS[preset].get("DATA", {})
    elif checkpoint_config is not None:
        model, data = checkpoint_config["MODEL"], checkpoint_config["DATA"]
        preset = preset_of(model)
    elif options.config is None:
        raise ValueError(f"give --pretrained (a simmim-fast checkpoint), --preset ({', '.join(PRESETS)}) "
                         "or --config FILE for the model")
    else:
        model, data = {}, {}
    keep = ("IMG_SIZE", "BATCH_SIZE", "NUM_WORKERS", "INTERPOLATION")  # not the pretraining data path or masks
    config = merge(config, {"MODEL": model, "DATA": {key: value for key, value in data.items() if key in keep}})
    from_file = read_yaml_config(options.config) if options.config is not None else {}
    model_type = from_file.get("MODEL", {}).get("TYPE", config.MODEL.TYPE)
    config = merge(config, RECIPES.get(model_type, {}))
    config = merge(config, PRESET_CHANGES.get(preset, {}))
    config = merge(config, from_file)
    for text in options.set:
        config = set_key(config, *parse_assignment(text))
    flags = {"DATA.DATA_PATH": options.data, "DATA.BATCH_SIZE": options.batch_size,
             "DATA.NUM_WORKERS": options.num_workers, "TRAIN.EPOCHS": options.epochs,
             "TRAIN.ACCUMULATION_STEPS": options.accum_steps, "SEED": options.seed, "OUTPUT": options.output,
             "PRETRAINED": options.pretrained}
    for key, value in flags.items():
        if value is not None:
            config = set_key(config, key, value)
    return config


def layer_id(name: str, config) -> int:
    """The original's layer of a parameter for layer-wise LR decay: 0 = patch embedding (and tokens),
    then one per block, the last = everything after the blocks (and ViT's shared bias)."""
    if config.MODEL.TYPE == "vit":
        last = config.MODEL.VIT.DEPTH + 1
        if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return last
    depths = list(config.MODEL.SWIN.DEPTHS)
    if name == "mask_token" or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers."):
        parts = name.split(".")
        stage = int(parts[1])
        if parts[2] == "downsample":
            return sum(depths[:stage + 1])
        return sum(depths[:stage]) + int(parts[3]) + 1
    return sum(depths) + 1


def layer_decay_groups(model: torch.nn.Module, config) -> List[Dict[str, Any]]:
    """AdamW groups by (layer, decayed or not): lr_scale = LAYER_DECAY^(last layer - layer), weight decay
    by the pretraining rule (``skips_weight_decay``)."""
    skips = skips_weight_decay(model)
    last = layer_id("head.weight", config)
    groups: Dict[str, Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, decayed = layer_id(name, config), not skips(name, param)
        key = f"layer_{layer}_{'decay' if decayed else 'no_decay'}"
        group = groups.setdefault(key, {"params": [], "group_name": key,
                                        "weight_decay": config.TRAIN.WEIGHT_DECAY if decayed else 0.0,
                                        "lr_scale": config.TRAIN.LAYER_DECAY ** (last - layer)})
        group["params"].append(param)
    return list(groups.values())


def read_pretrained(path: str, trust: bool) -> Dict[str, Any]:
    """A checkpoint as a dict with 'model', and 'config' and 'classes' where simmim-fast wrote them."""
    state = read_checkpoint_file(path, trust)
    config, classes = (state.get("config"), state.get("classes")) if isinstance(state, dict) else (None, None)
    return {"model": state_dict_of(state), "config": config if isinstance(config, dict) else None,
            "classes": list(classes) if isinstance(classes, (list, tuple)) else None}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> List[torch.Tensor]:
    """Counts of samples whose label is among the top-k logits, for each k (k capped at the classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [hits[:, :min(k, logits.shape[1])].any(1).sum() for k in ks]


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device, runtime: distributed.Runtime,
             autocast) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the loader, summed across processes."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for batch in loader:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        with autocast():
            logits = model(images).float()
        top1, top5 = topk_correct(logits, labels)
        totals += torch.stack([top1.double(), top5.double(), F.cross_entropy(logits, labels, reduction="sum").double(),
                               torch.tensor(float(len(labels)), dtype=torch.float64, device=device)])
        if device.type == "xla":  # one graph per batch, not one for the whole pass
            xla_sync()
    model.train(was_training)
    totals = distributed.sum_across(totals, runtime)
    count = max(float(totals[3]), 1.0)
    return {"top1": 100.0 * float(totals[0]) / count, "top5": 100.0 * float(totals[1]) / count,
            "val_loss": float(totals[2]) / count, "val_images": int(totals[3])}


class Finetuning(TrainingSteps):
    """One fine-tuning run; ``run()`` trains to the last step, evaluating every epoch."""

    def __init__(self, options: FinetuneOptions, runtime: distributed.Runtime):
        self.options, self.runtime = options, runtime
        pretrained = read_pretrained(options.pretrained, options.trust_checkpoint) if options.pretrained else None
        self.config = config = finetune_config(options, pretrained and pretrained["config"])
        self.output = Path(config.OUTPUT or Path("runs") / config.TAG)
        self.device = runtime.device
        self.amp_dtype = resolve_amp(options.amp, self.device)
        self.xla = xla_spmd.XlaTraining(runtime, options) if runtime.is_xla else None

        self.train_source, self.val_source = open_splits(config.DATA.DATA_PATH)
        self.classes = self.train_source.classes
        config.MODEL.NUM_CLASSES = len(self.classes)
        seed_everything(config.SEED)
        self.model = build_classifier(config, len(self.classes))
        self.loaded = load_into(self.model, pretrained["model"], keep_head=False) if pretrained else None
        self.model.to(self.device)
        seed_everything(config.SEED + runtime.rank)
        if self.xla:
            xla_spmd.seed(config.SEED)
        self.train_model = distributed.wrap(self.model, runtime, fsdp=False)
        if options.compile:
            self.train_model = torch.compile(self.train_model)

        aug = config.AUG
        if aug.AUTO_AUGMENT in ("", "none") and aug.COLOR_JITTER > 0:
            raise ValueError("AUG.COLOR_JITTER without RandAugment is not implemented; set AUG.COLOR_JITTER=0")
        if aug.REMODE != "pixel" or aug.RECOUNT != 1 or aug.MIXUP_MODE != "batch":
            raise ValueError("only AUG.REMODE=pixel, AUG.RECOUNT=1 and AUG.MIXUP_MODE=batch (the recipe's) "
                             "are implemented")
        transform = FinetuneTransform(config.DATA.IMG_SIZE, aug.AUTO_AUGMENT, aug.REPROB)
        self.batch_size = config.DATA.BATCH_SIZE * runtime.devices_per_process  # per process (XLA: per host)
        pin = config.DATA.PIN_MEMORY and self.device.type == "cuda"
        self.loader = build_loader(TrainingSet(self.train_source, transform, config.SEED), self.batch_size,
                                   runtime.world_size, runtime.rank, config.SEED, config.DATA.NUM_WORKERS, pin)
        val_part = torch.utils.data.Subset(EvalSet(self.val_source, config.DATA.IMG_SIZE, config.TEST.CROP),
                                           range(runtime.rank, len(self.val_source), runtime.world_size))
        self.val_loader = DataLoader(val_part, batch_size=self.batch_size, num_workers=config.DATA.NUM_WORKERS,
                                     pin_memory=pin)
        self.mixup = None
        if aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None:
            self.mixup = Mixup(len(self.classes), aug.MIXUP, aug.CUTMIX, aug.MIXUP_PROB, aug.MIXUP_SWITCH_PROB,
                               config.MODEL.LABEL_SMOOTHING, aug.CUTMIX_MINMAX)

        self.accumulation = max(config.TRAIN.ACCUMULATION_STEPS, 1)
        self.images_per_step = self.batch_size * runtime.world_size * self.accumulation
        self.steps_per_epoch = self.loader.sampler.samples_per_epoch // self.batch_size // self.accumulation
        if self.steps_per_epoch == 0:
            raise ValueError(f"an epoch has fewer batches than --accum-steps {self.accumulation}; "
                             "lower it or add images")
        self.total_steps = options.steps or config.TRAIN.EPOCHS * self.steps_per_epoch
        schedule_epoch = self.total_steps / config.TRAIN.EPOCHS if options.steps else self.steps_per_epoch
        # Evaluate once per (possibly --steps-shortened) epoch and at the end.
        self.eval_every = max(int(round(schedule_epoch)), 1)
        lrs = scaled_lrs(config, self.batch_size * runtime.world_size, self.accumulation)
        self.optimizer = build_optimizer(self.model, config, lrs["base"], device_type=self.device.type,
                                         groups=layer_decay_groups(self.model, config))
        self.schedule = build_schedule(config, lrs, self.total_steps, schedule_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.clip_grad = config.TRAIN.CLIP_GRAD or math.inf
        self.log_every = options.log_every or config.PRINT_FREQ

        self.step = 0
        self.epoch = 0
        self.samples_into_epoch = 0
        self.nonfinite_skipped = 0
        self.evaluations: List[Dict[str, Any]] = []

    # ---- checkpoints (the pretraining layout; 'model' is the classifier's state dict) ---------------

    def save(self) -> Optional[Path]:
        rng = checkpoints.gathered_rng(self.device, self.runtime)
        if not self.runtime.is_main:
            return None
        to_cpu = self.xla.state_to_cpu if self.xla else checkpoints.to_cpu
        model_state, optimizer_state = to_cpu((self.model.state_dict(), self.optimizer.state_dict()))
        path = checkpoints.save_checkpoint(checkpoints.checkpoint_path(self.output, self.step), {
            "model": model_state, "optimizer": optimizer_state,
            "lr_scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "step": self.step, "config": self.config.to_dict(), "classes": list(self.classes),
            "data": {"samples_into_epoch": self.samples_into_epoch, "world_size": self.runtime.world_size,
                     "images_per_step": self.images_per_step},
            "rng": rng, "nonfinite_skipped": self.nonfinite_skipped, "evaluations": self.evaluations},
            kind=CHECKPOINT_KIND)
        checkpoints.keep_last(self.output, self.options.keep_last)
        return path

    def resume(self) -> Optional[Path]:
        resume = self.options.resume or ("auto" if self.config.TRAIN.AUTO_RESUME else None)
        path = checkpoints.find_resume_checkpoint(resume, self.output)
        if path is None:
            return None
        state = checkpoints.read_checkpoint(path)
        checkpoints.check_resumable(state, self.config.to_dict(), path, kind=CHECKPOINT_KIND)
        if list(state["classes"]) != list(self.classes):
            raise ValueError(f"cannot resume from {path}: its classes {state['classes']} differ from the data's")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.evaluations = list(state["evaluations"])
        self.restore_progress(state)
        if self.runtime.is_main:
            print(f"resumed from {path} at step {self.step} (epoch {self.epoch})", file=sys.stderr)
        return path

    # ---- training ----------------------------------------------------------------------------------

    def _loss(self, batch, generator: torch.Generator) -> torch.Tensor:
        return self._loss_on_device(batch["image"].to(self.device, non_blocking=True),
                                    batch["label"].to(self.device, non_blocking=True), generator)

    def _loss_on_device(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.mixup is not None:  # soft targets: mixed, smoothed one-hots
            images, targets = self.mixup(images, labels, generator)
            return torch.sum(-targets * F.log_softmax(self.train_model(images), dim=-1), dim=-1).mean()
        return F.cross_entropy(self.train_model(images), labels, label_smoothing=self.config.MODEL.LABEL_SMOOTHING)

    def _evaluate(self, monitor: Monitor) -> Dict[str, Any]:
        result = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                  **evaluate(self.model, self.val_loader, self.device, self.runtime, self._autocast)}
        self.evaluations.append(result)
        monitor.message(f"eval at step {self.step}: top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
                        f"loss {result['val_loss']:.4f} ({result['val_images']} images)")
        if self.runtime.is_main:
            with open(self.output / "log.jsonl", "a") as log:
                log.write(json.dumps({"eval": True, "time": time.time(), **result}) + "\n")
        return result

    def run(self) -> Dict[str, Any]:
        if self.runtime.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
        self.resume()
        monitor = Monitor(self.output, self.total_steps, self.step, self.device, enabled=self.runtime.is_main,
                          name="finetune")
        monitor.message(self.describe())
        if self.xla:
            xla_steps = self.xla.steps(xla_spmd.host_steps(self, ("image", "label")), ranks={"image": 5, "label": 2})
        else:
            batches = self._batches()
        consecutive = 0
        window_start = time.perf_counter()
        # Mixup's draws: per process, except under SPMD, where one program (one draw) spans the processes.
        mix_rank = 0 if self.runtime.spmd else self.runtime.rank
        try:
            while self.step < self.total_steps:
                generator = torch.Generator().manual_seed(sample_seed(self.config.SEED, self.step, mix_rank))
                if self.xla:
                    result = self._xla_step(next(xla_steps), generator)
                else:
                    micro = [next(batches) for _ in range(self.accumulation)]
                    result = self.optimizer_step(micro, lambda batch: self._loss(batch, generator))
                self.step += 1
                self.samples_into_epoch += self.images_per_step
                rate = self.images_per_step / max(time.perf_counter() - window_start, 1e-9)
                window_start = time.perf_counter()
                consecutive = self._log(result, rate, monitor, consecutive)
                if self.step % self.eval_every == 0 or self.step == self.total_steps:
                    self._evaluate(monitor)
                    self.save()
        finally:
            if self.xla:
                self.xla.close()
            monitor.close()
        return self._finish()

    def _xla_step(self, step_inputs, generator: torch.Generator) -> Dict[str, Any]:
        """One step from the parallel loader's sharded (batch, accumulation, ...) images and labels; its
        loss and gradient norm come back in one transfer (the log has a row per step)."""
        inputs, host_step = step_inputs
        if host_step.epoch != self.epoch:
            self.epoch, self.samples_into_epoch = host_step.epoch, 0
        result = self.optimizer_step(range(self.accumulation), lambda index: self._loss_on_device(
            inputs["image"][:, index], inputs["label"][:, index], generator))
        self.xla.note_step(result)
        xla_sync()
        return xla_spmd.batched_to_cpu(result)

    def _log(self, result: Dict[str, Any], rate: float, monitor: Monitor, consecutive: int) -> int:
        loss = float(result["loss"])
        if result["skipped"]:
            self.nonfinite_skipped += 1
            consecutive += 1
            monitor.message(f"step {self.step}: non-finite loss ({loss}), update skipped")
            if consecutive >= self.options.max_nonfinite:
                raise NonFiniteLossError(f"{consecutive} optimizer steps in a row had a non-finite loss; lower "
                                         "TRAIN.BASE_LR or use --amp bf16")
            return consecutive
        row = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": result["lr"],
               "grad_norm": float(result["grad_norm"]), "images_per_s": rate, "time": time.time()}
        on_schedule = self.step % self.log_every == 0
        monitor.step(row, with_device_stats=on_schedule)
        if on_schedule and not sys.stderr.isatty():
            monitor.message(f"step {self.step}/{self.total_steps} loss {loss:.4f} lr {row['lr']:.3e} {rate:.1f} img/s")
        return 0

    def describe(self) -> str:
        config = self.config
        source = "random init" if self.loaded is None else f"pretrained {self.options.pretrained}"
        return (f"fine-tune {config.MODEL.TYPE} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params, "
                f"{source}), {len(self.classes)} classes, {len(self.train_source)} train / {len(self.val_source)} val "
                f"images, {config.DATA.IMG_SIZE}px; {self.images_per_step} images/step, {self.total_steps} steps "
                f"({self.steps_per_epoch}/epoch), peak lr {self.schedule.base_lr:.3e}, layer decay "
                f"{config.TRAIN.LAYER_DECAY}; device {self.device}, amp {self.amp_dtype or 'off'}; "
                f"output {self.output}")

    def _finish(self) -> Dict[str, Any]:
        final = self.evaluations[-1] if self.evaluations else {}
        metrics = {"final": final, "best_top1": max((row["top1"] for row in self.evaluations), default=None),
                   "evaluations": self.evaluations, "classes": list(self.classes), "steps": self.step,
                   "pretrained": self.options.pretrained,
                   "checkpoint": str(checkpoints.checkpoint_path(self.output, self.step))}
        if self.runtime.is_main:
            save_atomic_json(metrics, self.output / "metrics.json")
            print(f"done: {self.step} steps; top-1 {final.get('top1', float('nan')):.2f}% top-5 "
                  f"{final.get('top5', float('nan')):.2f}% on {final.get('val_images', 0)} images; "
                  f"metrics {self.output / 'metrics.json'}", file=sys.stderr)
        return {"output": self.output, **metrics}


def save_atomic_json(data: Dict[str, Any], path: Path) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(data, indent=2))
    temporary.replace(path)


def finetune(options: FinetuneOptions) -> Dict[str, Any]:
    """Run a fine-tuning (see ``FinetuneOptions``); returns the metrics and the output folder."""
    check_options(options)  # before the device starts (XLA's runtime, a process group)
    with kernel_backend(options.backend):
        runtime = distributed.start(options.device)
        try:
            return Finetuning(options, runtime).run()
        finally:
            distributed.stop(runtime)
