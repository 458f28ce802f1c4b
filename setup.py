"""simmim_fast: pip install -e .  (torch + numpy only; `.[triton]`, `.[train]`, `.[dev]` for more).

The Triton kernels in kernels/ install as ``simmim_fast.kernels`` (never a top-level ``kernels``).
The CUDA C++ extension in csrc/ is built only with SIMMIM_FAST_BUILD_CUDA=1 (see csrc/README.md).
"""
import os

from setuptools import setup

packages = [
    "simmim_fast",
    "simmim_fast.backends",
    "simmim_fast.models",
    "simmim_fast.reference",
    "simmim_fast.train",
    "simmim_fast.downstream",
    "simmim_fast.kernels",
]
package_dir = {"simmim_fast.kernels": "kernels"}


def cuda_extension_kwargs():
    """Only with SIMMIM_FAST_BUILD_CUDA=1; needs a CUDA build of torch and nvcc (CUDA_HOME)."""
    if os.environ.get("SIMMIM_FAST_BUILD_CUDA", "0") != "1":
        return {}
    from csrc.build import extension_kwargs

    return extension_kwargs()


setup(
    name="simmim_fast",
    version="0.1.0",
    description="Fast, faithful SimMIM pretraining: fused Triton kernels behind the original model API",
    python_requires=">=3.9",
    packages=packages,
    package_dir=package_dir,
    package_data={"simmim_fast.train": ["default_data/*"]},
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "triton": ["triton"],
        "train": ["pillow", "pyyaml", "tqdm", "nvidia-ml-py", "matplotlib"],
        "dev": ["pytest", "triton", "pillow", "pyyaml", "tqdm", "nvidia-ml-py", "matplotlib"],
    },
    entry_points={"console_scripts": ["simmim-fast=simmim_fast.cli:main"]},
    **cuda_extension_kwargs(),
)
