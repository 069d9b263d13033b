"""Active mode under a heavy write load, and the races of its cutover.

In active mode the copier copies a region that has writes in flight too (I5).

The copier skipped a region with a write in flight: a copy that races a write is
thrown away (I3), so it waited for the region to be idle. Under enough writes (64
hosts at queue depth 128 over a 64 MiB LUN, helper stress runs) no region was ever
idle: the migration stayed `converging`, active, with nothing clean, for good. In
active mode new writes to a region being copied wait for the copy, so the copier
can claim a busy region, wait out the writes in flight, and copy it. Reaching
the cutover under such a load showed two races of it (below).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from pathlib import Path

import pytest

from emulator.mirror.copier import Copier, Throttle
from emulator.mirror.migrating import MigratingBackend
from emulator.mirror.regions import CLEAN, ProgressFile, RegionMap
from emulator.nbd.backend import MemoryBackend
from emulator.nbd.errors import BackendError

REGION = 64 << 10
COUNT = 4
SIZE = REGION * COUNT
BLOCK = 4096
WRITERS = 3  # per region: one of them is nearly always in flight


def migrating(tmp_path: Path, source: MemoryBackend, target: MemoryBackend) -> MigratingBackend:
    """A MigratingBackend of ``source`` into ``target``, every region dirty, progress on disk."""
    regions = RegionMap(SIZE, REGION)
    progress = ProgressFile(tmp_path / "progress", regions, {})
    progress.create()
    return MigratingBackend(source, target, regions, progress)


class SlowWrites(MemoryBackend):
    """A source whose writes take a while, as a remote one's do."""

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        await asyncio.sleep(0.002)
        await super().write(offset, data, fua)


def test_active_mode_copies_regions_that_are_never_idle(tmp_path: Path) -> None:
    async def main() -> None:
        source, target = SlowWrites(SIZE), MemoryBackend(SIZE)
        model = bytearray(os.urandom(SIZE))
        await source.write(0, bytes(model))
        mb = migrating(tmp_path, source, target)
        regions = mb.regions
        mb.active = True
        copier = Copier(source, target, regions, Throttle(), claim_busy=lambda: mb.active)
        stop = asyncio.Event()

        async def writer(r: int, w: int) -> None:
            rng = random.Random(r * WRITERS + w)
            mine = range(r * REGION + w * BLOCK, (r + 1) * REGION, WRITERS * BLOCK)  # blocks of its own
            while not stop.is_set():
                off = rng.choice(mine)
                data = rng.randbytes(BLOCK)
                await mb.write(off, data)
                model[off : off + BLOCK] = data

        writers = [asyncio.ensure_future(writer(r, w)) for r in range(COUNT) for w in range(WRITERS)]
        try:
            for r in range(COUNT):
                while not regions.inflight[r]:  # copy it while it is busy
                    await asyncio.sleep(0)
                assert await asyncio.wait_for(copier.copy_region(r), 10), f"region {r} was not copied"
            await asyncio.sleep(0.05)  # more writes, to clean regions now: both sides
        finally:
            stop.set()
            await asyncio.gather(*writers)
        assert all(regions.state == CLEAN)
        assert await source.read(0, SIZE) == model
        assert await target.read(0, SIZE) == model  # I2: clean means equal

    asyncio.run(main())


class GoneOnFlush(MemoryBackend):
    """A source whose flush is answered only after the cutover released it: ESHUTDOWN."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.flushing = asyncio.Event()
        self.released = asyncio.Event()

    async def flush(self) -> None:
        self.flushing.set()
        await self.released.wait()
        raise BackendError(errno.ESHUTDOWN, "remote LUN is closed")


@pytest.mark.parametrize("active", [False, True])
def test_a_flush_that_races_the_cutover_flushes_the_local_copy(tmp_path: Path, active: bool) -> None:
    """The cutover holds writes, not flushes: a host FLUSH sent to the source just before
    the swap found it released and failed with ESHUTDOWN (helper stress runs: 6-21 FLUSHes
    a cutover under 16 hosts), which a file system takes as a failed disk. The local
    copy serves the LUN once cut over: flushing it is what the host asked for."""

    async def main() -> None:
        source, target = GoneOnFlush(SIZE), MemoryBackend(SIZE)
        mb = migrating(tmp_path, source, target)
        mb.active = active
        flush = asyncio.ensure_future(mb.flush())
        await asyncio.wait_for(source.flushing.wait(), 5)
        mb.release_writes(forward_to=target)  # the swap, then the source is released
        flushes = target.flushes
        source.released.set()
        await asyncio.wait_for(flush, 5)
        assert target.flushes > flushes

    asyncio.run(main())


def test_a_write_that_waited_for_a_copy_is_held_by_a_cutover_begun_meanwhile(tmp_path: Path) -> None:
    """An active-mode write waits out a copy of its region before it begins; a cutover
    that held writes meanwhile did not count it (it had not begun), and once the copy
    ended it went on to the source, after the swap. It looks at the gate again now, and
    lands on the local copy that serves the LUN."""

    async def main() -> None:
        source, target = MemoryBackend(SIZE), MemoryBackend(SIZE)
        mb = migrating(tmp_path, source, target)
        regions = mb.regions
        mb.active = True
        regions.copying[0] = copy_done = asyncio.Event()  # a copy of region 0 runs
        write = asyncio.ensure_future(mb.write(0, b"\xab" * BLOCK))
        await asyncio.sleep(0)
        await asyncio.wait_for(mb.hold_writes(), 5)  # nothing begun: drained at once
        del regions.copying[0]
        copy_done.set()
        await asyncio.sleep(0.01)
        assert not write.done()  # held, not on its way to the source
        mb.release_writes(forward_to=target)
        await asyncio.wait_for(write, 5)
        assert await target.read(0, BLOCK) == b"\xab" * BLOCK
        assert await source.read(0, BLOCK) == bytes(BLOCK)

    asyncio.run(main())
