"""What the tests' FUSE file systems (slowfs, crashfs) share: metadata passed
through to a real directory, and a mount served by a process of its own."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MOUNT_TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parent.parent


class PassThrough:
    """FUSE operations (mfusepy's Operations protocol, paths relative to the mount)
    that answer from the real directory ``_real(path)`` names."""

    use_ns = True

    def _real(self, path: str) -> str:
        raise NotImplementedError

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.lstat(self._real(path))
        out: dict[str, Any] = {
            k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks")
        }
        for k in ("st_atime", "st_mtime", "st_ctime"):
            out[k] = getattr(st, k + "_ns")
        return out

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    def statfs(self, path: str) -> dict[str, int]:
        s = os.statvfs(self._real(path))
        keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail")
        return {k: getattr(s, k) for k in (*keys, "f_flag", "f_namemax")}

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        if times is None:
            os.utime(self._real(path))
        else:
            os.utime(self._real(path), ns=times)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def flush(self, path: str, fh: int) -> int:
        return 0  # close() is no sync

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def opendir(self, path: str) -> int:
        return 0

    def releasedir(self, path: str, fh: int) -> int:
        return 0

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._real(path), amode):
            raise OSError(errno.EACCES, "access")
        return 0


def mounted(mountpoint: Path) -> bool:
    target = str(mountpoint.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def start(module: str, args: list[str], mountpoint: Path, log: Path) -> subprocess.Popen[bytes]:
    """Run ``python -m module *args`` (a FUSE server, in the foreground) until
    ``mountpoint`` is mounted; RuntimeError with its log if it is not in time."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            cwd=ROOT,
            env=env,
        )
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not mounted(mountpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc, mountpoint)
            raise RuntimeError(f"{module} did not mount: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.02)
    return proc


def stop(proc: subprocess.Popen[bytes] | None, mountpoint: Path) -> None:
    """Wait for the server to end (after an unmount or a kill), and unmount
    lazily what a dead server left mounted."""
    if proc is not None:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, timeout=10)


def unmount(proc: subprocess.Popen[bytes] | None, mountpoint: Path) -> None:
    """The clean stop: fusermount -u while the server runs, then :func:`stop`."""
    if proc is not None and proc.poll() is None:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, timeout=10)
    stop(proc, mountpoint)
