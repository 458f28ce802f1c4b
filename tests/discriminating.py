"""Weights that tell layouts apart, for the comparisons with other libraries' models."""
import torch


def discriminating_weights(model, seed=0):
    """LayerNorm gains and layer scales near 1 (not near 0, which would hide a swapped norm), matrices
    wide enough that attention is far from uniform (a q/k swap moves the features by more than 10x the
    tolerance), Swin V2's logit scale near its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1 and (name.endswith(".weight") or name.endswith("gamma")):
                param.copy_(1 + 0.1 * noise)  # norm gains, layer scales
            elif name.endswith("logit_scale"):
                param.copy_(torch.log(torch.full_like(param, 10.0)) + 0.1 * noise)
            else:
                param.copy_(0.2 * noise)
    return model
