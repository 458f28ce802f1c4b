"""The fine-tuning recipe against the original SimMIM's (main_finetune.py, optimizer.py, lr_scheduler.py
with timm 0.4's schedulers, utils.load_pretrained, data/data_finetune.py and its YAMLs), point by point,
and the linear probe against a converged logistic regression (plain lane)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from simmim_fast.config import PRESETS, merge
from simmim_fast.downstream import augment
from simmim_fast.downstream.finetune import FinetuneOptions, finetune_config, layer_decay_groups
from simmim_fast.downstream.models import build_classifier, resize_relative_position_table
from simmim_fast.downstream import probe
from simmim_fast.downstream.probe import fit_logistic_regression, linear_probe
from simmim_fast.train.data import center_view, center_view_geometry, to_normalized_tensor
from simmim_fast.train.distributed import Runtime
from simmim_fast.train.engine import TrainingSteps
from simmim_fast.train.optim import LRSchedule, build_schedule, scaled_lrs
from simmim_fast.train.scenes import render_scene

FIXTURES = Path(__file__).parent / "fixtures"


# ---- learning rates: warm-up and minimum are not layer-scaled ----------------------------------------

def test_layer_decay_scales_the_peak_but_not_warmup_or_minimum_lrs():
    """timm 0.4's CosineLRScheduler as the original builds it: each group warms up from the (batch-scaled)
    WARMUP_LR to its own peak BASE_LR x lr_scale, then follows the cosine down to MIN_LR, the same for
    all groups. ViT-B's lowest group (patch embedding, scale 0.65^13) at global batch 1024: 5.0e-7 at the
    first and last steps (a layer-scaled warm-up and minimum gave 1.8e-9)."""
    config = finetune_config(FinetuneOptions(preset="vit-base-224"), None)
    small = merge(config, {"MODEL": {"VIT": {"EMBED_DIM": 48, "NUM_HEADS": 3}}})  # ViT-B's 12 blocks, narrow
    groups = layer_decay_groups(build_classifier(small, 10), small)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    lrs = scaled_lrs(config, global_batch=1024, accumulation_steps=1)
    schedule = build_schedule(config, lrs, total_steps=1000, steps_per_epoch=10)  # warm-up: 20 epochs
    lowest = min(range(len(groups)), key=lambda index: groups[index]["lr_scale"])
    scale = groups[lowest]["lr_scale"]
    assert scale == pytest.approx(0.65 ** 13)
    peak, start, end = 1.25e-3 * 2, 2.5e-7 * 2, 2.5e-7 * 2

    def lr_at(step):
        schedule.apply(optimizer, step)
        return optimizer.param_groups[lowest]["lr"], max(group["lr"] for group in optimizer.param_groups)

    assert lr_at(0) == (pytest.approx(start, rel=1e-12), pytest.approx(start, rel=1e-12))
    assert lr_at(100) == (pytest.approx(start + (peak * scale - start) / 2), pytest.approx(start + (peak - start) / 2))
    cosine = 0.5 * (1 + np.cos(np.pi * 500 / 1000))  # the cosine spans the whole run, warm-up included
    assert lr_at(500)[0] == pytest.approx(end + (peak * scale - end) * cosine)
    assert lr_at(1000) == (pytest.approx(end, rel=1e-12), pytest.approx(end, rel=1e-12))
    assert schedule.apply(optimizer, 500) == pytest.approx(end + (peak - end) * cosine)  # logged: the head's


@pytest.mark.parametrize("name, scaled", [("linear", lambda peak, t: peak - (peak - peak * 0.01) * t),
                                          ("step", lambda peak, t: peak * 0.1)])
def test_other_schedules_scale_after_the_warmup(name, scaled):
    """The original's LinearLRScheduler (to 1% of each group's peak) and timm's StepLRScheduler decay each
    group's own peak; their warm-up starts from the unscaled WARMUP_LR too."""
    schedule = LRSchedule(name, base_lr=1.0, warmup_lr=0.01, min_lr=0.0, total_steps=110, warmup_steps=10,
                          decay_steps=50)
    assert schedule(0, lr_scale=0.25) == pytest.approx(0.01)
    assert schedule(60, lr_scale=0.25) == pytest.approx(scaled(0.25, 0.5))


# ---- presets fine-tune with the original YAML of their recipe -----------------------------------------

# From microsoft/SimMIM configs/*/simmim_finetune__*.yaml: (layer decay, drop path, image size, window).
ORIGINAL_YAMLS = {
    "simmim_finetune__vit_base__img224__800ep": (0.65, 0.1, 224, None),
    "simmim_finetune__swin_base__img224_window7__100ep": (0.9, 0.1, 224, 7),
    "simmim_finetune__swin_base__img224_window7__800ep": (0.8, 0.1, 224, 7),
    "simmim_finetune__swin_large__img224_window14__800ep": (0.7, 0.2, 224, 14),
}


@pytest.mark.parametrize("preset, pretraining_epochs, yaml", [
    ("vit-base-224", None, "simmim_finetune__vit_base__img224__800ep"),
    ("swin-base-192-w6", None, "simmim_finetune__swin_base__img224_window7__100ep"),  # the preset: 100 epochs
    ("swin-base-192-w6", 800, "simmim_finetune__swin_base__img224_window7__800ep"),
    ("swin-large-192-w12", None, "simmim_finetune__swin_large__img224_window14__800ep"),
    ("swin-large-192-w12", 800, "simmim_finetune__swin_large__img224_window14__800ep"),
])
def test_presets_fine_tune_with_the_original_yaml_of_their_recipe(preset, pretraining_epochs, yaml):
    """By --preset, or from a pretraining checkpoint's config (its length picks Swin-B's YAML)."""
    if pretraining_epochs is None:
        config = finetune_config(FinetuneOptions(preset=preset), None)
    else:
        saved = {**PRESETS[preset], "TRAIN": {**PRESETS[preset]["TRAIN"], "EPOCHS": pretraining_epochs}}
        config = finetune_config(FinetuneOptions(), saved)
    layer_decay, drop_path, img_size, window = ORIGINAL_YAMLS[yaml]
    assert (config.TRAIN.LAYER_DECAY, config.MODEL.DROP_PATH_RATE, config.DATA.IMG_SIZE) == (
        layer_decay, drop_path, img_size)
    if window is not None:
        assert config.MODEL.SWIN.WINDOW_SIZE == window
    else:
        assert (config.MODEL.VIT.USE_RPB, config.MODEL.VIT.USE_SHARED_RPB, config.MODEL.VIT.USE_MEAN_POOLING) == (
            True, False, True)
    train = config.TRAIN
    assert (train.EPOCHS, train.WARMUP_EPOCHS, train.BASE_LR, train.WARMUP_LR, train.MIN_LR, train.WEIGHT_DECAY) == (
        100, 20, 1.25e-3, 2.5e-7, 2.5e-7, 0.05)
    assert train.CLIP_EACH_MICRO_BATCH and config.TAG == yaml


# ---- relative position bias: the original's geometric resize ---------------------------------------

def test_relative_position_bias_resize_matches_the_original_interp2d():
    """tests/fixtures/make_relative_position_bias_resize.py ran the original's algorithm with SciPy
    1.13's interp2d; ours (RectBivariateSpline) must agree to 1e-6 on rough and smooth tables, Swin
    windows up and down and ViT's table with its CLS rows. (Uniform bicubic resampling was 1.3-4.3 off.)"""
    fixture = np.load(FIXTURES / "relative_position_bias_resize.npz")
    cases = sorted({key.split(".")[0] for key in fixture.files})
    assert len(cases) == 4
    for case in cases:
        source = torch.from_numpy(fixture[f"{case}.source"])
        expected = torch.from_numpy(fixture[f"{case}.expected"])
        resized = resize_relative_position_table(source, expected.shape[0], int(fixture[f"{case}.extra_rows"]))
        torch.testing.assert_close(resized, expected, rtol=0, atol=1e-6, msg=case)


# ---- clipping with accumulation -------------------------------------------------------------------

class TinySteps(TrainingSteps):
    """TrainingSteps on a linear layer: SGD at LR 1, clip 0.5, no DDP."""

    def __init__(self, clip_each_micro_batch: bool, scaler=None):
        torch.manual_seed(0)
        self.model = self.train_model = torch.nn.Linear(6, 3)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1.0)
        self.schedule = LRSchedule("cosine", base_lr=1.0, warmup_lr=1.0, min_lr=1.0, total_steps=1, warmup_steps=0)
        self.options, self.runtime = FinetuneOptions(), Runtime(torch.device("cpu"))
        self.device, self.amp_dtype, self.scaler, self.step = torch.device("cpu"), None, scaler, 0
        self.clip_grad, self.clip_each_micro_batch = 0.5, clip_each_micro_batch
        self.start_health()


MICRO_BATCHES = [(torch.randn(4, 6, generator=torch.Generator().manual_seed(seed)) * scale,
                  torch.tensor([0, 1, 2, 1])) for seed, scale in ((1, 3.0), (2, 0.2), (3, 1.0))]


def loss_of(model):
    return lambda batch: F.cross_entropy(model(batch[0]), batch[1]) * 10


def original_accumulation(clip: float):
    """main_finetune.py's accumulation: after each micro-batch's backward of loss / steps, clip the running
    sum of gradients; step after the last."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    for batch in MICRO_BATCHES:
        (loss_of(model)(batch) / len(MICRO_BATCHES)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    with torch.no_grad():
        return [param - param.grad for param in model.parameters()]


@pytest.mark.parametrize("scaler", [None, "fp16 scaler"])
def test_accumulation_clips_each_micro_batch_as_the_original(scaler):
    """Under the fp16 GradScaler the running sum is still scaled between micro-batches: the threshold must
    be too. Clipping once per step (our pretraining's rule) gives other weights here."""
    expected = original_accumulation(0.5)
    steps = TinySteps(True, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaler else None)
    result = steps.optimizer_step(MICRO_BATCHES, loss_of(steps.model))
    assert not result["skipped"]
    for ours, theirs in zip(steps.model.parameters(), expected):
        torch.testing.assert_close(ours.detach(), theirs, rtol=1e-5, atol=1e-6)
    once = TinySteps(False)
    once.optimizer_step(MICRO_BATCHES, loss_of(once.model))
    assert not torch.allclose(once.model.weight, expected[0], atol=1e-3)


# ---- augmentation and the evaluation view ------------------------------------------------------------

def test_rand_augment_filters_every_geometric_op_bicubically(monkeypatch):
    """create_transform(interpolation='bicubic') gives timm's RandAugment one filter (the downstream lane
    checks that on timm itself); drawing bilinear or bicubic per op is timm's rule without one."""
    filters = []
    for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        level_to_arg, op = augment.RAND_AUGMENT_OPS[name]
        recording = lambda image, argument, resample, op=op: filters.append(resample) or op(image, argument, resample)
        monkeypatch.setitem(augment.RAND_AUGMENT_OPS, name, (level_to_arg, recording))
    rand_augment = augment.RandAugment.from_spec("rand-m9-mstd0.5-inc1")
    image = render_scene(3)
    for seed in range(60):
        rand_augment(image, torch.Generator().manual_seed(seed))
    assert len(filters) > 15 and set(filters) == {Image.BICUBIC}


def torchvision_resize_and_centre_crop(width, height, size, resize):
    """torchvision's arithmetic, transcribed: Resize(int) (``_compute_resized_output_size``: the shorter
    side to ``resize``, the longer int(resize * longer / shorter)), CenterCrop (``center_crop``: top and
    left int(round((side - crop) / 2.0)))."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_width, new_height, int(round((new_width - size) / 2.0)), int(round((new_height - size) / 2.0))


def test_eval_view_uses_torchvisions_arithmetic_on_many_sizes():
    """Resize to int(256/224 x size), then the centre crop, as data_finetune.py's eval transform; on 2000
    sizes (a rounded resized side or a floored offset differs on about half of them)."""
    rng = np.random.default_rng(0)
    for size in (64, 192, 224):
        resize = int(256 / 224 * size)
        for width, height in rng.integers(resize, 4 * resize, size=(600, 2)).tolist() + [(resize, resize)]:
            assert center_view_geometry(width, height, size, resize) == torchvision_resize_and_centre_crop(
                width, height, size, resize), (width, height, size)
    assert center_view_geometry(335, 200, 224, 256) == (428, 256, 102, 16)  # int(428.8); round(102.0)
    assert center_view_geometry(200, 351, 64, 73) == (73, 128, 4, 32)  # round(4.5) = 4, round(31.5) = 32
    image = render_scene(1).resize((97, 83))
    width, height, left, top = torchvision_resize_and_centre_crop(97, 83, 64, 73)
    expected = to_normalized_tensor(image.resize((width, height), Image.BICUBIC).crop((left, top, left + 64, top + 64)))
    assert torch.equal(center_view(image, 64, 73), expected)


# ---- the linear probe converges ------------------------------------------------------------------

def newton_logistic_regression(features, labels, num_classes, weight_decay, iterations=30):
    """Reference: Newton's method on mean cross-entropy + weight_decay / 2 |W|^2 (bias free), the exact
    Hessian of the multinomial logistic loss; quadratic convergence to the unique minimum."""
    count, dim = features.shape
    inputs = torch.cat((features.double(), torch.ones(count, 1, dtype=torch.float64)), dim=1)  # bias column
    targets = F.one_hot(labels, num_classes).double()
    penalty = torch.full((dim + 1,), weight_decay, dtype=torch.float64)
    penalty[-1] = 0.0
    theta = torch.zeros(num_classes, dim + 1, dtype=torch.float64)
    for _ in range(iterations):
        probabilities = torch.softmax(inputs @ theta.T, dim=1)
        gradient = (probabilities - targets).T @ inputs / count + theta * penalty
        # Hessian blocks (c, d): X^T diag(p_c (delta_cd - p_d)) X / N, plus the penalty on the diagonal.
        weights = probabilities[:, :, None] * (torch.eye(num_classes, dtype=torch.float64) - probabilities[:, None, :])
        hessian = torch.einsum("ncd,ni,nj->cidj", weights, inputs, inputs) / count
        hessian = hessian.reshape(num_classes * (dim + 1), -1) + torch.diag(penalty.repeat(num_classes))
        # The softmax is shift invariant (one class's direction is flat without a penalty on the bias).
        step = torch.linalg.lstsq(hessian, gradient.reshape(-1, 1)).solution
        theta = theta - step.reshape(num_classes, dim + 1)
    logits = inputs @ theta.T
    objective = F.cross_entropy(logits, labels) + 0.5 * weight_decay * theta[:, :-1].pow(2).sum()
    return theta[:, :-1], theta[:, -1], float(objective)


def overlapping_classes(count=240, dim=12, num_classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (count,), generator=generator)
    centres = torch.randn(num_classes, dim, generator=generator)
    return centres[labels] * 0.8 + torch.randn(count, dim, generator=generator), labels


@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
@pytest.mark.parametrize("weight_decay", [1e-4, 1e-1])
def test_logistic_regression_reaches_the_newton_minimum(weight_decay, solver, monkeypatch):
    """Both solvers of the probe (L-BFGS: the one for more than NEWTON_MAX_PARAMETERS parameters)."""
    if solver == "lbfgs":
        monkeypatch.setattr(probe, "NEWTON_MAX_PARAMETERS", 0)
    features, labels = overlapping_classes()
    ours = fit_logistic_regression(features, labels, 3, weight_decay)
    assert ours["solver"] == solver
    weight, bias, objective = newton_logistic_regression(features, labels, 3, weight_decay)
    assert ours["converged"] and ours["objective"] == pytest.approx(objective, rel=1e-8)
    torch.testing.assert_close(ours["weight"], weight, rtol=0, atol=1e-4)
    # The bias is defined up to a shift common to all classes (the softmax ignores it).
    torch.testing.assert_close(ours["bias"] - ours["bias"].mean(), bias - bias.mean(), rtol=0, atol=1e-4)


def test_linear_probe_reports_training_accuracy_and_its_chosen_penalty():
    features, labels = overlapping_classes(count=300)
    result = linear_probe(features[:200], labels[:200], features[200:], 3, seed=0)
    held_out = result["selection"]["held_out_top1"]
    assert result["converged"] and len(held_out) == 7 and result["selection"]["held_out_images"] == 40
    assert held_out[str(result["selection"]["weight_decay"])] == max(held_out.values())
    train_top1 = (result["train_scores"].argmax(1) == labels[:200]).double().mean()
    assert train_top1 > 0.8 and result["scores"].shape == (100, 3)
