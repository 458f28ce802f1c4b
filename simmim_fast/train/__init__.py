"""SimMIM pretraining: ``simmim-fast pretrain`` / ``python -m simmim_fast.train`` (see ``simmim_fast.cli``),
or ``pretrain(PretrainOptions(preset="vit-tiny", output="runs/demo"))`` from Python."""
from .engine import NonFiniteLossError
from .loop import PretrainOptions, pretrain
from .reconstruct import reconstruct_images

__all__ = ["pretrain", "PretrainOptions", "NonFiniteLossError", "reconstruct_images"]
