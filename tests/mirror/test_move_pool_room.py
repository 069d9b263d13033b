"""While a LUN moves between pools, its host writes are charged to the pool they land in.

Regression (was a bug): until a move completes, host writes land in the LUN's old
file, but only the copy into the new pool was charged: a write that its pool
refused with ENOSPC before the move was taken once the move had begun, and
the old pool ended over its capacity (24 MiB used of 16, also after a cancel).
A real array; hosts are our NBD client.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from emulator.nbd.client import NbdClient
from emulator.nbd.errors import RequestError
from tests.servers import ArrayDaemon, array_api, array_daemon

MiB = 1 << 20


def pools(d: ArrayDaemon) -> dict[str, dict[str, int]]:
    return {p["name"]: p for p in array_api(d).call("GET", "/api/v1/array")["pools"]}


async def write(uri: str, offset: int, length: int, byte: int) -> int:
    """0, or the NBD error of a write of ``length`` bytes of ``byte`` at ``offset``."""
    async with await NbdClient.connect(uri, timeout=10) as c:
        try:
            await c.write(offset, bytes([byte]) * length)
            await c.flush()
        except RequestError as e:
            return e.error
        return 0


async def read(uri: str, offset: int, length: int) -> bytes:
    async with await NbdClient.connect(uri, timeout=10) as c:
        return bytes(await c.read(offset, length))


@pytest.mark.timeout(60)
def test_a_full_pool_refuses_host_writes_also_while_its_lun_moves(tmp_path: Path) -> None:
    args = ("--pool", "p1=16M", "--pool", "p2=1G", "--migration-throttle", "1")
    with array_daemon(tmp_path / "C", "C", *args) as d:
        api = array_api(d)
        api.call("POST", "/api/v1/luns", {"name": "m", "size": 64 * MiB, "pool": "p1"})
        uri = d.uri("m")
        assert asyncio.run(write(uri, 0, 8 * MiB, 1)) == 0
        assert asyncio.run(write(uri, 16 * MiB, 16 * MiB, 2)) == errno.ENOSPC  # before the move
        api.call("POST", "/api/v1/luns/m/move", {"pool": "p2"})  # 1 MB/s: it runs for seconds
        assert asyncio.run(write(uri, 16 * MiB, 16 * MiB, 2)) == errno.ENOSPC, pools(d)
        assert asyncio.run(write(uri, 16 * MiB, 4 * MiB, 3)) == 0  # what fits is taken
        p1 = pools(d)["p1"]
        assert p1["used"] <= p1["capacity"], p1
        assert api.call("POST", "/api/v1/migrations/m/cancel")["state"] == "cancelled"
        p1 = pools(d)["p1"]
        assert p1["used"] <= p1["capacity"], p1
        assert asyncio.run(read(uri, 16 * MiB, 4 * MiB)) == bytes([3]) * 4 * MiB
        assert asyncio.run(read(uri, 20 * MiB, 4096)) == bytes(4096)


@pytest.mark.timeout(60)
def test_a_lun_larger_than_the_room_of_the_pool_it_moves_to_does_not_overfill_it(tmp_path: Path) -> None:
    """Regression (was a bug): the new pool counted its LUNs' files, not the copy a move
    fills in it, so its capacity held nothing back: a LUN holding 32 MiB moved into a
    16 MiB pool whole (32 MiB used of 16). The copy is refused at the capacity, the move
    fails, and the LUN stays in its pool with all its data."""
    with array_daemon(tmp_path / "C", "C", "--pool", "p1=1G", "--pool", "p2=16M") as d:
        api = array_api(d)
        api.call("POST", "/api/v1/luns", {"name": "m", "size": 64 * MiB, "pool": "p1"})
        uri = d.uri("m")
        assert asyncio.run(write(uri, 0, 32 * MiB, 7)) == 0
        api.call("POST", "/api/v1/luns/m/move", {"pool": "p2"})
        st = api.call("GET", "/api/v1/migrations/m", query={"wait": "30"})
        p2 = pools(d)["p2"]
        assert p2["used"] <= p2["capacity"], p2
        assert st["state"] == "failed" and "pool 'p2' is full" in st["last_error"], st
        lun = api.call("GET", "/api/v1/luns/m")
        assert (lun["pool"], lun["state"]) == ("p1", "ready"), lun
        assert pools(d)["p2"]["used"] == 0  # its copy is gone
        assert not (d.data_dir / "pools" / "p2" / "m.img").exists()
        assert asyncio.run(read(uri, 0, 32 * MiB)) == bytes([7]) * 32 * MiB
        assert asyncio.run(write(uri, 32 * MiB, MiB, 8)) == 0  # its pool takes writes


@pytest.mark.timeout(60)
def test_a_restart_removes_the_old_file_a_crash_left_after_a_completed_move(tmp_path: Path) -> None:
    """Regression (was a bug): a completed pool move is recorded first (the LUN in its new
    pool), then it waits out the reads in flight on its old file, and only then are the
    old file and the progress file removed. A kill -9 in between left the old file, which
    no LUN owns, for good: its space was lost to the old pool's file system, and no
    restart removed it. The crash's leftovers are made here as it leaves them."""
    args = ("--pool", "p1=1G", "--pool", "p2=1G")
    with array_daemon(tmp_path / "C", "C", *args) as d:
        api = array_api(d)
        api.call("POST", "/api/v1/luns", {"name": "m", "size": 16 * MiB, "pool": "p1"})
        assert asyncio.run(write(d.uri("m"), 0, 8 * MiB, 7)) == 0
        api.call("POST", "/api/v1/luns/m/move", {"pool": "p2"})
        assert api.call("GET", "/api/v1/migrations/m", query={"wait": "30"})["state"] == "completed"
        d.sigkill()
    old, progress = tmp_path / "C/pools/p1/m.img", tmp_path / "C/pools/p2/m.progress"
    assert not old.exists() and not progress.exists()
    with open(old, "wb") as f:  # what the crash left: the old file, whole, and the progress
        f.truncate(16 * MiB)
        f.write(bytes([7]) * 8 * MiB)
    progress.write_bytes(b"progress")
    with array_daemon(tmp_path / "C", "C", *args) as d:
        assert not old.exists() and not progress.exists()
        assert pools(d)["p1"]["used"] == 0
        api = array_api(d)
        assert api.call("GET", "/api/v1/luns/m")["pool"] == "p2"
        assert api.call("GET", "/api/v1/migrations/m")["state"] == "completed"
        assert asyncio.run(read(d.uri("m"), 0, 8 * MiB)) == bytes([7]) * 8 * MiB
