"""Region state of a migrating LUN, in memory (numpy) and on disk.

The LUN is cut into regions of ``region_size`` bytes. In memory each region
is DIRTY (the target may differ from the source), COPYING, or CLEAN (the
target holds exactly the source's bytes: I2). Every host write bumps the
region's generation and counts as in flight until it completes, so a copy
that raced a write is never taken as clean (I3).

On disk (:class:`ProgressFile`) one bit per region says "clean". The rules
that make it crash-safe (I4):

- a region becomes clean on disk only after the target data was flushed;
- a write to a region that is clean on disk waits until the bit is cleared
  and that is durable, so no acknowledged write can hide behind a stale bit.

Both run through group commits: one fdatasync serves every waiter.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from emulator.durable import fsync_dir
from emulator.nbd.errors import BackendError

DIRTY = 0
COPYING = 1
CLEAN = 2

#: A migration's default region size doubles until its LUN has at most this many
#: regions: status, checkpoints and the cutover pause scan them all (a 6 ms pause at
#: 16M regions, 44-53 ms at 64M: README, "Limits").
DEFAULT_MAX_REGIONS = 1 << 24
#: A region size asked for that gives more is refused: ~19 bytes a region in memory
#: (1.2 GiB at 64M), where a 1 PiB LUN in 1 MiB regions would take the array's 20 GiB.
MAX_REGIONS = 1 << 26

HEADER_SIZE = 4096
MAGIC = "blockmig-progress-v1"


def regions_of(size: int, region_size: int) -> int:
    return (size + region_size - 1) // region_size


def region_size_for(size: int, region_size: int, most: int | None = None) -> int:
    """``region_size`` (a power of two), doubled until a LUN of ``size`` bytes has at
    most ``most`` regions (DEFAULT_MAX_REGIONS)."""
    most = DEFAULT_MAX_REGIONS if most is None else most
    while regions_of(size, region_size) > most:
        region_size <<= 1
    return region_size


class RegionMap:
    """In-memory state of every region."""

    def __init__(self, size: int, region_size: int) -> None:
        if region_size <= 0 or region_size & (region_size - 1):
            raise ValueError(f"region size {region_size} must be a power of two")
        self.size = size
        self.region_size = region_size
        self.shift = region_size.bit_length() - 1
        self.count = (size + region_size - 1) >> self.shift
        self.state: npt.NDArray[np.uint8] = np.zeros(self.count, np.uint8)  # all DIRTY
        self.gen: npt.NDArray[np.uint32] = np.zeros(self.count, np.uint32)
        self.inflight: npt.NDArray[np.int32] = np.zeros(self.count, np.int32)
        self.last_write: npt.NDArray[np.float64] = np.zeros(self.count, np.float64)
        #: the target may hold data here (False only where it is known to be a hole)
        self.target_data: npt.NDArray[np.bool_] = np.ones(self.count, np.bool_)
        #: regions being copied -> set when the copy ends (active mode holds writes on it)
        self.copying: dict[int, asyncio.Event] = {}
        #: regions a copy waits to see idle -> done when their last write in flight ends
        self._idle_waiters: dict[int, asyncio.Future[None]] = {}

    def span(self, offset: int, length: int) -> tuple[int, int]:
        """Regions [first, end) touched by a byte range (length > 0)."""
        return offset >> self.shift, ((offset + length - 1) >> self.shift) + 1

    def region_bytes(self, r: int) -> tuple[int, int]:
        off = r << self.shift
        return off, min(self.region_size, self.size - off)

    def all_clean(self, r0: int, r1: int) -> bool:
        if r1 - r0 == 1:
            return bool(self.state[r0] == CLEAN)
        return bool((self.state[r0:r1] == CLEAN).all())

    # Every host write runs these: one region (the usual case) skips numpy's
    # slicing, which costs ~1 us per call against ~0.05 us for an item.
    def begin_write(self, r0: int, r1: int, now: float) -> None:
        if r1 - r0 == 1:
            self.gen[r0] += 1
            self.inflight[r0] += 1
            self.last_write[r0] = now
            return
        self.gen[r0:r1] += 1
        self.inflight[r0:r1] += 1
        self.last_write[r0:r1] = now

    def being_copied(self, r0: int, r1: int) -> bool:
        c = self.copying
        if not c:
            return False
        return r0 in c if r1 - r0 == 1 else any(r in c for r in range(r0, r1))

    def end_write(self, r0: int, r1: int) -> None:
        if r1 - r0 == 1:
            self.inflight[r0] -= 1
        else:
            self.inflight[r0:r1] -= 1
        if self._idle_waiters:
            for r in range(r0, r1):
                w = self._idle_waiters.get(r)
                if w is not None and not self.inflight[r]:
                    del self._idle_waiters[r]
                    if not w.done():
                        w.set_result(None)

    async def idle(self, r: int) -> None:
        """Return once region ``r`` has no write in flight."""
        if not self.inflight[r]:
            return
        w = self._idle_waiters.get(r)
        if w is None:
            w = self._idle_waiters[r] = asyncio.get_running_loop().create_future()
        await asyncio.shield(w)  # a cancelled waiter must not cancel it for the others

    def mark_dirty(self, r0: int, r1: int) -> int:
        """Mark regions dirty; returns the bytes of those that were not (what the
        copier has to copy again: the dirty rate that decides convergence)."""
        if r1 - r0 == 1:
            was = self.state[r0]
            self.state[r0] = DIRTY
            return 0 if was == DIRTY else self.region_size
        st = self.state[r0:r1]
        again = int(np.count_nonzero(st != DIRTY))
        st[:] = DIRTY
        return again * self.region_size

    def dirty_count(self) -> int:
        return int(np.count_nonzero(self.state != CLEAN))

    def dirty_bytes(self) -> int:
        n = self.dirty_count()
        if n and self.state[-1] != CLEAN:  # the last region may be short
            return (n - 1) * self.region_size + self.region_bytes(self.count - 1)[1]
        return n * self.region_size

    def clean_bytes(self) -> int:
        return self.size - self.dirty_bytes()

    def next_dirty(self, start: int) -> int:
        """Index of the first DIRTY region at or after ``start`` (wrapping), or -1."""
        idx = np.flatnonzero(self.state[start:] == DIRTY)
        if idx.size:
            return start + int(idx[0])
        idx = np.flatnonzero(self.state[:start] == DIRTY)
        return int(idx[0]) if idx.size else -1


class ProgressFile:
    """Durable clean-bitmap with group commit.

    Layout: a 4 KiB JSON header (magic, size, region size, source, count)
    padded with spaces, then one bit per region (numpy packbits, 1 = clean).
    """

    def __init__(
        self,
        path: Path,
        regions: RegionMap,
        header: dict[str, object],
        fsync: Callable[[int], None] = os.fdatasync,
    ) -> None:
        self.path = path
        self.regions = regions
        self.disk_clean: npt.NDArray[np.bool_] = np.zeros(regions.count, np.bool_)
        #: the bits the file may hold until the commit under way is durable: those of the
        #: last durable commit and of the one being written (ensure_dirty clears
        #: ``disk_clean`` at once, long before the file says so)
        self._on_disk: npt.NDArray[np.bool_] = np.zeros(regions.count, np.bool_)
        self._fsync = fsync
        self._header = {
            "magic": MAGIC,
            "size": regions.size,
            "region_size": regions.region_size,
            "count": regions.count,
            **header,
        }
        self._fd = -1
        self._requested = 0  # bumped by every change that must reach the disk
        self._committed = 0
        #: requests up to this one failed with ``_error`` (the file could not be written)
        self._failed = 0
        self._error: BackendError | None = None
        self._cond: asyncio.Condition | None = None
        self._committer: asyncio.Task[None] | None = None
        self.commits = 0
        self.closed = False

    # ---- open / load
    def create(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.pwrite(fd, self._header_bytes(), 0)
        os.pwrite(fd, np.packbits(self.disk_clean).tobytes(), HEADER_SIZE)
        os.fsync(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self._fd = fd

    def load(self) -> dict[str, object]:
        """Read the header and the clean bits; mark clean regions CLEAN in memory."""
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        head = json.loads(os.pread(fd, HEADER_SIZE, 0).rstrip(b" \0"))
        if head.get("magic") != MAGIC:
            os.close(fd)
            raise ValueError(f"{self.path}: not a blockmig progress file")
        r = self.regions
        if head["size"] != r.size or head["region_size"] != r.region_size:
            os.close(fd)
            raise ValueError(f"{self.path}: was written for another size or region size")
        nbytes = (r.count + 7) // 8
        bits = np.frombuffer(os.pread(fd, nbytes, HEADER_SIZE), np.uint8)
        self.disk_clean = np.unpackbits(bits, count=r.count).astype(np.bool_)
        self._on_disk = self.disk_clean.copy()
        r.state[self.disk_clean] = CLEAN
        self._fd = fd
        return dict(head)

    def _header_bytes(self) -> bytes:
        raw = json.dumps(self._header).encode()
        if len(raw) > HEADER_SIZE:
            raise ValueError("progress header too large")
        return raw.ljust(HEADER_SIZE, b" ")

    def any_clean(self, r0: int, r1: int) -> bool:
        """Is any of [r0, r1) clean on disk, or may it still be (its clear not yet durable)?"""
        if r1 - r0 == 1:
            return bool(self.disk_clean[r0] or self._on_disk[r0])
        return bool(self.disk_clean[r0:r1].any() or self._on_disk[r0:r1].any())

    # ---- group commit
    async def ensure_dirty(self, r0: int, r1: int) -> None:
        """Clear the on-disk clean bits of [r0, r1) and wait until that is durable. Also
        when another write cleared them and waits for the commit: a write that went on
        meanwhile would be acknowledged while a crash still finds the region clean (I4)."""
        if not self.any_clean(r0, r1):
            return
        self.disk_clean[r0:r1] = False
        await self.commit()

    async def commit(self) -> None:
        """Write the current bits; return when a commit that began after this call is durable."""
        if self.closed:
            return
        if self._cond is None:
            self._cond = asyncio.Condition()
        self._requested += 1
        mine = self._requested
        if self._committer is None or self._committer.done():
            self._committer = asyncio.ensure_future(self._commit_loop())
        async with self._cond:
            await self._cond.wait_for(lambda: self._committed >= mine or self._failed >= mine or self.closed)
        if self._committed < mine and self._failed >= mine and self._error is not None:
            raise self._error

    async def _commit_loop(self) -> None:
        assert self._cond is not None
        loop = asyncio.get_running_loop()
        while self._committed < self._requested and not self.closed:
            upto = self._requested
            snap = self.disk_clean.copy()  # at commit start
            self._on_disk |= snap  # the file may hold either until the fsync returns
            try:
                await loop.run_in_executor(None, self._write, np.packbits(snap).tobytes())
            except OSError as e:
                # Its waiters get the error rather than wait for good (a host write hung on
                # ensure_dirty, the migration on its checkpoint); the next commit tries again.
                self._error = BackendError(e.errno or errno.EIO, f"progress file {self.path}: {e}")
                self._failed = self._requested  # also those that came meanwhile: no commit follows
                async with self._cond:
                    self._cond.notify_all()
                return
            self._on_disk = snap
            self.commits += 1
            self._committed = upto
            async with self._cond:
                self._cond.notify_all()

    def _write(self, data: bytes) -> None:
        if self._fd < 0:
            return
        os.pwrite(self._fd, data, HEADER_SIZE)
        self._fsync(self._fd)

    async def close(self, remove: bool = False) -> None:
        """Stop committing (waiting out a write in progress), close, maybe delete."""
        self.closed = True
        if self._committer is not None:
            try:
                await self._committer
            except Exception:
                pass
        if self._cond is not None:
            async with self._cond:
                self._cond.notify_all()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if remove:
            self.path.unlink(missing_ok=True)
