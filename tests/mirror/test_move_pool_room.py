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
