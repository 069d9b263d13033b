"""crashfs: a FUSE file system that loses what was not fsync'ed when "power is cut".

kill -9 of a process never loses the page cache, so it cannot catch a missing
or misordered fdatasync. Mount crashfs over a directory and run the process
under test on it: every file's data changes (write, truncate) reach the
backing directory DURABLE only when that file is fsync'ed or fdatasync'ed
(FUSE's FSYNC op, which the kernel also sends for O_SYNC/O_DSYNC opens and
RWF_DSYNC writes). Until then they live in a scratch copy WORK that serves
reads. A power cut is SIGKILL of the crashfs process (plus a lazy unmount):
DURABLE then holds exactly what was durable, and a new mount starts from it.

Names are durable only once their directory is fsync'ed (POSIX: an fsync of
a file does not make its directory entry durable). A new file or directory
(create, mkdir) is lost at a power cut before that, whatever was fsync'ed into
it (a lost directory takes everything under it along). An unlink, rmdir or
rename is undone at a cut unless its directory (both, for a rename) was
fsync'ed since: the old name comes back with the data that was durable, and a
file a rename replaced comes back too. DURABLE applies every change at once;
the changes a cut must undo are logged beside CONTROL (``.state``; removed and
replaced entries wait in ``.stash``), and the next mount undoes them, newest
first.

Simplifications (say so in a report):
- chmod and utimens are not modelled (chmod applies to DURABLE at once).
- Changes are durable per directory: an fsync of one makes its own changes
  durable, never those of other directories made before them (ext4's journal
  would commit them all); each change still pending is undone as far as it
  still applies.
- A cut in the middle of one operation (the crashfs process is killed while it
  serves one) may leave that operation half applied or half recorded.
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

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.fusefs import PassThrough, start, stop, unmount


class CrashFS(PassThrough):
    """The FUSE operations: reads and metadata from WORK, what is synced to DURABLE too."""

    def __init__(self, durable: str, work: str, control: str) -> None:
        self.durable = durable
        self.work = work
        self.control = control  # a file naming the suffix to cut after (see the docstring)
        self.off = False
        #: changes of names not yet durable, oldest first: {"op": create, mkdir, unlink,
        #: rmdir or rename; "path" (a rename's new name; "old" its old one); "stash":
        #: where the entry it removed or replaced waits, or ""; "dirs": the directories
        #: still to fsync}
        self.undo: list[dict[str, Any]] = []
        self.stash = control + ".stash"
        os.makedirs(self.stash, exist_ok=True)
        self._stashed = 0
        self._lock = threading.Lock()
        #: path -> (smallest size since the last sync, [(offset, length)] written since)
        self._pending: dict[str, tuple[int, list[tuple[int, int]]]] = {}

    def _names_changed(self) -> None:
        # On disk before the operation returns (the power may go right after it), and
        # atomically: the power may go while it is written.
        state = json.dumps(self.undo)
        tmp = self.control + ".state.tmp"
        Path(tmp).write_text(state)
        os.replace(tmp, self.control + ".state")

    def _stash(self, path: str) -> str:
        """Move DURABLE's ``path`` aside (a cut brings it back) and return where to."""
        self._stashed += 1
        where = f"{self.stash}/{self._stashed}"
        os.rename(self._d(path), where)
        return where

    def _log(self, op: str, path: str, stash: str = "") -> None:
        self.undo.append({"op": op, "path": path, "stash": stash, "dirs": [os.path.dirname(path)]})
        self._names_changed()

    def _real(self, path: str) -> str:
        return self.work + path

    _w = _real  # the work tree, beside _d's durable one

    def _d(self, path: str) -> str:
        return self.durable + path

    def _note(self, path: str, size_before: int, rng: tuple[int, int] | None) -> None:
        with self._lock:
            low, ranges = self._pending.get(path, (size_before, []))
            if rng is not None:
                ranges.append(rng)
            self._pending[path] = (min(low, size_before), ranges)

    # ---- metadata: both trees at once
    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._w(path), mode)
        self._log("mkdir", path)
        os.mkdir(self._d(path), mode)
        return 0

    # A removed entry waits in the stash (with what a cut must bring back) until its
    # directory is fsync'ed; so does one a rename replaces.
    def rmdir(self, path: str) -> int:
        os.rmdir(self._w(path))
        self._log("rmdir", path, self._stash(path))
        return 0

    def unlink(self, path: str) -> int:
        os.unlink(self._w(path))
        with self._lock:
            self._pending.pop(path, None)
        self._log("unlink", path, self._stash(path))
        return 0

    def rename(self, old: str, new: str) -> int:
        os.rename(self._w(old), self._w(new))
        stash = self._stash(new) if os.path.lexists(self._d(new)) else ""
        dirs = sorted({os.path.dirname(old), os.path.dirname(new)})
        self.undo.append({"op": "rename", "old": old, "path": new, "stash": stash, "dirs": dirs})
        self._names_changed()
        os.rename(self._d(old), self._d(new))

        def moved(p: str) -> str:  # what was at or under ``old`` (a directory's files)
            return new + p[len(old) :] if p == old or p.startswith(old + "/") else p

        with self._lock:  # unsynced data moves with the name
            self._pending.pop(new, None)
            self._pending = {moved(p): v for p, v in self._pending.items()}
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._w(path), mode)
        os.chmod(self._d(path), mode)
        return 0

    # ---- files
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        # The file exists in DURABLE (its synced data goes there) but is logged as new:
        # the next mount removes it unless its directory was fsync'ed meanwhile.
        if not os.path.lexists(self._d(path)):
            self._log("create", path)
        os.close(os.open(self._d(path), os.O_WRONLY | os.O_CREAT, mode))
        return os.open(self._w(path), os.O_RDWR | os.O_CREAT, mode)

    def open(self, path: str, flags: int) -> int:
        # O_SYNC/O_DSYNC need nothing here: the kernel sends FSYNC after each such write.
        return os.open(self._w(path), os.O_RDWR)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._note(path, os.fstat(fh).st_size, (offset, len(data)))
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self._note(path, os.stat(self._w(path)).st_size, None)
        os.truncate(self._w(path), length)
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
        synced = [u for u in self.undo if parent in u["dirs"]]
        if synced:
            for u in synced:
                u["dirs"].remove(parent)
            self.undo = [u for u in self.undo if u["dirs"]]
            self._names_changed()
            for u in synced:  # durable now: what it removed or replaced is gone for good
                if not u["dirs"] and u["stash"]:
                    _rm(u["stash"])
        return 0


def _rm(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        Path(path).unlink(missing_ok=True)


def _move_back(src: str, dst: str) -> None:
    """Undo a move to ``src`` as far as it still applies (its directory may be gone)."""
    if os.path.lexists(src) and not os.path.lexists(dst) and os.path.isdir(os.path.dirname(dst)):
        os.rename(src, dst)


def recover(durable: str, control: str) -> None:
    """What a power cut leaves: undo the changes of names not yet durable, newest
    first, and empty the stash."""
    state = Path(control + ".state")
    if state.exists():
        for u in reversed(json.loads(state.read_text())):
            path = durable + u["path"]
            if u["op"] in ("create", "mkdir"):
                _rm(path)  # a lost directory takes what is in it along
            elif u["op"] == "rename":
                _move_back(path, durable + u["old"])
            if u["stash"]:
                _move_back(u["stash"], path)
        state.unlink()
    shutil.rmtree(control + ".stash", ignore_errors=True)


def serve(durable: str, work: str, mountpoint: str, control: str) -> None:
    import mfusepy  # only the crashfs process needs it

    fs = CrashFS(os.path.abspath(durable), os.path.abspath(work), os.path.abspath(control))
    # Single-threaded: one request at a time keeps the pending map simple; mfusepy
    # registers only the operations CrashFS defines (no fallocate, no lseek).
    mfusepy.FUSE(fs, mountpoint, foreground=True, nothreads=True, fsname="crashfs")


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
        recover(str(self.durable), str(self.control))
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.copytree(self.durable, self.work)  # a fresh boot sees what was durable
        args = [str(self.durable), str(self.work), str(self.mountpoint), str(self.control)]
        self.proc = start("tests.crashfs", args, self.mountpoint, self.log)
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
        stop(self.proc, self.mountpoint)
        self.proc = None

    def unmount(self) -> None:
        unmount(self.proc, self.mountpoint)
        self.proc = None

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
