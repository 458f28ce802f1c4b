"""What torch.compile needs from code it traces, without importing Dynamo (which imports triton) when
``simmim_fast`` is imported."""
from __future__ import annotations

from typing import Callable, TypeVar

Function = TypeVar("Function", bound=Callable)

# The attribute ``torch.compiler.assume_constant_result`` sets; tests/test_tuning.py checks they agree.
DYNAMO_CONSTANT_MARK = "_dynamo_marked_constant"


def constant_while_tracing(function: Function) -> Function:
    """``torch.compiler.assume_constant_result``: Dynamo calls ``function`` eagerly and bakes in its
    result instead of tracing it (for lookups that import modules or read files)."""
    setattr(function, DYNAMO_CONSTANT_MARK, True)
    return function
