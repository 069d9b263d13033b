"""slowfs: a pass-through FUSE file system whose reads of LUN files are slow.

A read of a ``*.img`` file that misses the page cache reaches this process
and takes DELAY seconds here, like a cold file on a slow or remote disk;
once read (or written), its pages are in the kernel's page cache and never
come here again until evicted (``posix_fadvise(DONTNEED)`` on a clean file).
Everything else (metadata, SQLite, the progress files) passes through at
once. FUSE refuses RWF_NOWAIT (EOPNOTSUPP), as it does for real FUSE-backed
data dirs, so a FileBackend on it learns residency from cachestat(2).

Multi-threaded: a slow read holds one request, not the file system.
fallocate and lseek are not implemented (EOPNOTSUPP, as on crashfs).

Run it as ``python -m tests.slowfs BACKING MOUNTPOINT DELAY`` (foreground);
:class:`SlowMount` mounts and unmounts it for tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.fusefs import PassThrough, start, unmount


class SlowFS(PassThrough):
    """The FUSE operations: all of them pass through to BACKING, LUN files' reads late."""

    def __init__(self, backing: str, delay: float) -> None:
        self.backing = backing
        self.delay = delay

    def _real(self, path: str) -> str:
        return self.backing + path

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._real(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._real(path))
        return 0

    def unlink(self, path: str) -> int:
        os.unlink(self._real(path))
        return 0

    def rename(self, old: str, new: str) -> int:
        os.rename(self._real(old), self._real(new))
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._real(path), mode)
        return 0

    def create(self, path: str, mode: int, fi: object = None) -> int:
        return os.open(self._real(path), os.O_RDWR | os.O_CREAT, mode)

    def open(self, path: str, flags: int) -> int:
        return os.open(self._real(path), os.O_RDWR)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if path.endswith(".img"):
            time.sleep(self.delay)
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        os.truncate(self._real(path), length)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        os.fdatasync(fh)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        return 0


def serve(backing: str, mountpoint: str, delay: str) -> None:
    import mfusepy  # only the slowfs process needs it

    fs = SlowFS(os.path.abspath(backing), float(delay))
    mfusepy.FUSE(fs, mountpoint, foreground=True, nothreads=False, fsname="slowfs")


class SlowMount:
    """A slowfs mount in its own process, as a context manager: it always unmounts."""

    def __init__(self, root: Path, delay: float) -> None:
        self.backing = root / "backing"
        self.mountpoint = root / "mnt"
        self.log = root / "slowfs.log"
        self.delay = delay
        self.proc: subprocess.Popen[bytes] | None = None
        for d in (self.backing, self.mountpoint):
            d.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Path:
        args = [str(self.backing), str(self.mountpoint), str(self.delay)]
        self.proc = start("tests.slowfs", args, self.mountpoint, self.log)
        return self.mountpoint

    def __exit__(self, *exc: object) -> None:
        unmount(self.proc, self.mountpoint)
        self.proc = None


if __name__ == "__main__":
    serve(*sys.argv[1:4])
