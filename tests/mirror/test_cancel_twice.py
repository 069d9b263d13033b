"""Two cancels of one migration at once: one cancels, the other is refused (409).

Both answered 200 before: the second found the migration not ended yet (the first
was still stopping it), went through the whole cancel again and trimmed the local
copy a second time. Now the second waits for the first and is refused as a cancel
after it is. In-process (the first cancel is held inside its trim), then over the
API of a real array.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from control.api_client import ApiError
from emulator.mirror.migration import MigrationConfig
from emulator.nbd.backend import MemoryBackend
from emulator.nbd.client import NbdClient
from tests.backends import local_migration
from tests.servers import ArrayDaemon, array_api, array_daemon

MiB = 1 << 20


class HeldTrim(MemoryBackend):
    """Counts trims; the first waits until released."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.trims = 0
        self.release = asyncio.Event()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.trims += 1
        await self.release.wait()
        await super().trim(offset, length, fua)


def test_a_second_cancel_waits_for_the_first_and_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        size = 8 * MiB
        source, target = MemoryBackend(size), HeldTrim(size)
        await source.write(0, b"s" * size)
        m = local_migration(source, target, tmp_path, MigrationConfig(region_size=MiB, throttle=0.5e6))
        await m.start()
        first = asyncio.ensure_future(m.cancel())
        while target.trims == 0:
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(m.cancel())
        await asyncio.sleep(0.05)
        assert not second.done()  # it waits for the first, which is in its trim
        target.release.set()
        await first
        with pytest.raises(ValueError, match="already cancelled"):
            await second
        assert m.state == "cancelled" and target.trims == 1
        with pytest.raises(ValueError, match="already cancelled"):
            await m.cancel()

    asyncio.run(main())


def cancel_twice(b: ArrayDaemon) -> list[Any]:
    """POST .../cancel from two threads at once: each one's state, or its error status."""
    answers: list[Any] = []
    go = threading.Barrier(2)

    def cancel() -> None:
        go.wait()
        try:
            st = array_api(b, timeout=20).call("POST", "/api/v1/migrations/vol/cancel")
            answers.append(st["state"])
        except ApiError as e:
            answers.append(e.status)

    ts = [threading.Thread(target=cancel) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    return answers


def test_two_cancels_over_the_api_one_200_one_409(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "A") as a, array_daemon(tmp_path / "b", "B") as b:
        api_a, api_b = array_api(a, timeout=20), array_api(b, timeout=20)
        api_a.create_lun("vol", 64 * MiB)

        async def fill() -> None:  # data in every region: the copy at 0.1 MB/s takes minutes
            async with await NbdClient.connect(a.uri("vol")) as c:
                for off in range(0, 64 * MiB, 4 * MiB):
                    await c.write(off, b"d" * 4096)
                await c.flush()

        asyncio.run(fill())
        body = {"lun": "vol", "source": a.uri("vol"), "throttle": 0.1, "region_size": 4 * MiB}
        for round_ in range(3):  # a race: try it a few times
            api_b.call("POST", "/api/v1/migrations", body)
            answers = cancel_twice(b)
            assert sorted(answers, key=str) == [409, "cancelled"], (round_, answers)
            assert api_b.migration("vol")["state"] == "cancelled"
            api_b.delete_lun("vol", force=True)
