"""I/O begun without a coroutine: Backend.start_read / start_write, the path a
remote LUN's proxied reads and writes take.

Server side: our NbdServer serving a Backend that ends each started I/O later
on the loop (tests/backends.py StartedLater), to our client over TCP on
127.0.0.1 port 0: replies out of order, errors, the in-flight limit, a
client that goes away with I/O in flight. Client side:
NbdClient.start_read / start_write against real servers (ours, nbdkit,
qemu-nbd), including one that is frozen and killed with requests in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
from collections.abc import Awaitable, Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from emulator.nbd import protocol as p
from emulator.nbd import server as nbd_server
from emulator.nbd.backend import Backend, Done
from emulator.nbd.client import NbdClient
from emulator.nbd.errors import DisconnectedError, RequestError
from emulator.nbd.server import NbdServer
from tests.backends import StartedLater, started
from tests.files import sparse_image
from tests.servers import Server, nbdkit, qemu_nbd, serve_file

pytestmark = pytest.mark.timeout(60)
SIZE = 4 << 20
BLOCK = 8192


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


async def serving(backend: Backend, **connect: Any) -> tuple[NbdServer, NbdClient]:
    """Our server on this loop (its URI in ``server.uri``) and a client of it."""
    server = NbdServer()
    server.add_export("vol", backend)
    _, port = await server.listen_tcp("127.0.0.1", 0)
    server.uri = f"nbd://127.0.0.1:{port}/vol"  # type: ignore[attr-defined]
    return server, await NbdClient.connect(server.uri, **connect)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the server
@pytest.mark.parametrize("structured", [True, False])
def test_the_server_answers_started_io_out_of_order(structured: bool) -> None:
    rng = random.Random(7)
    delays = {off: rng.uniform(0, 0.005) for off in range(0, SIZE, BLOCK)}
    backend = StartedLater(SIZE, delay=lambda off: delays[off - off % BLOCK])

    async def main() -> None:
        server, c = await serving(backend, structured=structured)
        try:
            blocks = rng.sample(range(SIZE // BLOCK), 200)
            data = {b: rng.randbytes(BLOCK) for b in blocks}
            await asyncio.gather(*(c.write(b * BLOCK, data[b]) for b in blocks))
            got = await asyncio.gather(*(c.read(b * BLOCK, BLOCK) for b in blocks))
            assert [bytes(g) for g in got] == [data[b] for b in blocks]
            # Unaligned and short reads, and a 64 KiB one (the coroutine path: SPARSE_READ_MIN).
            assert bytes(await c.read(blocks[0] * BLOCK + 3, 100)) == data[blocks[0]][3:103]
            assert len(await c.read(0, 64 << 10)) == 64 << 10
            assert backend.started == 401 and backend.ended == 401
        finally:
            await c.close()
            await server.close()

    run(main())


def test_a_failed_started_io_gets_its_error_and_the_connection_goes_on() -> None:
    backend = StartedLater(SIZE, fail={BLOCK})

    async def main() -> None:
        server, c = await serving(backend)
        try:
            with pytest.raises(RequestError) as ei:
                await c.read(BLOCK, 512)
            assert ei.value.error == p.EIO
            with pytest.raises(RequestError) as ei:
                await c.write(BLOCK, b"x" * 512)
            assert ei.value.error == p.EIO
            await c.write(0, b"y" * 512)
            assert bytes(await c.read(0, 512)) == b"y" * 512
        finally:
            await c.close()
            await server.close()

    run(main())


def test_started_io_counts_toward_the_in_flight_limit() -> None:
    """At MAX_INFLIGHT the server stops reading requests (those of the receive pass
    in progress still start), and reads on once they end."""
    backend = StartedLater(SIZE, hold=True)
    n = 20 * nbd_server.MAX_INFLIGHT  # 140 KB of requests: more than one receive pass

    async def main() -> None:
        server, c = await serving(backend)
        try:
            reads = [asyncio.ensure_future(c.read(i * 512 % SIZE, 512)) for i in range(n)]
            while backend.started < nbd_server.MAX_INFLIGHT:
                await asyncio.sleep(0.005)
            last = -1
            while backend.started != last:  # until the server stops taking requests
                last = backend.started
                await asyncio.sleep(0.1)
            assert nbd_server.MAX_INFLIGHT <= backend.started < n
            (conn,) = server.connections
            assert conn._paused_reasons & 2
            backend.release()  # from now on they end at once
            assert all(len(r) == 512 for r in await asyncio.gather(*reads))
            assert backend.started == backend.ended == n
            assert not conn._paused_reasons
        finally:
            await c.close()
            await server.close()

    run(main())


def test_a_client_gone_with_started_io_in_flight_leaves_the_server_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = StartedLater(SIZE, hold=True)

    async def main() -> None:
        server, c = await serving(backend)
        try:
            reads = [asyncio.ensure_future(c.read(i * 512, 512)) for i in range(8)]
            writes = [asyncio.ensure_future(c.write(i * 512, b"w" * 512)) for i in range(8, 16)]
            while backend.started < 16:
                await asyncio.sleep(0.005)
            c.abort("the host went away")
            for f in (*reads, *writes):
                with pytest.raises(DisconnectedError):
                    await f
            await asyncio.sleep(0.05)  # the server saw the connection go
            backend.release()  # their ends find nobody to answer
            assert backend.ended == 16
            async with await NbdClient.connect(server.uri) as c2:  # type: ignore[attr-defined]
                await c2.write(0, b"z" * 512)
                assert bytes(await c2.read(0, 512)) == b"z" * 512
        finally:
            await server.close()

    with caplog.at_level(logging.WARNING):
        run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# ---------------------------------------------------------------- the client
PEERS = ["ours", "nbdkit-memory", "qemu-nbd"]


@pytest.fixture(params=PEERS)
def peer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    img = sparse_image(tmp_path / "peer.img", SIZE)
    with ExitStack() as stack:
        if request.param == "ours":
            yield stack.enter_context(serve_file(img, export="vol"))
        elif request.param == "nbdkit-memory":
            yield stack.enter_context(nbdkit(tmp_path, "memory", f"size={SIZE}"))
        else:
            yield stack.enter_context(qemu_nbd(tmp_path, img))


@pytest.mark.interop
def test_client_start_read_and_write_against_real_servers(peer: Server) -> None:
    rng = random.Random(3)

    async def main() -> None:
        async with await NbdClient.connect(peer.uri) as c:
            blocks = rng.sample(range(SIZE // BLOCK), 64)
            data = {b: rng.randbytes(BLOCK) for b in blocks}
            await asyncio.gather(
                *(started(partial(c.start_write, b * BLOCK, data[b], b % 2 == 0)) for b in blocks)
            )
            got = await asyncio.gather(*(started(partial(c.start_read, b * BLOCK, BLOCK)) for b in blocks))
            assert [bytes(g) for g in got] == [data[b] for b in blocks]
            # What it does not take, the coroutine API does (and refuses with a reason).
            never: Done = lambda r, e: pytest.fail("done ran for a declined request")  # noqa: E731
            assert not c.start_read(c.size - 2, 4, never)
            assert not c.start_read(0, 0, never)
            assert not c.start_read(0, c._max_request + 1, never)
            assert not c.start_write(c.size - 1, b"ab", False, never)

    run(main())


@pytest.mark.interop
def test_client_started_write_to_a_read_only_export_gets_eperm(tmp_path: Path) -> None:
    img = sparse_image(tmp_path / "ro.img", 1 << 20)

    async def main(uri: str) -> None:
        async with await NbdClient.connect(uri) as c:
            with pytest.raises(RequestError) as ei:
                await started(lambda done: c.start_write(0, b"abcd", False, done))
            assert ei.value.error == p.EPERM
            assert bytes(await started(lambda done: c.start_read(0, 4, done))) == bytes(4)

    with serve_file(img, "--read-only") as s:
        run(main(s.uri))


@pytest.mark.interop
def test_client_started_requests_fail_when_the_server_is_killed(tmp_path: Path) -> None:
    img = sparse_image(tmp_path / "k.img", SIZE)

    async def main(s: Server) -> None:
        c = await NbdClient.connect(s.uri)
        os.kill(s.proc.pid, signal.SIGSTOP)  # requests stay in flight
        futs = [asyncio.ensure_future(started(partial(c.start_read, i * 4096, 4096))) for i in range(16)]
        futs += [
            asyncio.ensure_future(started(partial(c.start_write, i * 4096, b"k" * 4096, False)))
            for i in range(16, 32)
        ]
        await asyncio.sleep(0.2)
        assert not any(f.done() for f in futs)
        os.kill(s.proc.pid, signal.SIGKILL)
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert all(isinstance(r, DisconnectedError) for r in results), results
        assert not c.start_read(0, 4096, lambda r, e: None)  # broken: the caller retries elsewhere
        await c.close()

    with serve_file(img) as s:
        run(main(s))


@pytest.mark.interop
def test_client_close_waits_for_started_requests(tmp_path: Path) -> None:
    img = sparse_image(tmp_path / "w.img", SIZE)

    async def main(s: Server) -> None:
        c = await NbdClient.connect(s.uri)
        await c.write(0, b"q" * 4096)
        os.kill(s.proc.pid, signal.SIGSTOP)
        try:
            read = asyncio.ensure_future(started(lambda d: c.start_read(0, 4096, d)))
            await asyncio.sleep(0.05)
            closing = asyncio.ensure_future(c.close())
            await asyncio.sleep(0.1)
            assert not closing.done()  # DISC waits for the read's answer
        finally:
            os.kill(s.proc.pid, signal.SIGCONT)
        assert bytes(await read) == b"q" * 4096
        await closing

    with serve_file(img) as s:
        run(main(s))
