"""``pretrain --decode gpu`` end to end on the CPU: torchvision's decode_jpeg runs on the CPU here, in
place of CUDA (the availability check is patched), so the whole path — bytes and crop draws in the
workers, collation, decoding, crop/resize/flip, unreadable files, resume — runs in CI. Lane downstream
(it has torchvision); skipped elsewhere."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_fast.train import PretrainOptions, pretrain
from simmim_fast.train import gpu_decode
from simmim_fast.train.loop import Pretraining
from simmim_fast.train.monitor import read_log
from simmim_fast.train.scenes import render_scene

pytest.importorskip("torchvision")
pytestmark = pytest.mark.downstream

SIZES = [(300, 240), (260, 330), (320, 240), (280, 280), (310, 250), (240, 300)]


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for index, (width, height) in enumerate(SIZES):
        render_scene(index, max(width, height)).crop((0, 0, width, height)).save(data / f"{index}.jpg", quality=90)
    render_scene(9, 200).save(data / "6.png")  # not a JPEG: the worker crops it on the CPU
    Image.new("CMYK", (200, 160), (10, 200, 30, 0)).save(data / "7.jpg")  # a CMYK JPEG: on the CPU too
    whole = (data / "0.jpg").read_bytes()
    (data / "8.jpg").write_bytes(whole[:len(whole) // 3])  # a header that opens, pixels that do not decode
    return data


@pytest.fixture
def decode_anywhere(monkeypatch):
    """GPU decoding "available" on the CPU device: decode_jpeg(device=cpu)."""
    monkeypatch.setattr(gpu_decode, "gpu_decode_unavailable_reason", lambda device, source=None: None)


def options(output, data, decode, **overrides):
    settings = dict(preset="vit-tiny", set=["MODEL.VIT.DEPTH=1", "MODEL.VIT.EMBED_DIM=48", "MODEL.VIT.NUM_HEADS=2"],
                    data=str(data), output=str(output), batch_size=3, num_workers=1, steps=3, log_every=1,
                    save_every=100, picture_every=1000, picture_count=2, device="cpu", decode=decode)
    return PretrainOptions(**(settings | overrides))


def recorded_pixels(monkeypatch, run):
    """Every micro-batch's uint8 crops as the training step receives them."""
    seen = []
    original = Pretraining._pixels

    def record(self, batch):
        pixels = original(self, batch)
        seen.append(pixels.clone())
        return pixels
    monkeypatch.setattr(Pretraining, "_pixels", record)
    summary = run()
    monkeypatch.setattr(Pretraining, "_pixels", original)
    return summary, torch.cat(seen).float()


def test_decode_gpu_trains_on_the_same_samples_as_the_cpu_path(tmp_path, folder, decode_anywhere, monkeypatch):
    cpu_summary, on_cpu = recorded_pixels(monkeypatch, lambda: pretrain(options(tmp_path / "cpu", folder, "cpu")))
    gpu_summary, on_gpu = recorded_pixels(monkeypatch, lambda: pretrain(options(tmp_path / "gpu", folder, "gpu")))
    assert on_gpu.shape == on_cpu.shape == (9, 3, 64, 64)
    # Same files, same crops, same flips, in the same order: per image a few grey levels apart (libjpeg
    # vs Pillow's draft decode, torch's antialiased bilinear vs Pillow's), never a different picture.
    per_image = (on_gpu - on_cpu).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 4, per_image
    assert (on_gpu != on_cpu).any()  # the GPU path's own decode/resize did run
    assert gpu_summary["unreadable_files"] == cpu_summary["unreadable_files"] == 1
    assert np.allclose(gpu_summary["losses"], cpu_summary["losses"], rtol=0.05)


def test_decode_gpu_resumes_exactly(tmp_path, folder, decode_anywhere):
    full = pretrain(options(tmp_path / "full", folder, "gpu", save_every=1))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "full" / "ckpt_step_0000001.pth", resumed_dir)
    resumed = pretrain(options(resumed_dir, folder, "gpu", resume="auto"))
    assert resumed["losses"] == full["losses"]
    assert [row["loss"] for row in read_log(resumed_dir / "log.jsonl")] == full["losses"][1:]


def test_a_raw_store_needs_no_decoding(tmp_path, folder, capsys):
    from simmim_fast.train.prepared import prepare

    prepare(str(folder), str(tmp_path / "raw"), max_side=200, progress=False, encoding="raw")
    pretrain(options(tmp_path / "run", tmp_path / "raw", "gpu", steps=1))
    warning = [line for line in capsys.readouterr().err.splitlines() if "--decode gpu" in line]
    assert len(warning) == 1 and "not JPEG files" in warning[0]
