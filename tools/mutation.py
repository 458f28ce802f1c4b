"""Mutation testing of the modules whose bugs cost users most (not part of CI; tests/README.md).

Each mutant is one plausible one-token bug (a flipped comparison, an off-by-one constant, a swapped
operator, and/or exchanged, a dropped call, two names of a tuple exchanged) applied alone to a scratch
copy of the repository; the module's test subset then runs there. A mutant the tests fail on is killed;
one they pass is a survivor: a missing test, or an equivalent mutant (no behaviour changes), which is
listed with its reason in tools/mutation_equivalent.txt and left out of the score.

    .venv/bin/python tools/mutation.py --list                  # the modules and their test subsets
    .venv/bin/python tools/mutation.py masking dispatch        # run those modules (niced, one job)
    .venv/bin/python tools/mutation.py all                     # everything (hours on 2 cores)
    .venv/bin/python tools/mutation.py masking --dry-run       # only count and print the mutants

Writes benchmarks/results/mutation/<module>.md (score, survivors with a diff line each, timeouts)
and updates benchmarks/results/mutation/scores.json.
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "mutation"
EQUIVALENT_FILE = ROOT / "tools" / "mutation_equivalent.txt"


PLAIN_LANE = "not interpreter and not compile and not downstream and not xla and not csrc"


@dataclasses.dataclass(frozen=True)
class Lane:
    """Tests of another lane (tests/run.sh), run in its venv after the plain tests pass: the libraries
    or the device the module's code needs (timm and transformers for export, torch_xla for resume)."""

    venv: str
    markers: str
    pytest_args: Tuple[str, ...]
    env: Tuple[Tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Target:
    """A module to mutate, optionally only inside some top-level functions/classes, and its tests."""

    path: str
    tests: Tuple[str, ...]
    only: Tuple[str, ...] = ()  # top-level def/class names; empty = the whole module
    pytest_args: Tuple[str, ...] = ()
    later_lanes: Tuple[Lane, ...] = ()

    def runs(self) -> List[Tuple[str, str, Tuple[str, ...], Dict[str, str]]]:
        """(python, marker expression, pytest arguments, extra environment) of each test run, in order."""
        plain = (str(ROOT / ".venv" / "bin" / "python"), PLAIN_LANE, self.pytest_args + self.tests, {})
        return [plain] + [(str(ROOT / lane.venv / "bin" / "python"), lane.markers, lane.pytest_args, dict(lane.env))
                          for lane in self.later_lanes]


# The modules whose bugs cost users most, each with the test subset that covers it (small enough for a
# run of the whole table to fit in hours on 2 cores).
TARGETS: Dict[str, Target] = {
    "reference_ops": Target("simmim_fast/reference/__init__.py",
                            ("tests/test_reference_ops.py", "tests/test_norm_target.py", "tests/test_models.py",
                             "tests/test_swinv2.py")),
    "masking": Target("simmim_fast/masking.py", ("tests/test_masking.py",)),
    "checkpoint": Target("simmim_fast/checkpoint.py",
                         ("tests/test_train_unit.py", "tests/test_models.py", "tests/test_export_atomic.py",
                          "tests/test_cli_errors.py", "tests/test_long_runs.py"),
                         pytest_args=("-k", "checkpoint or save or load or pretrained or torn or umask or rng "
                                            "or export_atomic or long_runs")),
    "resume": Target("simmim_fast/train/checkpoints.py",
                     ("tests/test_train_unit.py", "tests/test_train_run.py", "tests/test_cli_errors.py",
                      "tests/test_long_runs.py", "tests/test_train_distributed.py"),
                     pytest_args=("-k", "checkpoint or resume or rng or keep_last or save or crash or long_runs "
                                        "or two_processes or all_finite"),
                     # restore_rng's XLA branch
                     later_lanes=(Lane(".venv-xla", "xla", ("-k", "rng", "tests/test_xla.py"), (("PJRT_DEVICE", "CPU"),)),)),
    "lr_schedule": Target("simmim_fast/train/optim.py", ("tests/test_train_unit.py",),
                          pytest_args=("-k", "lr or schedule or decay or adamw or optimizer or apex")),
    "layer_decay": Target("simmim_fast/downstream/finetune.py", ("tests/test_downstream.py",),
                          only=("layer_id", "layer_decay_groups"), pytest_args=("-k", "layer_decay")),
    "data_crop": Target("simmim_fast/train/data.py", ("tests/test_train_unit.py", "tests/test_data_pipeline.py"),
                        only=("_uniform", "_offset", "random_resized_crop_box", "crop_and_flip"),
                        pytest_args=("-k", "crop or transform or draft or sample")),
    "dispatch": Target("simmim_fast/dispatch.py", ("tests/test_dispatch.py", "tests/test_tuning.py")),
    "tuning_table": Target("simmim_fast/tuning_table.py", ("tests/test_tuning.py",)),
    "config_typing": Target("simmim_fast/config.py", ("tests/test_cli_errors.py", "tests/test_train_unit.py"),
                            only=("checked_value", "merge", "set_key", "_type_name"),
                            pytest_args=("-k", "set or config or yaml or type")),
    # the plain tests first (fast), then the downstream lane's strict loads into timm and transformers
    "export": Target("simmim_fast/downstream/export.py",
                     ("tests/test_downstream.py", "tests/test_export_atomic.py", "tests/test_transfer.py",
                      "tests/test_cli_errors.py"), pytest_args=("-k", "export"),
                     later_lanes=(Lane(".venv-cuda", "downstream", ("-k", "export or backbones or image_processor",
                                                                   "tests/test_downstream_libraries.py")),)),
    "finetune_remap": Target("simmim_fast/downstream/models.py", ("tests/test_downstream.py",),
                             only=("load_into", "resize_relative_position_table"),
                             pytest_args=("-k", "bias or load or checkpoint or architecture or resize")),
}


@dataclasses.dataclass(frozen=True)
class Mutant:
    line: int
    col: int
    end_line: int
    end_col: int
    kind: str
    original: str
    replacement: str
    context: str  # the mutated line, stripped: tells apart the same change on two lines

    def key(self, path: str) -> str:
        """Stable across line moves: the file, the line's code and the change (equivalents file key)."""
        return f"{path} | {self.kind} | {self.context} | {self.original} -> {self.replacement}"

    def describe(self, path: str) -> str:
        return f"{path}:{self.line} {self.kind}: `{self.original}` -> `{self.replacement}`"


SWAPPED_OPERATORS = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult,
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.And: ast.Or, ast.Or: ast.And,
}


def _docstring_nodes(tree: ast.AST) -> set:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first))
    return found


# Calls whose tuple argument is a set of alternatives: exchanging two of them changes nothing.
UNORDERED_TUPLE_CALLS = {"isinstance", "issubclass", "startswith", "endswith"}
# Keyword arguments that only lay out text for a reader: a JSON file's indentation, the frame a warning
# is attributed to. Not behaviour, as a raise statement's message is not.
PRESENTATION_KEYWORDS = {"indent", "stacklevel"}


def _unmutable(tree: ast.AST) -> set:
    """ids of nodes not to mutate: docstrings, f-strings (positions inside are unreliable), type hints,
    the messages of raise statements and the PRESENTATION_KEYWORDS (text, not behaviour); and the
    exchange of two alternatives in isinstance/startswith/except/``in`` tuples (the same set either way)."""
    docstrings, skip = _docstring_nodes(tree), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.JoinedStr, ast.Raise)) or id(node) in docstrings:
            skip.update(id(child) for child in ast.walk(node))
        for hint in (getattr(node, "annotation", None), getattr(node, "returns", None)):
            if hint is not None:
                skip.update(id(child) for child in ast.walk(hint))
        if isinstance(node, ast.keyword) and node.arg in PRESENTATION_KEYWORDS:
            skip.update(id(child) for child in ast.walk(node.value))
        if isinstance(node, ast.Call):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if called in UNORDERED_TUPLE_CALLS:
                skip.update(id(arg) for arg in node.args if isinstance(arg, ast.Tuple))
        elif isinstance(node, ast.ExceptHandler) and isinstance(node.type, ast.Tuple):
            skip.add(id(node.type))
        elif isinstance(node, ast.Compare):
            skip.update(id(right) for op, right in zip(node.ops, node.comparators)
                        if isinstance(op, (ast.In, ast.NotIn)) and isinstance(right, ast.Tuple))
    return skip


def _variants(node: ast.AST) -> Iterator[Tuple[str, ast.AST]]:
    """(kind, mutated copy) for one node."""
    if isinstance(node, ast.BinOp) and type(node.op) in SWAPPED_OPERATORS:
        new = copy.deepcopy(node)
        new.op = SWAPPED_OPERATORS[type(node.op)]()
        yield "operator", new
    elif isinstance(node, ast.BoolOp):
        new = copy.deepcopy(node)
        new.op = SWAPPED_OPERATORS[type(node.op)]()
        yield "and/or", new
    elif isinstance(node, ast.Compare):
        for index, op in enumerate(node.ops):
            if type(op) in SWAPPED_OPERATORS:
                new = copy.deepcopy(node)
                new.ops[index] = SWAPPED_OPERATORS[type(op)]()
                yield "comparison", new
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "not dropped", copy.deepcopy(node.operand)
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        yield "bool", ast.Constant(not node.value)
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        yield "constant", ast.Constant(node.value + 1)
        if node.value != 0:
            yield "constant", ast.Constant(node.value - 1)
    elif isinstance(node, ast.Constant) and type(node.value) is float:
        yield "constant", ast.Constant(node.value * 2 if node.value else 1.0)
    elif isinstance(node, ast.Tuple) and len(node.elts) >= 2:
        # Exchanged names or positions: (q, k, v) -> (k, q, v), the kind of bug a mapping table hides.
        new = copy.deepcopy(node)
        new.elts[0], new.elts[1] = new.elts[1], new.elts[0]
        if ast.dump(new) != ast.dump(node):
            yield "swapped", new


def _code_of(line: str) -> str:
    """A line without its inline comment (a key must not hold the file's '  # ' separator)."""
    return line.split("  #")[0].strip()


def mutants(source: str, only: Sequence[str] = ()) -> List[Mutant]:
    tree = ast.parse(source)
    skip = _unmutable(tree)
    roots = [node for node in tree.body
             if not only or (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in only)]
    lines, found = source.splitlines(), []
    for root in roots:
        for node in ast.walk(root):
            if id(node) in skip or not hasattr(node, "end_col_offset"):
                continue
            original = ast.get_source_segment(source, node)
            if original is None:
                continue
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                found.append(Mutant(node.lineno, node.col_offset, node.end_lineno, node.end_col_offset,
                                    "call dropped", original, "pass", _code_of(lines[node.lineno - 1])))
                continue
            if isinstance(node, ast.expr):
                for kind, new in _variants(node):
                    found.append(Mutant(node.lineno, node.col_offset, node.end_lineno, node.end_col_offset,
                                        kind, original, f"({ast.unparse(new)})", _code_of(lines[node.lineno - 1])))
    return sorted((mutant for mutant in set(found) if _compiles(source, mutant)),
                  key=lambda m: (m.line, m.col, m.kind, m.replacement))


def _compiles(source: str, mutant: Mutant) -> bool:
    """False for a mutant that is not Python (two slices exchanged in a subscript: ``x[(0, :)]``)."""
    try:
        apply(source, mutant)
    except SyntaxError:
        return False
    return True


def apply(source: str, mutant: Mutant) -> str:
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode()))
    data = source.encode()
    start = offsets[mutant.line - 1] + mutant.col  # ast offsets are in UTF-8 bytes
    end = offsets[mutant.end_line - 1] + mutant.end_col
    mutated = (data[:start] + mutant.replacement.encode() + data[end:]).decode()
    ast.parse(mutated)  # every mutant compiles
    return mutated


def read_equivalents() -> Dict[str, str]:
    """key -> reason, from lines 'KEY  # reason' in tools/mutation_equivalent.txt."""
    if not EQUIVALENT_FILE.exists():
        return {}
    found = {}
    for line in EQUIVALENT_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, reason = line.partition("  # ")
            found[key.strip()] = reason.strip()
    return found


def scratch_copy() -> Path:
    """The tracked files in a temp folder, with kernels/ as simmim_fast/kernels (as installed)."""
    folder = Path(tempfile.mkdtemp(prefix="simmim_mutation_"))
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    (folder / "simmim_fast" / "kernels").symlink_to(folder / "kernels")
    return folder


def check_imports_the_copy(folder: Path, target: Target) -> None:
    for python, _, _, _ in target.runs():
        imported = subprocess.run([python, "-c", "import simmim_fast; print(simmim_fast.__file__)"], cwd=folder,
                                  env=_test_environment(folder), capture_output=True, text=True).stdout.strip()
        if not imported.startswith(str(folder)):  # else every mutant would "survive", untested
            raise SystemExit(f"{python} would import simmim_fast from {imported!r}, not the mutated copy in {folder}")


def _test_environment(folder: Path) -> Dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(folder), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("SIMMIM_FAST_BACKEND", None)
    return env


def run_tests(folder: Path, target: Target, timeout: float) -> Tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, the output's tail) of the target's tests in ``folder``."""
    env = _test_environment(folder)
    start = time.monotonic()
    for python, markers, arguments, lane_env in target.runs():
        command = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", markers, *arguments]
        try:
            result = subprocess.run(command, cwd=folder, env={**env, **lane_env}, capture_output=True,
                                    timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            return "timeout", time.monotonic() - start, ""
        if result.returncode == 5:
            raise SystemExit(f"no tests selected by {' '.join(command)}")
        if result.returncode != 0:
            return "failed", time.monotonic() - start, (result.stdout + result.stderr).decode(errors="replace")[-3000:]
    return "passed", time.monotonic() - start, ""


def run_target(name: str, target: Target, folder: Path, max_mutants: Optional[int], equivalents: Dict[str, str],
               log) -> dict:
    check_imports_the_copy(folder, target)
    module = folder / target.path
    source = module.read_text()
    found = mutants(source, target.only)
    if max_mutants is not None and len(found) > max_mutants:  # an even spread over the module
        step = len(found) / max_mutants
        found = [found[int(index * step)] for index in range(max_mutants)]
    baseline, seconds, output = run_tests(folder, target, timeout=1800)
    if baseline != "passed":
        raise SystemExit(f"{output}\n{name}: the tests fail on the unmutated code ({target.tests}); fix that first")
    timeout = max(4 * seconds, seconds + 120)  # generous: the machine is shared, a slow run is not a kill
    log(f"{name}: {len(found)} mutants, tests take {seconds:.0f} s unmutated")
    outcomes = []
    try:
        for index, mutant in enumerate(found, 1):
            module.write_text(apply(source, mutant))
            outcome, _, _ = run_tests(folder, target, timeout)
            if outcome == "timeout":  # once more with twice the time before calling it a hang
                outcome, _, _ = run_tests(folder, target, 2 * timeout)
            outcomes.append((mutant, outcome))
            log(f"  [{index}/{len(found)}] {outcome:7s} {mutant.describe(target.path)}")
    finally:
        module.write_text(source)
    killed = [m for m, outcome in outcomes if outcome != "passed"]
    survivors = [m for m, outcome in outcomes if outcome == "passed"]
    equivalent = [m for m in survivors if m.key(target.path) in equivalents]
    missed = [m for m in survivors if m.key(target.path) not in equivalents]
    scored = len(outcomes) - len(equivalent)
    return {"module": target.path, "tests": [" ".join(arguments) + f" ({Path(python).parent.parent.name}, -m '{markers}')"
                                             for python, markers, arguments, _ in target.runs()],
            "only": list(target.only), "mutants": len(outcomes), "killed": len(killed),
            "timeouts": sum(outcome == "timeout" for _, outcome in outcomes),
            "equivalent": len(equivalent), "score": round(len(killed) / scored, 4) if scored else None,
            "survivors": [m.describe(target.path) for m in missed],
            "survivor_keys": [m.key(target.path) for m in missed],
            "equivalent_survivors": [f"{m.describe(target.path)}  # {equivalents[m.key(target.path)]}" for m in equivalent],
            "baseline_seconds": round(seconds, 1), "sampled_from": max_mutants,
            # what a later run compares against: when, on which torch, by which command
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "torch": _torch_version(folder, target),
            "command": " ".join(["tools/mutation.py", *sys.argv[1:]])}


def _torch_version(folder: Path, target: Target) -> str:
    return subprocess.run([target.runs()[0][0], "-c", "import torch; print(torch.__version__)"], cwd=folder,
                          env=_test_environment(folder), capture_output=True, text=True).stdout.strip()


def write_report(name: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    score = "n/a" if result["score"] is None else f"{100 * result['score']:.1f}%"
    lines = [f"# Mutation score: {name} ({result['module']})", "",
             f"- tests: `{'`, then `'.join(result['tests'])}`" + (f"; mutated only in {', '.join(result['only'])}" if result["only"] else ""),
             f"- {result['mutants']} mutants" + (f" (an even sample, --max-mutants {result['sampled_from']})"
                                                  if result["sampled_from"] else "")
             + f", {result['killed']} killed ({result['timeouts']} by timeout), {result['equivalent']} judged "
               f"equivalent (tools/mutation_equivalent.txt)",
             f"- score (killed / non-equivalent): **{score}**",
             f"- run {result['date']} on torch {result['torch']} ({result['baseline_seconds']} s for the unmutated "
             f"tests): `{result['command']}`", "",
             "## Survivors (a missing test, or an equivalent mutant to list with its reason)", ""]
    lines += [f"- {line}\n  key: `{key}`" for line, key in zip(result["survivors"], result["survivor_keys"])] or ["- none"]
    if result["equivalent_survivors"]:
        lines += ["", "## Judged equivalent", ""] + [f"- {line}" for line in result["equivalent_survivors"]]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    scores_file = RESULTS / "scores.json"
    scores = json.loads(scores_file.read_text()) if scores_file.exists() else {}
    scores[name] = {key: result[key] for key in ("module", "mutants", "killed", "timeouts", "equivalent", "score",
                                                 "sampled_from", "date", "torch", "command")}
    scores_file.write_text(json.dumps(dict(sorted(scores.items())), indent=2) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"'all' or some of: {', '.join(TARGETS)}")
    parser.add_argument("--list", action="store_true", help="print the modules and their test subsets")
    parser.add_argument("--dry-run", action="store_true", help="print the mutants, run nothing")
    parser.add_argument("--max-mutants", type=int, default=None, help="an even sample of at most this many per module")
    args = parser.parse_args(argv)
    if args.list or not args.modules:
        for name, target in TARGETS.items():
            print(f"{name:15s} {target.path}{' (' + ', '.join(target.only) + ')' if target.only else ''}")
            for python, markers, arguments, _ in target.runs():
                print(f"{'':15s} tests ({Path(python).parent.parent.name}): {' '.join(arguments)}")
        return 0
    names = list(TARGETS) if args.modules == ["all"] else args.modules
    unknown = [name for name in names if name not in TARGETS]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    if args.dry_run:
        for name in names:
            target = TARGETS[name]
            found = mutants((ROOT / target.path).read_text(), target.only)
            print(f"{name}: {len(found)} mutants")
            for mutant in found:
                print("  " + mutant.describe(target.path))
        return 0
    os.nice(19)  # a shared machine: the mutants run at the lowest priority, one at a time
    # A background job (`cmd &`) starts with SIGINT ignored, and its children would inherit that: the tests
    # that stop a CLI run with SIGINT would then fail on every mutant, the unmutated code included.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes the scratch copy
    equivalents = read_equivalents()
    folder = scratch_copy()
    try:
        for name in names:
            result = run_target(name, TARGETS[name], folder, args.max_mutants, equivalents,
                                log=lambda text: print(text, flush=True))
            write_report(name, result)
            print(f"{name}: score {result['score']} ({result['killed']}/{result['mutants'] - result['equivalent']}), "
                  f"{len(result['survivors'])} survivors -> {RESULTS / (name + '.md')}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
