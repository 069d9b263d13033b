"""A LUN: a name, a size, a pool, and the Backend its export serves.

:class:`LunBackend` is what the NBD server serves for a LUN. It counts I/O,
charges the pool for writes (ENOSPC when full) and holds the inner Backend
(the LUN's file, or later a migrating or remote Backend), which can be
swapped atomically.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any

from emulator.nbd.backend import Backend, Done, copy_capabilities
from emulator.nbd.protocol import Extent

from .file_backend import FileBackend
from .pool import Pool
from .stats import LunStats

_LUN_ID = re.compile(r"\bLUN id ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b")


def describe(array: str, pool: str, lun_id: str, more: str = "") -> str:
    """A LUN's export description (NBD_INFO_DESCRIPTION, which nbdinfo shows). It
    carries the LUN's id: NBD itself names an export only by address and name, so an
    array that takes the LUN over (emulator/mirror/remote.py) tells by the id whether
    it reconnected to the same LUN or to another one now behind that name."""
    return f"array {array} pool {pool}, LUN id {lun_id}{more}"


def lun_id_of(description: str) -> str:
    """The LUN id in an export's description; "" when it gives none (any other server)."""
    m = _LUN_ID.search(description)
    return m.group(1) if m else ""


class LunBackend(Backend):
    """The exported Backend of one LUN."""

    def __init__(self, name: str, inner: Backend, pool: Pool | None, file: FileBackend | None) -> None:
        self.name = name
        self.stats = LunStats()
        self._pool = pool
        self._file = file  # the local file charged to the pool, if any
        #: the Backend that stores into ``file``; host writes are charged only while it serves
        self.local = inner
        self.inner = inner
        self.swap(inner)

    def swap(self, inner: Backend, file: FileBackend | None = None) -> Backend:
        """Serve ``inner`` from now on; return the previous one."""
        old, self.inner = self.inner, inner
        if file is not None:
            self._file = file
        self.refresh_capabilities()
        self.can_start_io = inner.can_start_io
        self.remote = inner.remote
        return old

    def refresh_capabilities(self) -> None:
        """Offer what ``inner`` offers: on a swap, and when a remote source's changed.
        Hosts that connect from now on negotiate it; those connected keep their flags."""
        copy_capabilities(self, self.inner)

    def set_file(self, file: FileBackend, pool: Pool, local: Backend) -> None:
        """The LUN's local file moved (to another pool)."""
        self._file, self._pool, self.local = file, pool, local

    @property
    def size(self) -> int:
        return self.inner.size

    def _charge(self, offset: int, length: int) -> int:
        """Reserve pool room for a host write to the local file (0 if none is needed:
        a migrating or remote LUN writes to its source, which has its own pool)."""
        if self._pool is not None and self._file is not None and self.inner is self.local:
            return self._pool.charge(self._file, self.name, offset, length)
        return 0

    def _release(self, reserved: int) -> None:
        if reserved and self._pool is not None:
            self._pool.release(reserved)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        t0 = time.perf_counter()
        st = self.stats.ops["read"]
        try:
            data = await self.inner.read(offset, length)
        except BaseException:
            st.record(0, time.perf_counter() - t0, ok=False)
            raise
        st.record(length, time.perf_counter() - t0)
        return data

    async def read_into(self, offset: int, buf: memoryview) -> None:
        t0 = time.perf_counter()
        st = self.stats.ops["read"]
        try:
            await self.inner.read_into(offset, buf)
        except BaseException:
            st.record(0, time.perf_counter() - t0, ok=False)
            raise
        st.record(len(buf), time.perf_counter() - t0)

    def _timed_done(self, op: str, nbytes: int, done: Done) -> Done:
        t0 = time.perf_counter()
        st = self.stats.ops[op]

        def end(result: Any, error: Exception | None) -> None:
            if error is None:
                st.record(nbytes, time.perf_counter() - t0)
            else:
                st.record(0, time.perf_counter() - t0, ok=False)
            done(result, error)

        return end

    def start_read(self, offset: int, length: int, done: Done) -> bool:
        return self.inner.start_read(offset, length, self._timed_done("read", length, done))

    def start_write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool, done: Done) -> bool:
        if self._pool is not None and self._file is not None and self.inner is self.local:
            return False  # a write to the local file is charged to the pool: write() does that
        return self.inner.start_write(offset, data, fua, self._timed_done("write", len(data), done))

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        t0 = time.perf_counter()
        st = self.stats.ops["write"]
        reserved = 0
        try:
            reserved = self._charge(offset, len(data))
            await self.inner.write(offset, data, fua)
        except BaseException:
            self._release(reserved)
            st.record(0, time.perf_counter() - t0, ok=False)
            raise
        self._release(reserved)
        st.record(len(data), time.perf_counter() - t0)

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        await self._timed("zero", length, self._zero(offset, length, may_trim, fast, fua))

    async def _zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        reserved = 0 if may_trim else self._charge(offset, length)  # ZERO_RANGE allocates
        try:
            await self.inner.write_zeroes(offset, length, may_trim, fast, fua)
        finally:
            self._release(reserved)

    async def _timed(self, op: str, nbytes: int, coro: Any) -> Any:
        t0 = time.perf_counter()
        st = self.stats.ops[op]
        try:
            result = await coro
        except BaseException:
            st.record(0, time.perf_counter() - t0, ok=False)
            raise
        st.record(nbytes, time.perf_counter() - t0)
        return result

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._timed("trim", length, self.inner.trim(offset, length, fua))

    async def flush(self) -> None:
        await self._timed("flush", 0, self.inner.flush())

    async def cache(self, offset: int, length: int) -> None:
        await self._timed("cache", length, self.inner.cache(offset, length))

    async def extents(self, offset: int, length: int) -> list[Extent]:
        result: list[Extent] = await self._timed("extents", 0, self.inner.extents(offset, length))
        return result

    async def first_extent(self, offset: int, length: int) -> Extent:
        result: Extent = await self._timed("extents", 0, self.inner.first_extent(offset, length))
        return result

    async def extents_for_read(self, offset: int, length: int) -> list[Extent]:
        result: list[Extent] = await self._timed("extents", 0, self.inner.extents_for_read(offset, length))
        return result

    def close(self) -> None:
        self.inner.close()


@dataclass
class Lun:
    name: str
    pool: str
    size: int
    state: str
    created: float
    file: FileBackend
    backend: LunBackend
    #: the LUN's own storage as hosts should see it (the file, with media latency if any)
    local: Backend | None = None
    #: its identity (metadata.new_lun_id), advertised in its export's description
    uuid: str = ""

    @property
    def allocated(self) -> int:
        try:
            return os.fstat(self.file.fd).st_blocks * 512
        except OSError:
            return 0
