"""simmim_fast: SimMIM pretraining, the original model and loss, on fused kernels.

Importing this package never imports triton, xformers, apex or torch_xla: backends load them lazily.
"""
from . import dispatch, ops, reference
from .checkpoint import load_pretrained
from .config import PRESETS, build_simmim, get_config
from .dispatch import use_backend
from .masking import MaskGenerator
from .models import (ConvNeXtForSimMIM, SimMIM, SwinTransformerForSimMIM, SwinTransformerV2ForSimMIM,
                     VisionTransformerForSimMIM)
from .tuning import tune

__version__ = "0.1.0"
__all__ = [
    "SimMIM", "VisionTransformerForSimMIM", "SwinTransformerForSimMIM", "SwinTransformerV2ForSimMIM",
    "ConvNeXtForSimMIM", "MaskGenerator", "build_simmim",
    "get_config", "PRESETS", "load_pretrained", "use_backend", "tune", "ops", "reference", "dispatch",
]
