"""An array of spinning disks says so: its LUNs advertise NBD_FLAG_ROTATIONAL (nbdinfo's
``is_rotational``), so a host may order its I/O to spare seeks. A LUN that migrates
advertises its own media, which it cuts over to; a remote LUN its source's. Before, no
LUN of an ``--media hdd`` array was rotational. Real array daemons, nbdinfo."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from emulator.nbd import protocol as p
from emulator.nbd.client import NbdClient
from tests.servers import array_api, array_daemon

MiB = 1 << 20
pytestmark = pytest.mark.timeout(60)


def rotational(uri: str) -> bool:
    async def go() -> bool:
        async with await NbdClient.connect(uri, timeout=10) as c:
            return c.can(p.FLAG_ROTATIONAL)

    return asyncio.run(go())


def fill(uri: str) -> None:
    async def go() -> None:
        async with await NbdClient.connect(uri, timeout=10) as c:
            await c.write(0, b"\x5a" * (4 * MiB))
            await c.flush()

    asyncio.run(go())


def test_luns_of_an_hdd_array_are_rotational(tmp_path: Path) -> None:
    with (
        array_daemon(tmp_path / "A", "A", "--media", "hdd") as a,
        array_daemon(tmp_path / "B", "B") as b,
    ):
        for name in ("v", "w"):
            array_api(a).create_lun(name, 4 * MiB)
            fill(a.uri(name))  # data: a throttled copy of it lasts
        array_api(b).create_lun("local", 4 * MiB)
        assert rotational(a.uri("v")) and not rotational(b.uri("local"))
        if shutil.which("nbdinfo"):
            out = subprocess.run(
                ["nbdinfo", "--json", a.uri("v")], capture_output=True, text=True, timeout=30
            )
            assert json.loads(out.stdout)["exports"][0]["is_rotational"] is True, out.stdout
        api = array_api(b)
        api.call("POST", "/api/v1/migrations", {"lun": "mig", "source": a.uri("v"), "throttle": 1})
        api.call("POST", "/api/v1/migrations/mig/pause")
        api.call("POST", "/api/v1/migrations", {"lun": "rem", "source": a.uri("w"), "throttle": 1})
        api.call("POST", "/api/v1/migrations/rem/cancel")
        assert not rotational(b.uri("mig"))  # B's own media, which it becomes
        assert rotational(b.uri("rem"))  # served from A's disks
