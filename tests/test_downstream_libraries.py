"""Against the real timm and transformers (lane downstream, .venv-cuda): exported checkpoints load
with strict key matching and give our features; our torch-only augmentation follows timm's rules."""
import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from simmim_fast import build_simmim, get_config  # noqa: E402
from simmim_fast.checkpoint import save_atomic  # noqa: E402
from simmim_fast.config import merge  # noqa: E402
from simmim_fast.downstream import augment, transfer  # noqa: E402
from simmim_fast.downstream.export import export_checkpoint  # noqa: E402
from simmim_fast.downstream.finetune import RECIPES  # noqa: E402
from simmim_fast.downstream.models import build_classifier, load_into  # noqa: E402
from simmim_fast.downstream.probe import model_from_checkpoint  # noqa: E402
from simmim_fast.train.scenes import render_scene  # noqa: E402

from discriminating import assert_discriminates, discriminating_weights, swapped_q_and_k  # noqa: E402

pytestmark = pytest.mark.downstream
FEATURE_TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # fp32 rounding of differently ordered matmuls
# Stage maps after a fresh per-stage LayerNorm: it rescales the rounding of 8 blocks by up to ~10x.
NORMED_STAGE_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


PRESETS = ["vit-tiny", "swin-tiny", "swinv2-tiny", "convnext-tiny"]


def write_checkpoint(tmp_path, preset, finetuned, overrides=()):
    """A pretraining checkpoint (SimMIM, encoder only) or a fine-tuned one (classifier with a 3-class head)."""
    config = get_config(preset, overrides)
    if finetuned:
        model_type = config.MODEL.TYPE
        config = merge(config, {"MODEL": RECIPES[model_type]["MODEL"]})
        model = discriminating_weights(build_classifier(config, 3))
        load_into(model, model.state_dict())
    else:
        model = discriminating_weights(build_simmim(config))
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


def timm_model(folder):
    config = json.loads((folder / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    model.load_state_dict(safetensors_torch.load_file(str(folder / "model.safetensors")), strict=True)
    return model


def hf_model(folder):
    config = json.loads((folder / "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])
    # from_pretrained: the files as a user loads them (strict: no missing or unexpected keys).
    model, info = model_class.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("finetuned", [False, True], ids=["pretrained", "finetuned"])
def test_exports_load_strictly_into_timm_and_transformers_and_match(tmp_path, preset, finetuned):
    path = write_checkpoint(tmp_path, preset, finetuned)
    images = torch.randn(2, 3, 64, 64)
    features, logits = ours(path, images)
    timm_classes = timm_model(export_checkpoint(str(path), "timm", str(tmp_path / "timm")))
    hf_classes = hf_model(export_checkpoint(str(path), "transformers", str(tmp_path / "hf")))

    def compared():  # (theirs, ours) for every output the exports must reproduce
        tokens = timm_classes.forward_features(images)
        pooled = preset != "vit-tiny" or finetuned  # a pretrained ViT gives its tokens
        pairs = [(timm_classes.forward_head(tokens, pre_logits=True) if pooled else tokens, features)]
        output = hf_classes(pixel_values=images)
        if logits is not None:
            pairs += [(timm_classes(images), logits), (output.logits, logits)]
        else:
            pairs.append((output.last_hidden_state if preset == "vit-tiny" else output.pooler_output, features))
        return pairs

    with torch.no_grad():
        for theirs, expected in compared():
            torch.testing.assert_close(theirs, expected, **FEATURE_TOLERANCE)
        if preset != "convnext-tiny":  # attention: exports with q and k swapped (planted) miss by >= 10x
            for model in (timm_classes, hf_classes):
                model.load_state_dict(swapped_q_and_k(model.state_dict()))
            for theirs, expected in compared():
                assert_discriminates(theirs, expected, **FEATURE_TOLERANCE, name="a q/k-swapped export")


@pytest.mark.parametrize("fmt", ["timm", "transformers"])
def test_vit_per_block_bias_export_is_the_fine_tuning_layout(tmp_path, fmt):
    """The shared table copied into every block: the fine-tuning classes (timm's beit_* default, BEiT
    with per-block bias) load it strictly and give the shared-bias model's tokens; the file says so."""
    path = write_checkpoint(tmp_path, "vit-tiny", finetuned=False)
    folder = export_checkpoint(str(path), fmt, str(tmp_path / "per-block"), vit_bias="per-block")
    with safetensors_torch.safe_open(str(folder / "model.safetensors"), "pt") as file:
        assert file.metadata()["simmim_fast.relative_position_bias"] == "per-block"
        assert not any("rel_pos_bias" in key or "shared_position_bias" in key for key in file.keys())
    images = torch.randn(2, 3, 64, 64)
    features, _ = ours(path, images)
    with torch.no_grad():
        if fmt == "timm":
            model = timm_model(folder)
            assert model.rel_pos_bias is None
            tokens = model.forward_features(images)
        else:
            model = hf_model(folder)
            assert not model.config.use_shared_relative_position_bias
            tokens = model(pixel_values=images).last_hidden_state
    torch.testing.assert_close(tokens, features, **FEATURE_TOLERANCE)


def test_auto_image_processor_gives_our_evaluation_view(tmp_path):
    """Both of transformers' backends (torchvision, the default, and PIL): our mean/std and crop size, and
    our view of the image (PIL: to uint8 rounding; torchvision: its tensor bicubic, ~1 level from Pillow's).
    The shapes are ones whose resized side and crop offset every arithmetic agrees on (docs/transfer.md
    says where transformers' floor((side - size) / 2) offset and torchvision's round() part)."""
    from PIL import Image

    from simmim_fast.downstream.data import eval_view
    from simmim_fast.train.data import IMAGENET_MEAN, IMAGENET_STD

    path = write_checkpoint(tmp_path, "swin-tiny", finetuned=True)
    folder = export_checkpoint(str(path), "transformers", str(tmp_path / "hf"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
              for width, height in ((90, 90), (120, 90), (77, 131), (200, 64))]
    for backend, tolerance in (("torchvision", 4e-2), ("pil", 2e-2)):  # one uint8 level is 0.0175 after /std
        processor = transformers.AutoImageProcessor.from_pretrained(str(folder), backend=backend)
        assert list(processor.image_mean) == list(IMAGENET_MEAN) and list(processor.image_std) == list(IMAGENET_STD)
        assert processor.crop_size["height"] == processor.crop_size["width"] == 64
        for image in images:
            theirs = processor(images=image, return_tensors="pt").pixel_values[0]
            torch.testing.assert_close(theirs, eval_view(image, 64), atol=tolerance, rtol=0,
                                       msg=f"{backend} {image.size}")


def layer_decay_check(model, folder):
    """transfer.param_groups on a real library's model: a parameter holding an exported tensor (our
    discriminating weights tell them apart by value) gets that tensor's layer from layer_decay.json and
    its weight-decay flag; a new one (neck, head, extra norm) the top layer. Returns the new ones' names."""
    table = json.loads((folder / "layer_decay.json").read_text())["parameters"]
    exported = safetensors_torch.load_file(str(folder / "model.safetensors"))
    entry_of = {exported[name].numpy().tobytes(): entry for name, entry in table.items()}
    last = max(entry["layer"] for entry in table.values())
    groups = transfer.param_groups(model, str(folder), lr=1.0, weight_decay=0.05, layer_decay=0.5)
    found = {id(param): (group["lr"], group["weight_decay"]) for group in groups for param in group["params"]}
    new = []
    for name, param in model.named_parameters():
        entry = entry_of.get(param.detach().numpy().tobytes())
        if entry is None:
            new.append(name)
            entry = {"layer": last, "weight_decay": param.ndim > 1}
        assert found[id(param)] == (0.5 ** (last - entry["layer"]), 0.05 if entry["weight_decay"] else 0.0), name
    return new


def backbone_parts(names):
    """The names inside UperNet's backbone that are not among the parts a backbone adds (transfer.UNTRAINED)."""
    return [name for name in names if name.startswith("backbone.")
            and not any(re.match(pattern, name[len("backbone."):]) for pattern in transfer.UNTRAINED)]


@pytest.mark.parametrize("preset", PRESETS)
def test_backbones_hold_our_weights(tmp_path, preset):
    """timm.create_model("local-dir:EXPORT", features_only=True) and SwinBackbone / Swinv2Backbone /
    ConvNextBackbone / BeitBackbone give our stage maps (through the per-stage norms where the class has
    them: the last one ours, the others new, a plain LayerNorm); UperNet's backbone is that backbone.
    Swin's window is 2 here: transformers' Swin backbones always partition (and shift) windows, where
    the classifier takes a stage no larger than the window whole, unshifted."""
    swin_section = {"swin-tiny": "SWIN", "swinv2-tiny": "SWINV2"}.get(preset)
    overrides = [{"MODEL": {swin_section: {"WINDOW_SIZE": 2}}}] if swin_section else []
    path = write_checkpoint(tmp_path, preset, finetuned=False, overrides=overrides)
    images = torch.randn(2, 3, 64, 64)
    ours_model, _, _ = model_from_checkpoint(str(path))
    with torch.no_grad():
        expected = transfer.stage_outputs(ours_model, images)
    timm_folder = export_checkpoint(str(path), "timm", str(tmp_path / "timm"))
    timm_backbone = transfer.timm_features(str(timm_folder), out_indices=list(range(len(expected)))).eval()
    assert layer_decay_check(timm_backbone, timm_folder) == []  # every weight is ours
    channels_last = str(getattr(timm_backbone, "output_fmt", "NCHW")).endswith("NHWC")  # timm's Swin stages
    with torch.no_grad():
        theirs = timm_backbone(images)
    assert len(theirs) == len(expected)
    for their_map, our_map in zip(theirs, expected):
        torch.testing.assert_close(their_map.permute(0, 3, 1, 2) if channels_last else their_map, our_map,
                                   **FEATURE_TOLERANCE)

    folder = export_checkpoint(str(path), "transformers", str(tmp_path / "hf"))
    if preset == "vit-tiny":
        kwargs = {"out_indices": [1, 2, 3, 4], "reshape_hidden_states": True, "add_fpn": False}
    else:
        kwargs = {"out_features": ["stage1", "stage2", "stage3", "stage4"]}
    backbone = transfer.hf_backbone(str(folder), **kwargs).eval()
    if getattr(backbone, "hidden_states_norms", None) is not None:
        final_norm = ours_model.norm
        expected = [torch.nn.functional.layer_norm(stage.permute(0, 2, 3, 1), stage.shape[1:2],
                                                   *((final_norm.weight, final_norm.bias) if index == 3 else (None, None)),
                                                   eps=final_norm.eps).permute(0, 3, 1, 2)
                    for index, stage in enumerate(expected)]
    upernet = transfer.hf_upernet(str(folder), num_labels=5, backbone_kwargs=kwargs).eval()
    assert backbone_parts(layer_decay_check(upernet, folder)) == []
    with torch.no_grad():
        theirs = backbone(images).feature_maps
        for their_map, our_map in zip(theirs, expected):
            torch.testing.assert_close(their_map, our_map, **NORMED_STAGE_TOLERANCE)
        for their_map, backbone_map in zip(upernet.backbone(images).feature_maps, theirs):
            torch.testing.assert_close(their_map, backbone_map, **FEATURE_TOLERANCE)
        assert upernet(pixel_values=images).logits.shape == (2, 5, 64, 64)
    if preset == "vit-tiny":  # docs/transfer.md's BEiT call: a new FPN makes four scales of one
        with_fpn = transfer.hf_upernet(str(folder), num_labels=5, backbone_kwargs={**kwargs, "add_fpn": True}).eval()
        assert backbone_parts(layer_decay_check(with_fpn, folder)) == []
        with torch.no_grad():
            assert with_fpn(pixel_values=images).logits.shape == (2, 5, 64, 64)


def test_rand_augment_levels_and_ops_are_timms(monkeypatch):
    from timm.data import auto_augment as timm_aa

    image = render_scene(2)
    for name, (level_to_arg, _) in augment.RAND_AUGMENT_OPS.items():
        for sign, draw in ((1.0, 0.0), (-1.0, 1.0)):  # timm negates when random.random() > 0.5
            monkeypatch.setattr(random, "random", lambda draw=draw: draw)
            their_args = timm_aa.LEVEL_TO_ARG[name](7.3, timm_aa._HPARAMS_DEFAULT) if level_to_arg else ()
            our_args = (level_to_arg(7.3, sign),) if level_to_arg else ()
            assert our_args == pytest.approx(their_args), name
            theirs = timm_aa.NAME_TO_OP[name](image, *their_args, fillcolor=augment.FILL, resample=augment.RESAMPLE)
            ours_image = augment.apply_op(image, name, 7.3, sign)
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


def test_the_original_transform_gives_rand_augment_one_bicubic_filter():
    """data_finetune.py's create_transform(..., interpolation='bicubic'): timm's RandAugment then filters
    every geometric op bicubically, as ours (it draws bilinear or bicubic per op only without one)."""
    transform = timm.data.create_transform(input_size=64, is_training=True, color_jitter=0.4,
                                           auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel",
                                           re_count=1, interpolation="bicubic")
    rand_augment = next(step for step in transform.transforms if type(step).__name__ == "RandAugment")
    assert {op.kwargs["resample"] for op in rand_augment.ops} == {augment.RESAMPLE}


@pytest.mark.parametrize("size", [64, 224])
def test_eval_view_is_torchvisions_resize_and_centre_crop(size):
    """data_finetune.py's evaluation transform, run by torchvision itself, on 40 image sizes."""
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms

    from simmim_fast.downstream.data import eval_view

    theirs = transforms.Compose([
        transforms.Resize(int(256 / 224 * size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    scene = render_scene(4)
    for width, height in np.random.default_rng(size).integers(size, 3 * size, size=(40, 2)).tolist():
        image = scene.resize((width, height), Image.BILINEAR)
        torch.testing.assert_close(eval_view(image, size), theirs(image), rtol=0, atol=1e-6, msg=str((width, height)))
