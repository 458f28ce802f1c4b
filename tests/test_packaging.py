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


def run_python(code: str, cwd: Path, **env_changes: str):
    """``python -c code`` as a user's shell starts it: the working folder first on sys.path (no safe-path mode)."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_kernels_folder_is_never_a_top_level_module():
    """From the repository root ``import kernels`` finds this folder first; with no other ``kernels`` on the
    path it must refuse, naming the package's real name, rather than pose as a third-party package."""
    result = run_python(f"import sys; sys.path[:] = [{str(ROOT)!r}]; import kernels", cwd=ROOT)
    assert result.returncode == 1 and "ImportError" in result.stderr, result.stderr
    assert "simmim_fast.kernels" in result.stderr.splitlines()[-1]


def test_a_built_wheel_installs_the_kernels_as_simmim_fast_kernels(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("simmim_fast-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    result = run_python("import simmim_fast.kernels.masked_l1_loss as op; print(op.__file__)", cwd=tmp_path,
                        PYTHONPATH=str(tmp_path / "site"))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent == tmp_path / "site" / "simmim_fast" / "kernels"


def installed_requirements():
    """(constraints file, requirement names) for every pip install of tools/setup_env.sh and tests/run.sh."""
    setup = (ROOT / "tools" / "setup_env.sh").read_text()
    for line in setup.splitlines():
        if '"${PIN[@]}"' in line and "pip install" in line:
            yield "main", line.split('"${PIN[@]}"', 1)[1].split("#")[0].split()
    lanes = (ROOT / "tests" / "run.sh").read_text().replace("\\\n", " ")
    for pins, requirements in re.findall(r"lane_venv \.venv-\S+ (\S+) ([^\n;]+)", lanes):
        yield pins, requirements.split()


def test_every_installed_package_is_pinned_in_its_venvs_constraints():
    """An upstream release must never turn main red: each package a lane installs has a pin."""
    checked = 0
    for pins, requirements in installed_requirements():
        pinned = {re.split(r"==", line)[0].lower().replace("_", "-")
                  for line in (ROOT / "tools" / "constraints" / f"{pins}.txt").read_text().splitlines()
                  if line and not line.startswith("#")}
        for requirement in requirements:
            if requirement.startswith("-"):
                continue
            name = re.split(r"[<>=!]", requirement.strip('"'))[0].lower().replace("_", "-")
            assert name in pinned, f"{name} is installed without a pin in tools/constraints/{pins}.txt"
            checked += 1
    assert checked >= 30, checked
