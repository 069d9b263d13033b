"""A migration stored with a ``user@`` source URI, as arrays took them before such URIs
were refused, resumes after an upgrade: the user part, ignored then, is dropped, and no
password stays in the row or shows in the status. Real array daemons."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from tests.mirror.test_faults import (
    LUN,
    MiB,
    api,
    make_data,
    new_source,
    read_all,
    restart,
    run,
    start_migration,
    status,
    two_arrays,
    wait_final,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_a_stored_source_with_a_password_resumes_without_it(tmp_path: Path) -> None:
    with two_arrays(tmp_path) as (stack, a, b):

        async def body() -> None:
            model = await new_source(a, make_data(7, 8 * MiB))
            uri = a.uri(LUN)
            await asyncio.to_thread(start_migration, b, uri, "--throttle", "1")
            b.sigkill()
            db = sqlite3.connect(b.data_dir / "array.db")
            with db:
                db.execute("UPDATE migrations SET source=?", (uri.replace("nbd://", "nbd://bob:hunter2@"),))
            db.close()
            b2 = await restart(stack, b.data_dir, "B")
            st = await status(b2)
            assert st["source"] == uri and "hunter2" not in str(st), st
            db = sqlite3.connect(b.data_dir / "array.db")
            assert db.execute("SELECT source FROM migrations").fetchall() == [(uri,)]
            db.close()
            await asyncio.to_thread(api(b2).update_migration, LUN, throttle=0)
            done = await wait_final(b2, 60)
            assert done["state"] == "completed", done
            model.check(await read_all(b2.uri(LUN), 8 * MiB), "B after the resumed migration")

        run(body(), 100)
