"""How the CUDA extension ``simmim_fast._C`` is built: setup.py (``SIMMIM_FAST_BUILD_CUDA=1``) and
the JIT path (``SIMMIM_FAST_JIT_CUDA=1``, see simmim_fast/cuda_ops.py) share this one description.

Environment:
  SIMMIM_FAST_CUDA_ARCHS  compute capabilities, ';' or ',' separated ("8.0;9.0", "90", "9.0a");
                          default 8.0;9.0 (A100, H100). PTX for the newest is embedded too, so
                          later GPUs can JIT it.
  MAX_JOBS                parallel compile jobs (read by torch's BuildExtension / ninja).
  CUDA_HOME               the CUDA toolkit root (parent of nvcc's bin/); torch finds it otherwise.
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import Dict, List

CSRC = pathlib.Path(__file__).resolve().parent
SOURCES = ("simmim_ops.cpp", "masked_l1_loss.cu", "mask_token_blend.cu")
EXTENSION_NAME = "simmim_fast._C"
JIT_NAME = "simmim_fast_C"
ARCHS_ENV_VAR = "SIMMIM_FAST_CUDA_ARCHS"
DEFAULT_ARCHS = "8.0;9.0"
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]


def cuda_archs(spec: str | None = None) -> List[str]:
    """'8.0;9.0' / '80,90' / '9.0a' -> ['80', '90'] / ['80', '90'] / ['90a'] (nvcc's spelling)."""
    spec = os.environ.get(ARCHS_ENV_VAR, DEFAULT_ARCHS) if spec is None else spec
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)\.?(\d)([af]?)", item)
        if match is None:
            raise ValueError(f"{ARCHS_ENV_VAR}: cannot read {item!r}; write compute capabilities like '8.0;9.0'")
        archs.append("".join(match.groups()))
    if not archs:
        raise ValueError(f"{ARCHS_ENV_VAR} is empty; write compute capabilities like '8.0;9.0'")
    return archs


def gencode_flags(archs: List[str]) -> List[str]:
    """SASS for every arch, plus PTX of the newest (torch then adds no arch flags of its own)."""
    flags = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
    newest = max(archs, key=lambda arch: int(re.match(r"\d+", arch).group()))
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def nvcc_flags() -> List[str]:
    return NVCC_FLAGS + gencode_flags(cuda_archs())


def source_paths(relative_to: pathlib.Path | None = None) -> List[str]:
    """Source files, relative to ``relative_to`` (setuptools wants paths relative to setup.py)."""
    paths = [CSRC / name for name in SOURCES]
    if relative_to is None:
        return [str(path) for path in paths]
    return [os.path.relpath(path, relative_to) for path in paths]


def extension_kwargs() -> Dict[str, object]:
    """``setup(**extension_kwargs())``: the CUDAExtension and torch's BuildExtension (ninja, MAX_JOBS)."""
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    extension = CUDAExtension(
        name=EXTENSION_NAME,
        sources=source_paths(relative_to=CSRC.parent),
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc_flags()},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


def jit_load(verbose: bool = False) -> None:
    """Compile (cached in torch's extension dir) and load the ops with torch.utils.cpp_extension.load."""
    from torch.utils.cpp_extension import load

    load(name=JIT_NAME, sources=source_paths(), extra_cflags=CXX_FLAGS, extra_cuda_cflags=nvcc_flags(),
         is_python_module=False, verbose=verbose)
