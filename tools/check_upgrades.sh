#!/usr/bin/env bash
# Not part of CI: runs the downstream lane (exports into timm and transformers, augmentation against timm)
# with the newest releases of its third-party libraries instead of the pins in tools/constraints/cuda.txt,
# and prints which versions moved and what breaks, so that raising a pin stays a decision.
# torch and torchvision stay pinned (the lane's local CUDA build and the torchvision that loads beside it).
#   bash tools/check_upgrades.sh            # venv in .venv-upgrades (kept between runs; ~5.5 GB)
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-upgrades}
UPGRADED=(timm transformers huggingface_hub kernels safetensors)
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
# Everything but the upgraded packages at the lane's pins; those at their newest releases.
grep -v -i -E "^($(IFS='|'; echo "${UPGRADED[*]}" | sed 's/_/[-_]/g'))==" tools/constraints/cuda.txt > "$VENV/pins.txt"
"$VENV/bin/python" -m pip install -q -c "$VENV/pins.txt" "torch==2.14.1" "torchvision==0.29.1" "numpy<2.4" \
  pytest pillow pyyaml tqdm matplotlib
"$VENV/bin/python" -m pip install -q --upgrade -c "$VENV/pins.txt" "${UPGRADED[@]}"
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
echo "=== versions that differ from tools/constraints/cuda.txt"
"$VENV/bin/python" -m pip freeze --all 2>/dev/null | grep -v -i -E "^-e |simmim" | sort > "$VENV/freeze.txt"
grep -v "^#" tools/constraints/cuda.txt | sort | comm -13 - "$VENV/freeze.txt" | sed 's/^/  now /'
echo "=== the downstream lane against them"
"$VENV/bin/python" -m pytest -q -m downstream -rf tests/test_downstream_libraries.py tests/test_third_party_imports.py \
  tests/test_gpu_decode_pretrain.py
status=$?
[ $status = 0 ] && echo "=== nothing breaks: the pins can be raised to the versions above" \
  || echo "=== the failures above are what raising the pins would break"
exit $status
