"""Which 32-bit integer arithmetic of a compiled Triton kernel can overflow, at one launch's argument
values and grid: interval arithmetic over the kernel's TTIR (tests/compile_only.py --max-batch).

Triton computes offsets in i32 unless an operand is i64 (an argument >= 2**31, or a ``.to(tl.int64)``);
an i32 product such as ``program_id * stride`` silently wraps past 2**31 and addresses the wrong
memory. Each integer value gets a [low, high] range: arguments their launch value, program ids
[0, grid - 1], ``tl.arange`` its bounds, loop counters their loop bounds; arithmetic combines ranges
(sound: a true value is always inside). Integers read from memory are the kernels' index tensors
(token orders, masks) and counts of their entries, so within [0, the largest integer tensor
argument's element count]; loop-carried integers are unknown (the whole i32 range). An i32 result whose range leaves the i32 range is reported, with the
source line it comes from.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

Range = Tuple[int, int]
I32 = (-2 ** 31, 2 ** 31 - 1)
_TYPE_RANGES = {"i1": (0, 1), "i8": (-2 ** 7, 2 ** 7 - 1), "i16": (-2 ** 15, 2 ** 15 - 1), "i32": I32,
                "i64": (-2 ** 63, 2 ** 63 - 1)}
_OP = re.compile(r"^\s*(?:(%[\w$.-]+)(?::(\d+))? = )?([\w.]+)\b(.*)$")
_VALUE = re.compile(r"%[\w$.-]+(?:#\d+)?")
_LOC_DEF = re.compile(r"^#(loc\d*) = loc\((.*)\)$")
_ARGUMENT = re.compile(r"(%[\w$.-]+): (i\d+)")
_PASS_THROUGH = {"tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans", "arith.extsi",
                 "arith.index_cast", "ttg.convert_layout", "tt.unsplat"}
_WRAPS = {"arith.addi", "arith.subi", "arith.muli", "arith.shli", "arith.trunci"}


def _element_type(op_text: str) -> str:
    """The element type of an op's (last) result, from its trailing ``: type`` annotation."""
    text = op_text.split(" loc(")[0].rstrip()
    if " : " not in text:
        return ""
    annotation = text.rsplit(" : ", 1)[1]
    annotation = annotation.split(" to ")[-1].split(", ")[-1].split(" -> ")[-1].strip()
    if annotation.startswith("tensor<"):
        annotation = annotation[len("tensor<"):-1].split("x")[-1]
    return annotation


def _truncated_quotient(x: int, y: int) -> int:
    quotient = abs(x) // abs(y)
    return quotient if (x >= 0) == (y > 0) else -quotient


def _divide(a: Range, b: Range) -> Optional[Range]:
    if b[0] <= 0 <= b[1]:
        return None
    quotients = [_truncated_quotient(x, y) for x in a for y in b]  # monotone in each operand: corners bound it
    return min(quotients), max(quotients)


def _combine(op: str, a: Range, b: Range) -> Optional[Range]:
    if op == "arith.addi":
        return a[0] + b[0], a[1] + b[1]
    if op == "arith.subi":
        return a[0] - b[1], a[1] - b[0]
    if op == "arith.muli":
        products = [x * y for x in a for y in b]
        return min(products), max(products)
    if op in ("arith.divsi", "arith.divui"):
        return _divide(a, b)
    if op in ("arith.ceildivsi", "arith.floordivsi", "arith.ceildivui"):
        quotient = _divide(a, b)  # ceil/floor division differ from truncation by at most one
        return None if quotient is None else (quotient[0] - 1, quotient[1] + 1)
    if op in ("arith.remsi", "arith.remui"):
        if b[0] <= 0:
            return None
        return (0 if a[0] >= 0 else -(b[1] - 1)), (min(a[1], b[1] - 1) if a[0] >= 0 else b[1] - 1)
    if op == "arith.minsi":
        return min(a[0], b[0]), min(a[1], b[1])
    if op == "arith.maxsi":
        return max(a[0], b[0]), max(a[1], b[1])
    if op == "arith.andi" and a[0] >= 0 and b[0] >= 0:
        return 0, min(a[1], b[1])
    if op in ("arith.ori", "arith.xori") and a[0] >= 0 and b[0] >= 0:
        return 0, 2 ** max(a[1], b[1], 1).bit_length() - 1
    if op == "arith.shli" and b[0] >= 0:
        return _combine("arith.muli", a, (2 ** b[0], 2 ** b[1]))
    if op in ("arith.shrsi", "arith.shrui") and b[0] >= 0 and a[0] >= 0:
        return a[0] >> b[1], a[1] >> b[0]
    return None


def _locations(ttir: str) -> Dict[str, str]:
    """#locN -> "file.py:line" (of an inlined helper: "helper line, called at caller line")."""
    definitions = {}
    for line in ttir.splitlines():
        match = _LOC_DEF.match(line)
        if match:
            definitions[match.group(1)] = match.group(2)

    def resolve(name, depth=0):
        text = definitions.get(name)
        if text is None or depth > 50:
            return "?"
        file_line = re.fullmatch(r'"([^"]*)":(\d+):\d+', text)
        if file_line:
            return f"{file_line.group(1).rsplit('/', 1)[-1]}:{file_line.group(2)}"
        callsite = re.fullmatch(r"callsite\(#(loc\d*) at #(loc\d*)\)", text)
        if callsite:
            return f"{resolve(callsite.group(1), depth + 1)}, called at {resolve(callsite.group(2), depth + 1)}"
        wrapped = re.fullmatch(r'"[^"]*"\(#(loc\d*)\)', text)
        return resolve(wrapped.group(1), depth + 1) if wrapped else "?"

    return {name: resolve(name) for name in definitions}


def int32_overflows(ttir: str, arguments: Dict[str, int], grid: Sequence[int], largest_index: int) -> List[str]:
    """Every i32 operation of the kernel whose result can leave the i32 range at this launch, given
    its integer arguments by name and the bound of integers it loads (see above)."""
    ranges: Dict[str, Range] = {}
    locations = _locations(ttir)
    loaded = (0, largest_index)
    problems = []
    wrapped = set()
    for line in ttir.splitlines():
        if "tt.func" in line and "@" in line:
            for name, type_name in _ARGUMENT.findall(line):
                value = arguments.get(name[1:])
                ranges[name] = (int(value), int(value)) if isinstance(value, int) else _TYPE_RANGES[type_name]
            continue
        match = _OP.match(line)
        if not match or (not match.group(1) and match.group(3) != "scf.for"):
            continue
        result, count, op, rest = match.groups()
        element = _element_type(line)
        if op == "tt.load":  # annotated with the pointer type: the value has its pointee's type
            element = element.removeprefix("!tt.ptr<").removesuffix(">")
        if op == "scf.for":  # %r:n = scf.for %iv = %lb to %ub step %s iter_args(%a = %init, ...) -> (...)
            header = re.match(r"\s*(%[\w$.-]+) = (%[\w$.-]+) to (%[\w$.-]+) step", rest)
            if header and header.group(2) in ranges and header.group(3) in ranges:
                ranges[header.group(1)] = ranges[header.group(2)][0], ranges[header.group(3)][1] - 1
            carried_values = rest.split("iter_args(", 1)[1] if "iter_args(" in rest else ""
            for carried in re.findall(r"(%[\w$.-]+) = %", carried_values):
                ranges[carried] = I32  # loop-carried: unknown, at worst anything an i32 holds
            continue
        if element not in _TYPE_RANGES:
            continue
        names = [result] if not count else [f"{result}#{index}" for index in range(int(count))]
        operands = _VALUE.findall(rest.split(" : ")[0].split(" loc(")[0])
        known = [ranges.get(name) for name in operands]
        value: Optional[Range] = None
        if op == "arith.constant":
            literal = re.search(r"(?:dense<)?(-?\d+|true|false)\b", rest)
            if literal:
                text = literal.group(1)
                value = (int(text == "true"),) * 2 if text in ("true", "false") else (int(text), int(text))
        elif op == "tt.get_program_id":
            axis = "xyz".index(rest.split()[0])
            value = (0, grid[axis] - 1)
        elif op == "tt.get_num_programs":
            axis = "xyz".index(rest.split()[0])
            value = (grid[axis], grid[axis])
        elif op == "tt.make_range":
            bounds = dict(re.findall(r"(start|end) = (-?\d+)", rest))
            value = (int(bounds["start"]), int(bounds["end"]) - 1)
        elif op in _PASS_THROUGH or op == "arith.trunci":
            value = known[0] if known else None
        elif op == "arith.extui":
            value = known[0] if known and known[0] and known[0][0] >= 0 else None
        elif op == "arith.cmpi":
            value = (0, 1)
        elif op == "arith.select" and len(known) == 3 and known[1] and known[2]:
            value = min(known[1][0], known[2][0]), max(known[1][1], known[2][1])
        elif op == "tt.load":
            value = loaded
        elif len(known) == 2 and known[0] and known[1]:
            value = _combine(op, known[0], known[1])
        type_range = _TYPE_RANGES[element]
        if value is None:
            value = type_range
        if any(name in wrapped for name in operands):  # downstream of a reported wrap: one report per cause
            wrapped.update(names)
        elif element == "i32" and op in _WRAPS and (value[0] < I32[0] or value[1] > I32[1]):
            wrapped.update(names)
            location = locations.get(re.search(r"loc\(#(loc\d*)\)", line).group(1), "?") if "loc(#" in line else "?"
            bound = max(abs(value[0]), abs(value[1]))
            problems.append(f"{op} at {location} reaches {'-' if value[0] < I32[0] else ''}2**{math.log2(bound):.1f} "
                            f"in i32 (operands in {', '.join(str(list(r)) for r in known if r)})")
        for name in names:
            ranges[name] = max(value[0], type_range[0]), min(value[1], type_range[1])
    return problems
