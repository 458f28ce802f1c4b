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
venv_of_lane() {  # the lane venv a lane installs into, if any (.venv serves the rest and is kept)
  case "$1" in csrc|downstream) echo .venv-cuda ;; xla) echo .venv-xla ;; esac
}
# SIMMIM_FAST_PRUNE_VENVS=1 (.ci/run sets it): a lane venv is removed once the last lane of this run that
# uses it has finished. The three venvs take about 15 GB (.venv 2.1, .venv-cuda 5.9, .venv-xla 7.3, plus
# ~4 GB of torch 2.9's downloaded wheels while it installs): more than some CI machines have free.
prune_finished_venv() {  # prune_finished_venv LANE LANES_STILL_TO_RUN...
  local venv later
  venv=$(venv_of_lane "$1")
  [ "${SIMMIM_FAST_PRUNE_VENVS:-0}" = 1 ] && [ -n "$venv" ] || return 0
  for later in "${@:2}"; do [ "$(venv_of_lane "$later")" = "$venv" ] && return 0; done
  echo "=== pruning $venv: no later lane of this run uses it"
  rm -rf "$venv"
}
set -- $lanes
while [ $# -gt 0 ]; do
  lane=$1; shift
  echo "=== lane: $lane ($(df -h --output=avail . | tail -1 | tr -d ' ') free on this disk)"
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
  prune_finished_venv "$lane" "$@"
done
