"""A LUN whose delete a crash cut short takes its migration with it.

A delete marks the LUN ``deleting``, then stops its migration (whose row it removes),
then removes the LUN. A kill -9 between the first two steps left the migration's row and
progress file behind when the restarted array finished the delete: a new LUN of the same
name then showed the old migration as its own after the next restart. Real array daemons.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from control.api_client import ApiError
from emulator.nbd.client import NbdClient
from tests.mirror.test_faults import (
    LUN,
    MiB,
    api,
    make_data,
    new_source,
    restart,
    run,
    sigcont,
    start_migration,
    two_arrays,
)
from tests.servers import ArrayDaemon, array_api, array_daemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _no_migration(d: ArrayDaemon) -> None:
    with pytest.raises(ApiError) as e:
        array_api(d).migration(LUN)
    assert e.value.status == 404, e.value
    db = sqlite3.connect(d.data_dir / "array.db")
    try:
        assert db.execute("SELECT lun FROM migrations").fetchall() == []
    finally:
        db.close()
    assert list(d.data_dir.glob("pools/*/*.progress")) == []


def _mark_deleting(d: ArrayDaemon) -> None:
    """What a kill -9 right after the delete's first step leaves."""
    db = sqlite3.connect(d.data_dir / "array.db")
    with db:
        db.execute("UPDATE luns SET state='deleting' WHERE name=?", (LUN,))
    db.close()


def test_a_delete_cut_short_by_a_crash_leaves_no_migration_behind(tmp_path: Path) -> None:
    with two_arrays(tmp_path) as (stack, a, b):

        async def body() -> None:
            await new_source(a, make_data(61, 8 * MiB))
            await asyncio.to_thread(start_migration, b, a.uri(LUN), "--throttle", "1")
            b.sigkill()
            _mark_deleting(b)
            b2 = await restart(stack, b.data_dir, "B")
            assert LUN not in [x["name"] for x in await asyncio.to_thread(array_api(b2).list_luns)]
            _no_migration(b2)
            await asyncio.to_thread(array_api(b2).create_lun, LUN, 8 * MiB)
            b2.sigterm()
            b3 = await restart(stack, b.data_dir, "B")
            assert (await asyncio.to_thread(array_api(b3).get_lun, LUN))["state"] == "ready"
            _no_migration(b3)

        run(body(), 100)


def test_a_delete_cut_short_by_a_crash_mid_move_leaves_no_new_copy(tmp_path: Path) -> None:
    """A pool move's new file too: the array removed the LUN's file in its old pool only."""
    args = ("--pool", "p1=1G", "--pool", "p2=1G", "--migration-throttle", "1")
    with array_daemon(tmp_path / "C", "C", *args) as d:
        api = array_api(d)
        api.call("POST", "/api/v1/luns", {"name": LUN, "size": 64 * MiB, "pool": "p1"})
        api.call("POST", f"/api/v1/luns/{LUN}/move", {"pool": "p2"})  # 1 MB/s: it runs for seconds
        d.sigkill()
        _mark_deleting(d)
    with array_daemon(tmp_path / "C", "C", *args) as d2:
        assert array_api(d2).list_luns() == []
        _no_migration(d2)
        assert list(d2.data_dir.glob("pools/*/*")) == []


def _db_state(d: ArrayDaemon) -> tuple[str | None, str | None]:
    """(the LUN's state, its migration's state) in the array's database."""
    db = sqlite3.connect(d.data_dir / "array.db", timeout=5)
    try:
        lun = db.execute("SELECT state FROM luns WHERE name=?", (LUN,)).fetchone()
        mig = db.execute("SELECT state FROM migrations WHERE lun=?", (LUN,)).fetchone()
    finally:
        db.close()
    return (lun and lun[0]), (mig and mig[0])


def test_a_crash_after_the_delete_cancelled_the_migration_still_deletes(tmp_path: Path) -> None:
    """The delete's cancel of the migration made the LUN `remote` again in array.db, over
    its `deleting` mark; a kill -9 while the delete then waited (for the source to answer
    a host's write, here a stopped source) brought the LUN back at the restart, serving
    its source as a remote LUN."""
    with two_arrays(tmp_path) as (stack, a, b):

        async def body() -> None:
            await new_source(a, make_data(63, 8 * MiB))
            await asyncio.to_thread(start_migration, b, a.uri(LUN), "--throttle", "1")
            host = await NbdClient.connect(b.uri(LUN))
            a.proc.send_signal(signal.SIGSTOP)
            try:
                write = asyncio.ensure_future(host.write(0, b"w" * 4096))  # waits for A
                delete = asyncio.ensure_future(asyncio.to_thread(api(b).delete_lun, LUN, True))
                deadline = time.monotonic() + 20
                while _db_state(b)[1] != "cancelled":
                    assert time.monotonic() < deadline, f"no cancel: {_db_state(b)}"
                    await asyncio.sleep(0.01)
                assert not delete.done(), "the delete did not wait for the source"
                b.sigkill()
                await asyncio.gather(write, delete, return_exceptions=True)
            finally:
                sigcont(a.proc)
                await host.close()
            b2 = await restart(stack, b.data_dir, "B")
            assert await asyncio.to_thread(array_api(b2).list_luns) == []
            _no_migration(b2)
            assert list(b2.data_dir.glob("pools/*/*")) == []

        run(body(), 100)
