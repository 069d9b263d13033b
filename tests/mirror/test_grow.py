"""A LUN that serves its source (migrating, or remote after a cancel) keeps the source's
size: growing it is refused (409) rather than growing only the local file, which made the
API and NBD disagree during the migration. Real daemons, real NBD, 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

import pytest

from control.api_client import ApiError
from emulator.nbd.client import NbdClient
from tests.servers import array_api, array_daemon

MiB = 1 << 20
api = partial(array_api, timeout=20)


async def fill(uri: str, size: int) -> None:
    async with await NbdClient.connect(uri) as c:
        await c.write(0, b"\xa5" * size)  # data, not holes: the throttle holds the copy
        await c.flush()


async def export_size(uri: str) -> int:
    async with await NbdClient.connect(uri) as c:
        return c.size


@pytest.mark.timeout(120)
def test_a_migrating_or_remote_lun_cannot_grow(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "A") as a, array_daemon(tmp_path / "b", "B") as b:
        api(a).create_lun("vol", 8 * MiB)
        asyncio.run(fill(a.uri("vol"), 8 * MiB))
        api(b).call("POST", "/api/v1/migrations", {"lun": "vol", "source": a.uri("vol"), "throttle": 0.1})
        for state in ("migrating", "remote"):
            with pytest.raises(ApiError) as e:
                api(b).call("POST", "/api/v1/luns/vol/grow", {"size": 16 * MiB})
            assert e.value.status == 409 and state in str(e.value), e.value
            assert api(b).get_lun("vol")["size"] == 8 * MiB
            assert asyncio.run(export_size(b.uri("vol"))) == 8 * MiB
            if state == "migrating":
                api(b).call("POST", "/api/v1/migrations/vol/cancel")
        assert api(b).get_lun("vol")["state"] == "remote"
        # A ready LUN still grows, and a new host sees the new size.
        api(b).delete_lun("vol", force=True)
        api(b).create_lun("vol", 8 * MiB)
        assert api(b).call("POST", "/api/v1/luns/vol/grow", {"size": 16 * MiB})["size"] == 16 * MiB
        assert asyncio.run(export_size(b.uri("vol"))) == 16 * MiB
