"""What users pick instead of simmim_fast: Hugging Face transformers' masked-image-modeling models, built
at the nearest configuration to one of our presets, as a module ``model(images, mask) -> loss`` that the
end-to-end benchmark trains like ours.

- Swin: ``SwinForMaskedImageModeling`` is SimMIM's Swin (the same 1x1 conv + PixelShuffle decoder and
  masked L1 loss); same depths, heads, window, patch and encoder stride. transformers' Swin has no SDPA
  path: it runs its eager attention.
- ViT: ``ViTForMaskedImageModeling`` (SDPA) has SimMIM's decoder and loss but ViT's absolute position
  embeddings, without SimMIM ViT's shared relative position bias and layer scale;
  ``BeitForMaskedImageModeling`` (SDPA) has the shared relative position bias and layer scale but BEiT's
  head (a linear over 8192 visual tokens, cross-entropy at the masked patches) instead of the pixel decoder.
Their weights are random (drawn by transformers): only speed and memory are compared.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from simmim_fast import get_config

BEIT_VOCABULARY = 8192
# provider -> the transformers model it runs, by our encoder type (None: that provider has none for it)
MODELS: Dict[str, Dict[str, str]] = {
    "transformers": {"vit": "ViTForMaskedImageModeling", "swin": "SwinForMaskedImageModeling"},
    "transformers-beit": {"vit": "BeitForMaskedImageModeling"},
}


def model_class_name(provider: str, preset: str) -> Optional[str]:
    return MODELS[provider].get(get_config(preset).MODEL.TYPE)


def _configuration(class_name: str, preset: str):
    import transformers

    config = get_config(preset)
    size, drop_path = config.DATA.IMG_SIZE, config.MODEL.DROP_PATH_RATE
    if class_name == "SwinForMaskedImageModeling":
        swin = config.MODEL.SWIN
        return transformers.SwinConfig(
            image_size=size, patch_size=swin.PATCH_SIZE, num_channels=swin.IN_CHANS, embed_dim=swin.EMBED_DIM,
            depths=list(swin.DEPTHS), num_heads=list(swin.NUM_HEADS), window_size=swin.WINDOW_SIZE,
            mlp_ratio=swin.MLP_RATIO, qkv_bias=swin.QKV_BIAS, drop_path_rate=drop_path, use_absolute_embeddings=swin.APE,
            encoder_stride=swin.PATCH_SIZE * 2 ** (len(swin.DEPTHS) - 1))  # what each stage's merge leaves
    vit = config.MODEL.VIT
    common = dict(image_size=size, patch_size=vit.PATCH_SIZE, num_channels=vit.IN_CHANS, hidden_size=vit.EMBED_DIM,
                  num_hidden_layers=vit.DEPTH, num_attention_heads=vit.NUM_HEADS,
                  intermediate_size=int(vit.EMBED_DIM * vit.MLP_RATIO), qkv_bias=vit.QKV_BIAS, layer_norm_eps=1e-6,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if class_name == "ViTForMaskedImageModeling":
        return transformers.ViTConfig(encoder_stride=vit.PATCH_SIZE, **common)
    return transformers.BeitConfig(
        vocab_size=BEIT_VOCABULARY, use_mask_token=True, use_absolute_position_embeddings=vit.USE_APE,
        use_relative_position_bias=vit.USE_RPB, use_shared_relative_position_bias=vit.USE_SHARED_RPB,
        layer_scale_init_value=vit.INIT_VALUES, drop_path_rate=drop_path, use_mean_pooling=vit.USE_MEAN_POOLING,
        **common)


class TransformersSimMIM(nn.Module):
    """A transformers masked-image-modeling model called as ours: ``model(images, mask) -> loss``, the mask
    (B, h, w) at the model's patch resolution (its ``bool_masked_pos``, flattened)."""

    def __init__(self, class_name: str, preset: str):
        super().__init__()
        import transformers

        configuration = _configuration(class_name, preset)
        attention = "eager" if class_name == "SwinForMaskedImageModeling" else "sdpa"
        configuration._attn_implementation = attention  # before construction: BEiT picks its layers by it
        self.model = getattr(transformers, class_name)(configuration)
        self.class_name = class_name
        self.attention = attention

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        masked = mask.flatten(1).bool()
        if self.class_name == "BeitForMaskedImageModeling":
            # Visual-token labels: any fixed ids (the cost does not depend on them), drawn once per shape.
            generator = torch.Generator(images.device).manual_seed(0)
            labels = torch.randint(0, BEIT_VOCABULARY, masked.shape, generator=generator, device=images.device)
            return self.model(pixel_values=images, bool_masked_pos=masked, labels=labels[masked]).loss
        return self.model(pixel_values=images, bool_masked_pos=masked).loss
