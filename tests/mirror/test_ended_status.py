"""The status of a migration that has ended tells the source link as it is now.

A cancelled (or failed) migration leaves its LUN serving the source directly. Its status's
``source_connected`` was what the last request on the link found (a source gone while no
host did I/O still said True), and after a restart of the target, the value recorded when
the migration ended. The control layer reads it to tell whether the LUN can serve its
source. Real array daemons and NBD (tests.servers.array_daemon).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.mirror.test_faults import (
    LUN,
    TOKEN,
    MiB,
    cli,
    make_data,
    new_source,
    poll,
    restart,
    run,
    start_migration,
    status,
    two_arrays,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SIZE = 8 * MiB


async def _until(d: Any, connected: bool, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = await status(d)
        if st["source_connected"] is connected:
            return st
        assert time.monotonic() < deadline, f"source_connected still {st['source_connected']}: {st}"
        await asyncio.sleep(0.05)


def test_a_cancelled_migration_reports_its_source_link_live(tmp_path: Path) -> None:
    with two_arrays(tmp_path) as (stack, a, b):

        async def body() -> None:
            await new_source(a, make_data(51, SIZE))
            await asyncio.to_thread(start_migration, b, a.uri(LUN), "--throttle", "1")
            r = await asyncio.to_thread(cli, "migration", "cancel", "--api", b.api, "--token", TOKEN, LUN)
            assert r.returncode == 0, r.stdout + r.stderr
            st = await _until(b, True)
            assert st["state"] == "cancelled", st
            a.sigkill()  # no host does I/O: only the link itself says the source is gone
            await _until(b, False)
            b.sigkill()
            b2 = await restart(stack, b.data_dir, "B")
            st2 = await status(b2)  # the source is still down: not what was recorded at the end
            assert (st2["state"], st2["source_connected"]) == ("cancelled", False), st2

        run(body(), 100)


def test_cancel_of_a_completed_migration_says_the_lun_cut_over(tmp_path: Path) -> None:
    """`blockmig migration cancel` of a migration that completed answers 409 and says that
    the LUN holds the data now, before and after a restart of the target (the control
    layer's cancel_migration_target took a bare 409 for "nothing left" and deleted it)."""
    with two_arrays(tmp_path) as (stack, a, b):

        async def body() -> None:
            await new_source(a, make_data(52, SIZE))
            await asyncio.to_thread(start_migration, b, a.uri(LUN))
            await poll(b, lambda s: s["state"] == "completed", 30, "completed")
            for d in (b, None):
                if d is None:
                    b.sigkill()
                    d = await restart(stack, b.data_dir, "B")
                r = await asyncio.to_thread(cli, "migration", "cancel", "--api", d.api, "--token", TOKEN, LUN)
                assert r.returncode == 1, r.stdout + r.stderr
                assert "already completed" in r.stderr and "holds the data now" in r.stderr, r.stderr
                assert (await status(d))["state"] == "completed"

        run(body(), 100)
