from .simmim import SimMIM
from .swin import SwinTransformerForSimMIM
from .vit import VisionTransformerForSimMIM

__all__ = ["SimMIM", "SwinTransformerForSimMIM", "VisionTransformerForSimMIM"]
