"""Small building blocks shared by the ViT and Swin encoders (same behaviour as the timm versions the
original SimMIM code imports, written here so the package needs no timm)."""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def to_2tuple(value: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0):
    """Normal(mean, std) truncated to [a, b] (absolute bounds, as timm), by inverse-CDF sampling."""
    def normal_cdf(x):
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    low, high = normal_cdf((a - mean) / std), normal_cdf((b - mean) / std)
    tensor.uniform_(2 * low - 1, 2 * high - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0)).add_(mean)
    tensor.clamp_(min=a, max=b)
    return tensor


class DropPath(nn.Module):
    """Stochastic depth per sample (residual branch dropped with probability drop_prob)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


def init_weights(module: nn.Module, weight_init, weight_types=(nn.Linear,)) -> None:
    """The encoders' ``apply`` init: ``weight_init(std=0.02)`` weights and zero biases for
    ``weight_types``, LayerNorm to identity. ViT and Swin differ only in the two arguments."""
    if isinstance(module, weight_types):
        weight_init(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)
    elif isinstance(module, nn.LayerNorm):
        nn.init.constant_(module.bias, 0)
        nn.init.constant_(module.weight, 1.0)


def drop_path_or_identity(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0.0 else nn.Identity()


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def relative_position_index(window: Tuple[int, int]) -> torch.Tensor:
    """(Wh*Ww, Wh*Ww) index into a ((2Wh-1)*(2Ww-1), heads) bias table, as Swin and BEiT build it."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += wh - 1
    relative[:, :, 1] += ww - 1
    relative[:, :, 0] *= 2 * ww - 1
    return relative.sum(-1)


def gather_relative_position_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table (entries, heads) gathered by index (N, N) -> (heads, N, N); autograd scatters back."""
    tokens = index.shape[0]
    return table[index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1).contiguous()


class _SplitQKV(torch.autograd.Function):
    """(q, k, v), each (B, H, N, d), as views of a (B, N, 3 * H * d) qkv projection.

    Autograd's own split (reshape, permute, unbind) stacks the three gradients into a new tensor and
    then copies it back into the projection's layout. The Triton attention ops write dq, dk, dv as
    views of one (B, N, 3, H, d) buffer (kernels/_attention_operands.packed_qkv_gradient); when the
    gradients are exactly those views, this backward returns the buffer itself: no copy. Other
    gradients (the reference's, a missing one) take one stacking copy.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int):
        batch, tokens, channels = qkv.shape
        ctx.packed_shape = (batch, tokens, 3, heads, channels // (3 * heads))
        return qkv.view(ctx.packed_shape).permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def backward(ctx, *grads):
        batch, tokens = ctx.packed_shape[:2]
        base = grads[0]._base if grads[0] is not None else None
        if base is not None and _views_of_packed(base, ctx.packed_shape, grads):
            return base.view(batch, tokens, -1), None
        present = next(grad for grad in grads if grad is not None)
        grads = [grad if grad is not None else torch.zeros_like(present) for grad in grads]
        return torch.stack(grads).permute(1, 3, 0, 2, 4).reshape(batch, tokens, -1), None


def _views_of_packed(base: torch.Tensor, packed_shape, grads) -> bool:
    """Whether grads are base[:, :, i].transpose(1, 2) for i = 0, 1, 2, base a contiguous packed_shape."""
    if tuple(base.shape) != packed_shape or not base.is_contiguous():
        return False
    heads, head_dim = packed_shape[3:]
    strides = (base.stride(0), head_dim, base.stride(1), 1)
    return all(grad is not None and grad._base is base and grad.stride() == strides
               and grad.storage_offset() == index * heads * head_dim for index, grad in enumerate(grads))


def split_qkv(qkv: torch.Tensor, heads: int):
    """q, k, v (B, H, N, d) as views of a (B, N, 3 * H * d) projection (see _SplitQKV). Under
    torch.compile the plain view ops: the compiler plans those copies itself."""
    if torch.compiler.is_compiling():
        batch, tokens, channels = qkv.shape
        return qkv.view(batch, tokens, 3, heads, channels // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return _SplitQKV.apply(qkv, heads)


def activation_checkpoint(function, *args, **kwargs):
    """``function(*args, **kwargs)`` with activation checkpointing (recomputed in the backward pass). On XLA
    tensors torch_xla's implementation: torch's saves the RNG state through ``torch.xla``, which does not exist."""
    if args[0].device.type != "xla":
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
    import torch_xla.utils.checkpoint

    # torch_xla's is the reentrant kind, which takes positional inputs only: a keyword tensor (ViT's shared
    # relative position bias) must be one of them for its gradient to flow.
    names = list(kwargs)

    def positional(*inputs):
        return function(*inputs[:len(args)], **dict(zip(names, inputs[len(args):])))

    return torch_xla.utils.checkpoint.checkpoint(positional, *args, *kwargs.values(), use_reentrant=True)


def drop_path_rates(drop_path_rate: float, blocks: int):
    """Stochastic depth rising linearly from 0 to ``drop_path_rate`` over the blocks (as every original).
    Computed on the CPU, so models can be built under ``torch.device("meta")`` (parameter counts)."""
    return torch.linspace(0, drop_path_rate, blocks, device="cpu").tolist()


def qv_bias_linear(x: torch.Tensor, weight: torch.Tensor, q_bias, v_bias) -> torch.Tensor:
    """The qkv projection of BEiT and Swin V2: q and v have biases, k has none (None, None: no bias)."""
    bias = None
    if q_bias is not None:
        bias = torch.cat((q_bias, torch.zeros_like(v_bias, requires_grad=False), v_bias))
    return F.linear(x, weight, bias)
