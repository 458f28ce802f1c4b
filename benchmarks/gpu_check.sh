#!/usr/bin/env bash
# The GPU verification, numbers first, in parts that each fit one device call of 6 minutes (360 s) on one
# H100/H200 with 16 cores, compiles included (docs/gpu-check.md):
#   both parts: the package from this working tree (nothing installed, works offline), a CUDA check and the
#     toolchain in one line (gcc builds Triton's launchers, Triton's ptxas its cubins); then every Triton
#     specialisation the part's benchmarks launch, compiled in parallel worker processes into the shared
#     Triton cache (benchmarks/precompile.py); then the budget table (benchmarks/gpu_budget.py).
#   --part 1 (default): the headline numbers in their reserved window (>= 3 minutes): ViT-B 224 and Swin-B
#     192 w6 training steps at batch 128 (the original-style reference, ours, transformers' models), the
#     attention kernels against SDPA and the loss kernels' GB/s against the in-run copy bandwidth; then the
#     training-configuration numerics (-m training) in what is left.
#   --part 2: the training-configuration numerics again (part 1 may have had no time left for them), the
#     compiled providers (torch.compile of the reference, ours compiled, ours compiled with CUDA graphs:
#     --compile reduce-overhead), then the other GPU and kernel
#     tests, the input-pipeline suite and a short pretrain --decode gpu, as time allows.
#   Results are tarred into $OUT (when set: the device tool returns files from there), summary last.
# Tests run with SIMMIM_FAST_AUTOTUNE=0 (nothing timed: the table's config or the default; they check numbers); the benchmarks tune as
# users do. Every section has a hard cap; a failing section is reported and the next one still runs.
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [--part 1|2]
#   --dry-run   both parts on a CPU: kernels under TRITON_INTERPRET=1 (tiny shapes), smoke benchmarks into a
#               temporary folder, the precompile counting every specialisation and timing a sample of them;
#               fails if part 1's predicted headline does not fit one call (tests/run.sh lane gpu-check-dry-run)
#   PYTHON=...  the interpreter (default python3)
#   SIMMIM_FAST_GIT_COMMIT=... the commit being measured, when the copy has no .git (and
#   SIMMIM_FAST_GIT_DIRTY=0 if it is that commit exactly); it names the results folder
set -uo pipefail
DRY_RUN=0 PART=1
usage() { echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--part 1|2]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; PART=all ;;
    --part) [ "${2:-}" = 1 ] || [ "${2:-}" = 2 ] || usage; PART=$2; shift ;;
    *) usage ;;
  esac
  shift
done
if [ -n "${OUT:-}" ]; then exec > >(tee "$OUT/gpu_check.log") 2>&1; fi  # the whole log comes back too
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
START=$SECONDS
FAILED=()
HEADLINE_OPS=(attention window_attention masked_l1_loss masked_decoder_loss)
# One device call's length (benchmarks/gpu_budget.py): two calls and a machine's start fit the 15 minutes of
# device time a task is lent, so a failed part can run again. Sections stop 10 s before it (the results' tar).
CALL_S=$("$PY" -c 'import runpy; print(runpy.run_path("benchmarks/gpu_budget.py")["CALL_S"])')
[[ "$CALL_S" =~ ^[0-9]+$ ]] || { echo "!!! no CALL_S from benchmarks/gpu_budget.py"; exit 1; }
# Part 2's compiled e2e providers, as the budget counts them.
COMPILED_PROVIDERS=$("$PY" -c 'import runpy; print(" ".join(runpy.run_path("benchmarks/gpu_budget.py")["GPU_CHECK_COMPILED_PROVIDERS"]))')
if [ "$DRY_RUN" = 1 ]; then
  # The interpreter runs the kernels ~1000x slower than a GPU: generous caps, the tiny shapes the tests
  # pick without CUDA, and the rest of the kernel tests only collected (tests/run.sh's interpreter lane
  # runs them; here it is proved that this script selects and imports them).
  export TRITON_INTERPRET=1
  TOTAL_CAP_S=${GPU_CHECK_TOTAL_S:-1800} TRAINING_CAP_S=600 REST_CAP_S=300 REST_ONLY_COLLECT=(--collect-only -q)
  BENCHMARK_ARGS=(--smoke --device cpu) HEADLINE_BATCH_ARGS=() PRECOMPILE_ARGS=(--workers 2 --sample 8)
else
  TOTAL_CAP_S=${GPU_CHECK_TOTAL_S:-$(( CALL_S - 10 ))}
  TRAINING_CAP_S=150 REST_CAP_S=150 REST_ONLY_COLLECT=()
  BENCHMARK_ARGS=() HEADLINE_BATCH_ARGS=(--e2e-batches 128) PRECOMPILE_ARGS=(--workers "$(nproc)")
fi

elapsed() { echo $(( SECONDS - START )); }
left() { echo $(( TOTAL_CAP_S - $(elapsed) - ${1:-0} )); }
section() { echo; echo "=== $1 ($(elapsed) s elapsed)"; }
# capped SECONDS NAME COMMAND...: run COMMAND with a hard time cap, record it if it fails.
capped() {
  local cap=$1 name=$2 rc
  shift 2
  if [ "$cap" -lt 10 ]; then echo "!!! $name skipped: ${cap} s left"; FAILED+=("$name (no time)"); return; fi
  timeout --kill-after=10 "$cap" "$@"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    [ "$rc" -eq 124 ] && echo "!!! $name hit its ${cap} s cap" || echo "!!! $name failed (exit $rc)"
    FAILED+=("$name")
  fi
}
# tests CAP NAME MARKEXPR [PYTEST ARGS...]: the GPU tests, then the kernel tests, selected by MARKEXPR.
# The kernel tests run as tests/run.sh's interpreter lane runs them (every op forced to triton).
tests() {
  local cap=$1 name=$2 select=$3
  shift 3
  capped "$cap" "$name: gpu tests" env SIMMIM_FAST_AUTOTUNE=0 \
    "$PY" -m pytest -q -p no:cacheprovider -m "gpu and ($select)" "$@" "$REPO/tests"
  capped "$(left 10)" "$name: kernel tests" env SIMMIM_FAST_AUTOTUNE=0 SIMMIM_FAST_BACKEND=triton \
    "$PY" -m pytest -q -p no:cacheprovider -m "interpreter and ($select)" "$@" "$REPO/tests"
}
count_tests() {  # count_tests MARKEXPR: how many tests the section would run (the dry run's budget table)
  local select=$1 total=0 marks
  for marks in "gpu and ($select)" "interpreter and ($select)"; do
    total=$(( total + $("$PY" -m pytest -q -p no:cacheprovider --collect-only -m "$marks" "$REPO/tests" 2>/dev/null | grep -c "::") ))
  done
  echo "$total"
}
# benchmarks PART NAME SUITE ARGS...: benchmarks.run in the part's reserved window (benchmarks/gpu_budget.py),
# each suite stopping new measurements at its share; the cap adds a minute for the one in flight.
benchmarks() {
  local part=$1 name=$2 suite=$3 budgets kernel_s e2e_s window
  shift 3
  budgets=$("$PY" -m benchmarks.gpu_budget --precompile-json "$WORK/precompile.json" --budgets "$part") || budgets="90 90"
  read -r kernel_s e2e_s <<< "$budgets"
  window=$(( ${kernel_s%.*} + ${e2e_s%.*} + 60 ))
  [ "$window" -gt "$(left 15)" ] && window=$(left 15)
  echo "window: ${window} s (kernel suite ${kernel_s} s, e2e suite ${e2e_s} s, then the measurement in flight)"
  capped "$window" "$name" env -u TRITON_INTERPRET "$PY" -m benchmarks.run --suite "$suite" "${BENCHMARK_ARGS[@]}" \
    --out "$RESULTS_ROOT/part$part" --kernel-budget-s "$kernel_s" --e2e-budget-s "$e2e_s" "$@"
}

section "package from the working tree$([ "$DRY_RUN" = 1 ] && echo ' (dry run: CPU, TRITON_INTERPRET=1)'), part $PART"
echo "sections stop by ${TOTAL_CAP_S} s (a device call: ${CALL_S} s, benchmarks/gpu_budget.py)"
# simmim_fast.kernels lives in kernels/ (pyproject.toml's package-dir): a folder of links gives the same
# layout without pip. Commands run from that folder, so the repo root (with its bare kernels/ and
# simmim_fast/ without kernels) is never first on sys.path.
SHADOW=$(mktemp -d)
trap 'rm -rf "$SHADOW"' EXIT
mkdir "$SHADOW/simmim_fast"
for entry in "$REPO"/simmim_fast/*; do ln -s "$entry" "$SHADOW/simmim_fast/"; done
ln -s "$REPO/kernels" "$SHADOW/simmim_fast/kernels"
ln -s "$REPO/benchmarks" "$SHADOW/benchmarks"
ln -s "$REPO/tests" "$SHADOW/tests"  # the precompile runs tests/compile_only.py
export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
WORK="$SHADOW/work"
mkdir "$WORK"
# Results: benchmarks/results/<device-slug>/<date>-<commit>-part<N>/ on the device; a temporary folder in
# the dry run (smoke numbers are not results).
if [ "$DRY_RUN" = 1 ]; then RESULTS_ROOT="$SHADOW/benchmarks-smoke"
else RESULTS_ROOT="$REPO/benchmarks/results/$(cd "$SHADOW" && "$PY" -c 'import torch
from benchmarks.device import RESULTS_ROOT, results_folder
print(results_folder(torch.device("cuda"), False).relative_to(RESULTS_ROOT))')"
fi
cd "$SHADOW"
if ! GPU_CHECK_DRY_RUN=$DRY_RUN "$PY" - <<'PY'
import os, torch, triton, simmim_fast, simmim_fast.kernels as kernels
dry_run = os.environ["GPU_CHECK_DRY_RUN"] == "1"
assert dry_run or torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"simmim_fast from {simmim_fast.__file__}, kernels from {kernels.__file__}")
print(f"torch {torch.__version__} CUDA {torch.version.cuda}, triton {triton.__version__}, "
      f"{'dry run on the CPU' if dry_run else torch.cuda.get_device_name()}")
PY
then
  echo "!!! the package or CUDA is not usable; nothing else can run"
  exit 1
fi
PTXAS=$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))')
echo "toolchain: gcc $(gcc -dumpfullversion 2>/dev/null || echo MISSING), ptxas $("$PTXAS" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' || true)$([ -x "$PTXAS" ] || echo MISSING) ($PTXAS), $(nproc) cores"
if ! command -v gcc > /dev/null || [ ! -x "$PTXAS" ]; then
  echo "!!! Triton needs gcc (its launchers) and ptxas (its cubins): no kernel can run"; exit 1
fi
[ "$DRY_RUN" = 1 ] || nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu \
  --format=csv 2>/dev/null || true

section "precompile: every Triton specialisation of the headline, in parallel workers"
capped "$(left 300)" "precompile" env -u TRITON_INTERPRET "$PY" -m benchmarks.precompile "${PRECOMPILE_ARGS[@]}" \
  --json "$WORK/precompile.json"
[ -f "$WORK/precompile.json" ] || echo '{"specialisations": 0, "seconds_per_specialisation": 1.0}' > "$WORK/precompile.json"

section "budget table (predicted device seconds; benchmarks/gpu_budget.py)"
BUDGET_ARGS=(--precompile-json "$WORK/precompile.json")
if [ "$DRY_RUN" = 1 ]; then
  BUDGET_ARGS+=(--tests-training "$(count_tests training)" --tests-rest "$(count_tests 'not training')" --check)
fi
capped 120 "budget table (part 1 must fit)" "$PY" -m benchmarks.gpu_budget "${BUDGET_ARGS[@]}"

if [ "$PART" != 2 ]; then
  section "part 1: headline benchmarks (eager: reference, simmim_fast, transformers; attention vs SDPA; loss GB/s)"
  benchmarks 1 "headline benchmarks" all "${HEADLINE_BATCH_ARGS[@]}" --ops "${HEADLINE_OPS[@]}" \
    --providers reference simmim_fast transformers transformers-beit triton sdpa
  section "part 1: training configuration numerics (-m training: bf16 autocast, whole ViT-B and Swin-B steps)"
  cap=$(left 15); [ "$cap" -gt "$TRAINING_CAP_S" ] && [ "$DRY_RUN" = 1 ] && cap=$TRAINING_CAP_S
  tests "$cap" "training" "training"
fi

if [ "$PART" != 1 ]; then
  # Part 1 gives the training numerics only what its benchmarks leave (on a slow start, nothing): they are
  # the first check of every op on the GPU, so part 2 opens with them. The dry run ran them in part 1.
  section "part 2: training configuration numerics again, first"
  if [ "$PART" = 2 ]; then
    cap=$(left 15); [ "$cap" -gt "$TRAINING_CAP_S" ] && cap=$TRAINING_CAP_S
    tests "$cap" "training (part 2)" "training"
  else
    echo "dry run: part 1 ran them"
  fi
  section "part 2: compiled e2e providers (torch.compile of the reference, ours compiled, ours with CUDA graphs)"
  if [ "$DRY_RUN" = 1 ]; then
    # A cold torch.compile of a model takes minutes on 2 cores: here only the selection is checked (budget 0:
    # every compiled row is listed as skipped).
    capped 120 "compiled benchmarks (selection only)" env -u TRITON_INTERPRET "$PY" -m benchmarks.run --suite e2e \
      "${BENCHMARK_ARGS[@]}" --out "$RESULTS_ROOT/part2" --e2e-budget-s 0 --providers $COMPILED_PROVIDERS
  else
    benchmarks 2 "compiled benchmarks" e2e "${HEADLINE_BATCH_ARGS[@]}" --providers $COMPILED_PROVIDERS
  fi
  section "part 2: the other GPU and kernel tests (-m 'gpu or interpreter', natively on CUDA)"
  cap=$(left 120); [ "$cap" -gt "$REST_CAP_S" ] && cap=$REST_CAP_S
  tests "$cap" "rest" "not training" "${REST_ONLY_COLLECT[@]}"
  section "part 2: input pipeline (--suite data: CPU paths, and GPU JPEG decode where torchvision can)"
  DATA_OUT=${OUT:-$SHADOW}/data-benchmark
  cap=$(left 60); [ "$cap" -gt 60 ] && cap=60
  capped "$cap" "data benchmark" "$PY" -m benchmarks.run --suite data --data-workers 4 \
    $([ "$DRY_RUN" = 1 ] && echo --smoke) --out "$DATA_OUT"
  cat "$DATA_OUT/data.md" 2>/dev/null
  section "part 2: pretrain --decode gpu (JPEGs decoded by nvJPEG in the training process; dry run: the CPU fallback)"
  cap=$(left 5); [ "$cap" -gt 45 ] && cap=45
  capped "$cap" "pretrain --decode gpu" env -u TRITON_INTERPRET SIMMIM_FAST_AUTOTUNE=0 \
    "$PY" -m benchmarks.decode_smoke --device "$([ "$DRY_RUN" = 1 ] && echo cpu || echo cuda)"
fi

section "results"
if [ "$DRY_RUN" = 0 ] && [ -n "${OUT:-}" ] && [ -d "$RESULTS_ROOT" ]; then
  # <device-slug>/<date>-<commit>/part<N>/...: untar under benchmarks/results/ to commit it as it is.
  tar -czf "$OUT/benchmark-results-part$PART.tgz" -C "$REPO/benchmarks/results" "${RESULTS_ROOT#"$REPO/benchmarks/results/"}"
  cp "$WORK/precompile.json" "$OUT/precompile.json" 2>/dev/null
  echo "copied to \$OUT: benchmark-results-part$PART.tgz, precompile.json, gpu_check.log"
fi
echo "finished in $(elapsed) s; failed sections: ${FAILED[*]:-none}"
for summary in "$RESULTS_ROOT"/part*/summary.md; do
  [ -f "$summary" ] && { echo; echo "--- $summary"; cat "$summary"; }
done
[ ${#FAILED[@]} -eq 0 ]
