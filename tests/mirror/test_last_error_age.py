"""A migration's last error says when it happened.

A source that failed for a while and came back left ``last_error`` in the status
of a migration that went on and completed: nothing told an operator that the error
was old news. The status now has ``last_error_at`` and ``blockmig migration status``
says how long ago. In-process, a source that fails its reads on demand.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from control.migration_commands import format_status
from emulator.mirror.migration import MigrationConfig
from emulator.nbd.backend import MemoryBackend
from tests.backends import local_migration
from tests.mirror.test_pause_in_cutover import FailingReads

MiB = 1 << 20


def test_an_error_the_migration_got_over_says_how_old_it_is(tmp_path: Path) -> None:
    async def main() -> None:
        size = 4 * MiB
        source, target = FailingReads(size), MemoryBackend(size)
        await source.write(0, b"s" * size)
        source.fail = True
        m = local_migration(source, target, tmp_path, MigrationConfig(region_size=MiB))
        assert m.status()["last_error_at"] is None
        before = time.time()
        await m.start()
        for _ in range(200):
            if m.last_error:
                break
            await asyncio.sleep(0.01)
        assert "source read failed" in m.last_error
        at = m.status()["last_error_at"]
        assert at is not None and before <= at <= time.time()
        await asyncio.sleep(0.2)
        source.fail = False  # the source is back: the migration goes on by itself
        assert await m.wait(10) == "completed"
        st = m.status()
        assert "source read failed" in st["last_error"]
        assert st["last_error_at"] is not None and st["last_error_at"] < st["finished"]
        st["last_error_at"] -= 300  # as read five minutes later
        assert "(5 min ago)" in format_status(st)

    asyncio.run(main())
