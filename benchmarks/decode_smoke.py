"""``simmim-fast pretrain --decode gpu`` for a few steps on a folder of JPEGs (benchmarks/gpu_check.sh).

On CUDA the run must decode on the GPU: no fallback line, "decode gpu" in its description, a finite
loss. With ``--device cpu`` (the script's dry run) it must fall back to the CPU path with one line
that says why, and still train. Exit 0 when it did what it should, 1 otherwise.

    python -m benchmarks.decode_smoke --device cuda|cpu
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from simmim_fast.train.scenes import render_scene

IMAGES = 24
STEPS = 4


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "data"
        data.mkdir()
        for index in range(IMAGES):  # 320x240 to 480x360 JPEGs: draft-free crops at 64 px
            render_scene(index, 480).resize((320 + 8 * index, 240 + 6 * index)).save(data / f"{index}.jpg", quality=90)
        command = [sys.executable, "-m", "simmim_fast.cli", "pretrain", "--preset", "vit-tiny", "--data", str(data),
                   "--decode", "gpu", "--device", args.device, "--backend", "reference", "--steps", str(STEPS),
                   "--batch-size", "8", "--num-workers", "2", "--log-every", "1", "--picture-every", "1000",
                   "--output", str(Path(work) / "run")]
        print(" ".join(command[1:]))
        run = subprocess.run(command, capture_output=True, text=True)
    output = run.stdout + run.stderr
    print("\n".join(line for line in output.splitlines() if line.strip() and "step/s" not in line)[-3000:])
    fallback = [line for line in output.splitlines() if line.startswith("warning: --decode gpu")]
    if run.returncode != 0:
        print(f"!!! pretrain --decode gpu exited {run.returncode}")
        return 1
    if args.device == "cuda" and (fallback or "decode gpu;" not in output):
        print(f"!!! pretrain --decode gpu did not decode on the GPU: {fallback[0] if fallback else 'no decode gpu'}")
        return 1
    if args.device == "cpu" and len(fallback) != 1:
        print(f"!!! expected one line saying why GPU decoding falls back on the CPU, got {len(fallback)}")
        return 1
    print(f"pretrain --decode gpu on {args.device}: "
          f"{'decoded on the GPU' if args.device == 'cuda' else 'fell back with: ' + fallback[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
