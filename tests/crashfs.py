"""crashfs: a FUSE file system that loses what was not fsync'ed when "power is cut".

kill -9 of a process never loses the page cache, so it cannot catch a missing
or misordered fdatasync. Mount crashfs over a directory and run the process
under test on it: every file's data changes (write, truncate) reach the
backing directory DURABLE only when that file is fsync'ed or fdatasync'ed
(FUSE's FSYNC op, which the kernel also sends for O_SYNC/O_DSYNC opens and
RWF_DSYNC writes). Until then they live in a scratch copy WORK that serves
reads. A power cut is SIGKILL of the crashfs process (plus a lazy unmount):
DURABLE then holds exactly what was durable, and a new mount starts from it.

The name of a new file is durable only once its directory is fsync'ed (POSIX:
an fsync of the file does not make its directory entry durable): a power cut
before that loses the file, whatever was fsync'ed into it.

Simplifications (say so in a report):
- Other metadata (mkdir, rename, unlink, rmdir, chmod) applies to DURABLE at
  once, as if the directory were fsync'ed after each change (a renamed new file
  stays new until its directory is fsync'ed).
- fallocate and lseek(SEEK_DATA/SEEK_HOLE) are not implemented, as on many
  FUSE and network file systems: callers get EOPNOTSUPP, and the kernel
  answers SEEK_DATA/SEEK_HOLE as if the whole file were data.
- fsync writes the synced ranges to DURABLE non-atomically: a cut during an
  fsync may tear it, like a real disk (the tests cut after the writer died).

A cut at a chosen point: :meth:`CrashMount.cut_after_fsync_of` names a file
suffix; right after the next fsync of such a file, the power is off: every
later fsync hangs (nothing completes on a machine without power; one request
at a time, so the whole file system stops) until the process is killed. A
misordered pair of fsyncs (progress before data) is then caught every time,
not only when a random cut falls between the two.

Run it as ``python -m tests.crashfs DURABLE WORK MOUNTPOINT CONTROL``
(foreground); :class:`CrashMount` mounts, cuts and unmounts it for tests.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MOUNT_TIMEOUT = 10.0


class CrashFS:
    """The FUSE operations (mfusepy's Operations protocol, paths relative to the mount)."""

    use_ns = True

    def __init__(self, durable: str, work: str, control: str) -> None:
        self.durable = durable
        self.work = work
        self.control = control  # a file naming the suffix to cut after (see the docstring)
        self.off = False
        #: files created since their directory's last fsync: removed from DURABLE at the next mount
        self.new_names: set[str] = set()
        self._lock = threading.Lock()
        #: path -> (smallest size since the last sync, [(offset, length)] written since)
        self._pending: dict[str, tuple[int, list[tuple[int, int]]]] = {}

    def _names_changed(self) -> None:
        # On disk before the operation returns: the power may go right after it.
        Path(self.control + ".names").write_text("".join(f"{p}\n" for p in sorted(self.new_names)))

    def _w(self, path: str) -> str:
        return self.work + path

    def _d(self, path: str) -> str:
        return self.durable + path

    def _note(self, path: str, size_before: int, rng: tuple[int, int] | None) -> None:
        with self._lock:
            low, ranges = self._pending.get(path, (size_before, []))
            if rng is not None:
                ranges.append(rng)
            self._pending[path] = (min(low, size_before), ranges)

    # ---- metadata: both trees at once
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.lstat(self._w(path))
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
                "st_atime_ns", "st_mtime_ns", "st_ctime_ns")
        out = {k: getattr(st, k) for k in keys}
        for k in ("st_atime", "st_mtime", "st_ctime"):
            out[k] = out.pop(k + "_ns")
        return out

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._w(path))]

    def statfs(self, path: str) -> dict[str, int]:
        s = os.statvfs(self._w(path))
        return {k: getattr(s, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                           "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._w(path), mode)
        os.mkdir(self._d(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._w(path))
        os.rmdir(self._d(path))
        return 0

    def unlink(self, path: str) -> int:
        os.unlink(self._w(path))
        os.unlink(self._d(path))
        with self._lock:
            self._pending.pop(path, None)
        if path in self.new_names:
            self.new_names.discard(path)
            self._names_changed()
        return 0

    def rename(self, old: str, new: str) -> int:
        os.rename(self._w(old), self._w(new))
        os.rename(self._d(old), self._d(new))
        with self._lock:  # unsynced data moves with the name
            self._pending.pop(new, None)
            if old in self._pending:
                self._pending[new] = self._pending.pop(old)
        if old in self.new_names:
            self.new_names.discard(old)
            self.new_names.add(new)
            self._names_changed()
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._w(path), mode)
        os.chmod(self._d(path), mode)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        if times is None:
            os.utime(self._w(path))
        else:
            os.utime(self._w(path), ns=times)
        return 0

    # ---- files
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        # The file exists in DURABLE (its synced data goes there) but is listed as new:
        # the next mount removes it unless its directory was fsync'ed meanwhile.
        if not os.path.exists(self._d(path)):
            self.new_names.add(path)
            self._names_changed()
        os.close(os.open(self._d(path), os.O_WRONLY | os.O_CREAT, mode))
        return os.open(self._w(path), os.O_RDWR | os.O_CREAT, mode)

    def open(self, path: str, flags: int) -> int:
        # O_SYNC/O_DSYNC need nothing here: the kernel sends FSYNC after each such write.
        return os.open(self._w(path), os.O_RDWR)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._note(path, os.fstat(fh).st_size, (offset, len(data)))
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self._note(path, os.stat(self._w(path)).st_size, None)
        os.truncate(self._w(path), length)
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0  # close() is no sync

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        while self.off:  # the power is off: this never returns (the test kills us)
            time.sleep(1)
        self._sync(path, fh)
        try:
            with open(self.control) as f:
                cut_after = f.read()
        except FileNotFoundError:
            return 0
        if cut_after and path.endswith(cut_after):
            self.off = True  # after this one: its caller sees it succeed, and none since
            Path(self.control + ".off").touch()
        return 0

    def _sync(self, path: str, fh: int) -> None:
        """Make ``path``'s pending changes durable: cut DURABLE to the smallest size the
        file had since the last sync (a shrink drops data), copy the written ranges, set
        the size, fsync."""
        with self._lock:
            pending = self._pending.pop(path, None)
        if pending is None:
            return
        low, ranges = pending
        size = os.fstat(fh).st_size
        dfd = os.open(self._d(path), os.O_WRONLY)
        try:
            os.ftruncate(dfd, min(low, size))
            for off, n in ranges:
                n = max(0, min(n, size - off))
                if n:
                    os.pwrite(dfd, os.pread(fh, n, off), off)
            os.ftruncate(dfd, size)
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        while self.off:
            time.sleep(1)
        parent = path if path == "/" else path.rstrip("/")
        synced = {p for p in self.new_names if os.path.dirname(p) == parent}
        if synced:
            self.new_names -= synced
            self._names_changed()
        return 0

    def opendir(self, path: str) -> int:
        return 0

    def releasedir(self, path: str, fh: int) -> int:
        return 0

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._w(path), amode):
            raise OSError(errno.EACCES, "access")
        return 0


def serve(durable: str, work: str, mountpoint: str, control: str) -> None:
    import mfusepy  # only the crashfs process needs it

    fs = CrashFS(os.path.abspath(durable), os.path.abspath(work), os.path.abspath(control))
    # Single-threaded: one request at a time keeps the pending map simple; mfusepy
    # registers only the operations CrashFS defines (no fallocate, no lseek).
    mfusepy.FUSE(fs, mountpoint, foreground=True, nothreads=True, fsname="crashfs")


def _mounted(mountpoint: Path) -> bool:
    target = str(mountpoint.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


class CrashMount:
    """A crashfs mount in its own process (a kill -9 of the process under test leaves it up).

    ``mount()`` starts it from DURABLE (the work tree is laid anew from it);
    ``power_cut()`` kills it, dropping every unsynced change; ``unmount()`` is the
    clean stop. Use it as a context manager: it always unmounts.
    """

    def __init__(self, root: Path) -> None:
        self.durable = root / "durable"
        self.work = root / "work"
        self.mountpoint = root / "mnt"
        self.log = root / "crashfs.log"
        self.control = root / "cut-after"
        self.proc: subprocess.Popen[bytes] | None = None
        for d in (self.durable, self.mountpoint):
            d.mkdir(parents=True, exist_ok=True)

    def mount(self) -> Path:
        self.control.unlink(missing_ok=True)
        Path(f"{self.control}.off").unlink(missing_ok=True)
        names = Path(f"{self.control}.names")
        if names.exists():  # new files whose directory was never fsync'ed: gone
            for p in names.read_text().split("\n"):
                if p:
                    Path(f"{self.durable}{p}").unlink(missing_ok=True)
            names.unlink()
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.copytree(self.durable, self.work)  # a fresh boot sees what was durable
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ, PYTHONPATH=str(root))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.crashfs", str(self.durable), str(self.work),
                 str(self.mountpoint), str(self.control)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=root, env=env,
            )
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not _mounted(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._stop()
                raise RuntimeError(f"crashfs did not mount: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        return self.mountpoint

    def cut_after_fsync_of(self, suffix: str) -> None:
        """Cut the power right after the next fsync of a file whose name ends with ``suffix``."""
        self.control.write_text(suffix)

    def wait_power_off(self, timeout: float) -> bool:
        """True once a cut armed with :meth:`cut_after_fsync_of` happened."""
        deadline = time.monotonic() + timeout
        while not Path(f"{self.control}.off").exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def power_cut(self) -> None:
        """Every change not yet fsync'ed is gone: the process holding it dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self._stop()

    def unmount(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True, timeout=10)
        self._stop()

    def _stop(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        if _mounted(self.mountpoint):  # a dead server leaves the mount: lazy unmount
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True, timeout=10)

    def __enter__(self) -> CrashMount:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.unmount()
        # An operation that raised (not an OSError) reached the caller as EINVAL: a crashfs bug.
        log = self.log.read_text(errors="replace") if self.log.exists() else ""
        if exc_type is None and "Uncaught" in log:
            raise AssertionError(f"crashfs failed an operation:\n{log[-3000:]}")


if __name__ == "__main__":
    serve(*sys.argv[1:5])
