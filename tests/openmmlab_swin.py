"""OpenMMLab's Swin backbone (mmdet 3 ``mmdet/models/backbones/swin.py``, the same in mmseg 1) and its
loading of an original-layout checkpoint, re-expressed from reading their source: mmcv full cannot be
installed here (mmdet 3 asserts mmcv < 2.2 and imports mmcv.ops; no prebuilt mmcv exists for our torch),
so tests check our ``--format original`` export against this instead. What matters and is kept:

- parameter names: ``patch_embed.projection``, ``stages.i.blocks.j.attn.w_msa.{qkv,proj,
  relative_position_bias_table}``, ``ffn.layers.0.0`` / ``ffn.layers.1``, ``stages.i.downsample``,
  output norms ``norm{i}``;
- every odd block shifts by window // 2 and the map is padded to whole windows (never one smaller
  window for a small stage, unlike the classifier);
- patch merging samples 2x2 neighbourhoods with ``nn.Unfold`` (channel c of offset (dy, dx) at
  4c + 2dy + dx), so the converter permutes the original's merging weights (offsets ordered (0,0), (1,0),
  (0,1), (1,1), channel-major blocks) into that order;
- loading: the converter renames, prefixes every key with ``backbone.``; only ``backbone.`` keys are kept
  and stripped, then ``load_state_dict(strict=False)``.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


# The original merging concatenates offsets (dy, dx) = (0,0), (1,0), (0,1), (1,1); Unfold's order is
# (0,0), (0,1), (1,0), (1,1): original blocks 0, 2, 1, 3.
UNFOLD_FROM_ORIGINAL = [0, 2, 1, 3]


def to_unfold_order(tensor):
    """Merging weights (out, 4C) or norm params (4C,) from offset-major blocks to Unfold's channel-major order."""
    matrix = tensor.reshape(-1, 4, tensor.shape[-1] // 4)[:, UNFOLD_FROM_ORIGINAL]
    return matrix.transpose(1, 2).reshape(tensor.shape)


def convert_original(state):
    """An original-layout Swin state dict as OpenMMLab's converter returns it (``backbone.``-prefixed)."""
    converted = {}
    for key, value in state.items():
        if key.startswith("head"):
            continue
        if key.startswith("layers"):
            if "attn." in key:
                key = key.replace("attn.", "attn.w_msa.")
            elif "mlp.fc1." in key:
                key = key.replace("mlp.fc1.", "ffn.layers.0.0.")
            elif "mlp.fc2." in key:
                key = key.replace("mlp.fc2.", "ffn.layers.1.")
            elif "downsample" in key and ("reduction." in key or "norm." in key):
                value = to_unfold_order(value)
            key = key.replace("layers", "stages", 1)
        elif key.startswith("patch_embed") and "proj" in key:
            key = key.replace("proj", "projection")
        converted["backbone." + key] = value
    return converted


def load_like_init_weights(model, checkpoint):
    """mmdet's ``init_weights`` with init_cfg Pretrained: the checkpoint's state dict, converted from the
    original layout when the backbone's convert_weights is set, then only its 'backbone.' keys, unprefixed;
    returns load_state_dict's (missing, unexpected)."""
    state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    if model.convert_weights:
        state = convert_original(state)
    state = {key[len("backbone."):]: value for key, value in state.items() if key.startswith("backbone.")}
    return model.load_state_dict(state, strict=False)


class WindowMSA(nn.Module):
    def __init__(self, dim, heads, window):
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        # Their index: row offsets in steps of 2W-1 plus column offsets, summed over token pairs, flipped.
        flat = (torch.arange(0, (2 * window - 1) * window, 2 * window - 1)[:, None] + torch.arange(window)).reshape(1, -1)
        self.register_buffer("relative_position_index", (flat + flat.T).flip(1).contiguous())
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask):
        windows, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(windows, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q * (dim // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        logits = logits + bias.view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            logits = (logits.view(-1, mask.shape[0], self.heads, tokens, tokens) + mask[None, :, None]).flatten(0, 1)
        return self.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(windows, tokens, dim))


def partition(x, window):
    batch, height, width, dim = x.shape
    x = x.view(batch, height // window, window, width // window, window, dim).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, dim)


def unpartition(windows, window, height, width):
    batch = windows.shape[0] // (height // window * width // window)
    x = windows.view(batch, height // window, width // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height, width, -1)


class ShiftWindowMSA(nn.Module):
    def __init__(self, dim, heads, window, shift):
        super().__init__()
        self.window, self.shift = window, shift
        self.w_msa = WindowMSA(dim, heads, window)

    def forward(self, x, size):
        height, width = size
        batch, _, dim = x.shape
        window, shift = self.window, self.shift
        x = x.view(batch, height, width, dim)
        x = F.pad(x, (0, 0, 0, (-width) % window, 0, (-height) % window))
        padded_h, padded_w = x.shape[1:3]
        mask = None
        if shift:
            x = torch.roll(x, (-shift, -shift), (1, 2))
            regions = torch.zeros(1, padded_h, padded_w, 1)
            bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
            for index, (rows, cols) in enumerate((rows, cols) for rows in bands for cols in bands):
                regions[:, rows, cols] = index
            labels = partition(regions, window).squeeze(-1)
            mask = (labels[:, None, :] - labels[:, :, None] != 0).float() * -100.0
        x = unpartition(self.w_msa(partition(x, window), mask), window, padded_h, padded_w)
        if shift:
            x = torch.roll(x, (shift, shift), (1, 2))
        return x[:, :height, :width].reshape(batch, height * width, dim)


class FFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU()), nn.Linear(hidden, dim))


class SwinBlock(nn.Module):
    def __init__(self, dim, heads, window, shift, mlp_ratio):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ShiftWindowMSA(dim, heads, window, window // 2 if shift else 0)
        self.ffn = FFN(dim, mlp_ratio * dim)

    def forward(self, x, size):
        x = x + self.attn(self.norm1(x), size)
        return x + self.ffn.layers(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim, stride):
        super().__init__()
        self.sampler = nn.Unfold(kernel_size=2, stride=stride)
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x, size):
        height, width = size
        x = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)
        x = F.pad(x, (0, width % 2, 0, height % 2))
        x = self.sampler(x).transpose(1, 2)
        stride = self.sampler.stride
        return self.reduction(self.norm(x)), ((height + height % 2 - 2) // stride + 1, (width + width % 2 - 2) // stride + 1)


class Stage(nn.Module):
    def __init__(self, dim, depth, heads, window, mlp_ratio, downsample_stride):
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, window, index % 2 == 1, mlp_ratio) for index in range(depth))
        self.downsample = PatchMerging(dim, downsample_stride) if downsample_stride else None


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch, stride, norm):
        super().__init__()
        self.projection = nn.Conv2d(3, dim, patch, stride)
        self.norm = nn.LayerNorm(dim) if norm else None


class OpenMMLabSwin(nn.Module):
    """forward(images) -> [(B, C_i, H_i, W_i)], each stage's output through its norm{i}."""

    def __init__(self, embed_dims, patch_size, depths, num_heads, window_size, mlp_ratio, strides, patch_norm,
                 convert_weights=False, **unused):
        super().__init__()
        self.convert_weights = convert_weights  # mmdet's default: load the checkpoint's names as they are
        self.patch_embed = PatchEmbed(embed_dims, patch_size, strides[0], patch_norm)
        self.stages = nn.ModuleList(  # as mmdet: stage i downsamples with PatchMerging(stride=strides[i + 1])
            Stage(embed_dims * 2 ** i, depth, heads, window_size, mlp_ratio,
                  strides[i + 1] if i < len(depths) - 1 else None)
            for i, (depth, heads) in enumerate(zip(depths, num_heads)))
        for i in range(len(depths)):
            self.add_module(f"norm{i}", nn.LayerNorm(embed_dims * 2 ** i))

    def forward(self, images):
        x = self.patch_embed.projection(images)
        size = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        if self.patch_embed.norm is not None:
            x = self.patch_embed.norm(x)
        outputs = []
        for index, stage in enumerate(self.stages):
            for block in stage.blocks:
                x = block(x, size)
            out = getattr(self, f"norm{index}")(x)
            outputs.append(out.transpose(1, 2).reshape(out.shape[0], -1, *size))
            if stage.downsample is not None:
                x, size = stage.downsample(x, size)
        return outputs


def unexplained_keys(missing, unexpected):
    """What a strict load would report beyond mmdet's own buffers, its new output norms of the first
    three stages (the export gives norm3) and the original's pooled-head norm."""
    return ([key for key in missing if not (key.endswith("relative_position_index") or re.match(r"^norm[012]\.", key))],
            [key for key in unexpected if not re.match(r"^norm\.(weight|bias)$", key)])
