"""MigratingBackend: serve a LUN while its data moves from a source to a target.

- Reads of CLEAN regions are served by the target; the rest read through. So are
  CACHE and the allocation map (BLOCK_STATUS) of a range that begins clean.
- Writes go to the source and are acknowledged only once the source has
  them; FUA and FLUSH reach the source (I1).
- Before a write touches a region, the region's generation is bumped and it
  counts as in flight; in background mode it is marked DIRTY first, so a
  concurrent copy never lands over a newer write as clean (I3).
- In active mode a write to a CLEAN region goes to both sides, so the region
  stays clean and the copy converges under any write rate; a FLUSH reaches
  both sides too.
- A write to a region that is clean on disk waits until that bit is cleared
  durably (I4).
- During cutover writes are held at a gate; once the LUN has switched to its
  local copy, held writes are forwarded there.
- Host I/O in flight on either side is counted: a side is trimmed or closed
  only once none is left on it (:meth:`side_idle`), or a read of a clean region
  that a cancel overtook would answer with the zeroes of the trimmed copy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import numpy as np

from emulator.nbd.backend import Backend, Done, copy_capabilities, to_the_end
from emulator.nbd.errors import BackendError
from emulator.nbd.protocol import Extent

from .regions import CLEAN, ProgressFile, RegionMap

T = TypeVar("T")


class MigratingBackend(Backend):
    can_fast_zero = False

    def __init__(
        self,
        source: Backend,
        target: Backend,
        regions: RegionMap,
        progress: ProgressFile,
        reserve: Callable[[int, int], AbstractContextManager[None]] = lambda off, n: nullcontext(),
        clock: Callable[[], float] = time.monotonic,
        reserve_source: Callable[[int, int], AbstractContextManager[None]] | None = None,
    ) -> None:
        self.source = source
        self.target = target
        self.regions = regions
        self.progress = progress
        self.reserve = reserve  # pool room for writes that land on the target
        #: pool room for writes that land on the source, where it is a file of this array
        #: (a move between pools: the LUN's pool is full as it was before the move began)
        self.reserve_source = reserve_source
        self.active = False
        self._clock = clock
        self._gate = asyncio.Event()
        self._gate.set()
        self._writers = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._forward: Backend | None = None
        self.dirtied_bytes = 0  # bytes of regions host writes made dirty again (the dirty rate)
        self.local_reads = 0
        self.remote_reads = 0
        #: host I/O not yet done: reads on the source [0] (begun with read / read_into: a
        #: remote source's started reads are its own, its aclose waits), reads and writes
        #: on the target [1] (writes to the source are the cutover's: hold_writes)
        self._io = [0, 0]
        self._idle: asyncio.Event | None = None  # set when a side's count falls to 0
        self._local_off = False  # stop_local_io: host I/O goes to the source alone
        #: a target flush that failed under a host FLUSH (the migration must not complete)
        self.target_error: BaseException | None = None
        self.refresh_capabilities()
        self.can_multi_conn = True  # one MigratingBackend serves every connection of the LUN
        self.can_extents = True
        self.rotational = target.rotational  # the LUN's own media, which it cuts over to
        self.can_start_io = source.can_start_io
        self.remote = source.remote

    def refresh_capabilities(self) -> None:
        """Offer what the source offers (again: a reconnection may have changed it)."""
        copy_capabilities(
            self,
            self.source,
            ("read_only", "can_trim", "can_zero", "can_cache", "can_flush", "can_fua", "min_block"),
        )

    @property
    def size(self) -> int:
        return self.regions.size

    # ---- reads
    def _is_local(self, offset: int, length: int) -> bool:
        """Read [offset, offset+length) from the target: every region of it is clean."""
        r0, r1 = self.regions.span(offset, length)
        return not self._local_off and self.regions.all_clean(r0, r1)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        if self._forward is not None:
            return await self._forward.read(offset, length)
        local = self._is_local(offset, length)
        self._begin_read(local)
        try:
            return await (self.target if local else self.source).read(offset, length)
        finally:
            self._end_io(local)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        if self._forward is not None:
            await self._forward.read_into(offset, buf)
            return
        local = self._is_local(offset, len(buf))
        self._begin_read(local)
        try:
            await (self.target if local else self.source).read_into(offset, buf)
        finally:
            self._end_io(local)

    def start_read(self, offset: int, length: int, done: Done) -> bool:
        if self._forward is not None:
            return self._forward.start_read(offset, length, done)
        if self._is_local(offset, length):
            return False  # read() takes it, counted in flight (local storage starts none)
        if self.source.start_read(offset, length, done):
            self.remote_reads += 1
            return True
        return False

    def _begin_read(self, local: bool) -> None:
        if local:
            self.local_reads += 1
        else:
            self.remote_reads += 1
        self._io[local] += 1

    def _end_io(self, local: bool) -> None:
        self._io[local] -= 1
        if not self._io[local] and self._idle is not None:
            self._idle.set()
            self._idle = None

    def stop_local_io(self) -> None:
        """Host I/O goes to the source alone from now on (reads of clean regions, writes
        to them in active mode): the local copy is let go."""
        self._local_off = True

    async def side_idle(self, local: bool) -> None:
        """Return once no host I/O is in flight on the target (``local``: reads and
        writes) or on the source (reads): before that side is trimmed or closed."""
        while self._io[local]:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()

    # ---- writes
    async def _modify(
        self,
        offset: int,
        length: int,
        on_source: Callable[[Backend], Awaitable[None]],
        both_sides: bool,
        allocates: bool,
    ) -> None:
        regions = self.regions
        r0, r1 = regions.span(offset, length)
        while True:
            if not self._gate.is_set():
                await self._gate.wait()
            if self._forward is not None:  # cut over while we waited
                with self._room(self._forward, offset, length, allocates):
                    await on_source(self._forward)
                return
            if not self.active:
                break
            # Wait out a copy of these regions rather than void it: in active mode every
            # region then ends clean and stays so, whatever the write rate (I5). Then look
            # at the gate again: a cutover may have held writes meanwhile, and this one,
            # not yet begun, would not be drained but go to the source after the swap.
            waits = [ev for r in range(r0, r1) if (ev := regions.copying.get(r)) is not None]
            if not waits:
                break
            await asyncio.gather(*(ev.wait() for ev in waits))
        self._begin_write(r0, r1)
        try:
            if self.progress.any_clean(r0, r1):
                await self.progress.ensure_dirty(r0, r1)
            if both_sides and self.active and not self._local_off and regions.all_clean(r0, r1):
                await self._write_both(offset, length, r0, r1, on_source, allocates)
            else:
                self.dirtied_bytes += regions.mark_dirty(r0, r1)
                with self._room(self.source, offset, length, allocates):
                    if self.source.remote:
                        # NBD has no cancel: a request sent may land later, and until
                        # then it is in flight in its regions, or a copy reading the
                        # source ahead of it would be taken as clean (I2, I3)
                        await to_the_end(asyncio.ensure_future(on_source(self.source)))
                    else:
                        await on_source(self.source)
        finally:
            self._end_write(r0, r1)

    def _room(self, b: Backend, offset: int, length: int, allocates: bool) -> AbstractContextManager[None]:
        """Pool room for a write to ``b`` (the source, the target, or where the LUN went)
        that may allocate ``length`` bytes at ``offset``: ENOSPC when the pool is full."""
        if not allocates:
            return nullcontext()
        if b is self.target:
            return self.reserve(offset, length)
        if b is self.source and self.reserve_source is not None:
            return self.reserve_source(offset, length)
        return nullcontext()

    async def _write_both(
        self,
        offset: int,
        length: int,
        r0: int,
        r1: int,
        op: Callable[[Backend], Awaitable[None]],
        allocates: bool,
    ) -> None:
        # In flight on the target from now, not from when the gather starts on_target
        # (side_idle must not miss it), until on_target ends (not the source's write).
        self._io[True] += 1
        on_target_ended = False

        def target_ended() -> None:
            nonlocal on_target_ended
            if not on_target_ended:
                on_target_ended = True
                self._end_io(True)

        async def on_target() -> None:
            try:
                # The target may hold data here from now on: a later copy of a zero run
                # must zero it rather than trust it is a hole.
                self.regions.target_data[r0:r1] = True
                with self.reserve(offset, length):
                    await op(self.target)
            finally:
                target_ended()

        async def on_source() -> None:
            with self._room(self.source, offset, length, allocates):
                await op(self.source)

        try:
            src, tgt = await to_the_end(asyncio.gather(on_source(), on_target(), return_exceptions=True))
        except BaseException:
            # Cancelled (its host reset the connection): one side may have the write and
            # the other not (the source's request was sent, the target's cancelled).
            self.dirtied_bytes += self.regions.mark_dirty(r0, r1)
            raise
        finally:
            target_ended()  # cancelled before on_target began
        if isinstance(tgt, BaseException) or isinstance(src, BaseException):
            # The sides may differ now: copy the region again later.
            self.dirtied_bytes += self.regions.mark_dirty(r0, r1)
        if isinstance(src, BaseException):
            raise src

    def start_write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool, done: Done) -> bool:
        """The common write without a coroutine: one that goes to the source alone
        and need not wait (the gate open, no bit to clear on disk first, no copy
        of these regions to wait out, not a write to both sides). The rest, False:
        :meth:`write` takes it, with the same bookkeeping as :meth:`_modify`."""
        if self._forward is not None:
            return self._forward.start_write(offset, data, fua, done)
        regions = self.regions
        r0, r1 = regions.span(offset, len(data))
        if (
            self.reserve_source is not None  # write() charges the source's pool
            or not self._gate.is_set()
            or self.progress.any_clean(r0, r1)
            or (self.active and (regions.all_clean(r0, r1) or regions.being_copied(r0, r1)))
        ):
            return False
        self._begin_write(r0, r1)
        self.dirtied_bytes += regions.mark_dirty(r0, r1)

        def end(result: Any, error: Exception | None) -> None:
            self._end_write(r0, r1)
            done(None, error)

        if self.source.start_write(offset, data, fua, end):
            return True
        self._end_write(r0, r1)  # marked dirty for nothing: harmless, it is copied again
        return False

    @property
    def writing(self) -> bool:
        """Host writes (or trims, or write_zeroes) are in flight."""
        return self._writers > 0

    def _begin_write(self, r0: int, r1: int) -> None:
        """A host write to [r0, r1) is in flight: bump the regions, hold off cutover's drain."""
        self.regions.begin_write(r0, r1, self._clock())
        self._writers += 1
        self._drained.clear()

    def _end_write(self, r0: int, r1: int) -> None:
        self.regions.end_write(r0, r1)
        self._writers -= 1
        if self._writers == 0:
            self._drained.set()

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        data = bytes(data)  # the caller's buffer may be reused while we wait
        await self._modify(offset, len(data), lambda b: b.write(offset, data, fua), True, True)

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        await self._modify(
            offset, length, lambda b: b.write_zeroes(offset, length, may_trim, fast, fua), True, not may_trim
        )

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        # What a trimmed range reads as is up to each side: always copy it again.
        await self._modify(offset, length, lambda b: b.trim(offset, length, fua), False, False)

    async def flush(self) -> None:
        if self._forward is not None:
            await self._forward.flush()
            return
        try:
            await self._flush_both()
        except BackendError:
            if self._forward is None:
                raise
            # The LUN cut over while this flush ran (the cutover holds writes, not
            # flushes) and released its source: ESHUTDOWN, a host's FLUSH failing for
            # nothing. What must be durable now is the local copy, which serves the LUN.
            await self._forward.flush()

    async def _flush_both(self) -> None:
        if not self.active:
            await self.source.flush()
            return
        # The target mirrors every write to a clean region: flush it too, so that
        # what a host flushed is durable there when the LUN cuts over without a
        # flush under held writes. Its failure is the migration's, not the host's.
        src, tgt = await asyncio.gather(self.source.flush(), self.target.flush(), return_exceptions=True)
        if isinstance(tgt, BaseException):
            self.target_error = tgt
        if isinstance(src, BaseException):
            raise src

    async def cache(self, offset: int, length: int) -> None:
        """On the side a read of the range goes to (the source need not answer for
        copied regions: I6)."""
        if self._forward is not None or not self._is_local(offset, length):
            await (self._forward or self.source).cache(offset, length)
        else:
            await self._on_target(self.target.cache(offset, length))

    def _clean_run(self, offset: int, length: int) -> int:
        """Bytes from ``offset`` (at most ``length``) in regions clean on the target."""
        regions = self.regions
        r0, r1 = regions.span(offset, length)
        if self._local_off or not regions.all_clean(r0, r0 + 1):
            return 0
        if r1 - r0 > 1:
            dirty = np.flatnonzero(regions.state[r0 + 1 : r1] != CLEAN)
            if len(dirty):
                return ((r0 + 1 + int(dirty[0])) << regions.shift) - offset
        return length

    # The map of copied regions is the target's (the same bytes, so what it calls zero
    # reads as zeroes): a host's sparse-aware copy of them needs no source, like a read
    # (I6). An answer may cover less than was asked: it ends where they do.
    async def extents(self, offset: int, length: int) -> list[Extent]:
        if self._forward is not None:
            return await self._forward.extents(offset, length)
        n = self._clean_run(offset, length)
        if not n:
            return await self.source.extents(offset, length)
        return await self._on_target(self.target.extents(offset, n))

    async def first_extent(self, offset: int, length: int) -> Extent:
        if self._forward is not None:
            return await self._forward.first_extent(offset, length)
        n = self._clean_run(offset, length)
        if not n:
            return await self.source.first_extent(offset, length)
        return await self._on_target(self.target.first_extent(offset, n))

    async def extents_for_read(self, offset: int, length: int) -> list[Extent]:
        """A read of copied regions alone comes from the target: so does its map, which
        then needs no source (it may not answer: I6), like the read."""
        if self._forward is not None:
            return await self._forward.extents_for_read(offset, length)
        if not self._is_local(offset, length):
            return await self.source.extents(offset, length)
        return await self._on_target(self.target.extents_for_read(offset, length))

    async def _on_target(self, op: Awaitable[T]) -> T:
        """``op``, host I/O on the target that is not a read: counted in flight on it
        like one (:meth:`side_idle`), so the local copy is not trimmed under it."""
        self._io[True] += 1
        try:
            return await op
        finally:
            self._end_io(True)

    # ---- cutover support
    async def hold_writes(self) -> None:
        """Close the gate for new writes and wait for those in flight."""
        self._gate.clear()
        await self._drained.wait()

    def release_writes(self, forward_to: Backend | None = None) -> None:
        """Open the gate; with ``forward_to``, held and later I/O go there."""
        if forward_to is not None:
            self._forward = forward_to
        self._gate.set()

    def close(self) -> None:
        """Sources and targets are owned and closed by the migration."""
