"""The background copier: moves DIRTY regions from the source to the target.

It walks the LUN with the source's allocation map (BLOCK_STATUS), read a
window at a time, one read per window shared by every worker and the next
windows read ahead, so holes cost no data and no round trip of their own;
it keeps several regions in flight and honours a throttle. A copy is taken
as clean only if no host write touched the region while it ran (generation
unchanged, nothing in flight): I3.
"""

from __future__ import annotations

import asyncio
import errno
import time
from bisect import bisect_right
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from emulator.nbd.backend import Backend
from emulator.nbd.errors import BackendError
from emulator.nbd.protocol import STATE_ZERO

from .regions import CLEAN, COPYING, DIRTY, RegionMap

#: one BLOCK_STATUS walk covers an aligned window this large (then is reused per region)
EXTENT_WINDOW = 64 << 20
#: a map read asks this many windows ahead: as far as the source answers in one reply,
#: later windows' maps come with it (an empty or 10%-allocated 512 MiB LUN: 1 round trip, not 8)
MAP_SPAN = 8
#: windows whose map is read ahead of the copy (a map costs a round trip to the source)
READ_AHEAD = 2
#: BLOCK_STATUS lengths are u32 (no extended headers): the widest map read asks this much
MAX_MAP_BYTES = 0xFFFF_F000
#: a map read that found at most this many runs makes the next one ask MAX_MAP_BYTES
#: ahead first, for one extent (allocation_runs' ``wide``); more runs, a fragmented
#: stretch, and the next asks only MAP_SPAN windows, as many extents as they hold
FEW_RUNS = 8

T = TypeVar("T")


async def gather_or_cancel(*aws: Awaitable[T]) -> list[T]:
    """The results of ``aws`` in order. The first failure (or a cancel) cancels the
    rest and waits for them before it propagates: none outlives its caller (a copy
    of a put-off cutover went on while host writes flowed again)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        rest = [t for t in tasks if not t.done()]
        for t in rest:
            t.cancel()
        if rest:
            await asyncio.gather(*rest, return_exceptions=True)


class TargetError(BackendError):
    """The target (local copy) failed: the migration cannot go on."""


class Throttle:
    """Token bucket in bytes per second (0 = unlimited), with injected time.
    The rate may change while copies wait on it (``set_rate``)."""

    def __init__(
        self,
        rate: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0
        self._changed: asyncio.Future[None] | None = None  # set when the rate changes

    def set_rate(self, rate: float) -> None:
        """Apply ``rate`` from now on: the waits booked at the old rate are dropped
        and every waiter books again at the new one (1 MB/s -> unlimited: 4 workers
        would otherwise sleep out up to 4 s of booked regions first)."""
        self.rate = rate
        self._next = 0.0
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    async def take(self, nbytes: int) -> None:
        while self.rate > 0:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + nbytes / self.rate
            if start <= now:
                return
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            changed = self._changed
            nap = asyncio.ensure_future(self._sleep(start - now))
            try:
                await asyncio.wait((nap, changed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                nap.cancel()
            if not changed.done():
                return  # slept out the booked wait


@dataclass(slots=True)
class _ExtentMap:
    start: int  # region-aligned; the map runs to the end of its window
    end: int
    runs: list[tuple[int, int, bool]]  # (offset, length, is_zero), contiguous
    gens: np.ndarray  # generations of the regions from start on when the map was read
    starts: list[int]  # offset of each run, to find a region's runs by bisection


async def allocation_runs(
    backend: Backend, start: int, need: int, limit: int, wide: int = 0
) -> AsyncIterator[list[tuple[int, int, bool]]]:
    """``backend``'s allocation map from ``start`` as contiguous (offset, length,
    is_zero) runs, one list per answer, until ``need`` is covered (an answer may
    run on up to ``limit``). An answer that moves nowhere is not asked again: the
    rest up to ``need`` comes as one run of data (never trusted to be a hole).

    With ``wide`` (beyond ``limit``), the first ask reaches that far for one extent
    only (REQ_ONE): a long hole comes in one descriptor, and a fragmented stretch
    costs no bigger answer than at ``limit``; the walk goes on from where it ended."""
    pos = start
    if wide > limit and pos < need:
        e = await backend.first_extent(pos, wide - pos)
        ln = min(e.length, wide - pos)
        if ln > 0:
            yield [(pos, ln, bool(e.flags & STATE_ZERO))]
            pos += ln
    while pos < need:
        asked, runs = pos, []
        for e in await backend.extents(pos, limit - pos):
            ln = min(e.length, limit - pos)
            if ln <= 0:
                break
            runs.append((pos, ln, bool(e.flags & STATE_ZERO)))
            pos += ln
        if pos == asked:
            yield [(pos, need - pos, False)]
            return
        yield runs


def _clip(
    runs: list[tuple[int, int, bool]], starts: list[int], lo: int, hi: int
) -> list[tuple[int, int, bool]]:
    """The runs that meet [lo, hi), cut to it. By bisection: a window of a thin
    image has thousands of runs, and a scan per region made a walk quadratic."""
    out = []
    for i in range(max(0, bisect_right(starts, lo) - 1), len(runs)):
        o, ln, z = runs[i]
        if o >= hi:
            break
        a, b = max(o, lo), min(o + ln, hi)
        if a < b:
            out.append((a, b - a, z))
    return out


def _all_data(c: _ExtentMap | None, lo: int, hi: int) -> bool:
    """Did map ``c`` find [lo, hi) all data (no zero run)?"""
    return c is not None and c.start <= lo and not any(z for _, _, z in _clip(c.runs, c.starts, lo, hi))


class Copier:
    def __init__(
        self,
        source: Backend,
        target: Backend,
        regions: RegionMap,
        throttle: Throttle,
        reserve: Callable[[int, int], AbstractContextManager[None]] = lambda off, n: nullcontext(),
        claim_busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self.source = source
        self.target = target
        self.regions = regions
        self.throttle = throttle
        self.reserve = reserve  # pool room for what lands on the target
        #: copy a region that has writes in flight too (active mode): see copy_region
        self.claim_busy = claim_busy
        self.copied_bytes = 0  # data bytes read from the source and written to the target
        self.zeroed_bytes = 0
        self.regions_copied = 0
        self.races = 0  # copies thrown away because a write raced them
        #: window index -> its map (a few around the copy); maps being read
        self._maps: dict[int, _ExtentMap] = {}
        self._reading: dict[int, asyncio.Task[_ExtentMap]] = {}
        self._window = max(EXTENT_WINDOW, regions.region_size)  # a region never straddles two
        #: windows the first ask of a map read covers (for one extent, past MAP_SPAN):
        #: _max_span while the source's answers are sparse (a 16 TiB LUN took 32K
        #: requests of 512 MiB), MAP_SPAN in a fragmented stretch (no ask is wasted)
        self._span = MAP_SPAN
        self._max_span = max(MAP_SPAN, MAX_MAP_BYTES // self._window)
        # One copy write at a time: ext4 serializes buffered writes to a file anyway,
        # and writers that run in executor threads at once spin on the inode lock
        # (bench/migration.py: 17% of the target array's CPU).
        self._write_lock = asyncio.Lock()

    async def _runs(self, r: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_zero) runs covering region ``r``.

        A map read before the caller took the region's generation (copy_region)
        is used only if no write to the region began since it was read (gens);
        a map this call read itself is right as of that generation: a write
        since makes the copy stale, and copy_region throws it away (I3)."""
        regions = self.regions
        off, n = regions.region_bytes(r)
        w = off // self._window
        c = self._maps.get(w)
        # A stale map that found the region all data serves as it is: a later write
        # cannot make the copy wrong, as every byte is read from the source anyway (a
        # zero run is what a write may make stale). Under a heavy write load every map
        # is stale by the time a copy gets to its region, and reading it again queued
        # behind the writes in flight: 1.6 s of 3.2 a region (bench/active_load.py).
        if not self._valid(c, r, off) and not _all_data(c, off, off + n):
            t = self._reading.get(w)
            if t is not None:
                await t  # another worker or the read-ahead is reading it: share it
                c = self._maps.get(w)
            if not self._valid(c, r, off):
                c = await self._read(w, off)
        assert c is not None
        self._read_ahead(w)
        return _clip(c.runs, c.starts, off, off + n)

    def _valid(self, c: _ExtentMap | None, r: int, off: int) -> bool:
        return (
            c is not None
            and c.start <= off
            and bool(c.gens[(off - c.start) >> self.regions.shift] == self.regions.gen[r])
        )

    def _read(self, w: int, start: int) -> asyncio.Task[_ExtentMap]:
        """Read window ``w``'s map from ``start`` in a task others may wait on."""
        t = asyncio.ensure_future(self._read_map(w, start))
        t.add_done_callback(_retrieve)  # a failed read-ahead nobody waited on: no warning
        self._reading[w] = t
        return t

    def _read_ahead(self, w: int) -> None:
        regions = self.regions
        for nxt in range(w + 1, w + 1 + READ_AHEAD):
            start = nxt * self._window
            if start >= regions.size:
                return
            if nxt in self._maps or nxt in self._reading:
                continue
            r0, r1 = regions.span(start, min(self._window, regions.size - start))
            if (regions.state[r0:r1] == DIRTY).any():
                self._read(nxt, start)

    async def _read_map(self, w: int, start: int) -> _ExtentMap:
        regions = self.regions
        win = self._window
        try:
            end = min(regions.size, (w + 1) * win)
            # Ask up to MAP_SPAN windows ahead; window w needs only its own part.
            # Where the source is sparse, first ask far ahead for one extent.
            span = min(regions.size, (w + MAP_SPAN) * win)
            wide = min(regions.size, (w + self._span) * win, start + MAX_MAP_BYTES)
            reach = max(span, wide)
            w0, w1 = start >> regions.shift, ((reach - 1) >> regions.shift) + 1
            gens = regions.gen[w0:w1].copy()
            # A write in flight may not have reached the source when the map is read:
            # never trust the map for its region (its generation can only match later).
            gens[regions.inflight[w0:w1] > 0] -= 1
            runs: list[tuple[int, int, bool]] = []
            try:
                async for answer in allocation_runs(self.source, start, end, span, wide):
                    runs.extend(answer)
            except BackendError as e:
                if wide > span:
                    self._span = MAP_SPAN
                    if e.errno in (errno.EINVAL, errno.EOVERFLOW):
                        self._max_span = MAP_SPAN  # a source that refuses long asks
                raise
            self._span = self._max_span if len(runs) <= FEW_RUNS else MAP_SPAN
            pos = runs[-1][0] + runs[-1][1]
            starts = [o for o, _, _ in runs]
            c = self._install(w, start, end, runs, starts, gens)
            # Later windows the answer covered whole came free: their holes are
            # cleaned in one go, and only those still holding DIRTY regions (data)
            # get a map (a wide answer covers 63 windows, mostly holes: a map and
            # a clean each was most of a 16 TiB walk's CPU).
            covered = pos // win if pos < regions.size else -(-regions.size // win)
            lo, hi = (w + 1) * win, min(regions.size, covered * win)
            if lo < hi:
                shift = regions.shift
                self._clean_holes(runs, gens[(lo >> shift) - w0 :], lo, hi)
                r0, r1 = lo >> shift, ((hi - 1) >> shift) + 1
                dirty = np.flatnonzero(regions.state[r0:r1] == DIRTY) // (win >> shift)
                for i in np.unique(dirty).tolist():
                    nxt = w + 1 + i
                    if nxt not in self._maps and nxt not in self._reading:
                        ws = nxt * win
                        rest = gens[(ws >> shift) - w0 :]
                        self._install(nxt, ws, min(regions.size, ws + win), runs, starts, rest)
            # Keep the maps from the lowest window a copy is in on: a map read
            # ahead must not evict the one the workers still copy from (each
            # window's map was read twice, the second behind the data in flight).
            low = min((k << regions.shift) // self._window for k in (*regions.copying, w0))
            for k in [k for k in self._maps if k < low - 1]:
                del self._maps[k]
            return c
        finally:
            if self._reading.get(w) is asyncio.current_task():
                del self._reading[w]

    def _install(
        self,
        w: int,
        start: int,
        end: int,
        runs: list[tuple[int, int, bool]],
        starts: list[int],
        gens: np.ndarray,
    ) -> _ExtentMap:
        """Keep the part of ``runs`` in [start, end) as window ``w``'s map; clean its holes.
        ``gens`` starts at ``start``'s region."""
        shift = self.regions.shift
        w0, w1 = start >> shift, ((end - 1) >> shift) + 1
        mine = _clip(runs, starts, start, end)
        c = self._maps[w] = _ExtentMap(start, end, mine, gens[: w1 - w0].copy(), [o for o, _, _ in mine])
        self._clean_holes(mine, c.gens, start, end)
        return c

    def _clean_holes(self, runs: list[tuple[int, int, bool]], gens: np.ndarray, start: int, end: int) -> None:
        """Mark clean at once the regions of [start, end) that ``runs`` (covering it)
        show all zero where the target holds nothing: there is nothing to copy, and
        one vector operation costs less than a copy_region each (a 10%-allocated LUN
        is 90% such regions). Only if no write touched them since the map was read
        (I3): ``gens``, from ``start``'s region on."""
        regions = self.regions
        shift = regions.shift
        w0, w1 = start >> shift, ((end - 1) >> shift) + 1
        has_data = np.zeros(w1 - w0, np.bool_)
        for off, ln, zero in runs:
            a, b = max(off, start), min(off + ln, end)
            if not zero and a < b:
                has_data[(a >> shift) - w0 : ((b - 1) >> shift) + 1 - w0] = True
        gens = gens[: w1 - w0]
        span = slice(w0, w1)
        state = regions.state[span]
        ok = (
            ~has_data
            & (state == DIRTY)
            & (regions.inflight[span] == 0)
            & ~regions.target_data[span]
            & (regions.gen[span] == gens)
        )
        n = int(np.count_nonzero(ok))
        if n:
            state[ok] = CLEAN
            self.regions_copied += n

    async def _charged_write(self, off: int, data: bytes | bytearray) -> None:
        async with self._write_lock:
            with self.reserve(off, len(data)):
                # bulk: O_DIRECT where the target's file takes it (the flush before a
                # checkpoint still makes it durable: allocation, the disk's cache)
                await self.target.write_bulk(off, data)

    async def _on_target(self, op: Awaitable[None]) -> None:
        try:
            await op
        except BackendError as e:
            raise TargetError(e.errno, f"target: {e}") from None

    async def _read_data(self, runs: list[tuple[int, int, bool]]) -> list[bytes | bytearray]:
        """The source's bytes of every data run, in order."""
        spans = [(off, ln) for off, ln, zero in runs if not zero]
        if len(spans) <= 1:  # the usual region: one run, no task to make
            return [await self.source.read(off, ln) for off, ln in spans]
        # A fragmented region (4 KiB runs of data between holes, as a thin image has):
        # every read in flight at once, not one round trip to the source per run.
        return await gather_or_cancel(*(self.source.read(off, ln) for off, ln in spans))

    def _may_copy(self, r: int) -> bool:
        regions = self.regions
        return bool(regions.state[r] == DIRTY and (not regions.inflight[r] or self.claim_busy()))

    async def copy_region(self, r: int) -> bool:
        """Copy region ``r`` if it is DIRTY and idle (in active mode, busy too); True
        if it became CLEAN."""
        regions = self.regions
        if not self._may_copy(r):
            return False
        if self.throttle.rate > 0:
            # Wait for the throttle BEFORE the race window opens: a write during the
            # wait would otherwise void the copy and waste its budget (I5).
            await self.throttle.take(sum(ln for _, ln, zero in await self._runs(r) if not zero))
            if not self._may_copy(r):
                return False
        regions.state[r] = COPYING
        regions.copying[r] = done = asyncio.Event()
        try:
            if regions.inflight[r]:
                # Active mode, and writes keep the region busy: under enough of them no
                # region is ever idle and the copy never converges (I5). New writes wait
                # for this copy (MigratingBackend._modify); wait out those in flight.
                await regions.idle(r)
            return await self._copy(r, regions.gen[r])
        finally:
            if regions.state[r] == COPYING:  # failed or cancelled before _copy began
                regions.state[r] = DIRTY
            del regions.copying[r]
            done.set()

    async def _copy(self, r: int, gen: int) -> bool:
        regions = self.regions
        wrote_data = False
        # Zero runs need zeroing only where the target held data before this copy:
        # the runs are disjoint, so this copy's own data never lies under one (a
        # fresh target's region of 4 KiB data and hole runs: no zeroing at all).
        # Nothing else writes the region meanwhile: an active-mode write waits for
        # the copy, and a copy never starts under a write in flight.
        had_data = bool(regions.target_data[r])
        first = last = 0  # the span of the data this copy wrote, once wrote_data
        try:
            runs = await self._runs(r)
            datas = iter(await self._read_data(runs))
            for off, ln, zero in runs:
                if zero:
                    if had_data:
                        await self._on_target(self.target.write_zeroes(off, ln, may_trim=True))
                        self.zeroed_bytes += ln
                    continue
                data = next(datas)
                if regions.gen[r] != gen:
                    break  # a write raced us: the copy is stale anyway
                regions.target_data[r] = True
                await self._on_target(self._charged_write(off, data))
                if not wrote_data:
                    first = off
                last = off + ln
                self.copied_bytes += ln
                wrote_data = True
            if wrote_data:
                # Write back while copying on: the checkpoint's flush then finds little
                # left (a 512 MiB copy: 2.0 -> 2.4-2.7 GB/s on the reference box). One
                # hint a region, not one a run: a thin image has dozens of runs a region.
                await self._on_target(self.target.start_writeback(first, last - first))
        except BaseException:
            if regions.state[r] == COPYING:
                regions.state[r] = DIRTY
            raise
        if regions.state[r] == COPYING and regions.gen[r] == gen and not regions.inflight[r]:
            regions.state[r] = CLEAN
            regions.target_data[r] = wrote_data
            self.regions_copied += 1
            return True
        if regions.state[r] == COPYING:
            regions.state[r] = DIRTY
        self.races += 1
        return False


def _retrieve(t: asyncio.Task[_ExtentMap]) -> None:
    if not t.cancelled():
        t.exception()
