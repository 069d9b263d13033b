"""A cancel that comes while a migration fails (its target pool full) and lets go of the
local copy, waiting for a host read in flight on it.

The cancel stopped the failing task in that wait and ended the migration as it ends a
cancel: state "cancelled", no last_error, and the cancel answered as done. The reason
it failed (a full pool, which the operator must fix before trying again) was lost. Now
the failure ends as a failure, with its error, and the cancel is refused as one of a
migration that already failed. In-process: a target whose reads wait on demand and whose
copy writes fail with ENOSPC.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from emulator.mirror.migration import MigrationConfig
from emulator.mirror.regions import CLEAN
from emulator.nbd.backend import MemoryBackend
from emulator.nbd.errors import BackendError
from tests.backends import local_migration

MiB = 1 << 20


class FillingTarget(MemoryBackend):
    """Reads wait on ``gate`` once ``armed``; the copy's writes past the first MiB wait
    for ``full``, then fail with ENOSPC."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.armed = False
        self.gate = asyncio.Event()
        self.full = asyncio.Event()

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        if self.armed:
            await self.gate.wait()
        return await super().read(offset, length)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        if self.armed:
            await self.gate.wait()
        await super().read_into(offset, buf)

    async def write_bulk(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if offset >= MiB:
            await self.full.wait()
            raise BackendError(errno.ENOSPC, "pool 'default' is full (test)")
        await super().write(offset, data)


def test_a_cancel_while_a_migration_fails_keeps_the_failure(tmp_path: Path) -> None:
    async def main() -> None:
        size = 4 * MiB
        source, target = MemoryBackend(size), FillingTarget(size)
        await source.write(0, b"s" * size)
        m = local_migration(source, target, tmp_path, MigrationConfig(region_size=MiB, workers=1))
        await m.start()
        assert m.backend is not None and m.regions is not None
        for _ in range(500):
            if m.regions.state[0] == CLEAN:
                break
            await asyncio.sleep(0.01)
        assert m.regions.state[0] == CLEAN
        target.armed = True
        read = asyncio.ensure_future(m.backend.read(0, 4096))  # a clean region: read locally, held
        await asyncio.sleep(0.05)
        target.full.set()  # the copy of region 1 fails: the migration waits for that read
        await asyncio.sleep(0.05)
        assert m.state not in ("failed", "cancelled"), m.state
        asyncio.get_running_loop().call_later(0.2, target.gate.set)

        with pytest.raises(ValueError, match="already failed"):
            await asyncio.wait_for(m.cancel(), 10)

        assert m.state == "failed", m.state  # was "cancelled"
        assert "pool 'default' is full" in m.last_error, m.last_error  # was ""
        assert m.lun.backend is source  # the LUN serves its source, as after either
        assert bytes(await asyncio.wait_for(read, 10)) == b"s" * 4096
        assert bytes(await source.read(0, size)) == b"s" * size  # the source is whole

    asyncio.run(main())
