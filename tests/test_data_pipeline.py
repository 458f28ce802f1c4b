"""The input pipeline: the fast crop against the original transform, masks drawn per step on the
device, the prepared store, and bad data (symlink loops, 16-bit images, nothing readable)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_fast.cli import main
from simmim_fast.masking import MaskGenerator
from simmim_fast.train.data import (FastCrop, ImageFiles, PretrainDataset, SimMIMTransform, find_images,
                                    open_image_source)
from simmim_fast.train.device_batches import StepMasks, normalize
from simmim_fast.train.monitor import DATA_WAIT_WARNING, DataWaitWatch, Monitor
from simmim_fast.train.prepared import PreparedImages, lossless_max_side, prepare
from simmim_fast.train.scenes import render_scene


def write_jpegs(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for index, (width, height) in enumerate(sizes):
        render_scene(index, max(width, height)).crop((0, 0, width, height)).save(folder / f"{index}.jpg", quality=90)
    return folder


def datasets(folder, size, **fast_options):
    source = ImageFiles(find_images(folder), folder)
    return (PretrainDataset(source, SimMIMTransform(size, MaskGenerator(size, 32, 16, 0.6)), seed=7),
            PretrainDataset(source, FastCrop(size, **fast_options), seed=7))


def test_fast_crop_without_draft_is_the_original_transform_exactly(tmp_path):
    folder = write_jpegs(tmp_path / "jpg", [(300, 200), (97, 131), (640, 480)])
    Image.open(folder / "0.jpg").convert("L").save(folder / "grey.png")  # L: resized first, converted after
    reference, fast = datasets(folder, 64, draft=False, reducing_gap=None)
    for key in [(0, 0), (0, 1), (3, 2), (1, 3)]:
        pixels = fast[key]["image"]
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 64, 64)
        assert torch.equal(normalize(pixels[None])[0], reference[key]["image"]), key


def test_draft_decoding_stays_a_downscale_close_to_the_original(tmp_path):
    folder = write_jpegs(tmp_path / "jpg", [(1024, 768), (900, 700), (800, 1000)])
    reference, fast = datasets(folder, 96)
    for index in range(3):
        with Image.open(folder / f"{index}.jpg") as image:  # a whole-image crop
            width, height = image.size
            scale = FastCrop(96)._draft_scale(image, width, height)
            assert image.width == -(-width // scale)  # decoded at that scale
        assert scale in (2.0, 4.0, 8.0) and min(width, height) / scale >= 96  # drafted, still >= the output
        expected = reference[(0, index)]["image"]
        got = normalize(fast[(0, index)]["image"][None])[0]
        # Normalised units (1 grey level = 0.017): libjpeg's DCT downscale differs from the exact filter
        # by a few levels at edges, nothing on average.
        assert (got - expected).abs().mean() < 0.03 and (got - expected).abs().max() < 0.5


def test_step_masks_follow_samples_across_processes_and_accumulation():
    generator = MaskGenerator(64, 16, 8, 0.6)
    cpu = torch.device("cpu")
    one = StepMasks(generator, cpu, seed=3, world_size=1, rank=0, batch_size=8, accumulation=1).for_step(2, 5)[0]
    accumulated = StepMasks(generator, cpu, 3, 1, 0, batch_size=4, accumulation=2).for_step(2, 5)
    assert torch.equal(torch.cat(accumulated), one)
    ranks = [StepMasks(generator, cpu, 3, 2, rank, batch_size=4, accumulation=1).for_step(2, 5)[0] for rank in (0, 1)]
    # The sampler deals the step's samples to ranks in turn: rank r holds global positions r, r + 2, ...
    assert torch.equal(torch.stack(ranks, 1).reshape(8, 8, 8), one)
    assert not torch.equal(StepMasks(generator, cpu, 3, 1, 0, 8, 1).for_step(2, 6)[0], one)
    assert (one.view(8, -1).sum(1) == generator.mask_count * generator.scale ** 2).all()


def test_normalize_matches_the_cpu_transform_bit_for_bit():
    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    from simmim_fast.train.data import to_normalized_tensor

    expected = torch.stack([to_normalized_tensor(Image.fromarray(p.permute(1, 2, 0).numpy())) for p in pixels])
    assert torch.equal(normalize(pixels), expected)


def test_symlink_loops_list_each_real_file_once(tmp_path):
    write_jpegs(tmp_path / "data" / "a", [(40, 30)] * 3)
    os.symlink(tmp_path / "data", tmp_path / "data" / "a" / "loop")  # data/a/loop/a/loop/... forever
    os.symlink(tmp_path / "data" / "a" / "0.jpg", tmp_path / "data" / "link.jpg")  # a second name for a file
    (tmp_path / "data" / "a" / "broken.jpg").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="symbolic links"):
        files = find_images(tmp_path / "data")
    assert sorted(os.path.realpath(path) for path in files) == sorted(
        {os.path.realpath(path) for path in files}) and len(files) == 4
    dataset = PretrainDataset(ImageFiles(files, tmp_path / "data"), FastCrop(32), seed=0)
    unreadable = set()
    with pytest.warns(UserWarning, match="unreadable"):
        for index in range(len(dataset)):
            found = dataset[(0, index)]["unreadable"]
            unreadable.update(found[found >= 0].tolist())
    assert len(unreadable) == 1


@pytest.mark.parametrize("dtype, suffix", [(np.uint16, "png"), (np.int32, "tif")])  # modes I;16 and I
def test_sixteen_bit_greys_are_scaled_not_clipped(tmp_path, dtype, suffix):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(dtype)
    path = tmp_path / f"deep.{suffix}"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")
    source = ImageFiles([path], tmp_path)
    for transform in (FastCrop(64, draft=False, reducing_gap=None), FastCrop(64)):
        pixels = PretrainDataset(source, transform, seed=0)[(0, 0)]["image"].float()
        # The crop of a black-to-white ramp: a spread of greys, not a white field (Pillow's own
        # conversion clips at 255, which leaves 99.6% of this ramp white).
        assert (pixels == 255).float().mean() < 0.05 and pixels.std() > 40 and 60 < pixels.mean() < 200
    reference = PretrainDataset(source, SimMIMTransform(64, MaskGenerator(64, 16, 8, 0.6)), seed=0)[(0, 0)]
    assert abs(float(reference["image"].mean()) - float(normalize(pixels[None].to(torch.uint8)).mean())) < 0.05


def test_a_folder_with_no_readable_image_is_a_value_error_naming_it(tmp_path, capsys):
    data = tmp_path / "broken"
    data.mkdir()
    for index in range(20):
        (data / f"{index}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(ValueError, match=f"--data {data}: none of its 20 image files can be read"):
        open_image_source(str(data))
    assert main(["pretrain", "--preset", "vit-tiny", "--data", str(data), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of its 20 image files can be read" in err[0]
    assert not (tmp_path / "run").exists()
    write_jpegs(data, [(40, 30)])  # one good file among the bad ones is enough
    assert len(open_image_source(str(data))) == 20


def test_prepared_store_round_trip_and_cli(tmp_path, capsys):
    source = write_jpegs(tmp_path / "src" / "class_a", [(400, 300), (120, 90), (300, 500)]).parent
    (source / "class_a" / "bad.jpg").write_bytes(b"junk")
    assert main(["prepare-data", str(source), str(tmp_path / "prepared"), "--max-side", "200"]) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    store = open_image_source(str(tmp_path / "prepared"))
    assert isinstance(store, PreparedImages) and len(store) == 3
    manifest = json.loads((tmp_path / "prepared" / "prepared.json").read_text())
    assert manifest["unreadable"] == 1 and manifest["max_side"] == 200
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "prepared").stat().st_mode & 0o777 == 0o777 & ~umask
    sizes = [store.open(index).size for index in range(3)]
    assert sizes == [(200, 150), (120, 90), (120, 200)]  # aspect kept, small images untouched
    assert "class_a/1.jpg" in store.describe(1)
    original = np.asarray(Image.open(source / "class_a" / "1.jpg").convert("RGB"), dtype=float)
    assert np.abs(np.asarray(store.open(1), dtype=float) - original).mean() < 3  # re-encoded at quality 90
    sample = PretrainDataset(store, FastCrop(64), seed=0)[(0, 2)]
    assert sample["image"].shape == (3, 64, 64)

    # Mistakes: one line, exit 2, nothing written.
    for argv, message in [([str(source), str(tmp_path / "prepared"), "--max-side", "200"], "already exists"),
                          ([str(source), str(tmp_path / "other"), "--max-side", "4"], "--max-side"),
                          ([str(tmp_path / "missing"), str(tmp_path / "other"), "--max-side", "64"],
                           "no such directory")]:
        assert main(["prepare-data"] + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prepared", "src"]


def test_prepare_fails_cleanly_when_nothing_is_readable(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of its 1 image files can be read"):
        prepare(str(tmp_path / "src"), str(tmp_path / "out"), max_side=64, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src"]


def test_lossless_max_side_keeps_the_smallest_crop_a_downscale():
    for size in (192, 224):
        side = lossless_max_side(size)
        area = side * side * 3 / 4
        smallest = np.sqrt(0.67 * area * 3 / 4)
        assert smallest >= size and np.sqrt(0.67 * ((side - 1) ** 2 * 3 / 4) * 3 / 4) < size


def test_data_wait_warns_once_with_the_remedies_then_summarises(tmp_path):
    monitor = Monitor(tmp_path, 100, 0, torch.device("cpu"), enabled=True)
    lines = []
    monitor.message = lines.append
    monitor.bar.write = lines.append
    monitor.record_data_wait(DATA_WAIT_WARNING / 2 * 10.0, 10.0, step=5)
    assert lines == []
    for step in range(10, 100, 5):  # a starved short run: 18 intervals, as the demo on 2 cores
        monitor.record_data_wait(5.0, 10.0, step=step)
    assert len(lines) == 1 and "50%" in lines[0] and "--num-workers" in lines[0] and "prepare-data" in lines[0]
    monitor.close()
    assert len(lines) == 2 and lines[1].startswith("data wait: 48% of the training time (90.5 s of 190.0 s")
    assert "bottleneck" in lines[1]


def test_data_wait_reminds_only_when_starvation_holds_over_the_interval():
    watch = DataWaitWatch(remind_after_s=100.0)
    assert watch.record(5.0, 10.0, step=1).startswith("warning: step 1: 50%")
    # Fed over the next long interval as a whole: no reminder.
    assert [watch.record(0.0, 10.0, step=s) for s in range(2, 12)] == [None] * 10
    said = [watch.record(3.0, 10.0, step=s) for s in range(12, 22)]  # 30% for 100 s
    assert said[:-1] == [None] * 9 and said[-1] == "warning: step 21: still 30% of the last 2 minutes spent waiting for data"
    assert watch.summary().startswith("data wait: 17% of the training time (35.0 s of 210.0 s")


@pytest.mark.parametrize("encoding", ["jpeg", "raw"])
def test_pretrain_reads_a_prepared_store_and_logs_the_data_wait(tmp_path, encoding):
    from simmim_fast.train import PretrainOptions, pretrain
    from simmim_fast.train.monitor import read_log

    write_jpegs(tmp_path / "src", [(120, 90)] * 8)
    prepare(str(tmp_path / "src"), str(tmp_path / "prepared"), max_side=100, progress=False, encoding=encoding)
    summary = pretrain(PretrainOptions(
        preset="vit-tiny", set=["MODEL.VIT.DEPTH=1", "MODEL.VIT.EMBED_DIM=48", "MODEL.VIT.NUM_HEADS=2"],
        data=str(tmp_path / "prepared"), output=str(tmp_path / "run"), batch_size=4, num_workers=0, steps=2,
        log_every=1, save_every=100, picture_every=1000, picture_count=2))
    rows = read_log(tmp_path / "run" / "log.jsonl")
    assert summary["steps"] == 2 and len(rows) == 2
    assert all(0 < row["data_wait_fraction"] < 1 for row in rows)


def test_raw_store_holds_the_shrunk_pixels_and_crops_as_the_jpeg_store(tmp_path, capsys):
    source = write_jpegs(tmp_path / "src", [(400, 300), (120, 90), (300, 500)])
    Image.open(source / "0.jpg").convert("L").save(source / "grey.png")
    assert main(["prepare-data", str(source), str(tmp_path / "raw"), "--max-side", "200", "--format", "raw"]) == 0
    assert "raw RGB pixels" in capsys.readouterr().out
    prepare(str(source), str(tmp_path / "jpeg"), max_side=200, progress=False)
    raw, jpeg = PreparedImages(tmp_path / "raw"), PreparedImages(tmp_path / "jpeg")
    assert raw.encoding == "raw" and raw.manifest["quality"] is None and len(raw) == 4
    assert raw.manifest["bytes"] == sum(width * height * 3 for width, height in
                                        [(200, 150), (120, 90), (120, 200), (200, 150)])
    from simmim_fast.train.prepared import shrink

    for index, name in enumerate(["0.jpg", "1.jpg", "2.jpg", "grey.png"]):  # the sorted order
        with raw.open(index) as image:
            assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(shrink(source / name, 200)))
    # The same crops as the JPEG store, but for its re-encoding (a grey level or two).
    for key in [(0, 0), (1, 2), (2, 3)]:
        from_raw = PretrainDataset(raw, FastCrop(64), seed=5)[key]["image"].float()
        from_jpeg = PretrainDataset(jpeg, FastCrop(64), seed=5)[key]["image"].float()
        assert from_raw.shape == (3, 64, 64) and (from_raw - from_jpeg).abs().mean() < 3
    assert main(["prepare-data", str(source), str(tmp_path / "other"), "--max-side", "200", "--format", "png"]) == 2
    assert "--format" in capsys.readouterr().err


def test_gpu_decode_falls_back_with_a_reason_off_cuda(tmp_path):
    from simmim_fast.train.data import EmbeddedScenes
    from simmim_fast.train.gpu_decode import EncodedCrop, gpu_decode_unavailable_reason, resolve_decode

    reason = gpu_decode_unavailable_reason(torch.device("cpu"))
    assert reason is not None and "CUDA" in reason
    assert resolve_decode("auto", torch.device("cpu"), None) == ("cpu", reason)
    assert resolve_decode("cpu", torch.device("cuda"), None) == ("cpu", None)
    assert "not JPEG files" in resolve_decode("gpu", torch.device("cuda"), EmbeddedScenes(2))[1]
    with pytest.raises(ValueError, match="--decode / DATA.DECODE must be one of cpu, gpu, auto"):
        resolve_decode("nvjpeg", torch.device("cpu"), None)
    # The CPU half still runs anywhere: the file's bytes and the same crop and flip as FastCrop.
    folder = write_jpegs(tmp_path / "jpg", [(300, 200)])
    source = ImageFiles(find_images(folder), folder)
    sample = PretrainDataset(source, EncodedCrop(32), seed=4)[(0, 0)]
    assert bytes(sample["jpeg"].numpy()) == (folder / "0.jpg").read_bytes()
    from simmim_fast.train.data import crop_and_flip, sample_seed

    generator = torch.Generator().manual_seed(sample_seed(4, 0, 0))
    box, flip = crop_and_flip(300, 200, generator)
    assert sample["box"].tolist() == list(box) and bool(sample["flip"]) == flip


def test_pretrain_decode_gpu_off_cuda_says_why_once_and_trains_on_the_cpu_path(tmp_path, capsys):
    from simmim_fast.train.monitor import read_log

    write_jpegs(tmp_path / "src", [(120, 90)] * 4)
    common = ["pretrain", "--preset", "vit-tiny", "--set", "MODEL.VIT.DEPTH=1", "--set", "MODEL.VIT.EMBED_DIM=48",
              "--set", "MODEL.VIT.NUM_HEADS=2", "--data", str(tmp_path / "src"), "--batch-size", "4",
              "--num-workers", "0", "--steps", "1", "--device", "cpu", "--picture-every", "1000"]
    losses = {}
    for decode in ("cpu", "gpu", "auto"):
        assert main(common + ["--decode", decode, "--output", str(tmp_path / decode)]) == 0
        warnings = [line for line in capsys.readouterr().err.splitlines() if "--decode gpu" in line]
        assert len(warnings) == (decode == "gpu")
        if warnings:
            assert "needs a CUDA device" in warnings[0] and "decoding on the CPU" in warnings[0]
        losses[decode] = read_log(tmp_path / decode / "log.jsonl")[0]["loss"]
    assert losses["cpu"] == losses["gpu"] == losses["auto"]


@pytest.mark.gpu
def test_gpu_decode_matches_the_cpu_crop(tmp_path):
    from simmim_fast.train.gpu_decode import GpuJpegCrop, gpu_decode_unavailable_reason

    device = torch.device("cuda")
    reason = gpu_decode_unavailable_reason(device)
    if reason is not None:
        pytest.skip(reason)
    folder = write_jpegs(tmp_path / "jpg", [(640, 480), (300, 400), (1024, 768)])
    source = ImageFiles(find_images(folder), folder)
    gpu = GpuJpegCrop(96, device, source, seed=2)
    encoded = gpu.dataset()
    cpu = PretrainDataset(source, FastCrop(96, draft=False, reducing_gap=None), seed=2)
    keys = [(0, index) for index in range(3)]
    on_gpu = gpu.crops(gpu.collate([encoded[key] for key in keys])).cpu().float()
    on_cpu = torch.stack([cpu[key]["image"] for key in keys]).float()
    # nvJPEG's IDCT and upsampling, and torch's antialiased bilinear vs Pillow's: a few grey levels.
    assert on_gpu.shape == on_cpu.shape and (on_gpu - on_cpu).abs().mean() < 3
