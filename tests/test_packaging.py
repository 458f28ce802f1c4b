"""What the package promises a user: the torch floor it declares is the oldest torch CI tests, a licence,
type information for the public API, and the kernels installed as ``simmim_fast.kernels``."""
import inspect
import re
import tomllib
from pathlib import Path

import simmim_fast

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def version_tuple(text: str):
    return tuple(int(part) for part in text.split("."))


def test_declared_torch_floor_is_the_oldest_torch_a_ci_lane_runs():
    floor = next(re.fullmatch(r"torch>=([\d.]+)", dep).group(1) for dep in PYPROJECT["project"]["dependencies"]
                 if dep.startswith("torch"))
    lane_scripts = (ROOT / "tests" / "run.sh").read_text() + (ROOT / "tools" / "setup_env.sh").read_text()
    tested = sorted({version_tuple(pin) for pin in re.findall(r'"torch==([\d.]+)"', lane_scripts)})
    assert tested and version_tuple(floor) == tested[0], (floor, tested)


def test_licence_and_type_information_ship():
    assert PYPROJECT["project"]["license"] == "MIT" and "MIT License" in (ROOT / "LICENSE").read_text()
    assert (Path(simmim_fast.__file__).parent / "py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["simmim_fast"]


def test_kernels_install_as_a_subpackage():
    import simmim_fast.kernels

    assert Path(simmim_fast.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"simmim_fast.kernels": "kernels"}


def public_callables():
    for name in simmim_fast.__all__:
        obj = getattr(simmim_fast, name)
        if inspect.isfunction(obj):
            yield obj
        elif inspect.isclass(obj):
            yield from (member for attribute, member in vars(obj).items()
                        if inspect.isfunction(member) and (attribute == "__init__" or not attribute.startswith("_")))
        elif inspect.ismodule(obj):
            yield from (member for attribute, member in vars(obj).items() if inspect.isfunction(member)
                        and not attribute.startswith("_") and member.__module__ == obj.__name__)
    from simmim_fast.train import pretrain, reconstruct_images

    yield from (pretrain, reconstruct_images)


def test_public_functions_are_typed():
    untyped = []
    for function in public_callables():
        signature = inspect.signature(function)
        missing = [name for name, parameter in signature.parameters.items() if name not in ("self", "cls")
                   and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
                   and parameter.annotation is parameter.empty]
        if missing or (function.__name__ != "__init__" and signature.return_annotation is signature.empty):
            untyped.append(f"{function.__module__}.{function.__qualname__} {missing}")
    assert not untyped, untyped
