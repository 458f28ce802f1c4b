"""The launchers' grid and block arithmetic (kernels/_launch.py): Triton's own values, without the host cost
of Triton's constexpr functions (about 2 us a call, up to ten calls a launcher: docs/kernels.md)."""
from __future__ import annotations

import ast
from pathlib import Path

import triton

from simmim_fast.kernels._launch import cdiv, next_power_of_2

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
LARGE = [2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 2 ** 40 - 1, 2 ** 40, 2 ** 40 + 1, 2 ** 63 - 1]


def test_next_power_of_2_is_tritons():
    for n in [*range(0, 4100), *LARGE]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_cdiv_is_tritons():
    for numerator in [*range(0, 600), *LARGE]:
        for denominator in (1, 2, 3, 16, 17, 64, 128, 197, 1024):
            assert cdiv(numerator, denominator) == triton.cdiv(numerator, denominator), (numerator, denominator)


def test_launchers_do_not_call_tritons_constexpr_functions():
    """Host code in kernels/ takes cdiv and next_power_of_2 from _launch (kernels use tl.cdiv)."""
    calls = []
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "triton"
                    and node.attr in ("cdiv", "next_power_of_2")):
                calls.append(f"{path.name}:{node.lineno} triton.{node.attr}")
    assert not calls, calls
