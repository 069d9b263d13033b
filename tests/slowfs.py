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

import errno
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MOUNT_TIMEOUT = 10.0


class SlowFS:
    """The FUSE operations (mfusepy's Operations protocol, paths relative to the mount)."""

    use_ns = True

    def __init__(self, backing: str, delay: float) -> None:
        self.backing = backing
        self.delay = delay

    def _b(self, path: str) -> str:
        return self.backing + path

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.lstat(self._b(path))
        out: dict[str, Any] = {
            k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks")
        }
        for k in ("st_atime", "st_mtime", "st_ctime"):
            out[k] = getattr(st, k + "_ns")
        return out

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._b(path))]

    def statfs(self, path: str) -> dict[str, int]:
        s = os.statvfs(self._b(path))
        names = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_namemax")
        return {k: getattr(s, k) for k in names}

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._b(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._b(path))
        return 0

    def unlink(self, path: str) -> int:
        os.unlink(self._b(path))
        return 0

    def rename(self, old: str, new: str) -> int:
        os.rename(self._b(old), self._b(new))
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._b(path), mode)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        if times is None:
            os.utime(self._b(path))
        else:
            os.utime(self._b(path), ns=times)
        return 0

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        return os.open(self._b(path), os.O_RDWR | os.O_CREAT, mode)

    def open(self, path: str, flags: int) -> int:
        return os.open(self._b(path), os.O_RDWR)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if path.endswith(".img"):
            time.sleep(self.delay)
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        os.truncate(self._b(path), length)
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        os.fdatasync(fh)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        return 0

    def opendir(self, path: str) -> int:
        return 0

    def releasedir(self, path: str, fh: int) -> int:
        return 0

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._b(path), amode):
            raise OSError(errno.EACCES, "access")
        return 0


def serve(backing: str, mountpoint: str, delay: str) -> None:
    import mfusepy  # only the slowfs process needs it

    fs = SlowFS(os.path.abspath(backing), float(delay))
    mfusepy.FUSE(fs, mountpoint, foreground=True, nothreads=False, fsname="slowfs")


def _mounted(mountpoint: Path) -> bool:
    target = str(mountpoint.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


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
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ, PYTHONPATH=str(root))
        cmd = [sys.executable, "-m", "tests.slowfs", str(self.backing), str(self.mountpoint), str(self.delay)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=root, env=env
            )
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not _mounted(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"slowfs did not mount: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        return self.mountpoint

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True, timeout=10)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        if _mounted(self.mountpoint):  # a dead server leaves the mount: lazy unmount
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True, timeout=10)


if __name__ == "__main__":
    serve(*sys.argv[1:4])
