"""Inputs that discriminate: a comparison test's tolerance is only a check if a plausible wrong version
misses it by far. ``assert_discriminates`` plants that wrong version's output beside the right one and
asserts the gap (tests/README.md, "Inputs that discriminate")."""
from __future__ import annotations

from typing import Dict, Mapping

import torch

# How far past the tolerance a planted wrong version must land: rounding noise never bridges 10x.
MARGIN = 10.0


def tolerance_ratio(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> float:
    """max over elements of |actual - expected| / (atol + rtol |expected|): assert_close's test is <= 1."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    allowed = atol + rtol * expected.abs()
    return ((actual - expected).abs() / allowed).max().item()


def assert_discriminates(wrong: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float,
                         name: str = "the planted wrong version", margin: float = MARGIN) -> float:
    """``wrong`` (what a plausible bug computes) misses ``expected`` by >= ``margin`` x the tolerance
    (rtol, atol as in torch.testing.assert_close); returns the ratio for the test's own message."""
    assert wrong.shape == expected.shape, f"{name}: shape {tuple(wrong.shape)} vs {tuple(expected.shape)}"
    ratio = tolerance_ratio(wrong, expected, rtol, atol)
    assert ratio >= margin, (f"{name} is only {ratio:.3g}x the tolerance (rtol={rtol:g}, atol={atol:g}) away from the "
                             f"right result; the test's inputs do not discriminate (need >= {margin:g}x)")
    return ratio


def discriminating_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter so that plausible wrong versions show (tests/README.md): LayerNorm and
    layer-scale gains in [0.5, 1.5] (not near 0, where a block is nearly the identity, nor all 1),
    biases N(0, 0.2), matrices N(0, 1.5^2 / fan_in) so attention logits have a spread of ~2 and
    attention is far from uniform (a q/k swap, a missing scale, a transposed window then change the
    result), relative position bias tables N(0, 1), tokens and position embeddings N(0, 0.5), Swin V2's logit scale
    near its init."""
    generator = torch.Generator().manual_seed(seed)

    def draw(param: torch.Tensor, kind: str) -> None:
        if kind == "gain":
            values = torch.rand(param.shape, generator=generator) + 0.5
        elif kind == "matrix":
            fan_in = param[0].numel()
            values = torch.randn(param.shape, generator=generator) * (1.5 / fan_in ** 0.5)
        else:
            std = {"bias": 0.2, "table": 1.0, "embedding": 0.5}[kind]
            values = torch.randn(param.shape, generator=generator) * std
        param.copy_(values.to(param.dtype))

    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "logit_scale":  # Swin V2's cosine-attention temperature: near its init, log(10)
                param.copy_(torch.log(torch.full_like(param, 10.0)) + 0.1 * torch.randn(param.shape, generator=generator))
                continue
            if "relative_position_bias_table" in name:
                kind = "table"
            elif leaf in ("bias", "q_bias", "v_bias"):
                kind = "bias"
            elif param.dim() == 1:  # norm weights, gamma_1/gamma_2 layer scale
                kind = "gain"
            elif leaf == "weight":  # linear and convolution weights: (out, in, ...)
                kind = "matrix"
            else:  # cls/mask tokens, position embeddings
                kind = "embedding"
            draw(param, kind)
    return model


def swapped_q_and_k(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with the query and key projections exchanged, in our/timm's fused layout (rows 0/1 thirds
    of ``attn.qkv.weight``) and in transformers' (``q_proj``/``k_proj`` of BEiT and Swin, ``query``/``key``
    of Swin V2): the planted wrong version of a model or an export. Raises if ``state`` has neither (the bug would not be planted)."""
    wrong = dict(state)
    for key, value in state.items():
        if key.endswith("attn.qkv.weight"):
            query, key_projection, value_projection = value.chunk(3)
            wrong[key] = torch.cat([key_projection, query, value_projection])
        elif key.endswith((".q_proj.weight", ".query.weight")):  # transformers' BEiT and Swin / Swin V2
            stem, query = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
            partner = f"{stem}.{'k_proj' if query == 'q_proj' else 'key'}.weight"
            wrong[key], wrong[partner] = state[partner], value
    assert any(wrong[key] is not state[key] for key in state), "no q/k projection found to swap"
    return wrong
