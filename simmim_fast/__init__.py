"""simmim_fast: SimMIM pretraining, the original model and loss, on fused kernels."""
from . import dispatch, ops, reference
from .dispatch import use_backend

__version__ = "0.1.0"
