"""Against the real timm and transformers (lane downstream, .venv-cuda): exported checkpoints load
with strict key matching and give our features; our torch-only augmentation follows timm's rules."""
import json
import random

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from simmim_fast import build_simmim, get_config  # noqa: E402
from simmim_fast.checkpoint import save_atomic  # noqa: E402
from simmim_fast.config import merge  # noqa: E402
from simmim_fast.downstream import augment  # noqa: E402
from simmim_fast.downstream.export import export_checkpoint  # noqa: E402
from simmim_fast.downstream.finetune import RECIPES  # noqa: E402
from simmim_fast.downstream.models import build_classifier, load_into  # noqa: E402
from simmim_fast.downstream.probe import model_from_checkpoint  # noqa: E402
from simmim_fast.train.scenes import render_scene  # noqa: E402

from discriminating import assert_discriminates, discriminating_weights, swapped_q_and_k  # noqa: E402

pytestmark = pytest.mark.downstream
FEATURE_TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # fp32 rounding of differently ordered matmuls


def write_checkpoint(tmp_path, preset, finetuned):
    """A pretraining checkpoint (SimMIM, encoder only) or a fine-tuned one (classifier with a 3-class head)."""
    config = get_config(preset)
    if finetuned:
        model_type = config.MODEL.TYPE
        config = merge(config, {"MODEL": RECIPES[model_type]["MODEL"]})
        model = discriminating_weights(build_classifier(config, 3))
        load_into(model, model.state_dict())
    else:
        model = discriminating_weights(build_simmim(preset))
    path = tmp_path / f"{preset}-{'ft' if finetuned else 'pt'}.pth"
    save_atomic({"model": model.state_dict(), "config": config.to_dict()}, path)
    return path


def ours(path, images):
    """(token or pooled features, logits or None) of our model for the checkpoint."""
    model, config, _ = model_from_checkpoint(str(path), with_head=True)
    with torch.no_grad():
        if model.num_classes:
            return model.forward_features(images), model(images)
        if config.MODEL.TYPE == "vit":
            return model.forward_tokens(images), None
        return model.forward_features(images), None


@pytest.mark.parametrize("preset", ["vit-tiny", "swin-tiny"])
@pytest.mark.parametrize("finetuned", [False, True], ids=["pretrained", "finetuned"])
def test_timm_export_loads_strictly_and_matches(tmp_path, preset, finetuned):
    path = write_checkpoint(tmp_path, preset, finetuned)
    folder = export_checkpoint(str(path), "timm", str(tmp_path / "timm"))
    config = json.loads((folder / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    state = safetensors_torch.load_file(str(folder / "model.safetensors"))
    model.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 64, 64)
    features, logits = ours(path, images)

    def their_features():
        tokens = model.forward_features(images)
        return tokens if preset == "vit-tiny" and not finetuned else model.forward_head(tokens, pre_logits=True)

    with torch.no_grad():
        torch.testing.assert_close(their_features(), features, **FEATURE_TOLERANCE)
        if logits is not None:
            torch.testing.assert_close(model(images), logits, **FEATURE_TOLERANCE)
        model.load_state_dict(swapped_q_and_k(state))  # the planted wrong export
        assert_discriminates(their_features(), features, **FEATURE_TOLERANCE, name="a q/k-swapped export")


@pytest.mark.parametrize("preset", ["vit-tiny", "swin-tiny"])
@pytest.mark.parametrize("finetuned", [False, True], ids=["pretrained", "finetuned"])
def test_transformers_export_loads_strictly_and_matches(tmp_path, preset, finetuned):
    path = write_checkpoint(tmp_path, preset, finetuned)
    folder = export_checkpoint(str(path), "transformers", str(tmp_path / "hf"))
    config = json.loads((folder / "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])
    # from_pretrained: the files as a user loads them (strict: no missing or unexpected keys).
    model, info = model_class.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model.eval()
    images = torch.randn(2, 3, 64, 64)
    features, logits = ours(path, images)

    def compared():  # (theirs, ours) of what the export must reproduce
        output = model(pixel_values=images, output_hidden_states=True)
        if logits is not None:
            return output.logits, logits
        return (output.last_hidden_state if preset == "vit-tiny" else output.pooler_output), features

    with torch.no_grad():
        torch.testing.assert_close(*compared(), **FEATURE_TOLERANCE)
        model.load_state_dict(swapped_q_and_k(model.state_dict()))  # the planted wrong export
        assert_discriminates(*compared(), **FEATURE_TOLERANCE, name="a q/k-swapped export")


def test_rand_augment_levels_and_ops_are_timms(monkeypatch):
    from timm.data import auto_augment as timm_aa

    image = render_scene(2)
    for name, (level_to_arg, _) in augment.RAND_AUGMENT_OPS.items():
        for sign, draw in ((1.0, 0.0), (-1.0, 1.0)):  # timm negates when random.random() > 0.5
            monkeypatch.setattr(random, "random", lambda draw=draw: draw)
            their_args = timm_aa.LEVEL_TO_ARG[name](7.3, timm_aa._HPARAMS_DEFAULT) if level_to_arg else ()
            our_args = (level_to_arg(7.3, sign),) if level_to_arg else ()
            assert our_args == pytest.approx(their_args), name
            theirs = timm_aa.NAME_TO_OP[name](image, *their_args, fillcolor=augment.FILL, resample=augment.RESAMPLES[1])
            ours_image = augment.apply_op(image, name, 7.3, sign, augment.RESAMPLES[1])
            assert ours_image.tobytes() == theirs.tobytes(), name
    assert set(augment.RAND_AUGMENT_OPS) == set(timm_aa._RAND_INCREASING_TRANSFORMS)


def test_mixup_and_cutmix_are_timms(monkeypatch):
    from timm.data import mixup as timm_mixup

    images, labels = torch.randn(6, 3, 20, 20), torch.tensor([0, 1, 2, 3, 1, 0])
    ours_mixed, ours_targets = augment.mix_batch(images, labels, 4, 0.1, 0.7)
    theirs = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=4)
    monkeypatch.setattr(np.random, "beta", lambda *args, **kwargs: 0.7)
    their_images, their_targets = theirs(images.clone(), labels)
    torch.testing.assert_close(ours_mixed, their_images)
    torch.testing.assert_close(ours_targets, their_targets)

    centres = iter([13, 4])  # rand_bbox draws the centre row, then the column
    monkeypatch.setattr(np.random, "randint", lambda *args, **kwargs: next(centres))
    (top, bottom, left, right), lam = timm_mixup.cutmix_bbox_and_lam(images.shape, 0.6, correct_lam=True)
    assert augment.cutmix_box(20, 20, 0.6, 13, 4) == (top, bottom, left, right)
    kept = 1 - (bottom - top) * (right - left) / 400
    assert kept == pytest.approx(lam)
