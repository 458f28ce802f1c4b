#!/usr/bin/env bash
# Creates (or updates) .venv with everything the library, the CLI and the tests need, on a fresh
# machine, every package at the version in tools/constraints/main.txt (an upstream release cannot change
# what CI installs). torch 2.13.0 is the local CPU wheel (fast; a newer torch pulls a multi-GB CUDA
# build); numpy<2.4 because tl.dot fails under TRITON_INTERPRET=1 with numpy 2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIN=(-c tools/constraints/main.txt)
.venv/bin/python -m pip install -q "${PIN[@]}" --upgrade pip "setuptools>=77"  # pyproject.toml: PEP 639 licence
.venv/bin/python -m pip install -q "${PIN[@]}" "torch==2.13.0"
.venv/bin/python -m pip install -q "${PIN[@]}" "numpy<2.4" "triton==3.6.0" pytest pillow pyyaml tqdm nvidia-ml-py matplotlib safetensors scipy
# transformers: the e2e benchmark's smoke run trains its masked-image-modeling models beside ours
.venv/bin/python -m pip install -q "${PIN[@]}" transformers
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
echo "setup_env: $(.venv/bin/python -c 'import torch, triton, numpy; print("torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)')"
