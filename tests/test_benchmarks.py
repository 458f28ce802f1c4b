"""The benchmark harness (benchmarks/): the smoke run of every path, and the arithmetic behind the
numbers it reports (FLOPs, bytes, quantiles, regression detection, datasheet matching)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parent.parent
# benchmarks/ is a top-level folder of the checkout, not installed. Appended, never prepended: the
# checkout's simmim_fast/ lacks simmim_fast.kernels (pyproject.toml maps it), so it must not shadow the
# installed package or gpu_check.sh's linked one.
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.device import datasheet_for  # noqa: E402
from benchmarks.flops import simmim_forward_flops, training_step_flops  # noqa: E402
from benchmarks.kernel_cases import all_cases, traffic  # noqa: E402
from benchmarks.timing import TimingPlan, benchmark, quantile  # noqa: E402
from simmim_fast import MaskGenerator, build_simmim, get_config, use_backend  # noqa: E402
from simmim_fast.models import SimMIM, VisionTransformerForSimMIM  # noqa: E402

# The smoke run takes ~25 s of CPU on 2 cores; the cap only stops a hung run (shared CI machines are slow).
SMOKE_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "SIMMIM_FAST_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "benchmarks.run", "--suite", "all", "--smoke", "--device", "cpu",
               "--out", str(out)]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                               timeout=SMOKE_TIMEOUT_S)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return out, completed.stdout


def _csv(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


@pytest.mark.slow
def test_smoke_run_writes_every_file_with_the_expected_columns(smoke_results):
    out, stdout = smoke_results
    for name in ("results.json", "kernels.csv", "e2e.csv", "summary.md", "e2e_images_per_s.png"):
        assert (out / name).is_file(), f"{name} missing; stdout:\n{stdout[-2000:]}"
    columns, kernel_rows = _csv(out / "kernels.csv")
    assert columns == list(report.KERNEL_COLUMNS)
    columns, e2e_rows = _csv(out / "e2e.csv")
    assert columns == list(report.E2E_COLUMNS)

    ok = [row for row in kernel_rows if row["status"] == "ok"]
    assert {row["op"] for row in ok} == {case.op for case in all_cases(smoke=True)}
    assert {row["mode"] for row in ok} == {"forward", "backward", "forward+backward"}
    assert all(row["provider"] == "reference" and float(row["median_ms"]) > 0 for row in ok)
    # Backends that cannot run here are recorded with their reasons, never silently dropped.
    skipped = {row["provider"]: row["reason"] for row in kernel_rows if row["status"] == "skipped"}
    assert "sdpa" in skipped and "cpu" in skipped["sdpa"]
    assert "triton" in skipped and skipped["triton"]

    assert {(row["model"], row["provider"]) for row in e2e_rows if row["status"] == "ok"} == {
        (model, provider) for model in ("vit-tiny", "swin-tiny")
        for provider in ("reference", "simmim_fast", "transformers")} | {("vit-tiny", "transformers-beit")}
    # What users run instead, at the same shapes: our model's ratio to it is reported.
    ours = {row["model"]: row for row in e2e_rows if row["provider"] == "simmim_fast"}
    assert all(float(row["speedup_vs_transformers"]) > 0 for row in ours.values())
    backends = {row["model"]: row["backends"] for row in e2e_rows if row["provider"] == "transformers"}
    assert backends == {"vit-tiny": "transformers ViTForMaskedImageModeling (sdpa attention)",
                        "swin-tiny": "transformers SwinForMaskedImageModeling (eager attention)"}
    assert all(float(row["images_per_s"]) > 0 and float(row["forward_gflops_per_image"]) > 0 for row in e2e_rows)

    results = json.loads((out / "results.json").read_text())
    for key in ("device", "torch", "triton", "cuda", "driver", "git_commit", "git_dirty", "python"):
        assert key in results["environment"]
    assert results["ceilings"]["copy_gbps"] > 0 and results["ceilings"]["matmul_tflops"] > 0
    summary = (out / "summary.md").read_text()
    assert "not GPU results" in summary and "| op | case | mode |" in summary and "images/s" in summary


@pytest.mark.slow
def test_data_suite_smoke_measures_every_cpu_path_with_equal_crop_statistics(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "benchmarks.run", "--suite", "data", "--smoke", "--device", "cpu",
               "--out", str(tmp_path)]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                               timeout=SMOKE_TIMEOUT_S)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    from benchmarks.data import DATA_COLUMNS

    columns, rows = _csv(tmp_path / "data.csv")
    assert columns == list(DATA_COLUMNS)
    ok = [row for row in rows if row["status"] == "ok"]
    assert {(row["path"], row["img_size"]) for row in ok} == {
        (path, size) for path in ("original", "fast", "prepared", "prepared-small", "prepared-raw")
        for size in ("192", "224")}
    assert all(float(row["images_per_s_per_core"]) > 0 and float(row["loader_images_per_s"]) > 0 for row in ok)
    assert all(row["crop_stats_match"] == "True" for row in ok)
    skipped = [row for row in rows if row["status"] == "skipped"]
    assert [row["path"] for row in skipped] == ["gpu-decode"] * 2 and "CUDA" in skipped[0]["reason"]
    assert "| fast | 224 |" in (tmp_path / "data.md").read_text()
    assert {row["max_side"] for row in ok if row["path"].startswith("prepared")} == {"224", "256", "313", "365"}
    assert json.loads((tmp_path / "data.json").read_text())["settings"]["suite"] == "data"


def _tiny_simmim_vit():
    encoder = VisionTransformerForSimMIM(img_size=8, patch_size=4, in_chans=3, num_classes=0, embed_dim=8, depth=1,
                                         num_heads=2, mlp_ratio=4, qkv_bias=True, use_abs_pos_emb=False,
                                         use_shared_rel_pos_bias=False, use_mean_pooling=False)
    return SimMIM(encoder=encoder, encoder_stride=4)


def test_flop_counter_matches_a_hand_count_for_a_tiny_vit():
    # 8x8 image, patch 4: L = 4 patches, N = 5 tokens, D = 8, MLP hidden 32, decoder 8 -> 4*4*3 = 48.
    patch_embed = 4 * 8 * (3 * 4 * 4)
    block = 5 * 8 * 24 + 2 * 5 * 5 * 8 + 5 * 8 * 8 + 2 * 5 * 8 * 32  # qkv, q k^T and p v, proj, fc1 + fc2
    decoder = (2 * 2) * 8 * 48
    counted = simmim_forward_flops(_tiny_simmim_vit(), image_size=8)
    assert counted == {"encoder": 2 * (patch_embed + block), "decoder": 2 * decoder,
                       "total": 2 * (patch_embed + block + decoder)}
    assert training_step_flops(_tiny_simmim_vit(), 8, batch=3) == 3 * 3 * counted["total"]


@pytest.mark.parametrize("preset", ["vit-tiny", "swin-tiny"])
def test_flop_counter_matches_torch_flop_counter_on_the_reference_path(preset):
    model = build_simmim(preset)
    config = get_config(preset)
    size = config.DATA.IMG_SIZE
    masks = MaskGenerator(size, config.DATA.MASK_PATCH_SIZE, model.patch_size, 0.6)
    with use_backend("reference"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size), masks.generate(1))
    assert simmim_forward_flops(model, size)["total"] == counter.get_total_flops()


def test_byte_and_flop_counts_by_hand():
    tokens = torch.zeros(2, 4, 8)  # fp32: 256 bytes
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]])  # int64: 64 bytes, half masked
    blend = dict(tokens=tokens, mask=mask, mask_token=torch.zeros(1, 1, 8))
    # Forward: unmasked half of the tokens, the mask, the mask token in; the output out.
    assert traffic("mask_token_blend", blend, "forward") == (0.5 * 256 + 64 + 32 + 256, 0.0)
    assert traffic("mask_token_blend", blend, "backward") == (256 + 64 + 256 + 32, 0.0)

    q = torch.zeros(1, 1, 4, 8)  # 128 bytes
    attention = dict(q=q, k=q, v=q, bias=torch.zeros(1, 4, 4))  # bias: 64 bytes
    forward_flops = 4 * 1 * 1 * 4 * 4 * 8
    assert traffic("attention", attention, "forward") == (3 * 128 + 64 + 128, forward_flops)
    log_sum_exp = 4 * 4
    assert traffic("attention", attention, "backward") == (5 * 128 + log_sum_exp + 64 + 3 * 128 + 64,
                                                           2.5 * forward_flops)
    both = traffic("attention", attention, "forward+backward")
    assert both == (576 + 1168, 3.5 * forward_flops)

    # Decoder loss, stride 4, patch 2: a 2x2 feature grid; one of its 4 cells has masked pixels.
    decoder_mask = torch.zeros(1, 4, 4, dtype=torch.long)
    decoder_mask[0, 0, 1] = 1
    decoder = dict(features=torch.zeros(1, 16, 2, 2), mask=decoder_mask, weight=torch.zeros(48, 16, 1, 1),
                   bias=torch.zeros(48), target=torch.zeros(1, 3, 8, 8), encoder_stride=4, patch_size=2, in_chans=3)
    moved, flops = traffic("masked_decoder_loss", decoder, "forward")
    assert flops == 2 * 1 * 16 * 48  # one decoded cell of 16 channels into 48 outputs
    assert moved == 0.25 * 256 + (1 / 16) * 768 + 128 + 48 * 16 * 4 + 48 * 4


def test_quantile_matches_numpy():
    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 100):
        values = rng.random(size).tolist()
        for q in (0.0, 0.2, 0.5, 0.8, 1.0):
            assert quantile(values, q) == pytest.approx(np.quantile(values, q))
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_benchmark_rotates_inputs_and_keeps_preparation_out_of_the_samples():
    seen, prepared = [], []
    calls = [lambda i=i: seen.append(i) for i in range(3)]
    plan = TimingPlan(warmup_ms=0.0, min_warmup=2, target_ms=0.0, min_reps=7, max_reps=7)
    timing = benchmark(calls, torch.device("cpu"), plan, before_each=prepared.append)
    assert timing.reps == 7 and timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert seen == [0, 1] + [i % 3 for i in range(7)]
    assert len(prepared) == 2 + 7


def _synthetic_results(kernel_ms, e2e_ms, device="NVIDIA H100 80GB HBM3"):
    kernels = [dict(op="attention", case="c", mode=mode, dtype="bfloat16", provider="triton", status="ok",
                    median_ms=ms) for mode, ms in kernel_ms.items()]
    kernels.append(dict(op="attention", case="c", mode="forward", dtype="bfloat16", provider="sdpa",
                        status="skipped", reason="x"))
    e2e = [dict(model="vit", batch=64, provider="simmim_fast", status="ok", step_ms_median=e2e_ms)]
    return dict(environment=dict(device=device), kernels=kernels, e2e=e2e)


def test_regressions_are_found_above_five_percent_only():
    old = _synthetic_results({"forward": 1.0, "backward": 2.0, "forward+backward": 3.0}, e2e_ms=100.0)
    new = _synthetic_results({"forward": 1.04, "backward": 2.2, "forward+backward": 2.0}, e2e_ms=106.0)
    regressions, compared = report.find_regressions(old, new)
    assert compared == 4  # the skipped row is not compared
    assert len(regressions) == 2
    assert any("backward" in line and "+10.0%" in line for line in regressions)
    assert any(line.startswith("e2e vit / 64 / simmim_fast") for line in regressions)
    assert report.find_regressions(old, old) == ([], 4)


def test_compare_cli_exits_non_zero_on_a_regression(tmp_path):
    from benchmarks.run import main

    old, new, same = tmp_path / "old", tmp_path / "new", tmp_path / "same"
    for folder, results in ((old, _synthetic_results({"forward": 1.0}, 100.0)),
                            (new, _synthetic_results({"forward": 1.5}, 100.0)),
                            (same, _synthetic_results({"forward": 1.01}, 99.0))):
        folder.mkdir()
        (folder / report.RESULTS_JSON).write_text(json.dumps(results))
    assert main(["--compare", str(old), "--against", str(new)]) == 1
    assert main(["--compare", str(old), "--against", str(same)]) == 0


@pytest.mark.parametrize("name, matched, bandwidth", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM (80GB HBM3)", 3350.0),
    ("NVIDIA H200", "NVIDIA H200 (SXM)", 4800.0),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 2000.0),
    ("Some Future GPU", None, None),
])
def test_datasheet_matching(name, matched, bandwidth):
    sheet = datasheet_for(name)
    assert (sheet.matched, sheet.bandwidth_gbps) == (matched, bandwidth)


def test_annotation_and_summary_on_synthetic_gpu_rows(tmp_path):
    ceilings = dict(copy_gbps=3000.0, matmul_tflops=800.0, matmul_size=8192, matmul_dtype="torch.bfloat16",
                    datasheet=dict(matched="NVIDIA H100 SXM (80GB HBM3)", bandwidth_gbps=3350.0, bf16_tflops=989.0))

    def row(provider, ms, host_ms=0.001):
        return dict(op="masked_l1_loss", case="c", mode="forward", dtype="bfloat16", provider=provider, status="ok",
                    reason="", median_ms=ms, host_ms_per_call=host_ms, bytes=3000e9 * ms * 1e-3, flops=0.0,
                    gbps=3000.0, tflops=None)
    rows = [row("reference", 4.0), row("compile", 2.0), row("triton", 1.0, host_ms=1.5),
            dict(op="masked_l1_loss", case="c", mode="forward", dtype="bfloat16", provider="cuda", status="skipped",
                 reason="CUDA extension simmim_fast._C is not built")]
    report.annotate_kernel_rows(rows, ceilings)
    triton = rows[2]
    assert (triton["speedup_vs_reference"], triton["speedup_vs_compile"]) == (4.0, 2.0)
    assert triton["bandwidth_fraction_measured"] == 1.0
    assert triton["bandwidth_fraction_datasheet"] == pytest.approx(3000 / 3350)
    assert triton["roofline_fraction"] == pytest.approx(1.0)
    assert triton["matmul_fraction_measured"] is None  # no FLOPs: no matmul fraction, not a zero

    e2e = [dict(model="vit", batch=64, provider=provider, status="ok", images_per_s=rate, step_ms_median=64e3 / rate,
                host_ms_per_step=host_ms, mfu_vs_measured_matmul=0.4, mfu_vs_datasheet=0.3, first_step_s=1.0)
           for provider, rate, host_ms in (("reference", 1000.0, 30.0), ("compile", 1250.0, 9.0),
                                           ("simmim_fast", 1500.0, 20.0), ("transformers", 900.0, 25.0),
                                           ("transformers+compile", 1100.0, 8.0),
                                           ("simmim_fast+cudagraphs", 1650.0, 0.25))]
    report.annotate_e2e_rows(e2e)
    assert e2e[2]["speedup_vs_reference"] == 1.5 and e2e[2]["speedup_vs_compile"] == 1.2
    # each row against the transformers model run the same way: eager against eager, compiled against compiled
    assert (e2e[2]["speedup_vs_transformers"], e2e[5]["speedup_vs_transformers"]) == (1500 / 900, 1.5)

    environment = dict(device="NVIDIA H100 80GB HBM3", device_type="cuda", date_utc="d", git_commit="abc",
                       git_dirty=False, torch="2.11", triton="3.6", cuda="13.0", driver="580", python="3.12")
    results = dict(environment=environment, ceilings=ceilings, settings=dict(smoke=False), kernels=rows, e2e=e2e)
    written = report.write_results(tmp_path, results, ("reference", "compile", "triton", "cuda"))
    assert {path.name for path in written} >= {"summary.md", "kernels_speedup.png", "e2e_images_per_s.png"}
    summary = (tmp_path / "summary.md").read_text()
    assert "not GPU results" not in summary
    assert f"1{report.HOST_BOUND_MARK} (4.00× ref, 2.00× compile)" in summary
    assert "`cuda` skipped (1×): CUDA extension simmim_fast._C is not built" in summary
    assert "| vit | 64 | simmim_fast | 1500.0 | 1.50× | 1.20× |" in summary
    assert "| vit | 64 | simmim_fast+cudagraphs | 1650.0 | 1.65× | 1.32× | 1.50× | 40.0% | 30.0% | – | 0.25 |" in summary


@pytest.mark.gpu
def test_cuda_timing_counts_gpu_time_and_keeps_host_time_apart():
    import time

    device = torch.device("cuda")
    x = torch.zeros(1 << 20, device=device)

    def host_heavy_call():
        time.sleep(0.002)  # 2 ms of host work before a tiny kernel
        x.add_(1.0)
    timing = benchmark([host_heavy_call], device, TimingPlan(warmup_ms=5.0, target_ms=20.0, min_reps=10, max_reps=20))
    assert timing.host_ms >= 2.0
    assert timing.median_ms < 1.0, "the host's 2 ms leaked into the GPU time"

    # The training-step timing keeps the host in: the same call is host-bound there.
    step_plan = TimingPlan(warmup_ms=5.0, target_ms=20.0, min_reps=10, max_reps=20, gpu_time_only=False)
    assert benchmark([host_heavy_call], device, step_plan).median_ms >= 1.5


@pytest.mark.gpu
def test_cuda_kernel_and_e2e_paths_run_on_small_shapes():
    from benchmarks.e2e import E2EPlan, run_e2e_suite
    from benchmarks.device import measure_ceilings
    from benchmarks.kernels import run_kernel_suite

    device = torch.device("cuda", torch.cuda.current_device())
    ceilings = measure_ceilings(device, torch.cuda.get_device_name(device), smoke=True)
    rows = run_kernel_suite(device, torch.bfloat16, TimingPlan.smoke(), 50 << 20, smoke=True,
                            providers=("reference", "triton", "sdpa"), op_names=("attention",), deadline=float("inf"))
    by_provider = {row["provider"]: row for row in rows if row["mode"] == "forward+backward"}
    assert by_provider["reference"]["status"] == "ok" and by_provider["sdpa"]["status"] == "ok"
    assert by_provider["reference"]["peak_mem_mb"] is not None
    assert by_provider["triton"]["status"] in ("ok", "skipped"), by_provider["triton"]["reason"]

    plan = E2EPlan({"vit-tiny": "vit-tiny"}, (2,), TimingPlan(warmup_ms=0.0, min_warmup=1, target_ms=0.0, min_reps=2,
                                                            max_reps=2, gpu_time_only=False))
    e2e_rows = run_e2e_suite(device, plan, ceilings, ("reference", "simmim_fast"), deadline=float("inf"))
    assert [row["status"] for row in e2e_rows] == ["ok", "ok"], [row.get("reason") for row in e2e_rows]
    assert e2e_rows[1]["peak_mem_gb"] > 0 and "telemetry" in e2e_rows[1]


@pytest.mark.interpreter
def test_triton_provider_runs_through_the_dispatch():
    from benchmarks.kernels import run_kernel_suite

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run_kernel_suite(device, torch.float32, TimingPlan.smoke(), 0, smoke=True, providers=("reference", "triton"),
                            op_names=("mask_token_blend",), deadline=float("inf"))
    triton_rows = [row for row in rows if row["provider"] == "triton"]
    assert len(triton_rows) == 6 and all(row["status"] == "ok" for row in triton_rows), triton_rows
    assert all(row["max_rel_error_vs_reference"] < 1e-5 for row in triton_rows)


def test_gpu_budget_table_is_computed_from_counts_and_measured_compile_seconds(tmp_path):
    """benchmarks/gpu_budget.py: the precompile section from the counted specialisations and the measured
    seconds per specialisation, the headline from counted rows and tuned signatures; part 1 refused
    (--check exits 1) when its headline cannot fit one call with MIN_BENCHMARK_S of benchmarks."""
    from benchmarks import gpu_budget

    measured = dict(specialisations=100, seconds_per_specialisation=2.0, recording_s=4.0)
    sections = {(s.part, s.name): s for s in gpu_budget.predict(measured, tests_training=10, tests_rest=None)}
    precompile = sections[(1, "precompile (parallel)")]
    assert precompile.seconds == gpu_budget.WORKER_START_S + 4.0 + 7 * (2.0 + gpu_budget.GCC_LAUNCHER_S)  # ceil(100/16)
    assert "100 specialisations" in precompile.how
    assert (2, "other GPU and kernel tests") not in sections  # not counted: not predicted
    assert sections[(1, "training numerics tests")].seconds == 10 * gpu_budget.TEST_S
    e2e = sections[(1, "e2e headline, eager")]
    # ViT-B: reference, simmim_fast, transformers, transformers-beit; Swin-B: the same but BEiT.
    assert "7 rows" in e2e.how and e2e.benchmark
    signatures, candidates = gpu_budget._tune_work(128)
    assert signatures >= 4 and candidates >= 2 * signatures  # attention, window attention (x stages), losses...
    kernel_s, e2e_s = gpu_budget.suite_budgets(list(sections.values()), 1)
    assert kernel_s + e2e_s >= gpu_budget.MIN_BENCHMARK_S
    text, fits = gpu_budget.table(list(sections.values()))
    assert fits and "fits" in text
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(dict(measured, seconds_per_specialisation=60.0)))  # 7 x 60 s before any benchmark
    assert gpu_budget.main(["--precompile-json", str(slow), "--check"]) == 1
    assert gpu_budget.main(["--precompile-json", str(slow)]) == 0  # the table alone never fails
