"""A FLUSH in active mode reaches both sides: the cutover then needs no flush
under held writes, as what the host flushed is already durable on the target."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from emulator.mirror.migrating import MigratingBackend
from emulator.mirror.regions import ProgressFile, RegionMap
from emulator.nbd.backend import MemoryBackend
from emulator.nbd.errors import BackendError

SIZE = 4 << 20
REGION = 1 << 20


class FailingFlush(MemoryBackend):
    """A MemoryBackend whose flush is counted (``flushes``), then fails with EIO."""

    async def flush(self) -> None:
        await super().flush()
        raise BackendError(errno.EIO, "flush failed")


def _backend(tmp_path: Path, target: MemoryBackend) -> tuple[MigratingBackend, MemoryBackend]:
    source = MemoryBackend(SIZE)
    regions = RegionMap(SIZE, REGION)
    progress = ProgressFile(tmp_path / "progress", regions, {})
    progress.create()
    return MigratingBackend(source, target, regions, progress), source


@pytest.mark.parametrize("active", [False, True])
def test_flush_reaches_the_target_only_in_active_mode(tmp_path: Path, active: bool) -> None:
    async def main() -> None:
        target = MemoryBackend(SIZE)
        mb, source = _backend(tmp_path, target)
        mb.active = active
        await mb.flush()
        assert source.flushes == 1
        assert target.flushes == (1 if active else 0)
        assert mb.target_error is None

    asyncio.run(main())


def test_a_target_flush_failure_is_the_migrations_not_the_hosts(tmp_path: Path) -> None:
    async def main() -> None:
        mb, source = _backend(tmp_path, FailingFlush(SIZE))
        mb.active = True
        await mb.flush()  # the source has the data: the host's FLUSH succeeds
        assert source.flushes == 1
        assert isinstance(mb.target_error, BackendError)

    asyncio.run(main())
