"""Results on disk (CSV, JSON, markdown summary, PNG plots) and the regression check between runs."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .kernel_cases import MODES

KERNEL_COLUMNS = (
    "op", "case", "mode", "dtype", "provider", "status", "reason", "median_ms", "p20_ms", "p80_ms", "reps",
    "host_ms_per_call", "input_sets", "speedup_vs_reference", "speedup_vs_compile", "gbps", "tflops", "bytes", "flops",
    "bandwidth_fraction_measured", "bandwidth_fraction_datasheet", "matmul_fraction_measured",
    "matmul_fraction_datasheet", "roofline_fraction", "peak_mem_mb", "max_rel_error_vs_reference", "first_call_s",
)
E2E_COLUMNS = (
    "model", "batch", "provider", "status", "reason", "images_per_s", "speedup_vs_reference", "speedup_vs_compile",
    "speedup_vs_transformers", "step_ms_median", "step_ms_p20", "step_ms_p80", "host_ms_per_step", "reps",
    "forward_gflops_per_image", "achieved_tflops",
    "mfu_vs_measured_matmul", "mfu_vs_datasheet", "peak_mem_gb", "first_step_s", "tune_s", "first_loss", "backends", "telemetry",
    "sm_clock_mhz_median", "sm_clock_mhz_min", "power_w_median", "power_w_max", "memory_used_gb_max",
    "gpu_util_pct_median",
)
KERNEL_KEY = ("op", "case", "mode", "dtype", "provider")
E2E_KEY = ("model", "batch", "provider")
HOST_BOUND_MARK = "†"
REGRESSION_THRESHOLD = 0.05  # slower by more than 5% is a regression
RESULTS_JSON = "results.json"


def error_reason(error: Exception) -> str:
    """How a failed measurement is recorded: the exception's type and first line."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:400]


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return None if numerator is None or not denominator else numerator / denominator


def annotate_kernel_rows(rows: List[Dict], ceilings: Dict) -> None:
    """Speed-ups against the baselines of the same (op, case, mode, dtype), and every achieved rate
    as a fraction of the measured ceilings and of the datasheet."""
    baseline_ms = {(row["op"], row["case"], row["mode"], row["dtype"], row["provider"]): row["median_ms"]
                   for row in rows if row["status"] == "ok"}
    sheet = ceilings.get("datasheet") or {}
    for row in (row for row in rows if row["status"] == "ok"):
        group = (row["op"], row["case"], row["mode"], row["dtype"])
        row["speedup_vs_reference"] = _ratio(baseline_ms.get(group + ("reference",)), row["median_ms"])
        row["speedup_vs_compile"] = _ratio(baseline_ms.get(group + ("compile",)), row["median_ms"])
        row["bandwidth_fraction_measured"] = _ratio(row["gbps"], ceilings["copy_gbps"])
        row["bandwidth_fraction_datasheet"] = _ratio(row["gbps"], sheet.get("bandwidth_gbps"))
        row["matmul_fraction_measured"] = _ratio(row["tflops"], ceilings["matmul_tflops"])
        row["matmul_fraction_datasheet"] = _ratio(row["tflops"], sheet.get("bf16_tflops"))
        # Ideal time at the measured ceilings (whichever binds) over the time taken.
        ideal_s = max(row["bytes"] / (ceilings["copy_gbps"] * 1e9), row["flops"] / (ceilings["matmul_tflops"] * 1e12))
        row["roofline_fraction"] = ideal_s / (row["median_ms"] * 1e-3)


def annotate_e2e_rows(rows: List[Dict]) -> None:
    rate = {(row["model"], row["batch"], row["provider"]): row["images_per_s"] for row in rows if row["status"] == "ok"}
    for row in (row for row in rows if row["status"] == "ok"):
        group = (row["model"], row["batch"])
        row["speedup_vs_reference"] = _ratio(row["images_per_s"], rate.get(group + ("reference",)))
        row["speedup_vs_compile"] = _ratio(row["images_per_s"], rate.get(group + ("compile",)))
        # against what users run instead: the transformers model, compiled where this row is compiled
        compiled = any(word in row["provider"] for word in ("compile", "cudagraphs"))
        row["speedup_vs_transformers"] = _ratio(
            row["images_per_s"], rate.get(group + ("transformers+compile" if compiled else "transformers",)))


def write_csv(path: Path, rows: Iterable[Dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({column: "" if row.get(column) is None else row.get(column) for column in columns})


def load_results(folder: Path) -> Dict:
    path = Path(folder) / RESULTS_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no {RESULTS_JSON} in {folder}: not a benchmarks results folder")
    return json.loads(path.read_text())


# ---- markdown -----------------------------------------------------------------------------------

def _fmt(value: Optional[float], spec: str = ".3g", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _kernel_cell(row: Dict) -> str:
    cell = _fmt(row["median_ms"], ".4g") + (HOST_BOUND_MARK if _host_bound(row) else "")
    ratios = []
    if row["provider"] != "reference" and row.get("speedup_vs_reference") is not None:
        ratios.append(f"{row['speedup_vs_reference']:.2f}× ref")
    if row["provider"] not in ("reference", "compile") and row.get("speedup_vs_compile") is not None:
        ratios.append(f"{row['speedup_vs_compile']:.2f}× compile")
    return cell + (f" ({', '.join(ratios)})" if ratios else "")


def _host_bound(row: Dict) -> bool:
    return row.get("host_ms_per_call") is not None and row["host_ms_per_call"] > row["median_ms"]


def kernel_table(rows: List[Dict], provider_order: Sequence[str]) -> List[str]:
    ok = [row for row in rows if row["status"] == "ok"]
    providers = [name for name in provider_order if any(row["provider"] == name for row in ok)]
    if not ok:
        return ["No kernel measurement ran."]
    header = ["op", "case", "mode", "dtype"] + [f"{name} ms" for name in providers] + ["best % of roofline"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: Dict[Tuple, Dict[str, Dict]] = {}
    for row in ok:
        groups.setdefault((row["op"], row["case"], row["mode"], row["dtype"]), {})[row["provider"]] = row
    for group, by_provider in groups.items():
        cells = [_kernel_cell(by_provider[name]) if name in by_provider else "–" for name in providers]
        best = max(by_provider.values(), key=lambda row: row["roofline_fraction"])
        best_cell = f"{best['roofline_fraction']:.0%} ({best['provider']})"
        lines.append("| " + " | ".join(list(group) + cells + [best_cell]) + " |")
    return lines


def e2e_table(rows: List[Dict]) -> List[str]:
    header = ["model", "batch", "provider", "images/s", "× reference", "× compile", "× transformers", "MFU (measured matmul)",
              "MFU (datasheet)", "peak GB", "host ms/step", "SM clock MHz", "power W", "first step s",
              "op backends (eager)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in (row for row in rows if row["status"] == "ok"):
        lines.append("| " + " | ".join([
            row["model"], str(row["batch"]), row["provider"], _fmt(row["images_per_s"], ".1f"),
            _fmt(row.get("speedup_vs_reference"), ".2f", "×"), _fmt(row.get("speedup_vs_compile"), ".2f", "×"),
            _fmt(row.get("speedup_vs_transformers"), ".2f", "×"), _fmt(row["mfu_vs_measured_matmul"], ".1%"), _fmt(row.get("mfu_vs_datasheet"), ".1%"),
            _fmt(row.get("peak_mem_gb"), ".1f"), _fmt(row.get("host_ms_per_step"), ".2f"),
            _fmt(row.get("sm_clock_mhz_median"), ".0f"),
            _fmt(row.get("power_w_median"), ".0f"), _fmt(row["first_step_s"], ".1f"), row.get("backends") or "–"])
            + " |")
    return lines if len(lines) > 2 else ["No end-to-end measurement ran."]


def not_run_list(rows: List[Dict], what: str) -> List[str]:
    """Each distinct (provider, status, reason) once, with how many measurements it covers."""
    counts: Dict[Tuple[str, str, str], int] = {}
    for row in rows:
        if row["status"] != "ok":
            key = (row["provider"], row["status"], row["reason"])
            counts[key] = counts.get(key, 0) + 1
    return [f"- {what} `{provider}` {status} ({count}×): {reason}"
            for (provider, status, reason), count in counts.items()]


def summary_markdown(results: Dict, kernel_providers: Sequence[str]) -> str:
    env, ceilings = results["environment"], results["ceilings"]
    sheet = ceilings.get("datasheet") or {}
    cpu = env["device_type"] != "cuda"
    lines = [f"# simmim_fast benchmarks: {env['device']}", ""]
    if cpu or results["settings"].get("smoke"):
        lines += ["**CPU / smoke run: these numbers only show that every path runs; they are not GPU results.**", ""]
    lines += [
        f"{env['date_utc']}, commit `{env['git_commit']}`{' (dirty tree)' if env['git_dirty'] else ''}; "
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, driver {env['driver']}, "
        f"python {env['python']}. Settings: `{json.dumps(results['settings'], sort_keys=True)}`.", "",
        "## Ceilings (measured in this run)", "",
        "| | measured | datasheet |", "|---|---|---|",
        f"| copy bandwidth (read + write) | {ceilings['copy_gbps']:.0f} GB/s | "
        f"{_fmt(sheet.get('bandwidth_gbps'), '.0f', ' GB/s')} |",
        f"| matmul {ceilings['matmul_size']}³ {ceilings['matmul_dtype'].replace('torch.', '')} | "
        f"{ceilings['matmul_tflops']:.1f} TFLOP/s | {_fmt(sheet.get('bf16_tflops'), '.0f', ' TFLOP/s (dense bf16)')} |",
        "", f"Datasheet entry matched: {sheet.get('matched') or 'none (not in DATASHEET, benchmarks/device.py)'}.", "",
    ]
    if results.get("kernels"):
        lines += ["## Kernels", "",
                  "Median GPU ms per call (inputs rotated; on CUDA the host's enqueue time is kept out and "
                  f"recorded apart: {HOST_BOUND_MARK} marks a call whose host time exceeds its GPU time, so "
                  "that a loop of it alone is host-bound). Speed-up = baseline time / this provider's time. "
                  "Roofline = time at the measured copy bandwidth or matmul rate for the op's minimum bytes "
                  "and FLOPs (benchmarks/kernel_cases.py), over the time taken.", ""]
        lines += kernel_table(results["kernels"], kernel_providers) + [""]
        lines += not_run_list(results["kernels"], "kernel provider") + [""]
    if results.get("e2e"):
        lines += ["## End-to-end training step", "",
                  "Forward (bf16 autocast on CUDA) + backward + fused AdamW; MFU counts 3× the model's forward "
                  "matmul FLOPs (benchmarks/flops.py) against the matmul rate above.", ""]
        lines += e2e_table(results["e2e"]) + [""]
        lines += not_run_list(results["e2e"], "e2e provider") + [""]
    return "\n".join(lines)


# ---- plots --------------------------------------------------------------------------------------

def _grouped_bars(axis, labels: Sequence[str], values_by_provider: Dict[str, Dict[str, float]]) -> None:
    """One bar per (label, provider) that has a value, providers side by side within each label."""
    width = 0.8 / max(len(values_by_provider), 1)
    for index, (provider, values) in enumerate(values_by_provider.items()):
        present = [(i, values[label]) for i, label in enumerate(labels) if values.get(label)]
        axis.bar([i + index * width for i, _ in present], [value for _, value in present], width, label=provider)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])


def write_plots(folder: Path, results: Dict, kernel_providers: Sequence[str]) -> List[Path]:
    try:
        import matplotlib
    except ImportError:
        print("plots not written: matplotlib is not installed")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(figure, name):
        figure.tight_layout()
        written.append(folder / name)
        figure.savefig(written[-1], dpi=110)
        plt.close(figure)

    kernels = [row for row in results.get("kernels", []) if row["status"] == "ok" and row["provider"] != "reference"]
    if kernels:
        modes = [mode for mode in MODES if any(r["mode"] == mode for r in kernels)]
        providers = [name for name in kernel_providers if any(r["provider"] == name for r in kernels)]
        labels = list(dict.fromkeys(f"{r['op']}\n{r['case']}" for r in kernels))
        figure, axes = plt.subplots(len(modes), 1, figsize=(max(8, 0.9 * len(labels)), 4 * len(modes)), squeeze=False)
        for axis, mode in zip(axes[:, 0], modes):
            _grouped_bars(axis, labels, {
                provider: {f"{r['op']}\n{r['case']}": r["speedup_vs_reference"] for r in kernels
                           if r["mode"] == mode and r["provider"] == provider}
                for provider in providers})
            axis.axhline(1.0, color="black", linewidth=0.8)
            axis.set_yscale("log")
            axis.set_ylabel(f"{mode}\nspeed-up vs eager")
            axis.set_xticklabels(labels, fontsize=6, rotation=60, ha="right")
            axis.legend(fontsize=7)
        figure.suptitle(f"simmim_fast kernels on {results['environment']['device']}")
        save(figure, "kernels_speedup.png")
    e2e = [row for row in results.get("e2e", []) if row["status"] == "ok"]
    if e2e:
        groups = list(dict.fromkeys(f"{r['model']} b{r['batch']}" for r in e2e))
        providers = list(dict.fromkeys(r["provider"] for r in e2e))
        figure, axis = plt.subplots(figsize=(max(6, 2 * len(groups)), 4))
        _grouped_bars(axis, groups, {
            provider: {f"{r['model']} b{r['batch']}": r["images_per_s"] for r in e2e if r["provider"] == provider}
            for provider in providers})
        axis.set_xticklabels(groups)
        axis.set_ylabel("images/s (training step)")
        axis.legend(fontsize=8)
        axis.set_title(f"SimMIM training throughput on {results['environment']['device']}")
        save(figure, "e2e_images_per_s.png")
    return written


# ---- regression check ---------------------------------------------------------------------------

def find_regressions(old: Dict, new: Dict, threshold: float = REGRESSION_THRESHOLD) -> Tuple[List[str], int]:
    """Lines describing every measurement more than ``threshold`` slower in ``new``, and how many
    measurements both runs have. Kernels compare median ms; e2e compares median step time."""
    regressions, compared = [], 0
    for suite, key_fields, time_field in (("kernels", KERNEL_KEY, "median_ms"), ("e2e", E2E_KEY, "step_ms_median")):
        before = {tuple(row[f] for f in key_fields): row[time_field]
                  for row in old.get(suite, []) if row.get("status") == "ok"}
        for row in new.get(suite, []):
            key = tuple(row[f] for f in key_fields)
            if row.get("status") != "ok" or key not in before:
                continue
            compared += 1
            slowdown = row[time_field] / before[key] - 1.0
            if slowdown > threshold:
                regressions.append(f"{suite} {' / '.join(map(str, key))}: {before[key]:.4g} -> "
                                   f"{row[time_field]:.4g} ms ({slowdown:+.1%})")
    return regressions, compared


def write_results(folder: Path, results: Dict, kernel_providers: Sequence[str], plots: bool = True) -> List[Path]:
    """results.json, kernels.csv, e2e.csv, summary.md and (``plots``) the PNGs; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / RESULTS_JSON, folder / "kernels.csv", folder / "e2e.csv", folder / "summary.md"]
    written[0].write_text(json.dumps(results, indent=1, default=str))
    write_csv(written[1], results.get("kernels", []), KERNEL_COLUMNS)
    write_csv(written[2], results.get("e2e", []), E2E_COLUMNS)
    written[3].write_text(summary_markdown(results, kernel_providers))
    return written + (write_plots(folder, results, kernel_providers) if plots else [])
