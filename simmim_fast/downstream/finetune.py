"""``simmim-fast finetune``: the original SimMIM fine-tuning recipe on a labelled folder (or the
labelled embedded scenes), on one device or under torchrun (DDP).

The model comes from --preset/--config, or from the pretraining checkpoint's own config; the original
YAML that fine-tunes its preset follows (``PRESET_YAMLS``: ViT-B layer decay 0.65; Swin-B 0.9 after 100
pretraining epochs, 0.8 after 800; Swin-L 0.7 and drop path 0.2), or the recipe of its type (ViT:
per-block relative position bias, mean pooling, layer decay 0.65; Swin: 0.9; both drop path 0.1, 100
epochs, 20 warm-up, base LR 1.25e-3), then --config, --set and the flags. Steps, accumulation, AMP,
clipping, checkpoints and the log are pretraining's (``train.engine``, ``train.checkpoints``,
``train.monitor``). Top-1/top-5 on the validation split after every epoch and at
the end go to log.jsonl and metrics.json.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .._checks import check_writable_folder
from ..checkpoint import read_checkpoint_file, state_dict_of, write_atomic
from ..config import DEFAULTS, PRESETS, Config, check_hyperparameters, merge, set_key, to_config
from ..train import checkpoints, distributed, xla_spmd
from ..train.configs import given_texts, parse_assignment, read_yaml_config
from ..train.data import build_loader, sample_seed
from ..train.engine import (RunOptions, TrainingSteps, check_forced_backend, check_options, compile_for_training,
                            kernel_backend, resolve_amp, seed_everything, xla_sync)
from ..train.monitor import Monitor, json_text
from ..train.optim import build_optimizer, build_schedule, scaled_lrs, skips_weight_decay
from .augment import Mixup
from .data import EvalSet, FinetuneTransform, TrainingSet, open_splits
from .models import build_classifier, load_into

CHECKPOINT_KIND = checkpoints.FINETUNE_FORMAT

# The original config's fine-tuning sections (absent from pretraining's DEFAULTS), same names and values.
FINETUNE_SECTIONS = {
    "AUG": {"COLOR_JITTER": 0.4, "AUTO_AUGMENT": "rand-m9-mstd0.5-inc1", "REPROB": 0.25, "REMODE": "pixel",
            "RECOUNT": 1, "MIXUP": 0.8, "CUTMIX": 1.0, "CUTMIX_MINMAX": None, "MIXUP_PROB": 1.0,
            "MIXUP_SWITCH_PROB": 0.5, "MIXUP_MODE": "batch"},
    "TEST": {"CROP": True},
}
# What every published fine-tuning YAML shares (configs/*/simmim_finetune__*.yaml), and what the recipe
# adds to the original's config.py defaults: clipping after every micro-batch (main_finetune.py).
_SCHEDULE = {"EPOCHS": 100, "WARMUP_EPOCHS": 20, "BASE_LR": 1.25e-3, "WARMUP_LR": 2.5e-7, "MIN_LR": 2.5e-7,
             "WEIGHT_DECAY": 0.05, "LR_SCHEDULER": {"NAME": "cosine"}, "CLIP_EACH_MICRO_BATCH": True}
_VIT_HEAD = {"USE_APE": False, "USE_RPB": True, "USE_SHARED_RPB": False, "USE_MEAN_POOLING": True}
# The recipe of a model type, for a model no YAML fine-tunes (ViT-L/H, the tiny models before their
# changes): the ViT-B YAML's and the Swin-B 100-epoch YAML's values, without their image and window size.
RECIPES = {
    "vit": {"MODEL": {"DROP_PATH_RATE": 0.1, "VIT": _VIT_HEAD}, "TRAIN": {**_SCHEDULE, "LAYER_DECAY": 0.65}},
    "swin": {"MODEL": {"DROP_PATH_RATE": 0.1}, "TRAIN": {**_SCHEDULE, "LAYER_DECAY": 0.9}},
    # The successor's simmim_finetune__swinv2_base__img224_window14__800ep.yaml, without its sizes.
    "swinv2": {"MODEL": {"DROP_PATH_RATE": 0.1}, "TRAIN": {**_SCHEDULE, "LAYER_DECAY": 0.75}},
}
# ConvNeXt has no published SimMIM fine-tuning: its presets pretrain in the Swin-B recipe and fine-tune in it.
RECIPES["convnext"] = RECIPES["swin"]


def _finetune_yaml(name: str, model: Dict[str, Any], img_size: int, layer_decay: float):
    """(name, content) of an original fine-tuning YAML: what it sets beyond the pretraining preset's model."""
    return name, {"MODEL": model, "DATA": {"IMG_SIZE": img_size}, "TRAIN": {**_SCHEDULE, "LAYER_DECAY": layer_decay},
                  "PRINT_FREQ": 100, "SAVE_FREQ": 5, "TAG": name}


FINETUNE_YAMLS = dict([
    _finetune_yaml("simmim_finetune__vit_base__img224__800ep", {"DROP_PATH_RATE": 0.1, "VIT": _VIT_HEAD}, 224, 0.65),
    _finetune_yaml("simmim_finetune__swin_base__img224_window7__100ep",
                   {"DROP_PATH_RATE": 0.1, "SWIN": {"WINDOW_SIZE": 7}}, 224, 0.9),
    _finetune_yaml("simmim_finetune__swin_base__img224_window7__800ep",
                   {"DROP_PATH_RATE": 0.1, "SWIN": {"WINDOW_SIZE": 7}}, 224, 0.8),
    _finetune_yaml("simmim_finetune__swin_large__img224_window14__800ep",
                   {"DROP_PATH_RATE": 0.2, "SWIN": {"WINDOW_SIZE": 14}}, 224, 0.7),
    _finetune_yaml("simmim_finetune__swinv2_base__img224_window14__800ep",
                   {"DROP_PATH_RATE": 0.1, "SWINV2": {"WINDOW_SIZE": 14, "PRETRAINED_WINDOW_SIZES": [12, 12, 12, 6]}},
                   224, 0.75),
])
# Which YAML fine-tunes a pretraining preset, by the pretraining's length (TRAIN.EPOCHS of the checkpoint's
# config, else the preset's): the longest listed that the pretraining reaches, else the shortest. The
# original's Swin-B 192/w6 pretraining YAMLs differ only in length from the preset (100 or 800 epochs).
PRESET_YAMLS = {
    "vit-base-224": {800: "simmim_finetune__vit_base__img224__800ep"},
    "swin-base-192-w6": {100: "simmim_finetune__swin_base__img224_window7__100ep",
                         800: "simmim_finetune__swin_base__img224_window7__800ep"},
    "swin-large-192-w12": {800: "simmim_finetune__swin_large__img224_window14__800ep"},
    "swinv2-base-192-w12": {800: "simmim_finetune__swinv2_base__img224_window14__800ep"},
}
# The CPU-sized presets: a short run at the tiny batch (peak LR = BASE_LR x 32/512).
PRESET_CHANGES = {
    "vit-tiny": {"TRAIN": {"EPOCHS": 10, "WARMUP_EPOCHS": 1, "BASE_LR": 1.6e-2, "WARMUP_LR": 1e-5, "MIN_LR": 1e-5,
                           "LAYER_DECAY": 0.75}, "PRINT_FREQ": 10, "SAVE_FREQ": 5, "TAG": "vit_tiny_finetune"},
    "swin-tiny": {"TRAIN": {"EPOCHS": 10, "WARMUP_EPOCHS": 1, "BASE_LR": 1.6e-2, "WARMUP_LR": 1e-5, "MIN_LR": 1e-5,
                            "LAYER_DECAY": 0.9}, "PRINT_FREQ": 10, "SAVE_FREQ": 5, "TAG": "swin_tiny_finetune"},
}


def finetune_yaml_of(preset: Optional[str], pretraining_epochs: int) -> Optional[str]:
    """The name of the original YAML that fine-tunes ``preset`` pretrained for ``pretraining_epochs``."""
    by_length = PRESET_YAMLS.get(preset)
    if not by_length:
        return None
    reached = [epochs for epochs in by_length if epochs <= pretraining_epochs]
    return by_length[max(reached) if reached else min(by_length)]


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
    type, the original YAML that fine-tunes its preset (``finetune_yaml_of``) or the tiny preset's
    changes, then --config, --set and the flags."""
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
    pretraining = checkpoint_config if checkpoint_config is not None else PRESETS.get(preset, {})
    yaml_name = finetune_yaml_of(preset, pretraining.get("TRAIN", {}).get("EPOCHS", 0))
    config = merge(config, FINETUNE_YAMLS[yaml_name] if yaml_name else PRESET_CHANGES.get(preset, {}))
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
    then one per block (ConvNeXt: its authors' 12 groups), the last = everything after the blocks (and
    ViT's shared bias)."""
    if config.MODEL.TYPE == "vit":
        last = config.MODEL.VIT.DEPTH + 1
        if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return last
    if config.MODEL.TYPE == "convnext":
        return convnext_layer_id(name)
    # The successor fine-tunes Swin V2 with V1's rule, over MODEL.SWINV2.DEPTHS.
    depths = list((config.MODEL.SWINV2 if config.MODEL.TYPE == "swinv2" else config.MODEL.SWIN).DEPTHS)
    if name == "mask_token" or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers."):
        parts = name.split(".")
        stage = int(parts[1])
        if parts[2] == "downsample":
            return sum(depths[:stage + 1])
        return sum(depths[:stage]) + int(parts[3]) + 1
    return sum(depths) + 1


CONVNEXT_LAST_LAYER = 13  # ConvNeXt's optim_factory: 12 groups of blocks, then the norm and head


def convnext_layer_id(name: str) -> int:
    """ConvNeXt's own layer-decay rule (facebookresearch/ConvNeXt, written for depths 3-3-27-3 and used
    for every size): the stem 0, stages 0-1 and their downsampling 1-2, stage 2 in groups of three
    blocks from 3, stage 3 and its downsampling 12, the rest 13."""
    parts = name.split(".")
    if parts[0] in ("downsample_layers", "stages"):
        stage = int(parts[1])
        if stage == 3:
            return CONVNEXT_LAST_LAYER - 1
        if parts[0] == "downsample_layers":
            return 0 if stage == 0 else stage + 1
        return stage + 1 if stage < 2 else 3 + int(parts[2]) // 3
    if name == "mask_token":
        return 0
    return CONVNEXT_LAST_LAYER


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
    return {"model": state_dict_of(state, path), "config": config if isinstance(config, dict) else None,
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
        check_hyperparameters(config, masked=False, given=given_texts(options.set))
        self.output = Path(config.OUTPUT or Path("runs") / config.TAG)
        check_writable_folder("--output", self.output)
        self.device = runtime.device
        self.amp_dtype = resolve_amp(options.amp, self.device)
        self.xla = xla_spmd.XlaTraining(runtime, options) if runtime.is_xla else None

        self.train_source, self.val_source = open_splits(config.DATA.DATA_PATH)
        self.classes = self.train_source.classes
        config.MODEL.NUM_CLASSES = len(self.classes)
        seed_everything(config.SEED)
        self.model = build_classifier(config, len(self.classes))
        self.loaded = load_into(self.model, pretrained["model"], keep_head=False, name=options.pretrained) \
            if pretrained else None
        self.model.to(self.device)
        size = config.DATA.IMG_SIZE
        check_forced_backend(lambda: self.model(torch.zeros(1, 3, size, size, device=self.device)), self.device,
                             self.amp_dtype)
        seed_everything(config.SEED + runtime.rank)
        if self.xla:
            xla_spmd.seed(config.SEED)
        self.train_model = distributed.wrap(self.model, runtime, fsdp=False)
        self.train_model = compile_for_training(self.train_model, options.compile)

        aug = config.AUG
        if aug.AUTO_AUGMENT in ("", "none") and aug.COLOR_JITTER > 0:
            raise ValueError("AUG.COLOR_JITTER without RandAugment is not implemented; set AUG.COLOR_JITTER=0")
        if (aug.REMODE, aug.RECOUNT, aug.MIXUP_MODE, config.DATA.INTERPOLATION) != ("pixel", 1, "batch", "bicubic"):
            raise ValueError("only AUG.REMODE=pixel, AUG.RECOUNT=1, AUG.MIXUP_MODE=batch and "
                             "DATA.INTERPOLATION=bicubic (the recipe's) are implemented")
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
        self.clip_each_micro_batch = config.TRAIN.CLIP_EACH_MICRO_BATCH
        self.log_every = options.log_every or config.PRINT_FREQ

        self.step = 0
        self.epoch = 0
        self.samples_into_epoch = 0
        self.start_health()
        self.evaluations: List[Dict[str, Any]] = []

    # ---- checkpoints (the pretraining layout; 'model' is the classifier's state dict) ---------------

    def save(self) -> Optional[Path]:
        rng = checkpoints.gathered_rng(self.device, self.runtime)
        if not self.runtime.is_main:
            return None
        states = (self.model.state_dict(), self.optimizer.state_dict())
        model_state, optimizer_state = self.xla.state_to_cpu(states) if self.xla else states  # XLA: one transfer
        return self.write_checkpoint({
            "model": model_state, "optimizer": optimizer_state,
            "lr_scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "step": self.step, "config": self.config.to_dict(), "classes": list(self.classes),
            "data": {"samples_into_epoch": self.samples_into_epoch, "world_size": self.runtime.world_size,
                     "images_per_step": self.images_per_step},
            "rng": rng, "nonfinite_skipped": self.nonfinite_skipped, "evaluations": self.evaluations},
            kind=CHECKPOINT_KIND)

    def resume(self) -> Optional[Path]:
        resume = self.options.resume or ("auto" if self.config.TRAIN.AUTO_RESUME else None)
        path, state = checkpoints.read_resume_checkpoint(resume, self.output, kind=CHECKPOINT_KIND)
        if path is None:
            return None
        checkpoints.check_resumable(state, self.config.to_dict(), path)
        if list(state["classes"]) != list(self.classes):
            raise ValueError(f"cannot resume from {path}: its classes {state['classes']} differ from the data's")
        checkpoints.restore_training_state(self.model, self.optimizer, state, path)
        self.evaluations = list(state["evaluations"])
        self.restore_progress(state, path)
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
                log.write(json_text({"eval": True, "time": time.time(), **result}) + "\n")
        return result

    def _train(self) -> Dict[str, Any]:
        monitor = Monitor(self.output, self.total_steps, self.step, self.device, enabled=self.runtime.is_main,
                          name="finetune")
        monitor.message(self.describe())
        if self.xla:
            xla_steps = self.xla.steps(xla_spmd.host_steps(self, ("image", "label")), ranks={"image": 5, "label": 2})
        else:
            batches = self._batches()
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
                self._log(result, rate, monitor)
                if self.step % self.eval_every == 0 or self.step == self.total_steps:
                    self._evaluate(monitor)
                    self.save()
        finally:
            if self.xla:
                self.xla.close()
            monitor.close()
        self.confirm_last_checkpoint()
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

    def _log(self, result: Dict[str, Any], rate: float, monitor: Monitor) -> None:
        loss = float(result["loss"])
        bad = self.judge_step(self.step, loss, result["skipped"], monitor)
        row = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": result["lr"],
               "grad_norm": None if result["grad_norm"] is None else float(result["grad_norm"]),
               "images_per_s": rate, "time": time.time()}
        if bad:
            row["bad"] = bad
        on_schedule = self.step % self.log_every == 0
        monitor.step(row, with_device_stats=on_schedule)
        self.stop_if_diverged(self.step, bad)
        if on_schedule and not bad and not sys.stderr.isatty():
            monitor.message(f"step {self.step}/{self.total_steps} loss {loss:.4f} lr {row['lr']:.3e} {rate:.1f} img/s")

    def describe(self) -> str:
        config = self.config
        source = "random init" if self.loaded is None else f"pretrained {self.options.pretrained}"
        return (f"fine-tune {config.MODEL.TYPE} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params, "
                f"{source}), {len(self.classes)} classes, {len(self.train_source)} train / {len(self.val_source)} val "
                f"images, {config.DATA.IMG_SIZE}px; {self.images_per_step} images/step, {self.total_steps} steps "
                f"({self.steps_per_epoch}/epoch), peak lr {self.schedule.base_lr:.3e}, layer decay "
                f"{config.TRAIN.LAYER_DECAY}; device {self.device}, amp {self.amp_dtype or 'off'}"
                f"{self.compile_note()}; output {self.output}")

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
    write_atomic(path, lambda file: file.write(json_text(data, indent=2).encode()))


def finetune(options: FinetuneOptions) -> Dict[str, Any]:
    """Run a fine-tuning (see ``FinetuneOptions``); returns the metrics and the output folder."""
    check_options(options)  # before the device starts (XLA's runtime, a process group)
    with kernel_backend(options.backend):
        runtime = distributed.start(options.device)
        try:
            return Finetuning(options, runtime).run()
        finally:
            distributed.stop(runtime)
