#!/usr/bin/env bash
# The project's test command (README.md). Sets up .venv, then runs the lanes:
#   plain       every CPU test on the reference path (kernel tests deselected)
#   interpreter the Triton kernel tests under TRITON_INTERPRET=1 with SIMMIM_FAST_BACKEND=triton
#   compile     every Triton kernel compiled for sm_90 and sm_80 (no GPU needed): lowering, shared
#               memory and register spills at the recipes' shapes (tests/test_kernel_compile.py);
#               torch.compile(dynamic=True) with Inductor on the CPU (tests/test_dynamic_compile.py)
#   csrc        builds the CUDA extension (csrc/) in .venv-cuda (CUDA torch, no GPU needed), then
#               tests/test_csrc.py (+ tests/test_gpu_csrc.py where there is a GPU)
#   xla         the model on torch_xla's CPU device in .venv-xla vs eager (tests/test_xla.py)
#   gpu-check-dry-run  benchmarks/gpu_check.sh --dry-run: the GPU check's every section on the CPU
#   downstream  exports loaded into the real timm / transformers classes, augmentation vs timm's, in
#               .venv-cuda plus torchvision 0.29.1, timm, transformers (the pair timm imports with)
#               and pretrain --decode gpu with torchvision's decoder running on the CPU; Hugging Face's
#               kernels package importable from the repository root (tests/test_third_party_imports.py)
# Every venv installs at the versions of tools/constraints/<venv>.txt; tools/check_upgrades.sh (not CI)
# runs the downstream lane against the newest releases.
# `bash tests/run.sh plain` (or any list of lanes) runs only those.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
PY=.venv/bin/python
lanes=${*:-plain interpreter compile csrc downstream xla gpu-check-dry-run}

# csrc and xla each get their own venv: a CUDA build of torch there, the torch_xla pin here.
lane_venv() {  # lane_venv DIR PINS REQUIREMENTS...: the venv with those at the versions of
  # tools/constraints/PINS.txt (what CI last passed with), and this package without deps
  local venv=$1 pins=(-c "tools/constraints/$2.txt"); shift 2
  [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
  # --no-build-isolation below builds with the venv's own setuptools: it must have bdist_wheel
  "$venv/bin/python" -m pip install -q "${pins[@]}" --upgrade pip setuptools wheel
  "$venv/bin/python" -m pip install -q "${pins[@]}" "$@"
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
}
cuda_home() {  # the toolkit root; nvcc on the PATH may be a wrapper script, so ask nvcc where it runs from
  local bin
  bin=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p')
  dirname "${bin:-$(dirname "$(command -v nvcc)")}"
}
for lane in $lanes; do
  echo "=== lane: $lane"
  case "$lane" in
    plain) $PY -m pytest -q -m "not interpreter and not compile" tests ;;
    interpreter) TRITON_INTERPRET=1 SIMMIM_FAST_BACKEND=triton $PY -m pytest -q -m interpreter tests ;;
    compile) $PY -m pytest -q -m compile tests ;;
    csrc)
      lane_venv .venv-cuda cuda "torch==2.14.1" "numpy<2.4" pytest ninja
      # One arch (H100/H200) halves the compile; the build's default is 8.0;9.0 (csrc/README.md).
      CUDA_HOME=${CUDA_HOME:-$(cuda_home)} MAX_JOBS=${MAX_JOBS:-2} SIMMIM_FAST_BUILD_CUDA=1 \
        SIMMIM_FAST_CUDA_ARCHS=${SIMMIM_FAST_CUDA_ARCHS:-9.0} .venv-cuda/bin/python setup.py -q build_ext --inplace
      SIMMIM_FAST_EXPECT_CSRC=1 .venv-cuda/bin/python -m pytest -q tests/test_csrc.py tests/test_gpu_csrc.py ;;
    xla)
      lane_venv .venv-xla xla "torch==2.9.0" "torch_xla==2.9.0" "numpy<2.4" pytest pillow pyyaml tqdm matplotlib
      PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest -q -m xla tests/test_xla.py ;;
    gpu-check-dry-run) PYTHON=$(pwd)/$PY bash benchmarks/gpu_check.sh --dry-run ;;
    downstream)  # the csrc lane's venv (torch 2.14.1, a CUDA build) with the torchvision that loads beside it
      lane_venv .venv-cuda cuda "torch==2.14.1" "torchvision==0.29.1" timm transformers kernels safetensors \
        "numpy<2.4" pytest ninja pillow pyyaml tqdm matplotlib
      .venv-cuda/bin/python -m pytest -q -m downstream tests/test_downstream_libraries.py tests/test_third_party_imports.py \
        tests/test_gpu_decode_pretrain.py ;;
    *) echo "unknown lane $lane" >&2; exit 2 ;;
  esac
done
