"""Only the optional CUDA C++ extension (csrc/); everything else about the package is in pyproject.toml.

The extension is built only with SIMMIM_FAST_BUILD_CUDA=1 and needs a CUDA build of torch and nvcc
(CUDA_HOME); see csrc/README.md. Without it this adds nothing and the Triton/PyTorch paths are used.
"""
import os

from setuptools import setup


def cuda_extension_kwargs():
    if os.environ.get("SIMMIM_FAST_BUILD_CUDA", "0") != "1":
        return {}
    from csrc.build import extension_kwargs

    return extension_kwargs()


setup(**cuda_extension_kwargs())
