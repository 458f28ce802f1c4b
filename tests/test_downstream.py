"""Fine-tuning, probes and their pieces on the CPU (plain lane): checkpoint remap, layer decay,
augmentation invariants, labelled folders and their errors, a few-step CLI run with resume."""
import json
import shutil

import numpy as np
import pytest
import torch
from scipy.interpolate import CubicSpline

from simmim_fast import build_simmim, get_config
from simmim_fast.checkpoint import save_atomic
from simmim_fast.cli import main
from simmim_fast.config import merge
from simmim_fast.downstream.augment import Mixup, RandAugment, apply_op, cutmix_box, mix_batch, random_erasing
from simmim_fast.downstream.data import LabelledFolder, open_splits, write_scene_folder
from simmim_fast.downstream.export import DERIVED_BUFFERS, transformers_layout
from simmim_fast.downstream.finetune import RECIPES, layer_decay_groups
from simmim_fast.downstream.models import (build_classifier, geometric_source_positions, load_into,
                                           resize_relative_position_table)
from simmim_fast.downstream.probe import knn_classify
from simmim_fast.models.layers import relative_position_index
from simmim_fast.train.scenes import render_scene

from discriminating import assert_discriminates, discriminating_weights, swapped_q_and_k

VIT_FINETUNE = {"MODEL": {"VIT": {"USE_RPB": True, "USE_SHARED_RPB": False, "USE_MEAN_POOLING": True}}}


def pretrained(preset):
    return discriminating_weights(build_simmim(preset))


def test_vit_shared_bias_becomes_per_block_and_encoder_features_match():
    model = pretrained("vit-tiny")
    classifier = build_classifier(merge(get_config("vit-tiny"), VIT_FINETUNE), 3)
    report = load_into(classifier, model.state_dict())
    assert sorted(report["missing"]) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    shared = model.encoder.rel_pos_bias.relative_position_bias_table
    for block in classifier.blocks:
        assert torch.equal(block.attn.relative_position_bias_table, shared)
    # Same weights, no mask: the frozen classifier's tokens are the SimMIM encoder's.
    frozen = build_classifier(get_config("vit-tiny"), 0).eval()
    load_into(frozen, model.state_dict())
    images = torch.randn(2, 3, 64, 64)
    expected = model.eval().encoder(images, torch.zeros(2, 8, 8, dtype=torch.long)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(frozen.forward_tokens(images)[:, 1:], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["vit-tiny", "swin-tiny"])
def test_export_comparison_weights_see_a_q_k_swap(preset):
    """The downstream lane compares exports loaded into timm/transformers with our features at 1e-5 on
    weights from ``discriminating_weights``; a q/k-swapped export computes what this swapped copy does,
    which must miss by >= 10x that tolerance (N(0, 0.05) weights, the old draw, gave 1.5e-6: a pass)."""
    config = merge(get_config(preset), {"MODEL": RECIPES[get_config(preset).MODEL.TYPE]["MODEL"]})
    classifier = discriminating_weights(build_classifier(config, 3)).eval()
    wrong = build_classifier(config, 3).eval()
    wrong.load_state_dict(swapped_q_and_k(classifier.state_dict()))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_discriminates(wrong.forward_features(images), classifier.forward_features(images), rtol=1e-5,
                             atol=1e-5, name="features with q and k swapped")


def test_swin_bias_table_resized_when_the_window_changes():
    model = pretrained("swin-tiny")
    config = merge(get_config("swin-tiny"), {"DATA": {"IMG_SIZE": 80}, "MODEL": {"SWIN": {"WINDOW_SIZE": 5}}})
    classifier = build_classifier(config, 4)
    load_into(classifier, model.state_dict())
    source = model.encoder.layers[0].blocks[0].attn.relative_position_bias_table  # (7*7, heads)
    resized = classifier.layers[0].blocks[0].attn
    assert resized.relative_position_bias_table.shape == (81, source.shape[1])
    assert torch.equal(resized.relative_position_index, relative_position_index((5, 5)))
    # An interpolating spline: distance 0 keeps its value (tests/test_finetune_recipe.py: the original's values).
    grid = resized.relative_position_bias_table.detach().view(9, 9, -1)
    torch.testing.assert_close(grid[4, 4], source.detach().view(7, 7, -1)[3, 3])
    assert classifier(torch.randn(2, 3, 80, 80)).shape == (2, 4)


def test_resize_keeps_vit_cls_entries_and_is_identity_at_the_same_size():
    table = torch.randn(15 * 15 + 3, 2)
    assert torch.equal(resize_relative_position_table(table, table.shape[0], 3), table)
    resized = resize_relative_position_table(table, 19 * 19 + 3, 3)
    assert torch.equal(resized[-3:], table[-3:])


def test_resize_is_the_cubic_spline_through_each_axis():
    """A bias that is a sum f(dy) + g(dx) resizes to the same sum of 1-D not-a-knot cubic splines
    (SciPy's CubicSpline; what an s=0 bicubic RectBivariateSpline is on such a grid) at the target's
    distances: each head in its column, the first axis the grid's rows (dy), the CLS rows kept as
    they are. Exchanged axes miss by far more than the tolerance, a quadratic or quartic spline by 0.06."""
    source, target = geometric_source_positions(7, 9)
    axes = ((np.sin, lambda d: np.cos(0.7 * d)), (lambda d: np.tanh(d) * 2, np.sin))  # (f of dy, g of dx) per head

    def grid(positions, spline=False, exchanged=False):
        heads = []
        for f, g in axes:
            f_values, g_values = ((CubicSpline(source, f(source))(positions), CubicSpline(source, g(source))(positions))
                                  if spline else (f(positions), g(positions)))
            if exchanged:
                f_values, g_values = g_values, f_values
            heads.append(f_values[:, None] + g_values[None, :])
        return torch.from_numpy(np.stack(heads, axis=-1)).float().reshape(-1, len(axes))
    table = torch.cat((grid(source), torch.randn(3, 2)))
    resized = resize_relative_position_table(table, 9 * 9 + 3, 3)
    torch.testing.assert_close(resized[:81], grid(target, spline=True), rtol=1e-5, atol=1e-5)
    assert torch.equal(resized[81:], table[49:])
    assert_discriminates(grid(target, spline=True, exchanged=True), resized[:81], rtol=1e-5, atol=1e-5,
                         name="dy and dx exchanged")


def test_resize_refuses_tables_that_are_not_square_grids_or_too_small():
    assert resize_relative_position_table(torch.randn(25, 2), 49).shape == (49, 2)  # window 3 to 4
    table = torch.randn(25 + 20, 2)  # as many extra rows as the caller says, not only ViT's 3
    assert torch.equal(resize_relative_position_table(table, 49 + 20, 20)[49:], table[25:])
    # not squares; even sides (4 x 4, 6 x 6: no window's 2W-1); the CLS rows counted in the grid
    for rows, target_rows, extra in ((50, 81, 0), (49, 80, 0), (52, 84, 0), (49 + 3, 81, 3), (16, 49, 0), (49, 36, 0)):
        with pytest.raises(ValueError, match="not a square grid"):
            resize_relative_position_table(torch.randn(rows, 2), target_rows, extra)
    with pytest.raises(ValueError, match="too small for the original's bicubic resize"):
        resize_relative_position_table(torch.randn(9, 2), 25)


def test_checkpoint_of_another_architecture_is_a_value_error():
    with pytest.raises(ValueError, match="holds a swin encoder, but the model is a vit"):
        load_into(build_classifier(get_config("vit-tiny"), 3), pretrained("swin-tiny").state_dict())
    wider = merge(get_config("vit-tiny"), {"MODEL": {"VIT": {"EMBED_DIM": 48}}})
    with pytest.raises(ValueError, match="does not fit the model"):
        load_into(build_classifier(wider, 3), pretrained("vit-tiny").state_dict())


def test_load_into_keeps_a_fitting_head_unless_told_and_refuses_unknown_keys():
    """A classifier checkpoint's head is loaded when it fits (keep_head, the default), left at the
    model's init when told or when the class count differs; a key the model has no place for is an error."""
    config = merge(get_config("vit-tiny"), VIT_FINETUNE)
    source = discriminating_weights(build_classifier(config, 3)).state_dict()
    for classes, keep_head in ((3, True), (3, False), (5, True)):
        model = build_classifier(config, classes)
        initial_head = model.head.weight.detach().clone()
        report = load_into(model, source) if keep_head else load_into(model, source, keep_head=False)  # default: keep
        loaded = classes == 3 and keep_head
        assert torch.equal(model.head.weight, source["head.weight"] if loaded else initial_head)
        assert sorted(report["missing"]) == ([] if loaded else ["head.bias", "head.weight"])
        assert torch.equal(model.blocks[0].attn.qkv.weight, source["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="does not fit the model"):
        load_into(build_classifier(config, 3), {**source, "blocks.0.attn.extra": torch.zeros(1)})


def test_layer_decay_groups_follow_the_original_layers():
    config = merge(get_config("vit-tiny"), {**VIT_FINETUNE, "TRAIN": {"LAYER_DECAY": 0.5}})
    model = build_classifier(config, 3)
    scales = {}
    for group in layer_decay_groups(model, config):
        for name, param in model.named_parameters():
            if any(param is member for member in group["params"]):
                scales[name] = (group["lr_scale"], group["weight_decay"])
    depth = config.MODEL.VIT.DEPTH
    assert scales["patch_embed.proj.weight"] == (0.5 ** (depth + 1), 0.05)
    assert scales["blocks.0.attn.qkv.weight"] == (0.5 ** depth, 0.05)
    assert scales["blocks.0.attn.proj.bias"] == (0.5 ** depth, 0.0)
    assert scales["head.weight"] == (1.0, 0.05)
    assert scales["cls_token"] == (0.5 ** (depth + 1), 0.0)
    # The original ViT's no_weight_decay() is {pos_embed, cls_token}: its 2-D bias tables are decayed.
    assert scales["blocks.3.attn.relative_position_bias_table"] == (0.5, 0.05)


def lr_scales_and_weight_decays(model, config):
    """name -> (lr_scale, weight_decay) of the parameter's layer-decay group."""
    groups = {id(param): (group["lr_scale"], group["weight_decay"])
              for group in layer_decay_groups(model, config) for param in group["params"]}
    return {name: groups[id(param)] for name, param in model.named_parameters()}


def test_swin_layer_decay_groups_follow_the_original_layers():
    """The original's get_swin_layer: patch embedding 0, block j of stage i sum(depths[:i]) + j + 1, a
    stage's patch merging (downsample) with the stage's last block, sum(depths[:i+1]); the final norm
    and the head sum(depths) + 1, so they train at the full LR and the last block at LAYER_DECAY."""
    config = merge(get_config("swin-tiny"), {"TRAIN": {"LAYER_DECAY": 0.5}})
    depths = list(config.MODEL.SWIN.DEPTHS)
    scales = lr_scales_and_weight_decays(build_classifier(config, 3), config)
    top = sum(depths) + 1

    def scale(layer):
        return 0.5 ** (top - layer)

    assert scales["patch_embed.proj.weight"] == (scale(0), 0.05)
    assert scales["layers.0.blocks.0.attn.qkv.weight"] == (scale(1), 0.05)
    assert scales[f"layers.{len(depths) - 1}.blocks.{depths[-1] - 1}.mlp.fc2.weight"] == (0.5, 0.05)
    assert scales["norm.weight"] == (1.0, 0.0) and scales["head.weight"] == (1.0, 0.05)
    for stage in range(len(depths) - 1):  # the last stage has no patch merging
        end = sum(depths[:stage + 1])
        last_block = f"layers.{stage}.blocks.{depths[stage] - 1}.mlp.fc1.weight"
        assert scales[last_block] == (scale(end), 0.05)
        assert scales[f"layers.{stage}.downsample.reduction.weight"] == (scale(end), 0.05), stage
        assert scales[f"layers.{stage}.downsample.norm.weight"] == (scale(end), 0.0), stage


def test_transformers_export_splits_qkv_into_q_k_v_in_order():
    """q_proj, k_proj, v_proj are rows 0/1/2 thirds of the fused qkv (the original's
    qkv.reshape(B, N, 3, heads, d) order); ViT's separate q and v biases go to q_proj and v_proj."""
    for preset in ("vit-tiny", "swin-tiny"):
        encoder = build_classifier(get_config(preset), 0)  # what export builds from a pretraining checkpoint
        load_into(encoder, pretrained(preset).state_dict())
        state = encoder.state_dict()
        weights = {key: value for key, value in state.items() if not key.endswith(DERIVED_BUFFERS)}  # as export does
        exported, _ = transformers_layout(weights, get_config(preset), num_classes=0)
        qkv_name = next(name for name in state if name.endswith("attn.qkv.weight"))
        block = {"vit-tiny": "layers.0.attention.", "swin-tiny": "encoder.layers.0.blocks.0.attention."}[preset]
        dim = state[qkv_name].shape[1]
        for index, part in enumerate(("q_proj", "k_proj", "v_proj")):
            assert torch.equal(exported[block + part + ".weight"], state[qkv_name][index * dim:(index + 1) * dim])
            if preset == "swin-tiny":
                qkv_bias = state[qkv_name.replace("weight", "bias")]
                assert torch.equal(exported[block + part + ".bias"], qkv_bias[index * dim:(index + 1) * dim])
        if preset == "vit-tiny":
            assert torch.equal(exported[block + "q_proj.bias"], state["blocks.0.attn.q_bias"])
            assert torch.equal(exported[block + "v_proj.bias"], state["blocks.0.attn.v_bias"])


def test_mixup_targets_sum_to_one_and_cutmix_lambda_is_the_kept_area():
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])
    box = cutmix_box(16, 16, 0.75, 8, 8)  # an 8x8 box: a quarter of the image
    mixed, targets = mix_batch(images, labels, 3, 0.1, 0.75, box)
    assert box == (4, 12, 4, 12)
    assert torch.equal(mixed[0, :, 4:12, 4:12], images[3, :, 4:12, 4:12])
    assert torch.equal(mixed[0, :, :4], images[0, :, :4])
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        _, soft = Mixup(3)(images, labels, generator)
        torch.testing.assert_close(soft.sum(1), torch.ones(4))


def test_augmentations_are_reproducible_from_the_generator():
    image = render_scene(5)
    augment = RandAugment.from_spec("rand-m9-mstd0.5-inc1")
    first = augment(image, torch.Generator().manual_seed(3))
    assert first.tobytes() == augment(image, torch.Generator().manual_seed(3)).tobytes()
    pixels = torch.zeros(3, 32, 32)
    erased = random_erasing(pixels, torch.Generator().manual_seed(1), probability=1.0)
    changed = (erased != 0).any(0)
    rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
    area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert 0.02 * 32 * 32 - 40 <= area <= 32 * 32 / 3 + 40  # one rectangle of the allowed area
    black = apply_op(image, "PosterizeIncreasing", 10.0)  # 0 bits kept: Pillow's own posterize refuses it
    assert black.getextrema() == ((0, 0), (0, 0), (0, 0))
    with pytest.raises(ValueError, match="RandAugment"):
        RandAugment.from_spec("v0")


def test_labelled_folder_errors(tmp_path):
    (tmp_path / "one" / "cats").mkdir(parents=True)
    render_scene(0).save(tmp_path / "one" / "cats" / "a.png")
    with pytest.raises(ValueError, match="1 class folder"):
        LabelledFolder(tmp_path / "one")
    root = write_scene_folder(tmp_path / "scenes", train_count=8, val_count=4)
    for child in (root / "val" / "texture").iterdir():
        child.unlink()
    (root / "val" / "texture").rmdir()
    with pytest.raises(ValueError, match="missing texture"):
        open_splits(str(root))


def test_knn_votes_for_the_nearest_class():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    scores = knn_classify(train, labels, torch.tensor([[1.0, 0.05], [0.0, 2.0]]), 2, k=3)
    assert scores.argmax(1).tolist() == [0, 1]


@pytest.mark.slow
def test_finetune_cli_resumes_and_probes_cache(tmp_path, capsys):
    data = write_scene_folder(tmp_path / "data", train_count=24, val_count=12)
    model = pretrained("vit-tiny")
    checkpoint = tmp_path / "pretrain.pth"
    save_atomic({"model": model.state_dict(), "config": get_config("vit-tiny").to_dict()}, checkpoint)
    common = ["finetune", "--pretrained", str(checkpoint), "--data", str(data), "--batch-size", "8",
              "--num-workers", "0", "--set", "TRAIN.EPOCHS=2", "--steps", "3"]  # evaluated and saved at steps 2, 3
    assert main(common + ["--output", str(tmp_path / "ft")]) == 0
    straight = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert straight["steps"] == 3 and [row["step"] for row in straight["evaluations"]] == [2, 3]
    # An interrupted run: only the step-2 checkpoint; it resumes there and ends with the same weights.
    (tmp_path / "cut").mkdir()
    shutil.copy(tmp_path / "ft" / "ckpt_step_0000002.pth", tmp_path / "cut")
    assert main(common + ["--output", str(tmp_path / "cut")]) == 0
    ft_checkpoint = tmp_path / "ft" / "ckpt_step_0000003.pth"
    resumed = torch.load(tmp_path / "cut" / "ckpt_step_0000003.pth", weights_only=True)["model"]
    for key, value in torch.load(ft_checkpoint, weights_only=True)["model"].items():
        assert torch.equal(resumed[key], value), key
    args = ["eval", "--checkpoint", str(ft_checkpoint), "--data", str(data), "--linear", "--knn"]
    assert main(args) == 0 and main(args) == 0
    outputs = capsys.readouterr().out
    assert '"features_cached": false' in outputs and '"features_cached": true' in outputs
    assert '"train_top1"' in outputs and '"weight_decay"' in outputs
    baseline = ["eval", "--preset", "vit-tiny", "--seed", "1", "--knn", "--data", str(data),
                "--cache-dir", str(tmp_path / "features")]
    assert main(baseline) == 0 and '"random init, seed 1"' in capsys.readouterr().out
    assert main(["finetune", "--pretrained", str(checkpoint), "--preset", "swin-tiny", "--data", str(data),
                 "--output", str(tmp_path / "bad")]) == 2
    assert "holds a vit encoder, but the model is a swin" in capsys.readouterr().err


def test_export_configs_carry_the_evaluation_view_and_layer_scale():
    """timm's pretrained_cfg crops as our evaluation does (resize to 256/224 of the size, centre crop:
    crop_pct 0.875); transformers' layer_scale_init_value is the model's INIT_VALUES, and 0.0 (no
    layer scale) where the model has none, so that BEiT builds no lambda parameters."""
    from simmim_fast.downstream.export import timm_layout

    config = get_config("vit-tiny")
    weights = build_classifier(config, 0).state_dict()
    _, timm_config = timm_layout(weights, config, num_classes=0)
    assert timm_config["pretrained_cfg"]["crop_pct"] == pytest.approx(224 / 256)
    assert transformers_layout(weights, config, num_classes=0)[1]["layer_scale_init_value"] == 0.1
    no_layer_scale = merge(config, {"MODEL": {"VIT": {"INIT_VALUES": None}}})
    plain_weights = build_classifier(no_layer_scale, 0).state_dict()
    assert transformers_layout(plain_weights, no_layer_scale, num_classes=0)[1]["layer_scale_init_value"] == 0.0


@pytest.mark.parametrize("preset", ["vit-tiny", "swin-tiny", "swinv2-tiny", "convnext-tiny"])
def test_export_layer_norm_eps_is_the_models(preset):
    """transformers builds its LayerNorms with the config's layer_norm_eps: it must be the eps of every
    normalisation layer of the exported model (a small eps difference hides below any output tolerance)."""
    config = get_config(preset)
    model = build_classifier(config, 0)
    eps = {module.eps for module in model.modules() if "Norm" in type(module).__name__ and hasattr(module, "eps")}
    weights = {key: value for key, value in model.state_dict().items() if not key.endswith(DERIVED_BUFFERS)}
    assert eps == {transformers_layout(weights, config, num_classes=0)[1]["layer_norm_eps"]}, eps


@pytest.mark.parametrize("fmt", ["timm", "transformers", "original"])
@pytest.mark.parametrize("change", [{"APE": True}, {"PATCH_NORM": False}], ids=["ape", "no-patch-norm"])
def test_swin_export_refuses_what_the_library_cannot_build(fmt, change):
    """timm's, transformers' and OpenMMLab's Swin have no absolute position embedding and always a patch
    norm: each layout refuses a Swin with either one (alone, not only both) by name, and takes the default."""
    from simmim_fast.downstream.export import layout

    def exported(config):
        model = build_classifier(config, 0)
        weights = {key: value for key, value in model.state_dict().items() if not key.endswith(DERIVED_BUFFERS)}
        return layout(weights, model, config, fmt)

    config = get_config("swin-tiny")
    exported(config)
    with pytest.raises(ValueError, match="MODEL.SWIN.APE / PATCH_NORM"):
        exported(merge(config, {"MODEL": {"SWIN": change}}))


def test_transformers_export_labels_and_classifier_of_any_class_count():
    """id2label/label2id name the classes in the head's order when there is one name per class (else the
    indices), and a head of any size, one class included, exports as the ForImageClassification model
    with its base model's prefix."""
    config = get_config("vit-tiny")
    for classes, names in ((["cat", "dog", "eel"], ["cat", "dog", "eel"]), (["cat", "dog"], ["0", "1", "2"]),
                           (None, ["0", "1", "2"])):
        model = build_classifier(config, 3)
        weights = {key: value for key, value in model.state_dict().items() if not key.endswith(DERIVED_BUFFERS)}
        _, hf_config = transformers_layout(weights, config, num_classes=3, classes=classes)
        assert hf_config["id2label"] == {str(index): name for index, name in enumerate(names)}
        assert hf_config["label2id"] == {name: index for index, name in enumerate(names)}
    model = build_classifier(config, 1)
    weights = {key: value for key, value in model.state_dict().items() if not key.endswith(DERIVED_BUFFERS)}
    exported, hf_config = transformers_layout(weights, config, num_classes=1)
    assert hf_config["architectures"] == ["BeitForImageClassification"]
    assert "classifier.weight" in exported and all(key.startswith(("beit.", "classifier.")) for key in exported)


def test_export_preprocessor_config_is_the_evaluation_view():
    """AutoImageProcessor's settings, literally: pixels / 255 (a 1/254 hides inside the downstream lane's
    one-uint8-level tolerance), the shorter side to int(256/224 x size) with PIL's bicubic (3), the centre
    size x size crop, ImageNet's mean and std, RGB."""
    from simmim_fast.downstream.export import preprocessor_config

    processor = preprocessor_config(merge(get_config("swin-tiny"), {"DATA": {"IMG_SIZE": 192}}))
    assert processor["rescale_factor"] == 1 / 255 and processor["do_rescale"] and processor["do_normalize"]
    assert processor["size"] == {"shortest_edge": 219} and processor["resample"] == 3 and processor["do_resize"]
    assert processor["crop_size"] == {"height": 192, "width": 192} and processor["do_center_crop"]
    assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["image_std"] == [0.229, 0.224, 0.225]
    assert processor["do_convert_rgb"] and processor["image_processor_type"] == "BitImageProcessor"
