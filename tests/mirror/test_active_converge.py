"""Active mode converges in few host writes a region under a deep write queue.

64 hosts at queue depth 128 of random writes to a migrating 256 MiB LUN (real
arrays, bench/active_load.py) made a region clean every 0.8-1 s (255 s for
the LUN): a copy of a busy region waited for the writes already sent to the
source (~0.9 s behind the 8K queued there), read the region's map again behind
the queue (a write since the map was read made it stale: 1.6 s), then its data,
again behind the queue (0.7 s); 4 such copies in flight. Now an allocated
region's stale map is used (every byte is read from the source anyway: only a
zero run can be made stale by a write), and in active mode under writes up to
32 copies run beside the workers (at most an eighth of the LUN's regions):
10-12 regions a second under the same load, 23-27 s for the LUN.

The source here serves one request per event-loop turn in arrival order, so a
request waits for every one sent before it, as at a real source under a deep
queue; the hosts write as fast as it answers. The measure is host writes a
region converged: counts, no wall clock, the same on every run.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from pathlib import Path

from emulator.mirror.copier import Copier, Throttle
from emulator.mirror.migrating import MigratingBackend
from emulator.mirror.migration import MigrationConfig
from emulator.mirror.regions import DIRTY, ProgressFile, RegionMap
from emulator.nbd.backend import MemoryBackend
from emulator.nbd.protocol import Extent
from tests.backends import Lun, local_migration

REGION = 64 << 10
COUNT = 256
SIZE = REGION * COUNT
BLOCK = 4096
HOSTS = 64  # one write in flight each: the source's queue is ~64 deep


class QueuedSource(MemoryBackend):
    """Serves one request per event-loop turn, first come first served."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._queue: deque[asyncio.Future[None]] = deque()
        self._server: asyncio.Task[None] | None = None

    async def _turn(self) -> None:
        f = asyncio.get_running_loop().create_future()
        self._queue.append(f)
        if self._server is None or self._server.done():
            self._server = asyncio.ensure_future(self._serve())
        await f

    async def _serve(self) -> None:
        while self._queue:
            await asyncio.sleep(0)
            self._queue.popleft().set_result(None)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self._turn()
        await super().read_into(offset, buf)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        await self._turn()
        await super().write(offset, data, fua)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        await self._turn()
        return await super().extents(offset, length)


async def nap(seconds: float) -> None:
    await asyncio.sleep(0)


def test_active_mode_converges_in_few_host_writes_a_region(tmp_path: Path) -> None:
    async def main() -> tuple[int, int]:
        source, target = QueuedSource(SIZE), MemoryBackend(SIZE)
        model = bytearray(random.Random(1).randbytes(SIZE))
        await MemoryBackend.write(source, 0, model)  # all allocated
        lun = Lun()
        m = local_migration(
            source,
            target,
            tmp_path,
            MigrationConfig(region_size=REGION, mode="active", checkpoint_interval=1e9),
            clock=lambda: 0.0,
            sleep=nap,
            lun=lun,
        )
        await m.start(paused=True)
        copier = m.copier  # an ended migration lets go of it (Migration._let_go)
        assert copier is not None
        writes = [0]
        stop = asyncio.Event()

        async def host(i: int) -> None:
            rng = random.Random(i)
            while not stop.is_set():
                off = (rng.randrange(SIZE // BLOCK // HOSTS) * HOSTS + i) * BLOCK  # blocks of its own
                data = rng.randbytes(BLOCK)
                assert lun.backend is not None
                await lun.backend.write(off, data)
                model[off : off + BLOCK] = data
                writes[0] += 1
                await asyncio.sleep(0)  # once cut over, a write to the local copy never waits

        hosts = [asyncio.ensure_future(host(i)) for i in range(HOSTS)]
        for _ in range(4 * HOSTS):  # the queue fills up
            await asyncio.sleep(0)
        before = writes[0]
        m.resume()
        try:
            assert await m.wait(60) == "completed"
        finally:
            stop.set()
            await asyncio.gather(*hosts)
        assert await target.read(0, SIZE) == model
        return writes[0] - before, copier.regions_copied

    host_writes, copied = asyncio.run(main())
    assert copied >= COUNT
    # 28.3 host writes a region before (each copy: 3 trips through the queue, 4 at
    # a time), 3.4 now (an allocated region's map is not read again, 32 at a time)
    assert host_writes / COUNT < 8, (host_writes, copied)


def test_a_copy_cancelled_while_it_waits_out_writes_leaves_its_region_dirty(tmp_path: Path) -> None:
    """A pass that fails or is cancelled cancels the copies it runs beside its workers;
    one cancelled while it waited for the writes in flight left its region COPYING,
    which no pass takes again and no cutover sees clean."""

    async def main() -> None:
        source, target = QueuedSource(SIZE), MemoryBackend(SIZE)
        regions = RegionMap(SIZE, REGION)
        progress = ProgressFile(tmp_path / "progress", regions, {})
        progress.create()
        mb = MigratingBackend(source, target, regions, progress)
        mb.active = True
        copier = Copier(source, target, regions, Throttle(), claim_busy=lambda: mb.active)
        write = asyncio.ensure_future(mb.write(0, b"x" * BLOCK))
        await asyncio.sleep(0)
        assert regions.inflight[0]
        copy = asyncio.ensure_future(copier.copy_region(0))
        await asyncio.sleep(0)
        assert 0 in regions.copying
        copy.cancel()
        await asyncio.gather(copy, return_exceptions=True)
        assert regions.state[0] == DIRTY and not regions.copying
        await write
        assert await copier.copy_region(0)
        assert await target.read(0, BLOCK) == b"x" * BLOCK

    asyncio.run(main())
