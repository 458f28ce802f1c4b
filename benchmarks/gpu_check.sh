#!/usr/bin/env bash
# The whole GPU verification in one call, within 9 minutes wall on one H100/H200:
#   1. the package from this working tree (nothing installed, works offline) and a CUDA check
#   2. the GPU tests:            pytest -m gpu tests
#   3. the kernel tests natively on CUDA: SIMMIM_FAST_BACKEND=triton pytest -m interpreter tests
#   4. python -m benchmarks.run --suite all, with time budgets from what is left
#   5. results tarred into $OUT (when set: the device tool returns files from there), summary last.
# Usage: bash benchmarks/gpu_check.sh
#   PYTHON=...                 the interpreter (default python3)
#   SIMMIM_FAST_GIT_COMMIT=... the commit being measured, when the copy has no .git (and
#   SIMMIM_FAST_GIT_DIRTY=0 if it is that commit exactly); it names the results folder
#   SIMMIM_FAST_JIT_CUDA=1     also compile csrc/ on first use and benchmark the cuda backend
# Every section has a hard cap; a failing section is reported and the next one still runs.
set -uo pipefail
if [ -n "${OUT:-}" ]; then exec > >(tee "$OUT/gpu_check.log") 2>&1; fi  # the whole log comes back too
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
TOTAL_CAP_S=${GPU_CHECK_TOTAL_S:-530}  # the device tool's per-call limit is 600 s; keep a margin
START=$SECONDS
FAILED=()

elapsed() { echo $(( SECONDS - START )); }
section() { echo; echo "=== $1 ($(elapsed) s elapsed)"; }
# capped SECONDS NAME COMMAND...: run COMMAND with a hard time cap, record it if it fails.
capped() {
  local cap=$1 name=$2 rc
  shift 2
  timeout --kill-after=10 "$cap" "$@"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    [ "$rc" -eq 124 ] && echo "!!! $name hit its ${cap} s cap" || echo "!!! $name failed (exit $rc)"
    FAILED+=("$name")
  fi
}

section "package from the working tree"
# simmim_fast.kernels lives in kernels/ (pyproject.toml's package-dir): a folder of links gives the same
# layout without pip. Commands run from that folder, so the repo root (with its bare kernels/ and
# simmim_fast/ without kernels) is never first on sys.path.
SHADOW=$(mktemp -d)
trap 'rm -rf "$SHADOW"' EXIT
mkdir "$SHADOW/simmim_fast"
for entry in "$REPO"/simmim_fast/*; do ln -s "$entry" "$SHADOW/simmim_fast/"; done
ln -s "$REPO/kernels" "$SHADOW/simmim_fast/kernels"
ln -s "$REPO/benchmarks" "$SHADOW/benchmarks"
export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
cd "$SHADOW"
if ! "$PY" - <<'PY'
import torch, triton, simmim_fast, simmim_fast.kernels as kernels
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"simmim_fast from {simmim_fast.__file__}, kernels from {kernels.__file__}")
print(f"torch {torch.__version__} CUDA {torch.version.cuda}, triton {triton.__version__}, "
      f"{torch.cuda.get_device_name()}")
PY
then
  echo "!!! the package or CUDA is not usable; nothing else can run"
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu \
  --format=csv 2>/dev/null || true

section "GPU tests (pytest -m gpu)"
capped 100 "gpu tests" "$PY" -m pytest -q -p no:cacheprovider -m gpu "$REPO/tests"

section "kernel tests natively on CUDA (SIMMIM_FAST_BACKEND=triton, -m interpreter)"
capped 110 "kernel tests on CUDA" env -u TRITON_INTERPRET SIMMIM_FAST_BACKEND=triton \
  "$PY" -m pytest -q -p no:cacheprovider -m interpreter "$REPO/tests"

section "input pipeline (--suite data: CPU paths, and GPU JPEG decode when torchvision can; owner: data)"
capped 120 "data benchmark" "$PY" -m benchmarks.run --suite data --data-workers 4 ${OUT:+--out "$OUT/data-benchmark"}

section "benchmarks (--suite all)"
left=$(( TOTAL_CAP_S - $(elapsed) - 15 ))
# Each suite stops starting new measurements after its budget; the rest of the time absorbs the one
# in flight (a torch.compile of a whole model can take a minute). Skipped work is listed as skipped.
kernel_budget=$(( left * 30 / 100 ))
e2e_budget=$(( left * 38 / 100 ))
echo "budgets: kernels ${kernel_budget} s, e2e ${e2e_budget} s, hard cap ${left} s"
STAMP="$SHADOW/benchmarks-started"
touch "$STAMP"
capped "$left" "benchmarks" "$PY" -m benchmarks.run --suite all \
  --kernel-budget-s "$kernel_budget" --e2e-budget-s "$e2e_budget"
# The run's folder: benchmarks/results/<device-slug>/<date>-<commit>/, the one created after the stamp.
RESULTS=$(find "$REPO/benchmarks/results" -mindepth 2 -maxdepth 2 -type d -newer "$STAMP" 2>/dev/null | head -n 1)

section "results"
if [ -n "${OUT:-}" ] && [ -n "$RESULTS" ]; then
  # <device-slug>/<date>-<commit>/...: untar under benchmarks/results/ to commit it as it is.
  tar -czf "$OUT/benchmark-results.tgz" -C "$REPO/benchmarks/results" "${RESULTS#"$REPO/benchmarks/results/"}"
  cp "$RESULTS/summary.md" "$OUT/summary.md" 2>/dev/null
  echo "copied to \$OUT: benchmark-results.tgz (the results folder), summary.md, gpu_check.log"
fi
echo "finished in $(elapsed) s; failed sections: ${FAILED[*]:-none}"
echo
if [ -n "$RESULTS" ] && [ -f "$RESULTS/summary.md" ]; then cat "$RESULTS/summary.md"
else echo "(no summary.md: the benchmark run wrote no results)"; fi
[ ${#FAILED[@]} -eq 0 ]
