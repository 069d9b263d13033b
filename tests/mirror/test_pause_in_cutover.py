"""A pause that comes while a cutover runs, and a cutover then put off.

pause() cleared the gate and said "paused"; the cutover, put off by a source error
while writes were held, then set "converging" over it. The copy loop waited on the
gate, resume() saw no "paused" to undo and did nothing: the migration stayed in
"converging" for good, its LUN proxied to the source. Now a put-off cutover goes
back to "paused" when a pause came meanwhile, and resume() finishes the migration.
In-process, a source that fails its reads on demand.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

from emulator.mirror.migrating import MigratingBackend
from emulator.mirror.migration import Migration, MigrationConfig
from emulator.nbd.backend import MemoryBackend
from emulator.nbd.errors import BackendError
from tests.backends import local_migration

MiB = 1 << 20


class FailingReads(MemoryBackend):
    """Reads raise EIO while ``fail`` is set."""

    fail = False

    async def _check(self, offset: int) -> None:
        if self.fail:
            raise BackendError(errno.EIO, "source read failed (test)")

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        await self._check(offset)
        return await super().read(offset, length)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self._check(offset)
        await super().read_into(offset, buf)


async def _started(
    source: MemoryBackend, tmp_path: Path
) -> tuple[Migration, MemoryBackend, MigratingBackend]:
    """``source`` filled with b"s" and its migration in 1 MiB regions begun."""
    target = MemoryBackend(source.size)
    await source.write(0, b"s" * source.size)
    m = local_migration(source, target, tmp_path, MigrationConfig(region_size=MiB))
    await m.start()
    assert m.backend is not None
    return m, target, m.backend


def test_a_pause_during_a_cutover_that_is_put_off_can_be_resumed(tmp_path: Path) -> None:
    async def main() -> None:
        size = 4 * MiB
        source = FailingReads(size)
        m, target, backend = await _started(source, tmp_path)
        hold = backend.hold_writes
        held = asyncio.Event()

        async def pause_then_hold() -> None:
            # A host trim leaves a region dirty for the held copy (a write would go
            # to both sides); the pause comes now, the source fails that copy: the
            # cutover is put off.
            await backend.trim(0, 4096)
            m.pause()
            source.fail = True
            held.set()
            await hold()

        backend.hold_writes = pause_then_hold  # type: ignore[method-assign]
        await asyncio.wait_for(held.wait(), 10)
        for _ in range(100):  # the put-off cutover returns to the loop
            if "source read failed" in m.last_error:
                break
            await asyncio.sleep(0.01)
        assert "source read failed" in m.last_error
        assert m.state == "paused"  # was "converging", and nothing could resume it
        backend.hold_writes = hold  # type: ignore[method-assign]
        source.fail = False
        m.resume()
        assert await m.wait(10) == "completed"
        assert bytes(await target.read(0, 4096)) == bytes(4096)
        assert bytes(await target.read(4096, size - 4096)) == b"s" * (size - 4096)

    asyncio.run(main())


class SplitReads(FailingReads):
    """Once ``armed``, reads of the first MiB fail at once (EIO); reads of the rest
    wait on ``gate`` and count how many are still running."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.armed = False
        self.gate = asyncio.Event()
        self.waiting = 0

    async def _check(self, offset: int) -> None:
        if not self.armed:
            return
        if offset < MiB:
            raise BackendError(errno.EIO, "source read failed (test)")
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1


def test_a_put_off_cutover_leaves_no_copy_of_its_own_running(tmp_path: Path) -> None:
    """The held copy of one region fails while another's is still reading: the
    cutover is put off and host writes flow again, and the other copy ends with it
    (cancelled), not some time after, outside the copy loop's count of copies."""

    async def main() -> None:
        size = 4 * MiB
        source = SplitReads(size)
        m, target, backend = await _started(source, tmp_path)
        hold = backend.hold_writes
        held = asyncio.Event()

        async def dirty_two_then_hold() -> None:
            await backend.trim(0, 4096)  # region 0: its copy fails
            await backend.trim(MiB, 4096)  # region 1: its copy waits on the gate
            source.armed = True
            backend.hold_writes = hold  # type: ignore[method-assign]
            held.set()
            await hold()

        put_off = m._postponed
        running: list[int] = []  # copies still reading when the cutover is put off

        def postponed() -> None:
            running.append(source.waiting)
            put_off()

        m._postponed = postponed  # type: ignore[method-assign]
        backend.hold_writes = dirty_two_then_hold  # type: ignore[method-assign]
        await asyncio.wait_for(held.wait(), 10)
        for _ in range(100):
            if running:
                break
            await asyncio.sleep(0.01)
        assert running == [0], "a copy of the put-off cutover still runs"
        assert "source read failed" in m.last_error
        source.armed = False
        source.gate.set()
        assert await m.wait(10) == "completed"
        assert bytes(await target.read(0, 4096)) == bytes(4096)
        assert bytes(await target.read(MiB, 4096)) == bytes(4096)
        assert bytes(await target.read(4096, MiB - 4096)) == b"s" * (MiB - 4096)

    asyncio.run(main())
