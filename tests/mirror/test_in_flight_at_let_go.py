"""A side of a migration is trimmed or closed only once the host I/O on it is done.

Regression (was a bug): a cancel (or a failure) trimmed the local copy at once,
and a host's read of a clean region still in flight on it (waiting out the
media's latency, or a read over 1 MiB in a thread) answered with the zeroes of
the trimmed copy, though the LUN holds data; a pool move's cancel closed the new
file under it (EINVAL, "Bad file descriptor"), and its completion the old one.
An active-mode write in flight on the local copy landed after the trim: pool
room the remote LUN kept for good. The status also counted every local read of
under 64 KiB twice. Now host I/O goes to the source alone once the local copy
is let go, and the copy is trimmed (or closed) after what was in flight on it.
Real arrays with a slow media model, then in-process with reads held on each side.

Regression (was a bug): an active-mode write to a clean region whose host reset its
connection while the write waited on the local copy (the source had it already) was
cancelled there, and the region stayed clean: reads of it answered the old bytes
from the local copy, reads across it the new ones from the source, and the cutover
kept the old ones. A write to both sides that does not end normally now makes its
regions dirty, as a failed one does: they are copied again from the source.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from emulator.mirror.migration import Migration, MigrationConfig
from emulator.mirror.regions import CLEAN
from emulator.nbd.backend import MemoryBackend
from emulator.nbd.client import NbdClient
from emulator.nbd.errors import DisconnectedError
from tests.backends import local_migration
from tests.servers import ArrayDaemon, array_api, array_daemon

MiB = 1 << 20
SIZE = 8 * MiB
#: B's media: every I/O of its local copy waits this long first (the read's window)
SLOW = "fixed:300"


def pattern(r: int) -> bytes:
    return bytes([0xA0 + r]) * MiB


async def fill(uri: str) -> None:
    async with await NbdClient.connect(uri, timeout=10) as c:
        for r in range(SIZE // MiB):
            await c.write(r * MiB, pattern(r))
        await c.flush()


def wait_clean(b: ArrayDaemon, lun: str, timeout: float = 20.0) -> None:
    """Until the copy made region 0 clean (throttled at 1 MB/s: the next waits ~1 s)."""
    api = array_api(b)
    deadline = time.monotonic() + timeout
    while (st := api.migration(lun))["copied_bytes"] < MiB:
        assert time.monotonic() < deadline, st
        time.sleep(0.02)


def read_while_cancelled(b: ArrayDaemon, lun: str) -> None:
    """Read 4 KiB of region 0 (clean: from B's slow local copy), cancel meanwhile:
    the read answers the LUN's bytes."""

    async def main() -> dict[str, object]:
        loop = asyncio.get_running_loop()
        async with await NbdClient.connect(b.uri(lun), timeout=10) as c:
            read = asyncio.ensure_future(c.read(0, 4096))
            await asyncio.sleep(0.02)  # sent: it waits out B's media
            cancel = f"/api/v1/migrations/{lun}/cancel"
            st: dict[str, object] = await loop.run_in_executor(None, array_api(b).call, "POST", cancel)
            data = await read
            assert data == pattern(0)[:4096], f"read {data[:8].hex()}... of a LUN that holds a0a0..."
            assert await c.read(0, 4096) == pattern(0)[:4096]  # the source serves it now
        return st

    st = asyncio.run(main())
    assert st["state"] == "cancelled", st
    assert st["local_reads"] == 1, f"the read did not go to the local copy, or counted twice: {st}"


@contextmanager
def migrating(tmp_path: Path, mode: str = "background") -> Iterator[ArrayDaemon]:
    """Array B (slow media) migrating LUN v of array A, its region 0 clean already."""
    with (
        array_daemon(tmp_path / "A", "A") as a,
        array_daemon(tmp_path / "B", "B", "--media", SLOW) as b,
    ):
        array_api(a).create_lun("v", SIZE)
        asyncio.run(fill(a.uri("v")))
        start = {"lun": "v", "source": a.uri("v"), "throttle": 1, "mode": mode}
        array_api(b).call("POST", "/api/v1/migrations", start)
        wait_clean(b, "v")
        yield b


@pytest.mark.timeout(60)
def test_a_read_in_flight_on_the_local_copy_at_a_cancel_gets_the_data(tmp_path: Path) -> None:
    with migrating(tmp_path) as b:
        read_while_cancelled(b, "v")


@pytest.mark.timeout(60)
def test_a_write_in_flight_on_the_local_copy_at_a_cancel_leaves_it_empty(tmp_path: Path) -> None:
    with migrating(tmp_path, "active") as b:
        api = array_api(b)

        async def main() -> dict[str, Any]:
            loop = asyncio.get_running_loop()
            async with await NbdClient.connect(b.uri("v"), timeout=10) as c:
                write = asyncio.ensure_future(c.write(0, b"w" * 65536))  # to both sides
                await asyncio.sleep(0.02)  # sent: it waits out B's media
                st: dict[str, Any] = await loop.run_in_executor(
                    None, api.call, "POST", "/api/v1/migrations/v/cancel"
                )
                await write
                assert await c.read(0, 65536) == b"w" * 65536
            return st

        assert asyncio.run(main())["state"] == "cancelled"
        time.sleep(0.5)  # a write that was not waited for lands by now
        lun = api.get_lun("v")
        assert lun["state"] == "remote" and lun["allocated"] == 0, f"the trimmed copy holds data: {lun}"


@pytest.mark.timeout(60)
def test_a_read_in_flight_on_the_new_file_at_a_pool_move_cancel_gets_the_data(tmp_path: Path) -> None:
    args = ("--media", SLOW, "--pool", "p1=1G", "--pool", "p2=1G", "--migration-throttle", "1")
    with array_daemon(tmp_path / "C", "C", *args) as c:
        api = array_api(c)
        api.call("POST", "/api/v1/luns", {"name": "m", "size": SIZE, "pool": "p1"})
        asyncio.run(fill(c.uri("m")))
        api.call("POST", "/api/v1/luns/m/move", {"pool": "p2"})
        wait_clean(c, "m")
        read_while_cancelled(c, "m")


@pytest.mark.timeout(60)
def test_a_host_reset_under_a_write_to_both_sides_leaves_the_sides_alike(tmp_path: Path) -> None:
    with migrating(tmp_path, "active") as b:
        api = array_api(b)
        api.call("POST", "/api/v1/migrations/v/pause")  # region 0 clean, the rest dirty
        source = api.migration("v")["source"]

        async def write_then_reset() -> None:
            async with await NbdClient.connect(source, timeout=10) as a:
                c = await NbdClient.connect(b.uri("v"), timeout=10)
                write = asyncio.ensure_future(c.write(0, b"N" * 4096))  # to both sides
                deadline = time.monotonic() + 10
                while await a.read(0, 1) != b"N":  # the source has it; B's media holds it
                    assert time.monotonic() < deadline
                sock = c._transport.get_extra_info("socket")  # type: ignore[union-attr]
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.abort("host reset")  # RST: the server drops what the host had in flight
                with pytest.raises(DisconnectedError):
                    await write

        async def read(uri: str, offset: int, length: int) -> bytes:
            async with await NbdClient.connect(uri, timeout=10) as c:
                return bytes(await c.read(offset, length))

        asyncio.run(write_then_reset())
        api.call("POST", "/api/v1/migrations/v/resume")
        api.call("PATCH", "/api/v1/migrations/v", {"throttle": 0})
        assert api.wait_migration("v", 30)["state"] == "completed"
        want = asyncio.run(read(source, 0, 4096))
        assert want == b"N" * 4096
        got = asyncio.run(read(b.uri("v"), 0, 4096))
        assert got == want, f"cut over with {got[:4]!r}... where the source holds {want[:4]!r}..."


# --------------------------------------------------------------------------- in-process
class HeldReads(MemoryBackend):
    """Reads of ``held_length`` bytes wait in ``held`` until ``release`` is set; a read
    after :meth:`close` fails, as a closed file's does."""

    def __init__(self, size: int, held_length: int) -> None:
        super().__init__(size)
        self.held_length = held_length
        self.held = 0
        self.release = asyncio.Event()
        self.closed = False
        self.trims = 0

    async def read_into(self, offset: int, buf: memoryview) -> None:
        if len(buf) == self.held_length:
            self.held += 1
            await self.release.wait()
        if self.closed:
            raise OSError(9, "Bad file descriptor")
        await super().read_into(offset, buf)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.trims += 1
        await super().trim(offset, length, fua)

    def close(self) -> None:
        self.closed = True


def migration(tmp_path: Path, source: MemoryBackend, target: MemoryBackend, throttle: float) -> Migration:
    return local_migration(source, target, tmp_path, MigrationConfig(region_size=MiB, throttle=throttle))


async def until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)


def test_a_cancel_trims_the_local_copy_after_the_reads_in_flight_on_it(tmp_path: Path) -> None:
    async def main() -> None:
        source, target = MemoryBackend(SIZE), HeldReads(SIZE, 512)
        await source.write(0, b"s" * SIZE)
        m = migration(tmp_path, source, target, throttle=0.5e6)
        await m.start()
        mb = m.backend
        assert mb is not None and m.regions is not None
        regions = m.regions
        await until(lambda: regions.state[0] == CLEAN)
        read = asyncio.ensure_future(mb.read(0, 512))
        await until(lambda: target.held == 1)
        cancel = asyncio.ensure_future(m.cancel())
        await asyncio.sleep(0.05)
        assert not cancel.done() and target.trims == 0, "the local copy was trimmed under a read"
        assert await mb.read(MiB, 512) == b"s" * 512  # meanwhile reads go to the source
        target.release.set()
        assert await read == b"s" * 512
        await cancel
        assert m.state == "cancelled" and target.trims == 1

    asyncio.run(main())


def test_a_pool_move_closes_its_old_file_after_the_reads_in_flight_on_it(tmp_path: Path) -> None:
    async def main() -> None:
        source, target = HeldReads(SIZE, 512), MemoryBackend(SIZE)
        await source.write(0, b"s" * SIZE)
        m = migration(tmp_path, source, target, throttle=0)
        await m.start()
        mb = m.backend
        assert mb is not None
        read = asyncio.ensure_future(mb.read(0, 512))  # region 0 is not copied yet
        await until(lambda: source.held == 1)
        await until(lambda: m.state == "completed")
        await asyncio.sleep(0.05)
        assert not source.closed, "the old file was closed under a read"
        source.release.set()
        assert await read == b"s" * 512
        assert await m.wait(10) == "completed" and source.closed

    asyncio.run(main())


class OnTheWire(MemoryBackend):
    """A remote source: a write, once sent, lands when ``land`` is set, whether its
    caller still waits for the answer or not (NBD has no cancel); reads are answered
    at once, ahead of it (an NBD server may reorder what is in flight)."""

    remote = True

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.land = asyncio.Event()
        self.sent: list[asyncio.Future[None]] = []

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        data = bytes(data)

        async def land() -> None:
            await self.land.wait()
            await MemoryBackend.write(self, offset, data, fua)

        self.sent.append(asyncio.ensure_future(land()))
        await asyncio.shield(self.sent[-1])


@pytest.mark.parametrize("active", [False, True])
def test_a_write_its_host_gave_up_on_is_in_flight_until_the_source_answers(
    tmp_path: Path, active: bool
) -> None:
    """Regression (was a bug): a host write cancelled (its host reset the connection)
    while its request was on the way to the source ended its count of writes in flight
    at once: a copy of the region then read the source ahead of the write, was taken as
    clean, and the write landed on the source after it, so the local copy of a clean
    region held other bytes than the source (I2). Background mode (a write of a region
    clean on disk) and active mode (a write to both sides)."""

    async def main() -> None:
        source, target = OnTheWire(SIZE), MemoryBackend(SIZE)
        m = migration(tmp_path, source, target, throttle=0)
        await m.start(paused=True)
        mb, regions, copier = m.backend, m.regions, m.copier
        assert mb is not None and regions is not None and copier is not None
        mb.active = active
        assert await copier.copy_region(0)
        m.progress.disk_clean[0] = True  # type: ignore[union-attr]  # a checkpoint made it clean on disk
        write = asyncio.ensure_future(mb.write(0, b"N" * 4096))
        await until(lambda: source.sent)
        write.cancel()  # the host is gone; the source has the request
        await asyncio.sleep(0.01)
        copy = asyncio.ensure_future(copier.copy_region(0))  # active mode: waits for the write
        await asyncio.sleep(0.01)
        source.land.set()
        await asyncio.gather(write, copy, *source.sent, return_exceptions=True)
        await copier.copy_region(0)
        assert regions.state[0] == CLEAN
        got, want = await target.read(0, 4096), await source.read(0, 4096)
        assert got == want, f"region 0 is clean with {bytes(got[:4])!r}..., the source {bytes(want[:4])!r}..."
        await m.cancel()

    asyncio.run(main())
