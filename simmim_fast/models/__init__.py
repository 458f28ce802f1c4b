# Importing each encoder module registers its builder (models.registry) under its MODEL.TYPE.
from .convnext import ConvNeXtForSimMIM
from .simmim import SimMIM
from .swin import SwinTransformerForSimMIM
from .swinv2 import SwinTransformerV2ForSimMIM
from .vit import VisionTransformerForSimMIM

__all__ = ["SimMIM", "SwinTransformerForSimMIM", "SwinTransformerV2ForSimMIM", "VisionTransformerForSimMIM",
           "ConvNeXtForSimMIM"]
