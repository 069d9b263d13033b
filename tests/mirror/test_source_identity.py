"""The source changed under a migration: another LUN behind the same nbd:// URI.

A migration started with `blockmig migration start --source nbd://...` (no
fence) reconnects to its source by address and export name. NBD itself carries
no identity: a LUN deleted and made again with the same name and size, or
another array started on the source's port, answers the same URI with other
data. Our arrays give every LUN a persistent id and advertise it in the
export's description (NBD_INFO_DESCRIPTION); the target records it at the first
connection and refuses a source that answers with another one: I/O that needs
the source fails with EIO, the migration waits with the reason in last_error,
and goes on when the LUN it took over is back. Without that, the copy went on
from the new LUN and the target held half of one LUN and half of the other.

Real array daemons (tests.servers.array_daemon); the throttle keeps the first
pass long enough that the change comes while the end of the LUN is not copied
(the copier goes in LUN order).
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from emulator.nbd.client import NbdClient
from emulator.nbd.errors import RequestError
from tests.mirror.test_faults import (
    EIO,
    FINAL,
    LUN,
    RUNNING,
    TOKEN,
    MiB,
    api,
    brief,
    clean_fraction,
    cli,
    make_data,
    new_source,
    poll,
    read_all,
    restart,
    run,
    sigcont,
    start_migration,
    two_arrays,
    wait_final,
)
from tests.servers import ArrayDaemon

pytestmark = pytest.mark.slow

SIZE = 16 * MiB
CHANGED = "no longer the LUN"  # in the migration's last_error once the source changed


def refused(st: dict[str, object]) -> bool:
    return CHANGED in str(st["last_error"]) or st["state"] in FINAL


async def migrating(a: ArrayDaemon, b: ArrayDaemon, data: bytes, share: float) -> None:
    """A's LUN holds ``data`` and migrates to B at 4 MB/s; returns once ``share`` of it is
    clean on B (the rest is not copied yet)."""
    await new_source(a, data)
    await asyncio.to_thread(start_migration, b, a.uri(LUN), "--throttle", "4")
    await poll(b, lambda s: clean_fraction(s) >= share, 20, f"{share:.0%} clean")


async def regions_served(b: ArrayDaemon, old: bytes, new: bytes) -> tuple[int, int, int]:
    """Read B's LUN 1 MiB at a time: (regions with the old LUN's data, regions with
    the new LUN's data, regions that failed with EIO). Anything else fails."""
    counts = [0, 0, 0]
    async with await NbdClient.connect(b.uri(LUN)) as c:
        for off in range(0, SIZE, MiB):
            try:
                got = bytes(await c.read(off, MiB))
            except RequestError as e:
                assert e.error == EIO, e
                counts[2] += 1
                continue
            if got == old[off : off + MiB]:
                counts[0] += 1
            elif got == new[off : off + MiB]:
                counts[1] += 1
            else:
                raise AssertionError(f"region at {off:#x} holds neither LUN's data")
    return counts[0], counts[1], counts[2]


@pytest.mark.timeout(90)
def test_source_lun_deleted_and_made_again_while_the_target_is_stopped(tmp_path: Path) -> None:
    """B is stopped (SIGSTOP) mid-copy; on A the LUN is deleted (force: B's connection
    goes) and a new one made with the same name and size and other data; B goes on.
    B must not copy from, nor serve, the new LUN: nothing of it on B, reads of regions
    not copied yet fail with EIO, the migration waits saying why, and a cancel leaves
    B's LUN refusing the impostor too.

    Before the fix B reconnected to the new LUN and completed: the first quarter of
    the LUN from the old one, the rest from the new one, "completed" and ready."""
    old, new = make_data(41, SIZE), make_data(42, SIZE)
    with two_arrays(tmp_path) as (stack, a, b):
        stack.callback(sigcont, b.proc)

        async def body() -> None:
            await migrating(a, b, old, 0.25)
            b.proc.send_signal(signal.SIGSTOP)
            try:
                await asyncio.to_thread(api(a).delete_lun, LUN, True)
                await new_source(a, new)
            finally:
                b.proc.send_signal(signal.SIGCONT)
            st = await poll(b, refused, 30, "the changed source refused")
            from_old, from_new, eio = await regions_served(b, old, new)
            assert st["state"] in RUNNING and from_new == 0, (
                f"the migration went on with another LUN: {brief(st)}; B serves {from_old} MiB of "
                f"the old LUN, {from_new} MiB of the new one, {eio} MiB fail"
            )
            assert "LUN id" in st["last_error"], st["last_error"]
            assert eio > 0 and from_old + eio == SIZE // MiB, (from_old, eio)
            st = await poll(b, refused, 5, "still refused")
            assert st["state"] in RUNNING and st["dirty_bytes"] > 0, brief(st)
            # Cancelled, the LUN serves its source directly: not the impostor either.
            r = await asyncio.to_thread(
                cli, "migration", "cancel", "--api", b.api, "--token", TOKEN, LUN, "--json"
            )
            assert r.returncode == 0, r.stdout + r.stderr
            async with await NbdClient.connect(b.uri(LUN)) as c:
                with pytest.raises(RequestError) as ei:
                    await c.read(0, 4096)
                assert ei.value.error == EIO

        run(body(), 80)


@pytest.mark.timeout(90)
def test_another_array_on_the_source_port_while_the_target_restarts(tmp_path: Path) -> None:
    """Both arrays are killed -9 mid-copy; another array (its own data dir, a LUN of the
    same name and size, other data) comes up on A's NBD port, and B restarts. The
    resumed migration must refuse it (its identity was recorded before the crash), and
    complete with A's data once A is back on its port.

    Before the fix the resumed migration completed from the other array's LUN."""
    old, new = make_data(43, SIZE), make_data(44, SIZE)
    with two_arrays(tmp_path) as (stack, a, b):

        async def body() -> None:
            # past the first checkpoint (1 s): the resume believes part of the LUN clean
            await migrating(a, b, old, 0.5)
            b.sigkill()
            a.sigkill()
            port = f"127.0.0.1:{a.nbd_port}"
            other = await restart(stack, tmp_path / "other", "X", "--nbd-listen", port)
            await new_source(other, new)
            b2 = await restart(stack, b.data_dir, "B")
            st = await poll(b2, refused, 30, "the other array refused")
            from_old, from_new, eio = await regions_served(b2, old, new)
            assert st["state"] in RUNNING and from_new == 0 and eio > 0, (
                f"the migration went on with another LUN: {brief(st)}; B serves {from_old} MiB of "
                f"the old LUN, {from_new} MiB of the other one, {eio} MiB fail"
            )
            # A comes back on its port: the migration goes on by itself and completes.
            other.sigkill()
            await restart(stack, a.data_dir, "A", "--nbd-listen", port)
            done = await wait_final(b2, 40)
            assert done["state"] == "completed", brief(done)
            assert await read_all(b2.uri(LUN), SIZE) == old

        run(body(), 80)


@pytest.mark.timeout(60)
def test_a_migration_recorded_without_the_source_id_resumes(tmp_path: Path) -> None:
    """A data dir from before source ids (the column is not there): the migration
    resumes after kill -9 of B, completes, and the id is recorded from then on."""
    old = make_data(45, SIZE)
    with two_arrays(tmp_path) as (stack, a, b):

        async def body() -> None:
            await migrating(a, b, old, 0.25)
            b.sigkill()
            with closing(sqlite3.connect(b.data_dir / "array.db")) as db:
                assert db.execute("SELECT source_id FROM migrations").fetchone()[0]
                db.execute("ALTER TABLE migrations DROP COLUMN source_id")
                db.commit()
            b2 = await restart(stack, b.data_dir, "B")
            done = await wait_final(b2, 40)
            assert done["state"] == "completed", brief(done)
            assert await read_all(b2.uri(LUN), SIZE) == old
            b2.sigkill()
            with closing(sqlite3.connect(b.data_dir / "array.db")) as db:
                (sid,) = db.execute("SELECT source_id FROM migrations").fetchone()
            lun = await asyncio.to_thread(api(a).get_lun, LUN)
            assert sid == lun["id"], (sid, lun)

        run(body(), 50)
