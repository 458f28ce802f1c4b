"""Encoders by ``MODEL.TYPE``: each encoder module registers its SimMIM encoder class and the function
that turns its config section into constructor keyword arguments, so ``build_simmim`` never grows an
if/elif, and fine-tuning builds its classifiers (subclasses) from the same keys."""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch.nn as nn

EncoderKwargs = Callable[[Any], Dict[str, Any]]
_ENCODERS: Dict[str, Tuple[type, EncoderKwargs]] = {}


def register_encoder(model_type: str, encoder_class: type) -> Callable[[EncoderKwargs], EncoderKwargs]:
    """``@register_encoder("swinv2", SwinTransformerV2ForSimMIM)`` on ``kwargs(config) -> constructor
    keyword arguments``; a second registration of a type is an error."""
    def register(kwargs_of: EncoderKwargs) -> EncoderKwargs:
        if model_type in _ENCODERS:
            raise ValueError(f"MODEL.TYPE {model_type!r} already has an encoder")
        _ENCODERS[model_type] = (encoder_class, kwargs_of)
        return kwargs_of

    return register


def encoder_types() -> Tuple[str, ...]:
    return tuple(_ENCODERS)


def build_encoder(config, classes: Optional[Mapping[str, type]] = None, num_classes: int = 0) -> nn.Module:
    """The SimMIM encoder of MODEL.TYPE; ``classes`` (by type: fine-tuning's classifiers) and
    ``num_classes`` build other models from the same keys."""
    model_type = read_key(config, "MODEL.TYPE")
    if model_type not in _ENCODERS:
        raise ValueError(f"MODEL.TYPE must be one of {', '.join(map(repr, _ENCODERS))}, got {model_type!r}")
    encoder_class, kwargs_of = _ENCODERS[model_type]
    if classes is not None:
        if model_type not in classes:
            raise ValueError(f"MODEL.TYPE {model_type!r} has no classifier; there are classifiers for "
                             f"{', '.join(map(repr, classes))}")
        encoder_class = classes[model_type]
    return encoder_class(**kwargs_of(config), num_classes=num_classes)


def read_key(config, dotted_key: str):
    """``config``'s value at ``"MODEL.SWIN.EMBED_DIM"``: nested mappings or attribute objects (yacs)."""
    node = config
    for part in dotted_key.split("."):
        node = node[part] if isinstance(node, Mapping) else getattr(node, part)
    return node


def section(config, prefix: str) -> Callable[[str], Any]:
    """``swin = section(config, "MODEL.SWIN"); swin("EMBED_DIM")``."""
    return lambda key: read_key(config, f"{prefix}.{key}")


def common_kwargs(config) -> Dict[str, Any]:
    """The constructor arguments every encoder reads from outside its own section."""
    return dict(img_size=read_key(config, "DATA.IMG_SIZE"),
                drop_rate=read_key(config, "MODEL.DROP_RATE"), drop_path_rate=read_key(config, "MODEL.DROP_PATH_RATE"))
