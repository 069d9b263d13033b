"""RemoteBackend's coroutine-free path (start_read / start_write) when the link breaks.

The source is our NbdServer on this test's loop (127.0.0.1, port 0) serving
a Backend that can hold I/O (tests/backends.py StartedLater); the link is cut
from the server's side with requests in flight. A started request must then
be retried on a new connection within the retry window, or fail with EIO
once the window is over: never lost, never answered twice (I6).
"""

from __future__ import annotations

import asyncio
import errno
import time
from typing import Any

import pytest

from emulator.array.lun import describe
from emulator.mirror.remote import RemoteBackend
from emulator.nbd.backend import MemoryBackend
from emulator.nbd.client import NbdClient
from emulator.nbd.errors import BackendError
from emulator.nbd.server import NbdServer
from tests.backends import StartedLater, started
from tests.nbd.test_start_io import run

pytestmark = pytest.mark.timeout(60)
SIZE = 1 << 20


async def source(backend: StartedLater) -> tuple[NbdServer, str]:
    server = NbdServer()
    server.add_export("src", backend)
    _, port = await server.listen_tcp("127.0.0.1", 0)
    return server, f"nbd://127.0.0.1:{port}/src"


def cut(server: NbdServer) -> None:
    for conn in list(server.connections):
        conn.abort_now("the link was cut")


async def until(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_started_io_cut_off_is_retried_on_a_new_connection() -> None:
    backend = StartedLater(SIZE)

    async def main() -> None:
        server, uri = await source(backend)
        r = await RemoteBackend(uri, retry_window=5.0, backoff_min=0.01).connect()
        try:
            await started(lambda d: r.start_write(4096, b"a" * 4096, False, d))
            backend.hold = True
            read = asyncio.ensure_future(started(lambda d: r.start_read(4096, 4096, d)))
            write = asyncio.ensure_future(started(lambda d: r.start_write(0, b"b" * 4096, True, d)))
            await until(lambda: len(backend.held) == 2)
            cut(server)  # both were taken by the source, neither answered
            await until(lambda: len(backend.held) == 4)  # ... and asked again on a new connection
            backend.release()  # the first two end on the dead connection: nobody hears them
            assert bytes(await read) == b"a" * 4096
            assert await write is None
            assert r.reconnects == 1 and r.connected
            assert bytes(await started(lambda d: r.start_read(0, 4096, d))) == b"b" * 4096
        finally:
            await r.aclose()
            await server.close()

    run(main())


def test_started_io_fails_with_eio_when_the_source_stays_gone() -> None:
    backend = StartedLater(SIZE, hold=True)

    async def main() -> None:
        server, uri = await source(backend)
        r = await RemoteBackend(uri, retry_window=0.5, backoff_min=0.01).connect()
        try:
            t0 = time.monotonic()
            read = asyncio.ensure_future(started(lambda d: r.start_read(0, 4096, d)))
            await until(lambda: len(backend.held) == 1)
            await server.close(timeout=0.05)  # gone: no new connection either
            with pytest.raises(BackendError) as ei:
                await read
            assert ei.value.errno == errno.EIO
            assert time.monotonic() - t0 < 2.0  # the window counts from the request's start
            assert not r.start_read(0, 4096, lambda res, e: None)  # no connection: the caller waits
        finally:
            await r.aclose()

    run(main())


def test_aclose_ends_what_it_started_and_fails_a_retry_waiting_for_the_source() -> None:
    """A started write cut off from a source that is gone waits for a reconnect. Closing
    the remote LUN (a forced DELETE, an array stopping) fails it at once: cancelling the
    reconnect left its ``done`` uncalled, and the host's request unanswered until the
    server gave up on it. aclose returns with no task it started still pending: the loop
    of a stopping array closes right after ("Task was destroyed but it is pending!")."""
    backend = StartedLater(SIZE, hold=True)

    async def main() -> None:
        server, uri = await source(backend)
        before = asyncio.all_tasks()
        r = await RemoteBackend(uri, retry_window=30.0, backoff_min=0.01).connect()
        write = asyncio.ensure_future(started(lambda d: r.start_write(0, b"w" * 4096, False, d)))
        await until(lambda: len(backend.held) == 1)
        await server.close(timeout=0.05)  # gone: the write waits for a reconnect
        await until(lambda: r.last_error.startswith("cannot connect"))
        await r.aclose()
        left = [t for t in asyncio.all_tasks() - before if t is not write and not t.done()]
        assert not left, left
        with pytest.raises(BackendError) as ei:
            await asyncio.wait_for(write, 1)
        assert ei.value.errno == errno.ESHUTDOWN

    run(main())


def test_a_source_that_is_another_lun_is_refused_and_not_asked_again_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The export the remote LUN took over is replaced by another LUN of the same
    name and size (another LUN id in its description) and the link is cut. Reads
    must fail with EIO, not return the other LUN's data; and one connection finds
    that out: the requests of the next ``backoff_max`` seconds (on the injected
    clock) fail without another (a host's every request made one). Once the LUN
    taken over is back, the next request after that reconnects to it."""
    old_id, new_id = "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "6fa459ea-ee8a-3ca4-894e-db77e160355e"
    old, new = MemoryBackend(SIZE), MemoryBackend(SIZE)
    connects = 0
    real_connect = NbdClient.connect

    async def counted(*args: Any, **kwargs: Any) -> NbdClient:
        nonlocal connects
        connects += 1
        return await real_connect(*args, **kwargs)

    monkeypatch.setattr(NbdClient, "connect", counted)
    now = [0.0]

    async def main() -> None:
        server = NbdServer()
        server.add_export("src", old, description=describe("A", "p", old_id))
        _, port = await server.listen_tcp("127.0.0.1", 0)
        uri = f"nbd://127.0.0.1:{port}/src"
        await old.write(0, b"o" * 4096)
        await new.write(0, b"n" * 4096)
        r = await RemoteBackend(uri, retry_window=5.0, backoff_max=1.0, clock=lambda: now[0]).connect()
        try:
            assert connects == 1
            server.exports.pop("src")
            server.add_export("src", new, description=describe("A", "p", new_id))
            cut(server)
            for _ in range(20):
                with pytest.raises(BackendError) as ei:
                    await r.read(0, 4096)
                assert ei.value.errno == errno.EIO
                assert "no longer the LUN taken over" in str(ei.value) and new_id in str(ei.value)
            assert connects == 2, f"{connects - 1} connections to the other LUN for 20 reads"
            assert r.identity == old_id and not r.connected
            server.exports.pop("src")
            server.add_export("src", old, description=describe("A", "p", old_id))
            now[0] += 1.0
            assert bytes(await r.read(0, 4096)) == b"o" * 4096
            assert connects == 3 and r.reconnects == 1 and r.connected
        finally:
            await r.aclose()
            await server.close()

    run(main())


class ShuttingDown(MemoryBackend):
    """A source that answers ESHUTDOWN while ``shutting`` (a server being stopped)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.shutting = False
        self.refused = 0

    def _check(self) -> None:
        if self.shutting:
            self.refused += 1
            raise BackendError(errno.ESHUTDOWN, "the source is shutting down")

    async def read_into(self, offset: int, buf: memoryview) -> None:
        self._check()
        await super().read_into(offset, buf)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._check()
        await super().write(offset, data, fua)

    async def flush(self) -> None:
        self._check()
        await super().flush()


def test_a_source_shutting_down_is_left_and_asked_again_not_passed_on() -> None:
    """Regression (was a bug): a source's ESHUTDOWN went to the host as the remote LUN's
    own answer (seen with nbdkit's error filter, error=ESHUTDOWN: libnbd's pread on the
    target failed with ESHUTDOWN), telling a host to disconnect (doc/proto.md, "Terminating
    the transmission phase": a client receiving ESHUTDOWN MUST) from a target that is not
    stopping, while the target itself stayed on the source's connection. ESHUTDOWN now
    ends that connection, and the request is asked again within the retry window, like a
    lost link (I6); a source still shutting down at its end fails it with EIO."""
    backend = ShuttingDown(SIZE)

    async def main() -> None:
        server = NbdServer()
        server.add_export("src", backend)
        _, port = await server.listen_tcp("127.0.0.1", 0)
        r = await RemoteBackend(f"nbd://127.0.0.1:{port}/src", retry_window=5.0, backoff_min=0.01).connect()
        try:
            await r.write(0, b"s" * 4096)
            backend.shutting = True
            read = asyncio.ensure_future(r.read(0, 4096))
            begun = asyncio.ensure_future(started(lambda d: r.start_read(0, 4096, d)))
            write = asyncio.ensure_future(r.write(4096, b"t" * 4096))
            flush = asyncio.ensure_future(r.flush())
            await until(lambda: backend.refused >= 8)  # each asked, refused, asked again
            assert not any(f.done() for f in (read, begun, write, flush))
            assert r.reconnects >= 1
            backend.shutting = False
            assert bytes(await read) == bytes(await begun) == b"s" * 4096
            await write
            await flush
            assert bytes(await r.read(4096, 4096)) == b"t" * 4096
            await until(lambda: len(server.connections) == 1)  # the ones it left are closed
            r.retry_window = 0.3
            backend.shutting = True
            t0 = time.monotonic()
            with pytest.raises(BackendError) as ei:
                await r.read(0, 4096)
            assert ei.value.errno == errno.EIO and time.monotonic() - t0 < 2.0
        finally:
            await r.aclose()
            await server.close()

    run(main())
