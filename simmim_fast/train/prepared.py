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

import glob
import io
import json
import mmap
import os
import shutil
import socket
import sys
import tempfile
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image

from .._checks import check_writable_folder
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
        raise ValueError(f"DST {destination} already exists; give a new folder for the prepared data")
    if not destination.parent.is_dir():
        raise ValueError(f"DST {destination}: {destination.parent} is not a folder: cannot create "
                         f"{destination.name} in it")
    check_writable_folder("DST", destination)
    root = Path(source)
    paths = find_images(root, "SRC")
    remove_interrupted_stores(destination)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(destination) + f"{socket.gethostname()}.{os.getpid()}.",
                                    dir=destination.parent))
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


def _staging_prefix(destination: Path) -> str:
    """The name of a store being written starts with this, then its writer's host and process id."""
    return f".{destination.name}.prepare-data."


def remove_interrupted_stores(destination: Path) -> None:
    """Delete what a killed ``prepare-data`` into ``destination`` left beside it: staging folders whose
    writer (a process of this host, named in the folder's name) no longer runs."""
    prefix = _staging_prefix(destination)
    for staging in destination.parent.glob(glob.escape(prefix) + "*"):
        host, _, pid = staging.name[len(prefix):].rsplit(".", 1)[0].rpartition(".")
        if staging.is_dir() and host == socket.gethostname() and pid.isdigit() and not _running(int(pid)):
            print(f"prepare-data: removing {staging}, left by an interrupted run", file=sys.stderr)
            shutil.rmtree(staging, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


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
        raise ValueError(f"SRC {root}: none of its {len(paths)} image files can be read "
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
        self.manifest = read_manifest(self.root)
        self.encoding = self.manifest.get("encoding", "jpeg")  # stores from before the raw format: jpeg
        self.index = read_index(self.root, self.manifest)
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
            self._names = (self.root / "names.txt").read_text(errors="replace").splitlines()
        name = self._names[index] if index < len(self._names) else "name missing from names.txt"
        return f"{self.root} image {index} ({name})"


def _damaged(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}; the prepare-data store is damaged, run prepare-data again")


def _reason(error: Exception) -> str:
    """An error's first line, without the path an OSError repeats."""
    return getattr(error, "strerror", None) or str(error).splitlines()[0]


def read_manifest(root: Path) -> dict:
    """``prepared.json``, checked: a JSON object of this format with image and shard counts."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _damaged(path, f"not a readable manifest ({_reason(error)})") from None
    if not isinstance(manifest, dict):
        raise _damaged(path, f"expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"--data {root}: prepared with format {manifest.get('format')}, this version "
                         f"reads format {FORMAT_VERSION}; run prepare-data again")
    for key in ("images", "shards"):
        value = manifest.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _damaged(path, f"{key!r} must be a count >= 1, got {value!r}")
    if manifest.get("encoding", "jpeg") not in ENCODINGS:
        raise _damaged(path, f"unknown encoding {manifest.get('encoding')!r} (expected {', '.join(ENCODINGS)})")
    return manifest


def read_index(root: Path, manifest: dict) -> np.ndarray:
    """``index.npy``, checked against the manifest and the shard files: int64 rows (shard, offset, length
    [, width, height]), one per image, each inside its shard (a vectorised pass: milliseconds for ImageNet)."""
    path = root / "index.npy"
    try:
        index = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise _damaged(path, f"not a readable index ({_reason(error)})") from None
    columns = (5,) if manifest.get("encoding") == "raw" else (3, 5)  # 3: stores from before the raw format
    if not isinstance(index, np.ndarray) or index.dtype != np.int64 or index.ndim != 2 or index.shape[1] not in columns:
        found = f"{index.dtype} {index.shape}" if isinstance(index, np.ndarray) else type(index).__name__
        raise _damaged(path, f"expected int64 rows of (shard, offset, length, width, height), got {found}")
    if len(index) != manifest["images"]:
        raise _damaged(path, f"{len(index)} rows, but {MANIFEST} counts {manifest['images']} images")
    shard, offset, length = index[:, 0], index[:, 1], index[:, 2]
    bad = np.flatnonzero((shard < 0) | (shard >= manifest["shards"]))
    if len(bad):
        raise _damaged(path, f"row {bad[0]} names shard {shard[bad[0]]}, but {MANIFEST} counts {manifest['shards']}")
    sizes = np.zeros(manifest["shards"], dtype=np.int64)
    for number in range(manifest["shards"]):
        shard_path = root / f"images-{number:05d}.bin"
        try:
            sizes[number] = shard_path.stat().st_size
        except OSError as error:
            raise _damaged(shard_path, f"missing ({_reason(error)})") from None
    size = sizes[shard]
    bad = np.flatnonzero((offset < 0) | (length < 1) | (length > size) | (offset > size - length))
    if len(bad):
        row = bad[0]
        raise _damaged(path, f"row {row} points at bytes {offset[row]}..{offset[row] + length[row]} of "
                             f"images-{shard[row]:05d}.bin, which holds {size[row]} bytes")
    if manifest.get("encoding") == "raw":
        bad = np.flatnonzero((index[:, 3] < 1) | (index[:, 4] < 1) | (length != index[:, 3] * index[:, 4] * 3))
        if len(bad):
            raise _damaged(path, f"row {bad[0]}: {length[bad[0]]} bytes are not the {index[bad[0], 3]}x"
                                 f"{index[bad[0], 4]} RGB pixels it names")
    return index


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
