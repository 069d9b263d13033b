"""The one interface that carries every byte: :class:`Backend`.

The NBD server serves any Backend; arrays implement it with sparse files,
the mirror with remote LUNs and migrating LUNs. Offsets and lengths given to
a Backend have already been checked against ``size`` by the caller.

Methods are coroutines. A Backend that can finish at once (a page-cache hit)
simply never awaits, and the server runs such calls eagerly without a task.
A Backend whose reads and writes always wait (a remote LUN) may also offer
``start_read`` / ``start_write``: the same I/O begun without a coroutine,
ended by a callback. That path skips the coroutine chain and the Task the
server would need per request; a proxied I/O costs ~4 us less of Python.
"""

from __future__ import annotations

import asyncio
import errno
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import BackendError
from .protocol import STATE_HOLE, STATE_ZERO, Extent

T = TypeVar("T")

#: ``done(result, error)`` ends an I/O begun by ``start_read`` / ``start_write``:
#: ``(data, None)`` or ``(None, None)`` on success, ``(None, exception)`` on failure
Done = Callable[[Any, Exception | None], None]


class Backend(ABC):
    """Block storage of a fixed size (see DESIGN.md, "One interface")."""

    #: capability flags; the server advertises only what is True
    read_only: bool = False
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = False
    can_cache: bool = True
    can_flush: bool = True
    can_fua: bool = True
    #: flushing on one connection covers writes completed on every connection
    can_multi_conn: bool = True
    can_extents: bool = True
    #: spinning media (NBD_FLAG_ROTATIONAL): a host may order its I/O to spare seeks
    rotational: bool = False
    #: the smallest unit of I/O it takes: offsets and lengths of requests must be
    #: multiples of it (a remote LUN's source may ask for 512 or 4096); the server
    #: advertises it as the export's minimum block size
    min_block: int = 1
    #: start_read / start_write may take I/O (else they always return False)
    can_start_io: bool = False
    #: I/O goes to another process (a migration's source): it may wait on a peer that
    #: stopped answering, where local storage only waits on its disk
    remote: bool = False

    @property
    @abstractmethod
    def size(self) -> int: ...

    @abstractmethod
    async def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        buf = bytearray(length)
        await self.read_into(offset, memoryview(buf))
        return buf

    def start_read(self, offset: int, length: int, done: Done) -> bool:
        """Begin :meth:`read` without a coroutine, or return False (not offered, or
        not now): the caller then uses :meth:`read`. After True, ``done(data, None)``
        or ``done(None, error)`` runs exactly once, from the event loop, never
        before this returned."""
        return False

    def start_write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool, done: Done) -> bool:
        """:meth:`start_read` for :meth:`write`; ``done(None, None)`` when it is written.
        The caller keeps ``data`` unchanged until ``done`` ran."""
        return False

    @abstractmethod
    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write ``data``; with ``fua`` it is durable when this returns."""

    async def write_bulk(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """:meth:`write` of bulk data nobody will read soon (a migration's copy): it
        may bypass the page cache (O_DIRECT). Durable only after :meth:`flush`."""
        await self.write(offset, data)

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        """Make the range read as zeroes.

        ``may_trim``: the range may become a hole. ``fast``: fail with
        ENOTSUP rather than fall back to writing zeroes slowly.
        """
        if fast:
            raise BackendError(errno.ENOTSUP, "fast zero is not supported")
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            await self.write(offset, memoryview(chunk)[:n])
            offset += n
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Advise that the range is no longer needed (may do nothing)."""

    async def flush(self) -> None:
        """Make every completed write durable."""

    async def cache(self, offset: int, length: int) -> None:
        """Advise that the range will be read soon."""

    async def start_writeback(self, offset: int, length: int) -> None:
        """Advise that the range was written in bulk and a flush will follow:
        start moving it to stable storage now. A hint: only ``flush`` makes
        writes durable, and it reports what went wrong."""

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation map from ``offset``: at least one extent, covering at
        most ``length`` bytes (fewer is allowed). Default: all data."""
        return [Extent(length, 0)]

    async def first_extent(self, offset: int, length: int) -> Extent:
        """The first extent of :meth:`extents` (NBD's REQ_ONE): one descriptor
        whatever the range holds, so a long ask costs no long answer."""
        return (await self.extents(offset, length))[0]

    async def extents_for_read(self, offset: int, length: int) -> list[Extent]:
        """:meth:`extents` as a :meth:`read` of the range now sees them (where it
        reads zeroes: the holes a structured READ sends). A Backend that reads some
        ranges elsewhere than its map comes from (a migrating LUN's copied regions,
        read from its local copy) answers from there: the read must not wait for
        a source it does not need."""
        return await self.extents(offset, length)

    def zero_copy_fd(self, length: int, offset: int | None = None) -> int | None:
        """A file descriptor whose bytes at every offset are what ``read``
        returns for a ``length``-byte read, so the server may sendfile(2)
        them; None (the default) when there is none. With ``offset``, for that
        read now: None also when sendfile would wait for the disk (the range
        is not in the page cache), as it runs on the event loop. A wrapper
        that changes what reads return, or counts them, inherits None."""
        return None

    def close(self) -> None:
        """Release resources; no calls follow."""


CAPABILITIES = (
    "read_only",
    "can_trim",
    "can_zero",
    "can_fast_zero",
    "can_cache",
    "can_flush",
    "can_fua",
    "can_multi_conn",
    "can_extents",
    "rotational",
    "min_block",
)


def copy_capabilities(dst: Backend, src: Backend, names: tuple[str, ...] = CAPABILITIES) -> None:
    """A wrapping Backend offers what the Backend it wraps offers."""
    for cap in names:
        setattr(dst, cap, getattr(src, cap))


class MemoryBackend(Backend):
    """Sparse in-memory Backend: the test double for unit tests.

    Pages never written (or trimmed/zeroed) are holes that read as zeroes.
    """

    PAGE = 4096

    def __init__(self, size: int, read_only: bool = False) -> None:
        self._size = size
        self._pages: dict[int, bytearray] = {}
        self.read_only = read_only
        self.can_fast_zero = True
        self.flushes = 0

    @property
    def size(self) -> int:
        return self._size

    async def read_into(self, offset: int, buf: memoryview) -> None:
        pos, end = offset, offset + len(buf)
        while pos < end:
            page, off = divmod(pos, self.PAGE)
            n = min(self.PAGE - off, end - pos)
            data = self._pages.get(page)
            dst = buf[pos - offset : pos - offset + n]
            if data is None:
                dst[:] = bytes(n)
            else:
                dst[:] = data[off : off + n]
            pos += n

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        pos, end = offset, offset + len(view)
        while pos < end:
            page, off = divmod(pos, self.PAGE)
            n = min(self.PAGE - off, end - pos)
            p = self._pages.get(page)
            if p is None:
                p = self._pages[page] = bytearray(self.PAGE)
            p[off : off + n] = view[pos - offset : pos - offset + n]
            pos += n

    def _zero(self, offset: int, length: int) -> None:
        pos, end = offset, offset + length
        while pos < end:
            page, off = divmod(pos, self.PAGE)
            n = min(self.PAGE - off, end - pos)
            if n == self.PAGE:
                self._pages.pop(page, None)
            elif page in self._pages:
                self._pages[page][off : off + n] = bytes(n)
            pos += n

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        self._zero(offset, length)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._zero(offset, length)

    async def flush(self) -> None:
        self.flushes += 1

    async def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            page, off = divmod(pos, self.PAGE)
            n = min(self.PAGE - off, end - pos)
            flags = 0 if page in self._pages else STATE_HOLE | STATE_ZERO
            if out and out[-1].flags == flags:
                out[-1] = Extent(out[-1].length + n, flags)
            else:
                out.append(Extent(n, flags))
            pos += n
        return out


async def to_the_end(fut: asyncio.Future[T], dropped: Callable[[], bool] | None = None) -> T:
    """Await ``fut``, I/O that cannot be called back (a thread's syscall, an NBD
    request sent): a cancel of the caller waits until it has ended, then propagates,
    so the caller does not go on (reuse a buffer, mark a region clean) while the I/O
    it gave up on may still happen. ``dropped()`` True at the cancel: it never will."""
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if dropped is not None and dropped():
            raise
        while not fut.done():
            try:
                await asyncio.wait((fut,))
            except asyncio.CancelledError:
                pass  # cancelled again: still wait, then raise once
        if not fut.cancelled():
            fut.exception()  # retrieved: its caller was cancelled, it is nobody's to see
        raise
