"""The data suite: images/s of every input path at 192 and 224 px, per core and through a DataLoader,
and the output distribution each produces.

Paths (all from the same ImageNet-like folder of JPEGs, 400x300 to 1024x768, quality 90):
  original   the pre-#15 pipeline: full decode, crop, float normalisation and a mask per sample on the CPU
  fast       ``FastCrop``: draft JPEG decode, reducing resize, uint8 out (normalisation and masks on the device)
  prepared   ``FastCrop`` reading a ``prepare-data`` store whose longer side is ``lossless_max_side(size)``
             (313 for 192, 365 for 224: every crop is still a downscale)
  prepared-small  the same with the longer side at ``SMALL_MAX_SIDE`` (224 for 192, 256 for 224, the
             "resize 256" of ImageNet evaluation): crops are upsampled, cheaper to decode
  prepared-raw  ``FastCrop`` reading a ``prepare-data --format raw`` store at ``lossless_max_side(size)``:
             uint8 pixels memory-mapped, no decoding
  gpu-decode file bytes and the crop geometry from the CPU, JPEG decode + crop + flip on CUDA (torchvision)

Per core: each path runs ``dataset[key]`` in this process (one thread), interleaved with the others
round after round; the median round is reported, as wall time and as CPU time of the process (less
sensitive to a shared machine). Through a DataLoader: ``--data-workers`` processes, total and per worker.
The crop statistics (area fraction, aspect, flips) come from the same seeded draws in every path; the
pixel statistics and the PSNR against the original path show what draft decoding and the prepared
store's smaller images change.
"""
from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from simmim_fast.masking import MaskGenerator
from simmim_fast.train.data import (FastCrop, ImageFiles, PretrainDataset, SimMIMTransform, crop_and_flip,
                                    find_images, sample_seed)
from simmim_fast.train.device_batches import normalize
from simmim_fast.train.gpu_decode import GpuJpegCrop, gpu_decode_unavailable_reason
from simmim_fast.train.prepared import PreparedImages, lossless_max_side, prepare

from .report import error_reason, write_csv

PATHS = ("original", "fast", "prepared", "prepared-small", "prepared-raw", "gpu-decode")
SMALL_MAX_SIDE = {192: 224, 224: 256}
SIZES = (192, 224)
DATA_COLUMNS = (
    "path", "img_size", "max_side", "store_bytes_per_image", "status", "reason", "images_per_s_per_core", "images_per_cpu_s",
    "speedup_vs_original",
    "rounds", "samples_per_round", "loader_workers", "loader_images_per_s", "loader_images_per_s_per_worker",
    "crop_area_mean", "crop_log_aspect_mean", "flip_fraction", "pixel_mean", "pixel_std", "psnr_vs_original_db",
    "source_megapixels_mean", "crop_stats_match",
)
FOLDER_SEED = 1234
# Crop statistics of two paths "match" within these. Every path draws from the same per-sample seeds,
# so the original and fast paths agree exactly; on a prepared store's smaller image, integer rounding
# moves a crop a little and can make one of the 10 tries fail or succeed differently, which shifts a
# few samples' later draws (their flip): a few percent of flips, far inside the 2-sigma band of a
# fair coin over ~100 samples (0.1).
AREA_TOLERANCE = 0.01
LOG_ASPECT_TOLERANCE = 0.01
FLIP_TOLERANCE = 0.05


@dataclass
class DataPlan:
    images: int
    min_width: int
    max_width: int
    rounds: int
    samples_per_round: int
    loader_batches: int
    loader_batch: int

    @classmethod
    def for_run(cls, smoke: bool) -> "DataPlan":
        if smoke:
            return cls(images=6, min_width=160, max_width=320, rounds=2, samples_per_round=6, loader_batches=2,
                       loader_batch=3)
        return cls(images=96, min_width=400, max_width=1024, rounds=7, samples_per_round=48, loader_batches=12,
                   loader_batch=16)


def make_imagenet_like(folder: Path, plan: DataPlan) -> Path:
    """JPEGs at quality 90, widths uniform in [min, max] at 4:3 (a quarter of them portrait), with the
    detail of photos (~2 bits per pixel: scenes plus sensor-like noise); reused when already there."""
    from simmim_fast.train.scenes import render_scene

    folder = Path(folder)
    done = folder / "complete.json"
    if done.is_file() and json.loads(done.read_text()) == vars(plan) | {"seed": FOLDER_SEED}:
        return folder
    rng = np.random.default_rng(FOLDER_SEED)
    for index in range(plan.images):
        width = int(rng.integers(plan.min_width, plan.max_width + 1))
        height = width * 3 // 4
        if rng.random() < 0.25:
            width, height = height, width
        scene = render_scene(index, 256).resize((width, height), Image.BICUBIC)
        noisy = np.asarray(scene, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
        target = folder / f"n{index % 10:08d}" / f"image_{index:05d}.JPEG"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(target, quality=90)
    done.write_text(json.dumps(vars(plan) | {"seed": FOLDER_SEED}))
    return folder


def _median_rates(loops: Dict[str, Callable[[int], None]], rounds: int, samples: int) -> Dict[str, Dict]:
    """Each loop(round) processes ``samples`` images; rounds interleave the loops; medians of the rates."""
    wall: Dict[str, List[float]] = {name: [] for name in loops}
    cpu: Dict[str, List[float]] = {name: [] for name in loops}
    for round_index in range(rounds + 1):
        for name, loop in loops.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            loop(round_index)
            if round_index:  # round 0 warms caches (page cache, Pillow, allocator)
                wall[name].append(samples / (time.perf_counter() - start_wall))
                cpu[name].append(samples / max(time.process_time() - start_cpu, 1e-9))
    return {name: {"images_per_s_per_core": statistics.median(wall[name]),
                   "images_per_cpu_s": statistics.median(cpu[name]), "rounds": rounds} for name in loops}


def _normalised(sample: Dict) -> torch.Tensor:
    image = sample["image"]
    return normalize(image[None])[0] if image.dtype == torch.uint8 else image


def _distribution(dataset, keys, sizes, reference: Optional[List[torch.Tensor]],
                  decode: Callable[[Dict], torch.Tensor] = _normalised) -> Tuple[Dict, List[torch.Tensor]]:
    """Crop geometry replayed from the samples' seeds, pixel statistics, PSNR against ``reference``;
    ``decode`` turns a sample into its normalised CPU image."""
    areas, log_aspects, flips, images = [], [], [], []
    for key, (width, height) in zip(keys, sizes):
        generator = torch.Generator().manual_seed(sample_seed(dataset.seed, *key))
        (_, _, crop_w, crop_h), flip = crop_and_flip(width, height, generator)
        areas.append(crop_w * crop_h / (width * height))
        log_aspects.append(math.log(crop_w / crop_h))
        flips.append(flip)
        images.append(decode(dataset[key]))
    stacked = torch.stack(images)
    stats = {"crop_area_mean": float(np.mean(areas)), "crop_log_aspect_mean": float(np.mean(log_aspects)),
             "flip_fraction": float(np.mean(flips)), "pixel_mean": float(stacked.mean()),
             "pixel_std": float(stacked.std()),
             "source_megapixels_mean": float(np.mean([width * height for width, height in sizes]) / 1e6)}
    if reference is not None:
        # PSNR on [0, 1] pixels: normalised units times the mean std.
        error = ((stacked - torch.stack(reference)) * 0.226).pow(2).mean()
        stats["psnr_vs_original_db"] = float(10 * torch.log10(1 / error)) if error > 0 else float("inf")
    return stats, images


def _loader_rate(dataset, workers: int, plan: DataPlan, collate=None, consume=lambda batch: None) -> float:
    """Images/s through a DataLoader with ``workers`` processes (``consume`` runs on each batch in this
    process), after its first batch (worker start)."""
    keys = [(9, index % len(dataset)) for index in range(plan.loader_batch * (plan.loader_batches + 1))]
    loader = torch.utils.data.DataLoader(dataset, batch_size=plan.loader_batch, sampler=keys, num_workers=workers,
                                         collate_fn=collate)
    iterator = iter(loader)
    consume(next(iterator))
    start = time.perf_counter()
    for _ in range(plan.loader_batches):
        consume(next(iterator))
    return plan.loader_batches * plan.loader_batch / (time.perf_counter() - start)


def _sizes(source, keys) -> List:
    sizes = []
    for _, index in keys:
        with source.open(index) as image:
            sizes.append(image.size)
    return sizes


def run_data_suite(folder: Optional[Path], work: Path, plan: DataPlan, workers: int, device: torch.device,
                   after_each: Callable[[List[Dict]], None]) -> List[Dict]:
    folder = Path(folder) if folder else make_imagenet_like(work / "imagenet-like", plan)
    files = ImageFiles(find_images(folder), folder)
    print(f"  {len(files)} images from {folder}")
    with tempfile.TemporaryDirectory(dir=work) as scratch:

        def store(max_side: int, encoding: str = "jpeg") -> PreparedImages:
            start = time.perf_counter()
            destination = Path(scratch) / f"prepared-{max_side}-{encoding}"
            prepare(str(folder), str(destination), max_side=max_side, progress=False, encoding=encoding)
            print(f"  prepare-data --max-side {max_side} --format {encoding}: "
                  f"{len(files) / (time.perf_counter() - start):.1f} images/s")
            return PreparedImages(destination)
        rows: List[Dict] = []
        for size in SIZES:
            stores = {"prepared": store(lossless_max_side(size)), "prepared-small": store(SMALL_MAX_SIDE[size]),
                      "prepared-raw": store(lossless_max_side(size), "raw")}
            rows += _measure_size(size, files, stores, plan, workers, device)
            after_each(rows)
    return rows


def _measure_size(size: int, files: ImageFiles, stores: Dict[str, PreparedImages], plan: DataPlan, workers: int,
                  device: torch.device) -> List[Dict]:
    masks = MaskGenerator(size, 32, 16 if size == 224 else 4, 0.6)
    datasets = {"original": PretrainDataset(files, SimMIMTransform(size, masks), seed=0),
                "fast": PretrainDataset(files, FastCrop(size), seed=0)}
    datasets.update({name: PretrainDataset(store, FastCrop(size), seed=0) for name, store in stores.items()})
    gpu = GpuJpegCrop(size, device, files, seed=0)
    gpu_reason = gpu_decode_unavailable_reason(device, files)
    if gpu_reason is None:
        datasets["gpu-decode"] = gpu.dataset()
    samples = min(plan.samples_per_round, len(files))

    def loop(dataset):
        return lambda round_index: [dataset[(round_index, index)] for index in range(samples)]
    loops = {name: loop(dataset) for name, dataset in datasets.items()}
    if gpu_reason is None:
        read_files = loops["gpu-decode"]

        def read_and_decode(round_index):  # the CPU's part and the GPU's, synchronised
            gpu.crops(gpu.collate(read_files(round_index)))
            torch.cuda.synchronize()
        loops["gpu-decode"] = read_and_decode
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: the float path's normalisation would otherwise use every core
    try:
        rates = _median_rates(loops, plan.rounds, samples)
    finally:
        torch.set_num_threads(threads)

    keys = [(100, index) for index in range(len(files))]
    reference_stats, reference_images = _distribution(datasets["original"], keys, _sizes(files, keys), None)
    rows = []
    for name in PATHS:
        row = {"path": name, "img_size": size, "samples_per_round": samples, "loader_workers": workers,
               "max_side": stores[name].manifest["max_side"] if name in stores else None,
               "store_bytes_per_image": stores[name].manifest["bytes"] / len(stores[name]) if name in stores else None}
        if name == "gpu-decode" and gpu_reason is not None:
            rows.append(row | {"status": "skipped", "reason": gpu_reason})
            print(f"  {size}px {name}: skipped ({gpu_reason})")
            continue
        try:
            row.update(rates[name])
            dataset = datasets[name]
            if name == "gpu-decode":
                stats, _ = _distribution(dataset, keys, _sizes(files, keys), reference_images,
                                         decode=lambda sample: normalize(gpu.crops(gpu.collate([sample])))[0].cpu())
                row["loader_images_per_s"] = _loader_rate(dataset, workers, plan, gpu.collate, gpu.crops)
            else:
                stats, _ = _distribution(dataset, keys, _sizes(dataset.source, keys), reference_images)
                row["loader_images_per_s"] = _loader_rate(dataset, workers, plan)
            row.update(stats)
            row["loader_images_per_s_per_worker"] = row["loader_images_per_s"] / max(workers, 1)
            row["status"] = "ok"
        except Exception as error:  # a failing path is recorded, the others still run
            rows.append(row | {"status": "failed", "reason": error_reason(error)})
            continue
        rows.append(row)
    original = rows[0]
    for row in (row for row in rows if row["status"] == "ok"):
        row["speedup_vs_original"] = row["images_per_s_per_core"] / original["images_per_s_per_core"]
        if "crop_area_mean" in row:
            row["crop_stats_match"] = all(
                abs(row[key] - reference_stats[key]) <= tolerance for key, tolerance in (
                    ("crop_area_mean", AREA_TOLERANCE), ("crop_log_aspect_mean", LOG_ASPECT_TOLERANCE),
                    ("flip_fraction", FLIP_TOLERANCE)))
        print(f"  {size}px {row['path']}: {row['images_per_s_per_core']:.1f} images/s per core "
              f"({row['images_per_cpu_s']:.1f} per CPU second, {row['speedup_vs_original']:.2f}x original); "
              f"{row['loader_images_per_s']:.1f}/s with {workers} worker(s)")
    return rows


def data_markdown(rows: List[Dict], environment: Dict, settings: Dict) -> str:
    lines = [f"# Input pipeline: {environment['device']}, commit {environment['git_commit']}"
             f"{' (dirty)' if environment['git_dirty'] else ''}, {environment['date_utc']}", "",
             f"torch {environment['torch']}, Pillow {settings['pillow']}, {settings['cpu_count']} CPU(s); "
             f"{settings['images']} images from {settings['folder']}; loader: {settings['workers']} worker(s).", "",
             "Per core: one process, one thread, paths interleaved round by round, median round. Wall-clock rates on "
             "a shared machine are low bounds; CPU-second rates are what one dedicated core would give.", "",
             "| path | px | images/s per core | per CPU s | × original | loader images/s (per worker) | crop area | "
             "flips | pixel mean / std | PSNR vs original dB | same crop stats | KB/image stored |",
             "|" + "---|" * 12]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {_label(row)} | {row['img_size']} | {row['status']}: {row.get('reason', '')} |" + " |" * 9)
            continue
        psnr = row.get("psnr_vs_original_db")
        stored = row.get("store_bytes_per_image")
        lines.append(
            f"| {_label(row)} | {row['img_size']} | {row['images_per_s_per_core']:.1f} | "
            f"{row['images_per_cpu_s']:.1f} | "
            f"{row['speedup_vs_original']:.2f}× | {row['loader_images_per_s']:.1f} "
            f"({row['loader_images_per_s_per_worker']:.1f}) | {_cell(row, 'crop_area_mean', '.3f')} | "
            f"{_cell(row, 'flip_fraction', '.2f')} | "
            f"{_cell(row, 'pixel_mean', '.3f')} / {_cell(row, 'pixel_std', '.3f')} | "
            f"{'–' if psnr is None else ('∞' if math.isinf(psnr) else f'{psnr:.1f}')} | "
            f"{'–' if 'crop_stats_match' not in row else ('yes' if row['crop_stats_match'] else 'NO')} | "
            f"{'–' if stored is None else f'{stored / 1000:.0f}'} |")
    return "\n".join(lines) + "\n"


def _label(row: Dict) -> str:
    return row["path"] if row.get("max_side") is None else f"{row['path']} (side ≤ {row['max_side']})"


def _cell(row: Dict, key: str, spec: str) -> str:
    return "–" if row.get(key) is None else format(row[key], spec)


def write_data_results(folder: Path, results: Dict) -> List[Path]:
    """data.json, data.csv and data.md (kept apart from the kernel/e2e files of the same folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "data.json", folder / "data.csv", folder / "data.md"]
    written[0].write_text(json.dumps(results, indent=1, default=str))
    write_csv(written[1], results["data"], DATA_COLUMNS)
    written[2].write_text(data_markdown(results["data"], results["environment"], results["settings"]))
    return written
