"""Public ops: validate the inputs once, then run them on the backend the dispatch picks.

Each op has exactly the signature and meaning of its plain version in ``simmim_fast.reference``
(documented there).
"""
from __future__ import annotations

import functools
import inspect

from . import _checks, dispatch, reference


def _dispatched(op: str):
    plain = reference.OPS[op]
    # Plain tuples and dicts, not inspect.Signature.bind: torch.compile traces these without graph breaks.
    parameters = inspect.signature(plain).parameters
    names = tuple(parameters)
    defaults = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    check = _checks.CHECKS[op]

    @functools.wraps(plain)
    def run(*args, **kwargs):
        if len(args) > len(names):
            raise TypeError(f"{op}() takes {len(names)} arguments, got {len(args)}")
        unknown = [name for name in kwargs if name not in names]
        if unknown:
            raise TypeError(f"{op}() got unexpected arguments {unknown}")
        arguments = dict(defaults)
        arguments.update(zip(names, args))
        arguments.update(kwargs)
        missing = [name for name in names if name not in arguments]
        if missing:
            raise TypeError(f"{op}() missing arguments {missing}")
        check(**arguments)
        return dispatch.call(op, arguments)

    return run


mask_token_blend = _dispatched("mask_token_blend")
masked_patch_embed = _dispatched("masked_patch_embed")
attention = _dispatched("attention")
window_attention = _dispatched("window_attention")
masked_l1_loss = _dispatched("masked_l1_loss")
masked_decoder_loss = _dispatched("masked_decoder_loss")
