"""``simmim-fast eval --linear / --knn``: quick checks of a frozen encoder on a labelled folder.

Features are the encoder's pooled output (ViT: the mean of the patch tokens after the final norm, or
``fc_norm`` of a fine-tuned one; Swin: the pooled last stage) of the evaluation view (resize to 256/224,
centre crop). They are cached on disk under a key of the checkpoint's bytes, the images (paths, sizes,
times, labels) and the view, so repeated probes skip the encoder.

- Linear probe: multinomial logistic regression on standardised features (each dimension to zero mean,
  unit variance over the training split), trained to convergence (float64; Newton's method, or L-BFGS for
  problems too large for the Hessian) with an L2 penalty on the weights chosen on a split of the training
  set (``select_weight_decay``); reports top-1/top-5 on the validation split and the training accuracy.
- k-NN: cosine similarity to the training features, the k=20 nearest vote with weights exp(sim / 0.07)
  (DINO's weighted k-NN, the usual one in the MIM literature).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .._checks import check_count, require, usable_device
from ..checkpoint import CheckpointReadError, load_checkpoint, save_atomic
from ..config import check_hyperparameters, get_config, merge
from ..train.configs import build_config
from ..train.engine import seed_everything
from ..train.monitor import json_text
from .data import EVAL_RESIZE_RATIO, EvalSet, LabelledFolder, open_splits
from .finetune import FINETUNE_SECTIONS, read_pretrained, topk_correct
from .models import VisionTransformerClassifier, build_classifier, load_into

CACHE_FORMAT = "simmim_fast.features/1"


def model_from_checkpoint(path: str, preset: Optional[str] = None, config_file: Optional[str] = None,
                          trust: bool = False, with_head: bool = False):
    """(model in eval mode, config, class names or None) for a checkpoint: the model from its own config
    (simmim-fast pretraining or fine-tuning), else from ``preset`` / ``config_file``; with its head when
    ``with_head`` and it has one, else features only."""
    pretrained = read_pretrained(path, trust)
    if preset or config_file:
        config = build_config(preset, config_file)
    elif pretrained["config"] is not None:
        saved = {key: value for key, value in pretrained["config"].items() if key not in FINETUNE_SECTIONS}
        config = merge(get_config(), saved)
    else:
        raise ValueError(f"{path} has no simmim-fast config; give --preset or --config for its model")
    check_hyperparameters(config, masked=False)
    head = pretrained["model"].get("head.weight")
    model = build_classifier(config, num_classes=head.shape[0] if with_head and head is not None else 0)
    load_into(model, pretrained["model"], keep_head=with_head, name=str(path))
    return model.eval(), config, pretrained["classes"]


def probe_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    if isinstance(model, VisionTransformerClassifier) and model.fc_norm is None:
        return model.forward_tokens(images)[:, 1:].mean(1)
    return model.forward_features(images)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _data_fingerprint(source) -> list:
    if isinstance(source, LabelledFolder):
        return [(str(path), path.stat().st_size, path.stat().st_mtime_ns, label) for path, label in source.samples]
    return [(source.describe(index), label) for index, label in enumerate(source.labels)]


def cache_key(weights: str, source, img_size: int, crop: bool) -> str:
    """``weights``: the checkpoint file's digest, or a description of seeded random weights."""
    key = {"format": CACHE_FORMAT, "checkpoint": weights, "data": _data_fingerprint(source),
           "view": {"img_size": img_size, "crop": crop, "resize_ratio": EVAL_RESIZE_RATIO}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


@torch.no_grad()
def extract(model: torch.nn.Module, source, img_size: int, crop: bool, batch_size: int,
            device) -> Dict[str, torch.Tensor]:
    loader = DataLoader(EvalSet(source, img_size, crop), batch_size=batch_size)
    features, labels = [], []
    for batch in loader:
        features.append(probe_features(model, batch["image"].to(device)).float().cpu())
        labels.append(batch["label"])
    return {"features": torch.cat(features), "labels": torch.cat(labels)}


def cached_features(weights: str, model, config, source, cache_dir: Path, batch_size: int, device) -> Dict[str, Any]:
    """The features of ``source`` from the cache, or extracted and cached (atomically); a cache file
    that cannot be read or does not hold one feature row per image is rebuilt, with a warning."""
    img_size, crop = config.DATA.IMG_SIZE, config.get("TEST", {}).get("CROP", True)
    path = cache_dir / f"features_{cache_key(weights, source, img_size, crop)}.pt"
    if path.is_file():
        try:
            cached = load_checkpoint(path)
            problem = _feature_cache_problem(cached, len(source))
        except CheckpointReadError as error:
            problem = str(error)
        if problem is None:
            return {**cached, "cached": True}
        warnings.warn(f"rebuilding the feature cache {path}: {problem}", stacklevel=2)
    found = extract(model, source, img_size, crop, batch_size, device)
    save_atomic(found, path)
    return {**found, "cached": False}


def _feature_cache_problem(cached, images: int) -> Optional[str]:
    """None for a feature cache of ``images`` rows, else what is wrong with it."""
    if not (isinstance(cached, dict) and isinstance(cached.get("features"), torch.Tensor)
            and isinstance(cached.get("labels"), torch.Tensor)):
        return "not a feature cache (no 'features' and 'labels' tensors)"
    if cached["features"].ndim != 2 or len(cached["features"]) != images or len(cached["labels"]) != images:
        return f"{tuple(cached['features'].shape)} features for {images} images"
    return None


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor, num_classes: int,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores (N, C): the k nearest training samples by cosine similarity vote exp(sim / T)."""
    train = F.normalize(train_features, dim=1)
    scores = []
    for start in range(0, len(features), chunk):
        similarity = F.normalize(features[start:start + chunk], dim=1) @ train.T
        top, index = similarity.topk(min(k, len(train)), dim=1)
        votes = torch.zeros(len(top), num_classes, dtype=top.dtype)
        votes.scatter_add_(1, train_labels[index], (top / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


# The L2 penalties tried, and the share of the training split held out to choose among them.
WEIGHT_DECAYS = tuple(10.0 ** exponent for exponent in range(-6, 1))
SELECTION_FRACTION = 0.2
# Newton's method (exact Hessian) up to this many parameters (classes x (dim + 1)), else L-BFGS; each stops
# at this largest gradient entry (Newton's quadratic convergence gets there in a few steps more).
NEWTON_MAX_PARAMETERS = 4096
NEWTON_TOLERANCE, NEWTON_STEPS = 1e-9, 100
LBFGS_TOLERANCE, LBFGS_ITERATIONS = 1e-6, 5000


def _objective(inputs: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor, penalty: torch.Tensor):
    """Mean cross-entropy + 1/2 sum(penalty x theta^2); theta (C, D + 1) holds the bias in its last column."""
    return F.cross_entropy(inputs @ theta.T, labels) + 0.5 * (penalty * theta.pow(2)).sum()


def _newton(inputs: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Damped Newton steps (backtracking to sufficient decrease) with the exact Hessian of the multinomial
    logistic loss. The bias is unpenalised, so a shift common to all classes' biases is a flat direction:
    least squares takes the step without it."""
    count, num_classes = inputs.shape[0], theta.shape[0]
    targets = F.one_hot(labels, num_classes).double()
    identity = torch.eye(num_classes, dtype=torch.float64)
    for _ in range(NEWTON_STEPS):
        probabilities = torch.softmax(inputs @ theta.T, dim=1)
        gradient = (probabilities - targets).T @ inputs / count + penalty * theta
        if gradient.abs().max() <= NEWTON_TOLERANCE:
            break
        # Blocks (c, d): X^T diag(p_c (delta_cd - p_d)) X / N (one (N, D) temporary at a time), plus the
        # penalty on the diagonal.
        curvature = probabilities[:, :, None] * (identity - probabilities[:, None, :])
        hessian = torch.empty(num_classes, inputs.shape[1], num_classes, inputs.shape[1], dtype=torch.float64)
        for first in range(num_classes):
            for second in range(first, num_classes):
                block = (inputs * curvature[:, first, second, None]).T @ inputs / count
                hessian[first, :, second], hessian[second, :, first] = block, block.T
        hessian = hessian.reshape(gradient.numel(), -1) + torch.diag(penalty.expand_as(theta).reshape(-1))
        step = torch.linalg.lstsq(hessian, gradient.reshape(-1, 1)).solution.reshape(theta.shape)
        current, decrease, size = _objective(inputs, labels, theta, penalty), float((gradient * step).sum()), 1.0
        objective_at = lambda size: _objective(inputs, labels, theta - size * step, penalty)  # noqa: E731
        while size > 1e-10 and objective_at(size) > current - 1e-4 * size * decrease:
            size /= 2
        theta = theta - size * step
    return theta


def _lbfgs(inputs: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Full-batch L-BFGS with a strong-Wolfe line search, for problems too large for the Hessian."""
    theta = theta.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=LBFGS_ITERATIONS, max_eval=2 * LBFGS_ITERATIONS,
                                  tolerance_grad=LBFGS_TOLERANCE, tolerance_change=1e-14, history_size=50,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = _objective(inputs, labels, theta, penalty)
        loss.backward()
        return loss

    optimizer.step(closure)
    return theta.detach()


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                            start: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
    """The minimiser of mean cross-entropy + weight_decay / 2 x |W|^2 (the bias unpenalised) over (N, D)
    features, in float64, from zero or ``start`` (a previous result; the objective is strictly convex in W
    for weight_decay > 0: one minimum whatever the start): Newton's method up to NEWTON_MAX_PARAMETERS
    parameters, else L-BFGS. Returns weight (C, D), bias (C,), the objective, the largest gradient entry
    and whether that is within the solver's tolerance."""
    inputs = torch.cat((features.double(), torch.ones(len(features), 1, dtype=torch.float64)), dim=1)
    penalty = torch.full((inputs.shape[1],), float(weight_decay), dtype=torch.float64)
    penalty[-1] = 0.0
    theta = torch.zeros(num_classes, inputs.shape[1], dtype=torch.float64)
    if start is not None:
        theta = torch.cat((start["weight"], start["bias"][:, None]), dim=1)
    newton = theta.numel() <= NEWTON_MAX_PARAMETERS
    theta = (_newton if newton else _lbfgs)(inputs, labels, theta, penalty).requires_grad_(True)
    loss = _objective(inputs, labels, theta, penalty)
    loss.backward()
    gradient = float(theta.grad.abs().max())
    theta = theta.detach()
    return {"weight": theta[:, :-1], "bias": theta[:, -1], "objective": float(loss.detach()), "gradient": gradient,
            "converged": gradient <= (NEWTON_TOLERANCE if newton else LBFGS_TOLERANCE),
            "solver": "newton" if newton else "lbfgs"}


def select_weight_decay(features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0,
                        weight_decays=WEIGHT_DECAYS) -> Dict[str, Any]:
    """The penalty whose fit on a random 80% of the training split classifies the other 20% best (ties:
    the lower held-out cross-entropy). Returns it and every candidate's held-out accuracy (%)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held = max(1, int(round(SELECTION_FRACTION * len(labels))))
    fit, check = order[held:], order[:held]
    scores, model = {}, None
    for weight_decay in sorted(weight_decays, reverse=True):  # each fit starts from the stronger penalty's
        model = fit_logistic_regression(features[fit], labels[fit], num_classes, weight_decay, start=model)
        logits = features[check].double() @ model["weight"].T + model["bias"]
        scores[weight_decay] = (float((logits.argmax(1) == labels[check]).double().mean()) * 100,
                                -float(F.cross_entropy(logits, labels[check])))
    best = max(scores, key=lambda weight_decay: scores[weight_decay])
    return {"weight_decay": best, "held_out_top1": {str(key): scores[key][0] for key in sorted(scores)},
            "held_out_images": held}


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor,
                 num_classes: int, seed: int = 0) -> Dict[str, Any]:
    """Class scores (N, C) of ``features`` and the training scores, from a converged logistic regression on
    standardised training features with the penalty ``select_weight_decay`` picks (seeded split)."""
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    standardise = lambda x: ((x - mean) / std).double()  # noqa: E731
    inputs = standardise(train_features)
    selection = select_weight_decay(inputs, train_labels, num_classes, seed)
    model = fit_logistic_regression(inputs, train_labels, num_classes, selection["weight_decay"])
    classify = lambda x: x @ model["weight"].T + model["bias"]  # noqa: E731
    return {"scores": classify(standardise(features)), "train_scores": classify(inputs), "selection": selection,
            "converged": model["converged"], "gradient": model["gradient"], "solver": model["solver"]}


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    top1, top5 = topk_correct(scores, labels)
    return {"top1": 100.0 * float(top1) / len(labels), "top5": 100.0 * float(top5) / len(labels)}


def run_probes(checkpoint: Optional[str], data: Optional[str] = None, linear: bool = True, knn: bool = True,
               preset: Optional[str] = None, config_file: Optional[str] = None, cache_dir: Optional[str] = None,
               output: Optional[str] = None, k: int = 20, temperature: float = 0.07, batch_size: int = 64,
               device: str = "cpu", trust_checkpoint: bool = False, seed: int = 0) -> Dict[str, Any]:
    """Linear probe and/or k-NN of ``checkpoint``'s frozen encoder on ``data`` (train/ and val/ inside;
    the labelled embedded scenes when None); without a checkpoint, of ``preset``'s encoder randomly
    initialised with ``seed`` (the baseline). Returns (and writes to ``output``, a JSON file) the metrics."""
    if not (linear or knn):
        raise ValueError("choose --linear, --knn or both")
    check_count("--k", k, 1)
    check_count("--batch-size", batch_size, 1)
    if not temperature > 0:
        raise ValueError(f"--temperature must be > 0 (the k-NN votes are exp(similarity / T)), got {temperature}")
    device = usable_device("--device", device)
    if checkpoint:
        model, config, _ = model_from_checkpoint(checkpoint, preset, config_file, trust_checkpoint)
        weights, default_cache = _file_digest(Path(checkpoint)), Path(checkpoint).parent / "features"
    else:
        if not (preset or config_file):
            raise ValueError("give --checkpoint, or --preset/--config for a randomly initialised baseline")
        config = build_config(preset, config_file)
        check_hyperparameters(config, masked=False)
        seed_everything(seed)
        model = build_classifier(config, num_classes=0).eval()
        weights = f"random init {json.dumps(config.MODEL, sort_keys=True)} seed {seed}"
        default_cache = Path("runs/features")
    model.to(device)
    train, val = open_splits(data)
    require(not knn or k <= len(train),
            lambda: f"--k {k} is more than the {len(train)} training images the k-NN votes among")
    cache = Path(cache_dir) if cache_dir else default_cache
    splits = {name: cached_features(weights, model, config, source, cache, batch_size, device)
              for name, source in (("train", train), ("val", val))}
    num_classes = len(train.classes)
    results: Dict[str, Any] = {"checkpoint": str(checkpoint) if checkpoint else f"random init, seed {seed}",
                               "data": data or "embedded scenes",
                               "classes": list(train.classes), "train_images": len(train), "val_images": len(val),
                               "feature_dim": int(splits["train"]["features"].shape[1]),
                               "features_cached": splits["train"]["cached"] and splits["val"]["cached"]}
    arguments = (splits["train"]["features"], splits["train"]["labels"], splits["val"]["features"], num_classes)
    if knn:
        results["knn"] = {"k": k, "temperature": temperature,
                          **accuracy(knn_classify(*arguments, k=k, temperature=temperature), splits["val"]["labels"])}
    if linear:
        probe = linear_probe(*arguments, seed=seed)
        results["linear"] = {**accuracy(probe["scores"], splits["val"]["labels"]),
                             "train_top1": accuracy(probe["train_scores"], splits["train"]["labels"])["top1"],
                             "weight_decay": probe["selection"]["weight_decay"],
                             "held_out_top1_by_weight_decay": probe["selection"]["held_out_top1"],
                             "converged": probe["converged"], "max_gradient": probe["gradient"],
                             "solver": probe["solver"]}
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json_text(results, indent=2))
    return results

