#!/usr/bin/env bash
# The project's test command (README.md). Sets up .venv, then runs the lanes:
#   plain       every CPU test on the reference path (kernel tests deselected)
#   interpreter the Triton kernel tests under TRITON_INTERPRET=1 with SIMMIM_FAST_BACKEND=triton
# `bash tests/run.sh plain` (or any list of lanes) runs only those.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
PY=.venv/bin/python
lanes=${*:-plain interpreter}
for lane in $lanes; do
  echo "=== lane: $lane"
  case "$lane" in
    plain) $PY -m pytest -q -m "not interpreter" tests ;;
    interpreter) TRITON_INTERPRET=1 SIMMIM_FAST_BACKEND=triton $PY -m pytest -q -m interpreter tests ;;
    *) echo "unknown lane $lane" >&2; exit 2 ;;
  esac
done
