"""Every encoder downstream on the CPU (plain lane): Swin V2 and ConvNeXt fine-tune and probe through the
CLI, ConvNeXt's layer-decay rule, and the layer-decay table an export carries for its new names."""
import json

import pytest
import torch

from simmim_fast import build_simmim, get_config
from simmim_fast.checkpoint import save_atomic
from simmim_fast.cli import main
from simmim_fast.config import merge
from simmim_fast.downstream.data import write_scene_folder
from simmim_fast.downstream.finetune import RECIPES, layer_decay_groups, layer_id
from simmim_fast.downstream.models import build_classifier


@pytest.mark.parametrize("preset", ["swinv2-tiny", "convnext-tiny"])
def test_finetune_and_probe_swinv2_and_convnext(tmp_path, preset, capsys):
    data = write_scene_folder(tmp_path / "data", train_count=8, val_count=4)
    pretrained = tmp_path / "pretrain.pth"
    save_atomic({"model": build_simmim(preset).state_dict(), "config": get_config(preset).to_dict()}, pretrained)
    assert main(["finetune", "--pretrained", str(pretrained), "--data", str(data), "--batch-size", "4",
                 "--num-workers", "0", "--steps", "2", "--output", str(tmp_path / "ft")]) == 0
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["steps"] == 2
    finetuned = sorted((tmp_path / "ft").glob("ckpt_step_*.pth"))[-1]
    assert main(["eval", "--checkpoint", str(finetuned), "--data", str(data), "--knn", "--k", "3"]) == 0
    assert '"feature_dim": 256' in capsys.readouterr().out


def test_convnext_layer_ids_follow_its_authors_rule():
    """facebookresearch/ConvNeXt's get_num_layer_for_convnext (12 groups), for ConvNeXt-B's 3-3-27-3."""
    config = get_config("convnext-b-192")
    expected = {"downsample_layers.0.0.weight": 0, "stages.0.2.dwconv.weight": 1, "downsample_layers.1.1.weight": 2,
                "stages.1.0.gamma": 2, "downsample_layers.2.0.bias": 3, "stages.2.0.pwconv1.weight": 3,
                "stages.2.5.norm.weight": 4, "stages.2.26.pwconv2.bias": 11, "downsample_layers.3.1.weight": 12,
                "stages.3.2.gamma": 12, "norm.weight": 13, "head.weight": 13}
    assert {name: layer_id(name, config) for name in expected} == expected
    model = build_classifier(merge(config, RECIPES["convnext"]), 10)
    scales = {group["group_name"]: group["lr_scale"] for group in layer_decay_groups(model, merge(config, RECIPES["convnext"]))}
    assert scales["layer_0_decay"] == pytest.approx(0.9 ** 13) and scales["layer_13_decay"] == 1.0


def test_swinv2_layer_ids_use_the_swinv2_depths():
    config = get_config("swinv2-base-192-w12")  # depths 2-2-18-2
    assert layer_id("layers.2.blocks.17.attn.cpb_mlp.0.weight", config) == 22
    assert layer_id("layers.2.downsample.reduction.weight", config) == 22
    assert layer_id("head.weight", config) == 25


def module_with(shapes):
    """A module whose named_parameters are ``shapes`` (dotted name -> shape), like a library's model."""
    root = torch.nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
    return root


@pytest.mark.parametrize("fmt", ["timm", "transformers"])
def test_param_groups_give_exported_names_our_layers(tmp_path, fmt):
    """Swin-tiny (depths 2-2-2-2, last layer 9) exported, then wrapped as a detector would: each name
    gets our layer's LR (0.5^(9 - layer)) whatever its new name; new parts get the top layer's."""
    from simmim_fast.downstream.export import export_checkpoint
    from simmim_fast.downstream.transfer import param_groups

    source = tmp_path / "swin.pth"
    save_atomic({"model": build_simmim("swin-tiny").state_dict(), "config": get_config("swin-tiny").to_dict()}, source)
    export = export_checkpoint(str(source), fmt, str(tmp_path / fmt))
    if fmt == "timm":  # a features_only model: timm flattens the stage path with "_"
        expected = {"patch_embed.proj.weight": (0, True), "layers_0.blocks.1.attn.qkv.weight": (2, True),
                    "layers_1.downsample.reduction.weight": (2, True),  # our layers.0.downsample
                    "layers_3.blocks.1.attn.relative_position_bias_table": (8, False),  # Swin: no decay
                    "layers_3.blocks.1.norm2.weight": (8, False), "new_neck.weight": (9, True)}
    else:  # UperNetForSemanticSegmentation around the Swin backbone
        expected = {"backbone.embeddings.patch_embeddings.projection.weight": (0, True),
                    "backbone.encoder.layers.0.blocks.0.attention.k_proj.weight": (1, True),
                    "backbone.encoder.layers.0.blocks.0.attention.k_proj.bias": (1, False),
                    "backbone.encoder.layers.0.downsample.reduction.weight": (2, True),
                    "backbone.encoder.layers.2.blocks.1.mlp.fc2.weight": (6, True),
                    "backbone.hidden_states_norms.stage1.weight": (9, False), "decode_head.classifier.weight": (9, True)}
    model = module_with({name: (4,) if name.endswith(("norm2.weight", "bias", "stage1.weight")) else (4, 4)
                         for name in expected})
    groups = param_groups(model, str(export), lr=1.0, weight_decay=0.05, layer_decay=0.5)
    found = {}
    for name, param in model.named_parameters():
        group = next(group for group in groups if any(param is member for member in group["params"]))
        found[name] = (group["lr"], group["weight_decay"])
    assert found == {name: (0.5 ** (9 - layer), 0.05 if decayed else 0.0) for name, (layer, decayed) in expected.items()}


def test_openmmlab_swin_loads_the_original_export_and_gives_our_stages(tmp_path, capsys):
    """--format original through a re-expression of mmdet 3's Swin backbone and its converter
    (tests/openmmlab_swin.py; mmdet itself cannot be installed here): every key accounted for, every
    stage map ours (norm0-2 new LayerNorms, norm3 our final norm), and the layer-decay table in mmdet's
    names. Window 2: their blocks always shift, the classifier does not at a stage no larger than the window."""
    from discriminating import discriminating_weights
    from openmmlab_swin import OpenMMLabSwin, load_like_init_weights, unexplained_keys

    from simmim_fast.downstream.probe import model_from_checkpoint
    from simmim_fast.downstream.transfer import param_groups, stage_outputs

    config = get_config("swin-tiny", [{"MODEL": {"SWIN": {"WINDOW_SIZE": 2}}}])
    source = tmp_path / "swin.pth"
    save_atomic({"model": discriminating_weights(build_simmim(config)).state_dict(), "config": config.to_dict()}, source)
    export = tmp_path / "mmdet"
    assert main(["export", "--checkpoint", str(source), "--format", "original", "--out", str(export)]) == 0
    kwargs = json.loads((export / "config.json").read_text())["openmmlab_backbone"]
    theirs = OpenMMLabSwin(**kwargs).eval()
    missing, unexpected = load_like_init_weights(theirs, torch.load(export / kwargs["init_cfg"]["checkpoint"],
                                                                    weights_only=True))
    assert unexplained_keys(missing, unexpected) == ([], [])
    images = torch.randn(2, 3, 64, 64)
    ours, _, _ = model_from_checkpoint(str(source))
    with torch.no_grad():
        stages = stage_outputs(ours, images)
        final = ours.norm
        expected = [torch.nn.functional.layer_norm(stage.permute(0, 2, 3, 1), stage.shape[1:2],
                                                   *((final.weight, final.bias) if index == 3 else (None, None)),
                                                   eps=final.eps).permute(0, 3, 1, 2)
                    for index, stage in enumerate(stages)]
        for their_map, our_map in zip(theirs(images), expected):
            torch.testing.assert_close(their_map, our_map, rtol=1e-4, atol=1e-4)
    groups = param_groups(theirs, str(export), lr=1.0, weight_decay=0.05, layer_decay=0.5)
    lr_of = {name: next(group["lr"] for group in groups if any(param is member for member in group["params"]))
             for name, param in theirs.named_parameters()}
    assert lr_of["patch_embed.projection.weight"] == 0.5 ** 9
    assert lr_of["stages.0.blocks.1.attn.w_msa.qkv.weight"] == 0.5 ** 7
    assert lr_of["stages.0.downsample.reduction.weight"] == 0.5 ** 7  # layer 2, as the original's
    assert lr_of["stages.3.blocks.1.ffn.layers.1.weight"] == 0.5 and lr_of["norm0.weight"] == 1.0  # new: top


@pytest.mark.parametrize("preset, extra, named", [
    ("swin-tiny", ["--format", "timm", "--vit-bias", "per-block"], "--vit-bias"),
    ("vit-tiny", ["--format", "original"], "--format original")])
def test_export_options_that_do_not_fit_the_model_are_one_line_exit_2(tmp_path, capsys, preset, extra, named):
    """--vit-bias per-block needs a shared-bias ViT, --format original a Swin: refused before anything is written."""
    source = tmp_path / "model.pth"
    save_atomic({"model": build_simmim(preset).state_dict(), "config": get_config(preset).to_dict()}, source)
    assert main(["export", "--checkpoint", str(source), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.pth"]
