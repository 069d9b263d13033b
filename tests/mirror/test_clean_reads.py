"""A host's READ of regions already copied needs nothing of the source (I6), also a
structured READ large enough for the server to look for holes in it (64 KiB and more).

The LUN is a MigratingBackend served by our NbdServer on this test's loop; its source
stops answering (an array under SIGSTOP, a dead link) once a region is copied.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from emulator.mirror.copier import Copier, Throttle
from emulator.mirror.migrating import MigratingBackend
from emulator.mirror.regions import ProgressFile, RegionMap
from emulator.nbd.backend import MemoryBackend
from emulator.nbd.client import NbdClient
from emulator.nbd.protocol import STATE_ZERO, Extent
from emulator.nbd.server import NbdServer

pytestmark = pytest.mark.timeout(30)
REGION = 1 << 20
SIZE = 4 * REGION


class Hung(MemoryBackend):
    """A source that answers nothing once ``hung`` is set."""

    hung = False

    async def _answer(self) -> None:
        if self.hung:
            await asyncio.Event().wait()

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self._answer()
        await super().read_into(offset, buf)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        await self._answer()
        return await super().extents(offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self._answer()


def copied_region_0(tmp_path: Path, body: Callable[[NbdClient, bytes], Awaitable[None]]) -> None:
    """``body(client, data)`` on a LUN migrating from a source that holds ``data`` (random,
    but for a run of zeroes in region 0) and stops answering once region 0 is copied."""
    data = bytearray(os.urandom(SIZE))
    data[REGION // 2 : REGION] = bytes(REGION // 2)  # a run of zeroes: sent as a hole

    async def main() -> None:
        source, target = Hung(SIZE), MemoryBackend(SIZE)
        await source.write(0, bytes(data))
        await source.trim(REGION // 2, REGION // 2)
        regions = RegionMap(SIZE, REGION)
        progress = ProgressFile(tmp_path / "progress", regions, {})
        progress.create()
        mb = MigratingBackend(source, target, regions, progress)
        assert await Copier(source, target, regions, Throttle()).copy_region(0)
        source.hung = True
        server = NbdServer()
        server.add_export("lun", mb)
        _, port = await server.listen_tcp("127.0.0.1", 0)
        try:
            async with await NbdClient.connect(f"nbd://127.0.0.1:{port}/lun") as c:
                assert c.structured
                await body(c, bytes(data))
        finally:
            source.hung = False
            await server.close(timeout=1)

    asyncio.run(main())


def test_a_structured_read_of_copied_regions_needs_no_answer_from_the_source(tmp_path: Path) -> None:
    """Regression (was a bug): a structured READ of 64 KiB or more of a copied region failed
    with EIO when the source did not answer (its array under SIGSTOP, a 1 s retry window:
    EIO after 1.2 s; 4 KiB reads of it were answered at once): the server asked the LUN's
    allocation map, the source's, for the holes to send as OFFSET_HOLE chunks. A READ now
    asks the map of the side it reads (extents_for_read), here the target."""

    async def reads(c: NbdClient, data: bytes) -> None:
        for length in (4096, 64 << 10, REGION):
            got = await asyncio.wait_for(c.read(0, length), 5)
            assert got == data[:length], length

    copied_region_0(tmp_path, reads)


def test_a_cache_of_copied_regions_needs_no_answer_from_the_source(tmp_path: Path) -> None:
    """Regression (was a bug): a CACHE of copied regions went to the source, as every CACHE
    did, and waited for it (EIO once the retry window ended, as for a read of regions not
    copied), where the reads it announces are the target's. It goes to the target now; a
    CACHE of regions not copied still goes to the source."""

    async def cache(c: NbdClient, data: bytes) -> None:
        await asyncio.wait_for(c.cache(0, REGION), 5)
        assert await asyncio.wait_for(c.read(0, 4096), 5) == data[:4096]

    copied_region_0(tmp_path, cache)


def test_block_status_of_copied_regions_needs_no_answer_from_the_source(tmp_path: Path) -> None:
    """Regression (was a bug): BLOCK_STATUS always asked the source's map, so a host's
    sparse-aware copy (nbdcopy, qemu-img convert) of regions already copied waited on a
    source that did not answer, then failed with EIO, where reading them needed nothing of
    it. A range that begins in copied regions is answered from the target's map, up to
    the first region not copied (a reply may cover less than was asked); the rest still
    comes from the source."""

    async def block_status(c: NbdClient, data: bytes) -> None:
        for one in (False, True):
            for length in (REGION, SIZE):  # the whole LUN: answered up to region 0's end
                got = await asyncio.wait_for(c.extents(0, length, one=one), 5)
                assert sum(e.length for e in got) <= REGION, got
                pos = 0
                for e in got:  # what the map says is zero reads as zeroes
                    if e.flags & STATE_ZERO:
                        assert data[pos : pos + e.length] == bytes(e.length), (pos, e)
                    pos += e.length
        # the map covers the run of zeroes: all of region 0 was answered
        got = await asyncio.wait_for(c.extents(0, REGION), 5)
        assert sum(e.length for e in got) == REGION and got[-1].flags & STATE_ZERO, got
        with pytest.raises(TimeoutError):  # region 1 is not copied: the source's, which hangs
            await asyncio.wait_for(c.extents(REGION, REGION), 0.5)

    copied_region_0(tmp_path, block_status)
