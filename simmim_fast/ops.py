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
    signature = inspect.signature(plain)
    check = _checks.CHECKS[op]

    @functools.wraps(plain)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        check(**bound.arguments)
        return dispatch.call(op, bound.arguments)

    return run


mask_token_blend = _dispatched("mask_token_blend")
masked_patch_embed = _dispatched("masked_patch_embed")
attention = _dispatched("attention")
window_attention = _dispatched("window_attention")
masked_l1_loss = _dispatched("masked_l1_loss")
masked_decoder_loss = _dispatched("masked_decoder_loss")
