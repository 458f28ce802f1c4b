"""Encoder builders by ``MODEL.TYPE``: each encoder module registers the function that turns its
config section into constructor keyword arguments, so ``build_simmim`` never grows an if/elif."""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

import torch.nn as nn

EncoderBuilder = Callable[[Any], nn.Module]
_BUILDERS: Dict[str, EncoderBuilder] = {}


def register_encoder(model_type: str) -> Callable[[EncoderBuilder], EncoderBuilder]:
    """``@register_encoder("swinv2")`` on ``build(config) -> encoder``; a second builder for a type is an error."""
    def register(builder: EncoderBuilder) -> EncoderBuilder:
        if model_type in _BUILDERS:
            raise ValueError(f"MODEL.TYPE {model_type!r} already has an encoder builder")
        _BUILDERS[model_type] = builder
        return builder

    return register


def encoder_types():
    return tuple(_BUILDERS)


def build_encoder(config) -> nn.Module:
    model_type = read_key(config, "MODEL.TYPE")
    if model_type not in _BUILDERS:
        raise ValueError(f"MODEL.TYPE must be one of {', '.join(map(repr, _BUILDERS))}, got {model_type!r}")
    return _BUILDERS[model_type](config)


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
    return dict(img_size=read_key(config, "DATA.IMG_SIZE"), num_classes=0,
                drop_rate=read_key(config, "MODEL.DROP_RATE"), drop_path_rate=read_key(config, "MODEL.DROP_PATH_RATE"))
