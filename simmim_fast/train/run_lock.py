"""One run per output folder: process 0 of a run holds an OS lock (``flock``) on ``<output>/run.lock`` from
before it reads the folder's checkpoints until it ends. The kernel drops the lock when the process ends,
however it ends (kill -9 included), so a stale file locks nothing; the other ranks and hosts of the run take
no lock and share the folder. The file holds the holder's pid, host and start time, for the one line a
second run gets; it is removed when the run ends."""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

LOCK_NAME = "run.lock"


class FolderInUseError(ValueError):
    """Another live run holds the output folder (a user mistake: exit status 2 on the command line)."""


def _acquire(path: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive lock, or FolderInUseError naming the holder."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 4096).decode(errors="replace").strip() or "its details not yet written"
            os.close(descriptor)
            raise FolderInUseError(f"{path.parent} is in use by another run ({holder}); wait for it to end, or "
                                   "give another --output") from None
        try:
            current = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return descriptor
        os.close(descriptor)  # the previous holder removed this file as we opened it: lock the new one


@contextlib.contextmanager
def holding(output: Path, is_main: bool) -> Iterator[None]:
    """Hold ``output``'s lock for the block (process 0 only), creating the folder. If the block fails and
    the folder was created here and is still empty, it is removed: a refused run leaves nothing behind."""
    if not is_main:
        yield
        return
    output = Path(output)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    path = output / LOCK_NAME
    descriptor = _acquire(path)
    finished = False
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}, started "
                             f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
        yield
        finished = True
    finally:
        path.unlink(missing_ok=True)  # while still locked: a run waiting on this file retries the new one
        os.close(descriptor)
        if created and not finished and not any(output.iterdir()):
            output.rmdir()
