"""A migration's source URI changed while it runs: `blockmig migration set --source URI`
(PATCH /api/v1/migrations/{name} with {"source": URI}).

The target records its source by address (an nbd:// URI, in its array.db). When the
source array comes back at another address (restarted after a kill -9 on other ports,
its old one taken), the takeover kept dialing the old URI: host I/O that needs the
source failed with EIO after the retry window and the copy never resumed.

1. A killed and restarted on another port; a host read of a region not copied yet waits
   for the source; `migration set --source` gives the new URI: the waiting read completes
   with the right data, host writes and reads go on, the new URI is recorded (a kill -9
   and restart of the target dials it) and the migration completes with the data
   written.
2. A URI that serves another LUN (another id; another size) is refused with 409, one that
   cannot be reached with 400; the migration keeps its source and completes from it.
Real array daemons and NBD (tests.servers.array_daemon).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from control.api_client import ApiError
from emulator.nbd.client import NbdClient
from tests.mirror.test_faults import (
    BLOCK,
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
    start_migration,
    status,
    two_arrays,
    wait_final,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SIZE = 32 * MiB


def set_source(b_api: str, uri: str) -> tuple[int, dict[str, object] | str]:
    """`blockmig migration set --source URI` against B: (exit code, JSON status or stderr)."""
    r = cli("migration", "set", "--api", b_api, "--token", TOKEN, LUN, "--source", uri, "--json")
    return r.returncode, json.loads(r.stdout) if r.returncode == 0 else r.stderr


def recorded_source(data_dir: object) -> str:
    with closing(sqlite3.connect(f"file:{data_dir}/array.db?mode=ro", uri=True)) as db:
        row = db.execute("SELECT source FROM migrations WHERE lun=?", (LUN,)).fetchone()
    return str(row[0])


def test_a_source_restarted_on_another_port_is_followed_once_told(tmp_path: Path) -> None:
    with two_arrays(tmp_path) as (stack, a, b):

        async def body() -> None:
            model = await new_source(a, make_data(23, SIZE))
            await asyncio.to_thread(start_migration, b, a.uri(LUN), "--throttle", "4")
            await poll(b, lambda s: clean_fraction(s) >= 0.2, 30, "20% clean")
            old_uri = a.uri(LUN)
            a.sigkill()
            await poll(b, lambda s: not s["source_connected"], 10, "source_connected false")
            a2 = await restart(stack, a.data_dir, "A")  # port 0: another port
            assert a2.nbd_port != a.nbd_port
            async with await NbdClient.connect(b.uri(LUN)) as h:
                # the last region is not copied: this read waits for the source (30 s window)
                waiting = asyncio.ensure_future(h.read(SIZE - BLOCK, BLOCK))
                await asyncio.sleep(0.5)
                assert not waiting.done(), "a read of an uncopied region did not wait for the source"
                code, st = await asyncio.to_thread(set_source, b.api, a2.uri(LUN))
                assert code == 0, st
                assert isinstance(st, dict) and st["source"] == a2.uri(LUN) and st["state"] in RUNNING, st
                got = await asyncio.wait_for(waiting, 10)
                assert model.accepts(SIZE - BLOCK, got), "the waiting read got wrong data"
                assert recorded_source(b.data_dir) == a2.uri(LUN) != old_uri
                for i in range(8):  # host writes through the target: to the source first (I1)
                    off = SIZE - (i + 2) * MiB
                    data = os.urandom(BLOCK)
                    await asyncio.wait_for(h.write(off, data, fua=True), 10)
                    model.ack(off, data)
                    assert model.accepts(off, await asyncio.wait_for(h.read(off, BLOCK), 10))
            # the source is reached at its new address after a restart of the target too
            b.sigkill()
            b2 = await restart(stack, b.data_dir, "B")
            st2 = await poll(b2, lambda s: s["source_connected"] or s["state"] == "completed", 20, "resumed")
            assert st2["source"] == a2.uri(LUN), brief(st2)
            await asyncio.to_thread(api(b2).update_migration, LUN, 0)  # unthrottled: done soon
            done = await wait_final(b2, 60)
            assert done["state"] == "completed", brief(done)
            model.check(await read_all(b2.uri(LUN), SIZE), "B after its source moved")

        run(body(), 100)


def test_a_uri_serving_another_lun_or_none_is_refused_and_the_migration_goes_on(tmp_path: Path) -> None:
    with two_arrays(tmp_path) as (stack, a, b):

        async def body() -> None:
            data = make_data(29, SIZE)
            await new_source(a, data)
            await asyncio.to_thread(api(a).create_lun, "other", SIZE)  # same size, another id
            await asyncio.to_thread(api(a).create_lun, "small", SIZE // 2)
            await asyncio.to_thread(start_migration, b, a.uri(LUN), "--throttle", "8")
            await poll(b, lambda s: clean_fraction(s) >= 0.1, 30, "10% clean")
            for uri, code, text in (
                (a.uri("other"), 409, "serves another LUN"),
                (a.uri("small"), 409, "serves another LUN"),
                ("nbd://127.0.0.1:1/vol", 400, "cannot reach"),
                (a.uri("absent"), 400, "cannot reach"),
                ("http://x/vol", 400, "nbd://"),
            ):
                with pytest.raises(ApiError) as ei:
                    await asyncio.to_thread(api(b).update_migration, LUN, None, None, uri)
                assert (ei.value.status, text in ei.value.message) == (code, True), (uri, ei.value.message)
                st = await status(b)
                assert st["source"] == a.uri(LUN) and st["state"] in RUNNING, (uri, brief(st))
            r, err = await asyncio.to_thread(set_source, b.api, a.uri("other"))
            assert r == 1 and "another LUN" in str(err), err
            assert recorded_source(b.data_dir) == a.uri(LUN)
            # the same URI again changes nothing, and is no error
            code, same = await asyncio.to_thread(set_source, b.api, a.uri(LUN))
            assert code == 0 and isinstance(same, dict) and same["source"] == a.uri(LUN), same
            await asyncio.to_thread(api(b).update_migration, LUN, 0)
            done = await wait_final(b, 60)
            assert done["state"] == "completed", brief(done)
            assert await read_all(b.uri(LUN), SIZE) == data
            t0 = time.monotonic()
            with pytest.raises(ApiError) as ei:  # ended: 409, as for the throttle
                await asyncio.to_thread(api(b).update_migration, LUN, None, None, a.uri(LUN))
            assert ei.value.status == 409 and time.monotonic() - t0 < 5, ei.value

        run(body(), 100)


def test_a_remote_lun_left_by_a_cancel_follows_its_source_to_another_port(tmp_path: Path) -> None:
    """3. A cancelled migration leaves its LUN `remote` on B, serving the source directly, for
    as long as the LUN lives: its source's new URI is taken as for a running migration (same
    checks, recorded first, a waiting read completes through it, a restart of B dials it),
    while throttle and mode stay 409 (the migration has ended).

    Regression (fixed): MigrationManager.update refused every change of an ended migration
    with 409, so a remote LUN whose source array came back on other ports dialed the dead
    address for good, and host I/O on it failed with EIO."""
    with two_arrays(tmp_path) as (stack, a, b):

        async def body() -> None:
            model = await new_source(a, make_data(37, SIZE))
            await asyncio.to_thread(start_migration, b, a.uri(LUN), "--throttle", "4")
            r = await asyncio.to_thread(cli, "migration", "cancel", "--api", b.api, "--token", TOKEN, LUN)
            assert r.returncode == 0, r.stdout + r.stderr
            assert (await asyncio.to_thread(api(b).get_lun, LUN))["state"] == "remote"
            old_uri = a.uri(LUN)
            a.sigkill()
            a2 = await restart(stack, a.data_dir, "A")  # port 0: another port
            assert a2.nbd_port != a.nbd_port
            await asyncio.to_thread(api(a2).create_lun, "other", SIZE)  # same size, another id
            async with await NbdClient.connect(b.uri(LUN)) as h:
                # a remote LUN reads everything from its source: this read waits (30 s window)
                waiting = asyncio.ensure_future(h.read(SIZE - BLOCK, BLOCK))
                await asyncio.sleep(0.5)
                assert not waiting.done(), "a read of the remote LUN did not wait for its source"
                for throttle, mode, uri, code, text in (
                    (5, None, None, 409, "only its source can change"),
                    (None, "active", None, 409, "only its source can change"),
                    (5, None, a2.uri(LUN), 409, "cancelled"),  # nothing of it changes
                    (None, None, a2.uri("other"), 409, "serves another LUN"),
                    (None, None, "nbd://127.0.0.1:1/vol", 400, "cannot reach"),
                ):
                    with pytest.raises(ApiError) as ei:
                        await asyncio.to_thread(api(b).update_migration, LUN, throttle, mode, uri)
                    assert (ei.value.status, text in ei.value.message) == (code, True), ei.value.message
                    assert recorded_source(b.data_dir) == old_uri
                assert not waiting.done()
                code, st = await asyncio.to_thread(set_source, b.api, a2.uri(LUN))
                assert code == 0, st
                assert isinstance(st, dict) and st["source"] == a2.uri(LUN), st
                assert st["state"] == "cancelled", st
                got = await asyncio.wait_for(waiting, 10)
                assert model.accepts(SIZE - BLOCK, got), "the waiting read got wrong data"
                assert recorded_source(b.data_dir) == a2.uri(LUN)
                off, data = MiB, os.urandom(BLOCK)  # a write reaches the source at its new address
                await asyncio.wait_for(h.write(off, data, fua=True), 10)
                model.ack(off, data)
            # a restart of B dials the new URI (the old one would make reads wait, then EIO)
            b.sigkill()
            b2 = await restart(stack, b.data_dir, "B")
            model.check(await asyncio.wait_for(read_all(b2.uri(LUN), SIZE), 20), "B's remote LUN")
            st2 = await status(b2)
            assert (st2["state"], st2["source"]) == ("cancelled", a2.uri(LUN)), brief(st2)
            model.check(await read_all(a2.uri(LUN), SIZE), "A at its new address")

        run(body(), 100)
