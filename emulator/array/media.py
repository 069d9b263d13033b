"""MediaBackend: give a Backend the service time of real media.

Each I/O waits for a latency drawn from the array model, and for its turn
on a single channel when the model has an IOPS or bandwidth ceiling. Time
is injected (``clock``, ``sleep``) so tests are fast and deterministic.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable

from emulator.nbd.backend import Backend, copy_capabilities
from emulator.nbd.protocol import Extent

from .models import LatencyModel, Media
from .timer import precise_sleep


class MediaBackend(Backend):
    """Wrap ``inner`` with the media's latency and ceilings."""

    def __init__(
        self,
        inner: Backend,
        media: Media,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], Awaitable[None]] = precise_sleep,
    ) -> None:
        self.inner = inner
        self.media = media
        self._rng = rng or random.Random()
        self._clock = clock
        self._sleep = sleep
        self._busy_until = 0.0
        copy_capabilities(self, inner)
        self.rotational = inner.rotational or media.rotational

    @property
    def size(self) -> int:
        return self.inner.size

    async def _service(self, model: LatencyModel, nbytes: int) -> None:
        delay = model.sample(self._rng)
        m = self.media
        if m.iops_limit or m.bandwidth_limit:
            now = self._clock()
            cost = (1 / m.iops_limit if m.iops_limit else 0.0) + (
                nbytes / m.bandwidth_limit if m.bandwidth_limit else 0.0
            )
            start = max(now, self._busy_until)
            self._busy_until = start + cost
            delay = max(delay, self._busy_until - now)
        if delay > 0:
            await self._sleep(delay)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        await self._service(self.media.read, length)
        return await self.inner.read(offset, length)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self._service(self.media.read, len(buf))
        await self.inner.read_into(offset, buf)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        # Copy first: the caller's buffer may be reused while we wait.
        data = bytes(data)
        await self._service(self.media.write, len(data))
        await self.inner.write(offset, data, fua)

    async def write_bulk(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self._service(self.media.write, len(data))
        await self.inner.write_bulk(offset, data)

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        await self._service(self.media.write, 0)
        await self.inner.write_zeroes(offset, length, may_trim, fast, fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.inner.trim(offset, length, fua)

    async def flush(self) -> None:
        await self._service(self.media.write, 0)
        await self.inner.flush()

    async def cache(self, offset: int, length: int) -> None:
        await self.inner.cache(offset, length)

    async def start_writeback(self, offset: int, length: int) -> None:
        await self.inner.start_writeback(offset, length)  # the media's own business: no latency

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return await self.inner.extents(offset, length)

    async def first_extent(self, offset: int, length: int) -> Extent:
        return await self.inner.first_extent(offset, length)

    async def extents_for_read(self, offset: int, length: int) -> list[Extent]:
        return await self.inner.extents_for_read(offset, length)

    def close(self) -> None:
        self.inner.close()
