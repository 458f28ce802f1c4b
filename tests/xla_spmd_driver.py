"""Runs `simmim-fast pretrain` one or more times in one process on torch_xla's CPU device (the device count
comes from CPU_NUM_DEVICES, fixed per process) and records torch_xla's counters after every step.

tests/test_xla.py starts it as `python tests/xla_spmd_driver.py SPEC.json RESULT.json`. SPEC: a list of
runs, each {"argv": [...], "resume_from": CHECKPOINT or null}; resume_from is copied into the run's
--output first, so the run continues from it. RESULT: per run, per step (at the step's sync, before the
step's logging and saving) the process's totals of compiled graphs, cached graphs and device->host
transfers, then the run's exit status and the aten ops that fell back to the CPU so far (torch_xla's aten::*
counters).
"""
import json
import shutil
import sys
from pathlib import Path

import torch_xla.debug.metrics as metrics

import simmim_fast.train.loop as loop
from simmim_fast.cli import main as cli_main


def counters():
    transfers = metrics.metric_data("TransferFromDeviceTime")
    return {"compiled": metrics.counter_value("UncachedCompile") or 0,
            "cached": metrics.counter_value("CachedCompile") or 0,
            "to_host": transfers[0] if transfers else 0}


def main(spec_path: str, result_path: str) -> None:
    results = []
    sync = loop.xla_sync
    for run in json.loads(Path(spec_path).read_text()):
        steps = []

        def recording_sync():
            sync()
            steps.append(counters())

        argv = run["argv"]
        if run.get("resume_from"):
            output = Path(argv[argv.index("--output") + 1])
            output.mkdir(parents=True, exist_ok=True)
            shutil.copy(run["resume_from"], output)
        loop.xla_sync = recording_sync
        status = cli_main(argv)
        results.append({"status": status, "steps": steps,
                        "fallbacks": sorted(name for name in metrics.counter_names() if name.startswith("aten::"))})
    Path(result_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
