"""A LUN whose forced delete waits for its hosts' requests is `deleting` for all to see.

The delete marked the LUN `deleting` in array.db only: while it waited for a host's
request in flight, the API still showed the LUN `ready`, accepted a pool move of it
(202: a migration of a LUN on its way out, its new copy in the other pool) and grew
it. A real array daemon whose media is slow enough that one host read keeps the
delete waiting.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from control.api_client import ApiError, ArrayApi
from emulator.nbd.client import NbdClient
from tests.servers import ArrayDaemon, array_api, array_daemon

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
LUN = "vol"


def lun_state_in_db(d: ArrayDaemon) -> str | None:
    db = sqlite3.connect(d.data_dir / "array.db", timeout=5)
    try:
        row = db.execute("SELECT state FROM luns WHERE name=?", (LUN,)).fetchone()
    finally:
        db.close()
    return None if row is None else str(row[0])


async def until_deleting(d: ArrayDaemon, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while lun_state_in_db(d) != "deleting":
        assert time.monotonic() < deadline, "the delete did not mark the LUN deleting"
        await asyncio.sleep(0.01)


def refused(call: Callable[[], object]) -> ApiError:
    with pytest.raises(ApiError) as e:
        call()
    return e.value


def test_a_lun_whose_delete_waits_for_a_host_is_deleting_and_neither_moves_nor_grows(
    tmp_path: Path,
) -> None:
    args = ("--media", "fixed:2000", "--pool", "p1=1G", "--pool", "p2=1G")
    with array_daemon(tmp_path / "A", "A", *args) as d:
        api: ArrayApi = array_api(d, timeout=20)
        api.call("POST", "/api/v1/luns", {"name": LUN, "size": 8 * MiB, "pool": "p1"})

        async def body() -> None:
            async with await NbdClient.connect(d.uri(LUN)) as host:
                read = asyncio.ensure_future(host.read(0, 4096))  # 2 s of media time
                await asyncio.sleep(0)  # sent: the forced delete waits for it
                delete = asyncio.ensure_future(asyncio.to_thread(api.delete_lun, LUN, True))
                await until_deleting(d)
                moved = await asyncio.to_thread(
                    refused, lambda: api.call("POST", f"/api/v1/luns/{LUN}/move", {"pool": "p2"})
                )
                assert moved.status == 409, moved
                grown = await asyncio.to_thread(refused, lambda: api.grow_lun(LUN, 16 * MiB))
                assert grown.status == 409 and "being deleted" in grown.message, grown
                assert (await asyncio.to_thread(api.get_lun, LUN))["state"] == "deleting"
                assert not delete.done(), "the delete did not wait for the host's read"
                await delete
                await asyncio.gather(read, return_exceptions=True)

        asyncio.run(asyncio.wait_for(body(), 40))
        assert api.list_luns() == [] and lun_state_in_db(d) is None
        assert api.call("GET", "/api/v1/migrations") == []
        assert list(d.data_dir.glob("pools/*/*")) == []
