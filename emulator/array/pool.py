"""A storage pool: a directory of thin LUN files with a capacity.

LUNs are sparse, so the pool may be overcommitted; what counts is the bytes
actually allocated. A write that could allocate past the capacity fails with
ENOSPC and changes nothing. The check is cheap while the pool has room: an
estimate that only grows is kept between exact recounts, and only when the
estimate reaches the capacity are the files stat'ed and the write's range
inspected for holes.

Pools are thin and may together be larger than the file system under them:
then the file system, not a pool, fills first. The array keeps FS_RESERVE
bytes of it free for itself (array.db and its journal, progress files), so
that hosts' writes get ENOSPC first: once a host had taken the last byte,
no LUN could be deleted to free space (its delete is recorded first).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from emulator.nbd.errors import BackendError

from .file_backend import FileBackend

BLOCK = 4096  # allocation unit assumed for charging (ext4/xfs default)
#: near the capacity every write is checked exactly: file system metadata
#: (extent-tree blocks) grows outside what the writes themselves allocate
SLACK = 64 * 1024
#: bytes of a pool's file system that writes to LUNs leave free for the array's metadata
FS_RESERVE = 16 << 20


class FsRoom:
    """The room the pools on one file system share (:data:`FS_RESERVE` kept free).

    Checked like a pool's capacity: writes draw on a budget measured by statvfs, and
    only when it runs out is the file system asked again."""

    def __init__(self, path: Path, reserve: int = FS_RESERVE) -> None:
        self.path = path
        self.reserve = reserve
        self.budget = 0  # what writes may still take before the next statvfs
        self.reserved = 0  # charged by writes in flight, on every pool of the file system

    def fs_free(self) -> int:
        """Bytes of the file system free to the array."""
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def avail(self) -> int:
        """Bytes writes may still allocate: free to us, less the reserve and the writes in flight."""
        self.budget = max(0, self.fs_free() - self.reserve - self.reserved)
        return self.budget


class Pool:
    def __init__(self, name: str, capacity: int, directory: Path, room: FsRoom | None = None) -> None:
        self.name = name
        self.capacity = capacity
        self.directory = directory
        #: its file system's room, shared with the other pools there (None: not checked)
        self.room = room
        self.files: dict[str, FileBackend] = {}  # LUN name -> its file
        #: the new files of LUNs moving into the pool (mirror/manager.py), by LUN name:
        #: their copies fill it before they are its LUNs
        self.incoming: dict[str, FileBackend] = {}
        self._estimate = 0  # upper bound of allocated bytes, writes in flight included
        self._reserved = 0  # charged by writes still in flight

    def used(self) -> int:
        """Exact allocated bytes of every LUN file in the pool."""
        total = 0
        for fb in (*self.files.values(), *self.incoming.values()):
            try:
                # st_blocks: what the file system really gave the file, unwritten
                # extents of fallocate(ZERO_RANGE) and extent-tree blocks included
                total += os.fstat(fb.fd).st_blocks * 512
            except OSError:
                pass
        self._estimate = total + self._reserved  # an upper bound: completed plus in flight
        return total

    @property
    def free(self) -> int:
        return self.free_given(self.used())

    def free_given(self, used: int) -> int:
        """What writes may still allocate with ``used`` bytes allocated: the pool's room,
        or its file system's if that is less."""
        free = max(0, self.capacity - used)
        return free if self.room is None else min(free, self.room.avail())

    def charge(self, fb: FileBackend, lun: str, offset: int, length: int) -> int:
        """Reserve room for a write that may allocate ``length`` bytes; ENOSPC if it
        cannot fit. Returns the bytes reserved: give them back with :meth:`release`
        once the write is done (reserved writes count until then, so concurrent
        writes cannot overrun the pool together)."""
        # A write into a hole allocates whole blocks: charge what it may allocate.
        need = ((offset + length + BLOCK - 1) // BLOCK - offset // BLOCK) * BLOCK
        room = self.room
        if self._estimate + need <= self.capacity - SLACK and (room is None or need <= room.budget):
            self._estimate += need
            self._reserved += need
            if room is not None:
                room.budget -= need
                room.reserved += need
            return need
        used = self.used()
        new = _unallocated(fb, offset, length)
        # An overwrite of allocated blocks needs no space, however full the pool looks
        # (file system metadata blocks count in st_blocks).
        if new and used + self._reserved + new > self.capacity:
            raise BackendError(
                errno.ENOSPC,
                f"pool {self.name!r} is full ({used} of {self.capacity} bytes used"
                f"{f', {self._reserved} reserved by writes in flight' if self._reserved else ''}): "
                f"write of {length} bytes to LUN {lun!r} refused; grow the pool or free space",
            )
        if room is not None:
            avail = room.avail()
            if new > avail:
                raise BackendError(
                    errno.ENOSPC,
                    f"the file system of pool {self.name!r} is full ({avail} bytes free beyond "
                    f"the {room.reserve} the array keeps for its metadata): write of {length} "
                    f"bytes to LUN {lun!r} refused; free space there (delete a LUN)",
                )
            room.budget -= new
            room.reserved += new
        self._reserved += new
        self._estimate = used + self._reserved
        return new

    def release(self, reserved: int) -> None:
        self._reserved -= reserved
        if self.room is not None:
            self.room.reserved -= reserved

    @contextmanager
    def reserve(self, fb: FileBackend, lun: str, offset: int, length: int) -> Iterator[None]:
        """``with pool.reserve(...): write`` — charge, write, release."""
        n = self.charge(fb, lun, offset, length)
        try:
            yield
        finally:
            self.release(n)


def _unallocated(fb: FileBackend, offset: int, length: int) -> int:
    """Bytes of the range that are holes (a write there allocates them).

    SEEK_DATA counts unwritten extents (fallocate ZERO_RANGE) as holes too: an
    overwrite there is charged again, which errs on the safe side.
    """
    fd, pos, end, holes = fb.fd, offset, offset + length, 0
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return holes + end - pos  # ENXIO: a hole to the end of the file
        if data > pos:
            holes += min(data, end) - pos
            pos = data
            continue
        pos = os.lseek(fd, pos, os.SEEK_HOLE)
    return holes
