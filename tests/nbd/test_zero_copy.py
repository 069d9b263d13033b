"""READ replies sent with sendfile(2) from a file-backed export (server._send_file).

In-process server and client, so the edge cases can be forced: a socket
that takes only part of the reply header, a socket buffer that fills in the
middle of a reply, replies waiting in the transport, a wrapper Backend that
must not offer its file, and reads racing writes.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from emulator.array.file_backend import FileBackend
from emulator.nbd.backend import Backend
from emulator.nbd.client import NbdClient
from emulator.nbd.server import NbdServer

MiB = 1 << 20
SIZE = 8 * MiB


class _Counting(Backend):
    """A wrapper that counts reads: it inherits Backend's zero_copy_fd (None)."""

    def __init__(self, inner: FileBackend) -> None:
        self.inner, self.reads = inner, 0

    @property
    def size(self) -> int:
        return self.inner.size

    async def read_into(self, offset: int, buf: memoryview) -> None:
        self.reads += 1
        await self.inner.read_into(offset, buf)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        await self.inner.write(offset, data, fua)


def _image(tmp_path: Path, holes: bool = False) -> tuple[Path, bytearray]:
    rng = random.Random(7)
    model = bytearray(rng.randbytes(SIZE))
    path = tmp_path / "disk.img"
    path.write_bytes(model)
    if holes:  # punch holes so structured reads take the hole-aware path
        backend = FileBackend(path)
        for off in range(0, SIZE, 2 * MiB):
            asyncio.run(backend.trim(off, MiB))
            model[off : off + MiB] = bytes(MiB)
        backend.close()
    return path, model


@asynccontextmanager
async def _served(backend: Backend) -> AsyncIterator[tuple[NbdServer, str]]:
    server = NbdServer()
    server.add_export("vol", backend)
    host, port = await server.listen_tcp()
    try:
        yield server, f"nbd://{host}:{port}/vol"
    finally:
        await server.close(timeout=5)


def _run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(fn(), 60))


def _requests(rng: random.Random, n: int) -> list[tuple[int, int]]:
    out = []
    for _ in range(n):
        length = rng.choice([64 * 1024, 256 * 1024, MiB, MiB - 512, 4096, 3 * MiB])
        out.append((rng.randrange(0, SIZE - length + 1), length))
    out.append((SIZE - MiB, MiB))  # the last byte of the file
    return out


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("holes", [False, True])
def test_concurrent_reads_match_the_file(
    tmp_path: Path, structured: bool, holes: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many big reads in flight at once fill the socket buffer (the client
    shares the server's loop, so nothing drains it during a receive pass):
    sendfile stops part-way and the rest of that reply is queued on the
    transport; the reads after it find the transport busy and take the
    normal path. Every byte is checked."""
    path, model = _image(tmp_path, holes)
    short = []
    real = os.sendfile

    def recording(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        try:
            n = real(out_fd, in_fd, offset, count)
        except BlockingIOError:
            n = 0
            raise
        finally:
            if n < count:
                short.append((count, n))
        return n

    monkeypatch.setattr(os, "sendfile", recording)

    async def main() -> None:
        backend = FileBackend(path)
        async with _served(backend) as (_, uri):
            async with await NbdClient.connect(uri, structured=structured) as c:
                assert c.structured is structured
                reqs = _requests(random.Random(1), 64)
                datas = await asyncio.gather(*(c.read(o, n) for o, n in reqs))
                for (o, n), d in zip(reqs, datas, strict=True):
                    assert bytes(d) == model[o : o + n], (o, n)

    _run(main)
    if not (structured and holes):  # there most replies carry holes: chunks, not sendfile
        assert short, "the socket never filled: the partial-send path went untested"


def test_reads_see_writes_that_completed_before_them(tmp_path: Path) -> None:
    path, model = _image(tmp_path)
    rng = random.Random(3)

    async def main() -> None:
        async with _served(FileBackend(path)) as (_, uri):
            async with await NbdClient.connect(uri, structured=False) as c:
                for _ in range(20):
                    o = rng.randrange(0, SIZE - MiB)
                    data = rng.randbytes(MiB)
                    await c.write(o, data)
                    model[o : o + MiB] = data
                    reads = [c.read(rng.randrange(0, SIZE - MiB), MiB) for _ in range(4)]
                    assert bytes(await c.read(o, MiB)) == data
                    await asyncio.gather(*reads)
                assert bytes(await c.read(0, SIZE // 2)) == model[: SIZE // 2]

    _run(main)


class _StingySocket:
    """The server's socket handle, taking at most ``limit`` bytes per send()."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock, self.limit, self.partial = sock, limit, 0

    def send(self, data: bytes, flags: int = 0) -> int:
        if len(data) > self.limit:
            self.partial += 1
        return self.sock.send(data[: self.limit], flags)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("structured", [False, True])
def test_partial_reply_header(tmp_path: Path, structured: bool) -> None:
    """The socket takes a few bytes of the header: the rest of the header and
    the data go through the transport, in order."""
    path, model = _image(tmp_path)

    async def main() -> None:
        async with _served(FileBackend(path)) as (server, uri):
            async with await NbdClient.connect(uri, structured=structured) as c:
                (conn,) = server.connections
                assert conn._zsock is not None
                stingy = _StingySocket(conn._zsock, 5)
                conn._zsock = stingy  # type: ignore[assignment]
                for o in (0, 12345, SIZE - MiB):
                    assert bytes(await c.read(o, MiB)) == model[o : o + MiB]
                assert stingy.partial >= 3

    _run(main)


def test_a_wrapper_backend_is_read_through_its_methods(tmp_path: Path) -> None:
    """A Backend that wraps the file (stats, media, migration) offers no fd:
    its reads must go through it, or it would miss them."""
    path, model = _image(tmp_path)

    async def main() -> None:
        wrapper = _Counting(FileBackend(path))
        assert wrapper.zero_copy_fd(MiB) is None
        async with _served(wrapper) as (server, uri):
            async with await NbdClient.connect(uri, structured=False) as c:
                assert bytes(await c.read(0, MiB)) == model[:MiB]
                (conn,) = server.connections
                assert conn._zsock is None
        assert wrapper.reads == 1

    _run(main)


def test_sendfile_is_used_and_the_dup_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, model = _image(tmp_path)
    calls = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        calls.append(count)
        return real(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting)

    async def main() -> None:
        async with _served(FileBackend(path)) as (server, uri):
            async with await NbdClient.connect(uri, structured=False) as c:
                (conn,) = server.connections
                zsock = conn._zsock
                assert bytes(await c.read(MiB, MiB)) == model[MiB : 2 * MiB]
                assert bytes(await c.read(0, 4096)) == model[:4096]  # below ZERO_COPY_MIN
            for _ in range(100):
                if not server.connections:
                    break
                await asyncio.sleep(0.01)
            assert zsock is not None and zsock.fileno() == -1

    _run(main)
    assert calls and calls[0] == MiB
