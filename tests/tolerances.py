"""The tests' tolerance table is the library's (``simmim_fast.tolerances``, which ``tune()`` also uses)."""
from simmim_fast.tolerances import (CPU_FP16, CPU_FP32, FACTOR, FLOOR, Comparison, assert_close_cpu,  # noqa: F401
                                    assert_within_torch_error, compare_to_torch_error, magnitude, max_error,
                                    relative_error)
