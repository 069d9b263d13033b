"""The background copier: moves DIRTY regions from the source to the target.

It walks the LUN with the source's allocation map (BLOCK_STATUS), so holes
cost one extent lookup and no data; it keeps several regions in flight and
honours a throttle. A copy is taken as clean only if no host write touched
the region while it ran (generation unchanged, nothing in flight): I3.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np

from emulator.nbd.backend import Backend
from emulator.nbd.errors import BackendError
from emulator.nbd.protocol import STATE_ZERO

from .regions import CLEAN, COPYING, DIRTY, RegionMap

#: one BLOCK_STATUS call covers this much of the LUN (then is reused per region)
EXTENT_WINDOW = 64 << 20


class TargetError(BackendError):
    """The target (local copy) failed: the migration cannot go on."""


class Throttle:
    """Token bucket in bytes per second (0 = unlimited), with injected time."""

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

    async def take(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        now = self._clock()
        start = max(now, self._next)
        self._next = start + nbytes / self.rate
        if start > now:
            await self._sleep(start - now)


@dataclass(slots=True)
class _ExtentCache:
    start: int
    end: int
    runs: list[tuple[int, int, bool]]  # (offset, length, is_zero)
    gens: np.ndarray  # region generations when the map was read


class Copier:
    def __init__(
        self,
        source: Backend,
        target: Backend,
        regions: RegionMap,
        throttle: Throttle,
        reserve: Callable[[int, int], AbstractContextManager[None]] = lambda off, n: nullcontext(),
    ) -> None:
        self.source = source
        self.target = target
        self.regions = regions
        self.throttle = throttle
        self.reserve = reserve  # pool room for what lands on the target
        self.copied_bytes = 0  # data bytes read from the source and written to the target
        self.zeroed_bytes = 0
        self.regions_copied = 0
        self.races = 0  # copies thrown away because a write raced them
        self._cache: _ExtentCache | None = None
        # One copy write at a time: ext4 serializes buffered writes to a file anyway,
        # and writers that run in executor threads at once spin on the inode lock
        # (bench/migration.py: 17% of the target array's CPU).
        self._write_lock = asyncio.Lock()

    async def _runs(self, r: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_zero) runs covering region ``r``."""
        regions = self.regions
        off, n = regions.region_bytes(r)
        c = self._cache
        if (
            c is None
            or not (c.start <= off and off + n <= c.end)
            or (c.gens[r - (c.start >> regions.shift)] != regions.gen[r])
        ):
            # Read the map for a window from here; a write since makes it stale (gens).
            end = min(regions.size, max(off + n, (off & ~(EXTENT_WINDOW - 1)) + EXTENT_WINDOW))
            w0, w1 = off >> regions.shift, ((end - 1) >> regions.shift) + 1
            gens = regions.gen[w0:w1].copy()
            # A write in flight may not have reached the source when the map is read:
            # never trust the map for its region (its generation can only match later).
            gens[regions.inflight[w0:w1] > 0] -= 1
            runs: list[tuple[int, int, bool]] = []
            pos = off
            while pos < end:
                extents = await self.source.extents(pos, end - pos)
                if not extents:
                    break
                for e in extents:
                    ln = min(e.length, end - pos)
                    if ln <= 0:
                        break
                    runs.append((pos, ln, bool(e.flags & STATE_ZERO)))
                    pos += ln
            if pos < end:  # a short map: treat the rest as data
                runs.append((pos, end - pos, False))
            c = self._cache = _ExtentCache(off, end, runs, gens)
        out = []
        for o, ln, z in c.runs:
            lo, hi = max(o, off), min(o + ln, off + n)
            if lo < hi:
                out.append((lo, hi - lo, z))
        return out

    async def _charged_write(self, off: int, data: bytes | bytearray) -> None:
        async with self._write_lock:
            with self.reserve(off, len(data)):
                await self.target.write(off, data)

    async def _on_target(self, op: Awaitable[None]) -> None:
        try:
            await op
        except BackendError as e:
            raise TargetError(e.errno, f"target: {e}") from None

    async def copy_region(self, r: int) -> bool:
        """Copy region ``r`` if it is DIRTY and idle; True if it became CLEAN."""
        regions = self.regions
        if regions.state[r] != DIRTY or regions.inflight[r]:
            return False
        if self.throttle.rate > 0:
            # Wait for the throttle BEFORE the race window opens: a write during the
            # wait would otherwise void the copy and waste its budget (I5).
            await self.throttle.take(sum(ln for _, ln, zero in await self._runs(r) if not zero))
            if regions.state[r] != DIRTY or regions.inflight[r]:
                return False
        gen = regions.gen[r]
        regions.state[r] = COPYING
        regions.copying[r] = done = asyncio.Event()
        try:
            return await self._copy(r, gen)
        finally:
            del regions.copying[r]
            done.set()

    async def _copy(self, r: int, gen: int) -> bool:
        regions = self.regions
        wrote_data = False
        try:
            for off, ln, zero in await self._runs(r):
                if zero:
                    if regions.target_data[r]:
                        await self._on_target(self.target.write_zeroes(off, ln, may_trim=True))
                        self.zeroed_bytes += ln
                    continue
                data = await self.source.read(off, ln)
                if regions.gen[r] != gen:
                    break  # a write raced us: the copy is stale anyway
                regions.target_data[r] = True
                await self._on_target(self._charged_write(off, data))
                self.copied_bytes += ln
                wrote_data = True
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
