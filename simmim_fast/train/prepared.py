"""``simmim-fast prepare-data SRC DST --max-side N [--format jpeg|raw]``: the dataset written once as
smaller images in a few large files that training memory-maps, and the image source that reads them.

Layout of DST: ``images-00000.bin`` ... (images back to back, a new file every ``SHARD_BYTES``),
``index.npy`` (int64 rows: shard, offset, length, width, height, one per image, in the source's sorted
order; stores written before the raw format have the first three columns only), ``names.txt`` (each
image's path relative to SRC, for messages) and ``prepared.json`` (what was done, written last: a
folder without it is not a prepared dataset).

Two encodings (``prepared.json``'s "encoding"): ``jpeg`` (the default: JPEG files, 20-30 KB an image at
N = 365) and ``raw`` (uint8 RGB pixels, row-major HWC, width x height x 3 bytes: 300 KB at N = 365, no
decoding at all and no re-encoding loss; FFCV's RAW mode). Raw costs 10-15x the disk and page cache of
jpeg for about 1.5x its images/s per core (docs/input-pipeline.md).

Why a memory-mapped store rather than tar shards read in sequence: it is indexed like the folder, so
the same ``EpochSampler`` (a full per-epoch shuffle split across ranks), exact mid-epoch resume and the
1-process = N-process equivalence carry over unchanged, with no shuffle buffer to approximate a
shuffle; and at 20-30 KB per image (ImageNet-1k at --max-side 365: 25-40 GB) the store stays in the
page cache of a training server after the first epoch, where random reads cost what sequential ones do.
Tar shards remain the better format for object stores and network file systems without a page cache.
"""
from __future__ import annotations

import io
import json
import mmap
import os
import shutil
import sys
import tempfile
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image

from .data import UNREADABLE_ERRORS, as_rgb, find_images

MANIFEST = "prepared.json"
FORMAT_VERSION = 1
SHARD_BYTES = 1 << 30
ENCODINGS = ("jpeg", "raw")


def is_prepared(folder) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def shrink(path: Path, max_side: int) -> Image.Image:
    """The image at ``path`` as RGB, its longer side at most ``max_side`` (Pillow's antialiased bilinear
    filter, as the training crop uses; JPEGs decoded at a reduced scale first when that still leaves at
    least twice the target, so the filter sees no decode artefacts)."""
    with Image.open(path) as opened:
        scale = max_side / max(opened.size)
        if scale < 1:
            opened.draft("RGB", (int(opened.width * scale * 2), int(opened.height * scale * 2)))
        image = as_rgb(opened)
        if scale < 1:
            size = (max(1, round(image.width * max_side / max(image.size))),
                    max(1, round(image.height * max_side / max(image.size))))
            image = image.resize(size, Image.BILINEAR, reducing_gap=3.0)
        return image.copy() if image is opened else image  # closing the file empties ``opened``


def encode(image: Image.Image, encoding: str, quality: int) -> bytes:
    """What the store holds for ``image``: JPEG file bytes, or its RGB pixels row by row (raw)."""
    if encoding == "raw":
        return image.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _shrink_or_error(job: Tuple[Path, int, int, str]) -> Tuple[Optional[bytes], Tuple[int, int], str]:
    path, max_side, quality, encoding = job
    try:
        image = shrink(path, max_side)
        return encode(image, encoding, quality), image.size, ""
    except UNREADABLE_ERRORS as error:
        return None, (0, 0), str(error)


def prepare(source: str, destination: str, max_side: int, quality: int = 90, workers: int = 1,
            progress: bool = True, encoding: str = "jpeg") -> dict:
    """Write ``source`` (a folder of images) to ``destination`` (must not exist yet); returns the manifest.
    The store is built in a temporary folder beside ``destination`` and renamed at the end, so an
    interrupted run leaves nothing half-written under that name."""
    if max_side < 16:
        raise ValueError(f"--max-side must be at least 16 pixels, got {max_side}")
    if not 1 <= quality <= 95:
        raise ValueError(f"--quality must be in 1..95, got {quality}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if encoding not in ENCODINGS:
        raise ValueError(f"--format must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    destination = Path(destination)
    if destination.exists():
        raise ValueError(f"{destination} already exists; give a new folder for the prepared data")
    if not destination.parent.is_dir():
        raise ValueError(f"{destination.parent} is not a folder: cannot create {destination.name} in it")
    root = Path(source)
    paths = find_images(root)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the renamed folder private
    try:
        manifest = _write_store(root, paths, staging, max_side, quality, workers, progress, encoding)
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_store(root: Path, paths: List[Path], folder: Path, max_side: int, quality: int, workers: int,
                 progress: bool, encoding: str) -> dict:
    from tqdm.auto import tqdm

    rows, names, unreadable = [], [], []
    shard, shard_file, offset = -1, None, SHARD_BYTES
    jobs = ((path, max_side, quality, encoding) for path in paths)
    pool = get_context("spawn").Pool(workers) if workers > 1 else None
    results: Iterator = pool.imap(_shrink_or_error, jobs, chunksize=16) if pool else map(_shrink_or_error, jobs)
    try:
        for path, (encoded, (width, height), error) in tqdm(zip(paths, results), total=len(paths), unit="img", disable=not progress,
                                           desc="prepare-data", file=sys.stderr):
            if encoded is None:
                unreadable.append(f"{path}: {error}")
                continue
            if offset + len(encoded) > SHARD_BYTES and offset > 0:
                if shard_file is not None:
                    shard_file.close()
                shard, offset = shard + 1, 0
                shard_file = open(folder / f"images-{shard:05d}.bin", "wb")
            shard_file.write(encoded)
            rows.append((shard, offset, len(encoded), width, height))
            names.append(str(path.relative_to(root)))
            offset += len(encoded)
    finally:
        if shard_file is not None:
            shard_file.close()
        if pool is not None:
            pool.terminate()
    if not rows:
        raise ValueError(f"--data {root}: none of its {len(paths)} image files can be read "
                         f"(last: {unreadable[-1]})")
    np.save(folder / "index.npy", np.asarray(rows, dtype=np.int64))
    (folder / "names.txt").write_text("".join(name.replace("\n", " ") + "\n" for name in names))
    manifest = {"format": FORMAT_VERSION, "source": str(root.resolve()), "images": len(rows), "shards": shard + 1,
                "bytes": int(sum(row[2] for row in rows)), "max_side": max_side, "encoding": encoding,
                "quality": quality if encoding == "jpeg" else None,
                "unreadable": len(unreadable), "unreadable_examples": unreadable[:10]}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


class PreparedImages:
    """A ``prepare-data`` folder as an image source (``open``/``describe``/``len``, like ``data.ImageFiles``).
    The shards are memory-mapped when first read in each process, so DataLoader workers map them
    themselves instead of inheriting the parent's maps."""

    def __init__(self, folder):
        self.root = Path(folder)
        self.manifest = json.loads((self.root / MANIFEST).read_text())
        if self.manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"--data {self.root}: prepared with format {self.manifest.get('format')}, this version "
                             f"reads format {FORMAT_VERSION}; run prepare-data again")
        self.encoding = self.manifest.get("encoding", "jpeg")  # stores from before the raw format: jpeg
        self.index = np.load(self.root / "index.npy")
        self._maps: dict = {}
        self._names: Optional[List[str]] = None

    def __len__(self):
        return len(self.index)

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def _shard(self, shard: int) -> mmap.mmap:
        if shard not in self._maps:
            with open(self.root / f"images-{shard:05d}.bin", "rb") as file:
                self._maps[shard] = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[shard]

    def open(self, index: int) -> Image.Image:
        """A JPEG opened lazily (as ``ImageFiles.open``), or raw pixels as an RGB image (no decoding:
        one copy of the bytes from the page cache into Pillow's image)."""
        row = self.index[index]
        shard, offset, length = int(row[0]), int(row[1]), int(row[2])
        stored = memoryview(self._shard(shard))[offset:offset + length]
        if self.encoding == "raw":
            return Image.frombuffer("RGB", (int(row[3]), int(row[4])), stored, "raw", "RGB", 0, 1)
        return Image.open(io.BytesIO(stored))

    def describe(self, index: int) -> str:
        if self._names is None:
            self._names = (self.root / "names.txt").read_text().splitlines()
        return f"{self.root} image {index} ({self._names[index]})"


def lossless_max_side(img_size: int) -> int:
    """The smallest --max-side that keeps every RandomResizedCrop(scale 0.67-1, ratio 3/4-4/3) of a 4:3
    image at least ``img_size`` pixels on each side, i.e. still downscaled as in the original: the
    smallest crop side is sqrt(0.67 * 3/4) of sqrt(area), and a 4:3 image's area is 3/4 of max_side^2."""
    return int(np.ceil(img_size / np.sqrt(0.67 * 0.75 * 0.75)))


def main_prepare(source: str, destination: str, max_side: int, quality: int, workers: int,
                 encoding: str = "jpeg") -> int:
    manifest = prepare(source, destination, max_side, quality, workers, encoding=encoding)
    stored_as = f"JPEG quality {quality}" if encoding == "jpeg" else "raw RGB pixels"
    print(f"wrote {manifest['images']} images ({manifest['bytes'] / 2 ** 20:.1f} MiB in {manifest['shards']} "
          f"shard(s), longer side <= {max_side}, {stored_as}) to {destination}"
          + (f"; skipped {manifest['unreadable']} unreadable file(s)" if manifest["unreadable"] else ""))
    return 0
