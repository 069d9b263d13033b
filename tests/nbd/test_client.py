"""Our asyncio client against real servers: nbdkit (memory, file), qemu-nbd, ours."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from emulator.nbd import protocol as p
from emulator.nbd.client import MAX_EXTENTS, Address, NbdClient, _within, list_exports
from emulator.nbd.errors import DisconnectedError, OptionError, ProtocolError, RequestError
from emulator.nbd.protocol import STATE_HOLE, STATE_ZERO, Extent
from emulator.nbd.server import NbdServer
from tests.backends import FixedMap
from tests.files import sparse_image
from tests.servers import Server, nbdkit, qemu_nbd, serve_file

pytestmark = pytest.mark.interop
SIZE = 16 << 20
PEERS = ["ours", "nbdkit-memory", "nbdkit-file", "qemu-nbd"]


@pytest.fixture(params=PEERS)
def peer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    img = sparse_image(tmp_path / "peer.img", SIZE)
    with ExitStack() as stack:
        kind = request.param
        if kind == "ours":
            yield stack.enter_context(serve_file(img, export="vol"))
        elif kind == "nbdkit-memory":
            yield stack.enter_context(nbdkit(tmp_path, "memory", f"size={SIZE}"))
        elif kind == "nbdkit-file":
            yield stack.enter_context(nbdkit(tmp_path, "file", str(img)))
        else:
            yield stack.enter_context(qemu_nbd(tmp_path, img))


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


def test_uri_parsing() -> None:
    a = Address.parse("nbd://10.1.2.3:1234/my%20vol")
    assert (a.host, a.port, a.export, a.socket) == ("10.1.2.3", 1234, "my vol", None)
    assert Address.parse("nbd://localhost/").port == 10809
    u = Address.parse("nbd+unix:///exp?socket=/tmp/s.sock")
    assert (u.export, u.socket) == ("exp", "/tmp/s.sock")
    assert Address.parse(u.uri()) == u
    for bad in ("http://x/", "nbd+unix:///e", "nbd:///e", "nbds://h/e"):
        with pytest.raises(ValueError):
            Address.parse(bad)


def test_pipelined_io_matches_model(peer: Server) -> None:
    """Many requests in flight, completed in any order; every byte checked."""

    async def main() -> None:
        async with await NbdClient.connect(peer.uri) as c:
            assert c.size == SIZE
            assert c.structured
            model = bytearray(SIZE)
            rng = random.Random(7)
            for _ in range(4):
                writes = []
                for _ in range(64):
                    off = rng.randrange(0, SIZE - 70000)
                    data = rng.randbytes(rng.randrange(1, 70000))
                    model[off : off + len(data)] = data
                    writes.append((off, data))
                # Non-overlapping batches keep the model exact under reordering.
                batch: list[tuple[int, bytes]] = []
                for off, data in writes:
                    if any(o < off + len(data) and off < o + len(d) for o, d in batch):
                        await asyncio.gather(*(c.write(o, d) for o, d in batch))
                        batch = []
                    batch.append((off, data))
                await asyncio.gather(*(c.write(o, d) for o, d in batch))
                reads = [(rng.randrange(0, SIZE - 65536), rng.randrange(1, 65536)) for _ in range(128)]
                got = await asyncio.gather(*(c.read(o, n) for o, n in reads))
                for (o, n), read in zip(reads, got, strict=True):
                    assert read == model[o : o + n]
            await c.flush()
            assert await c.read(0, SIZE) == model

    run(main())


def test_zero_trim_cache_and_extents(peer: Server) -> None:
    async def main() -> None:
        async with await NbdClient.connect(peer.uri) as c:
            await c.write(0, b"\xaa" * (4 << 20))
            await c.write_zeroes(1 << 20, 1 << 20)  # may punch a hole
            await c.write_zeroes(2 << 20, 4096, may_trim=False, fua=True)
            await c.trim(3 << 20, 1 << 20)
            await c.cache(0, 1 << 20)
            await c.flush()
            data = await c.read(0, 4 << 20)
            assert data[: 1 << 20] == b"\xaa" * (1 << 20)
            assert data[1 << 20 : 2 << 20] == bytes(1 << 20)
            assert data[2 << 20 : (2 << 20) + 4096] == bytes(4096)
            assert data[(2 << 20) + 4096 : 3 << 20] == b"\xaa" * ((1 << 20) - 4096)
            # TRIM makes no promise about content; nothing to check but success.
            assert c.allocation_context is not None
            ext = await c.extents(0, SIZE)
            assert sum(e.length for e in ext) <= SIZE
            assert ext[0].flags & p.STATE_HOLE == 0  # the first MiB is data
            pos, zeroed = 0, 0
            for e in ext:  # every range reported as zero reads as zeroes
                end = min(pos + e.length, len(data))
                if e.flags & p.STATE_ZERO and pos < end:
                    assert data[pos:end] == bytes(end - pos)
                    zeroed += max(0, min(end, 2 << 20) - max(pos, 1 << 20))
                pos += e.length
            assert zeroed == 1 << 20  # the zeroed MiB is reported as zero

    run(main())


def test_large_requests_are_split(tmp_path: Path) -> None:
    """A 40 MiB read/write spans two requests of the server's 32 MiB maximum."""
    img = sparse_image(tmp_path / "big.img", 64 << 20)
    blob = os.urandom(40 << 20)

    async def main(uri: str) -> None:
        async with await NbdClient.connect(uri) as c:
            assert c.block_size.maximum == 32 << 20
            await c.write(1000, blob)
            assert await c.read(1000, len(blob)) == blob

    with serve_file(img) as s:
        run(main(s.uri))
    with open(img, "rb") as f:
        f.seek(1000)
        assert f.read(len(blob)) == blob


def test_cache_and_write_zeroes_are_split_to_the_maximum_block_size(tmp_path: Path) -> None:
    """Regression (was a bug): CACHE and WRITE_ZEROES went whole (up to 4 GiB), where
    doc/proto.md ("Block size constraints") has the client keep them within the server's
    maximum block size, as READ and WRITE; qemu-nbd refuses a 64 MiB CACHE with EINVAL
    ("len is larger than max len"). FAST_ZERO and TRIM have no such limit and go whole.
    nbdkit's log filter (outside a 1 MiB maximum) shows what reached the server."""
    img = sparse_image(tmp_path / "q.img", 96 << 20)
    with qemu_nbd(tmp_path, img) as q:

        async def cache_64m(uri: str) -> None:
            async with await NbdClient.connect(uri) as c:
                assert c.block_size.maximum == 32 << 20
                await c.cache(0, 64 << 20)
                await c.write_zeroes(0, 64 << 20, may_trim=False)

        run(cache_64m(q.uri))
    log = tmp_path / "requests.log"
    limits = ("blocksize-maximum=1M", "blocksize-error-policy=error", f"logfile={log}")
    with nbdkit(tmp_path, "--filter=log", "--filter=blocksize-policy", "memory", "8M", *limits) as k:

        async def ranged(uri: str) -> None:
            async with await NbdClient.connect(uri) as c:
                assert c.block_size.maximum == 1 << 20
                await c.cache(4096, 3 << 20)
                await c.write_zeroes(4096, 3 << 20, may_trim=False)
                await c.write_zeroes(0, 4 << 20)
                await c.write_zeroes(0, 4 << 20, fast=True)
                await c.trim(0, 4 << 20)

        run(ranged(k.uri))
    asked = [
        (ln.split()[3], int(ln.split("offset=")[1].split()[0], 16), int(ln.split("count=")[1].split()[0], 16))
        for ln in log.read_text().splitlines()
        if " id=" in ln and ln.rstrip().endswith("...") and "offset=" in ln
    ]
    split = [(4096 + (i << 20), 1 << 20) for i in range(3)]
    assert sorted((o, n) for op, o, n in asked if op == "Cache") == split
    zeroes = [(o, n) for op, o, n in asked if op == "Zero"]  # each call's, in any order
    assert sorted(zeroes[:3]) == split and sorted(zeroes[3:7]) == [(i << 20, 1 << 20) for i in range(4)]
    assert zeroes[7:] == [(0, 4 << 20)]  # FAST_ZERO: not limited
    assert [(o, n) for op, o, n in asked if op == "Trim"] == [(0, 4 << 20)]


def test_errors_carry_nbd_codes(tmp_path: Path) -> None:
    img = sparse_image(tmp_path / "ro.img", 1 << 20)

    async def main(uri: str) -> None:
        async with await NbdClient.connect(uri) as c:
            assert c.read_only
            with pytest.raises(RequestError) as ei:
                await c._submit(p.CMD_WRITE, 0, 4, payload=b"abcd")
            assert ei.value.error == p.EPERM
            # The connection survives an error.
            assert await c.read(0, 4) == bytes(4)
            with pytest.raises(RequestError) as ei:
                await c.read(c.size - 2, 4)  # refused before it is sent
            assert ei.value.error == p.EINVAL

    with serve_file(img, "--read-only") as s:
        run(main(s.uri))
    with nbdkit(tmp_path, "file", str(img), "-r") as s:
        run(main(s.uri))


@pytest.mark.parametrize("mask", ["0", "2"], ids=["zeroes", "no-zeroes"])
def test_a_newstyle_server_that_is_not_fixed_is_reached_with_export_name(tmp_path: Path, mask: str) -> None:
    """Regression (was a bug): a server without NBD_FLAG_FIXED_NEWSTYLE (nbdkit
    --mask-handshake=0 or 2, as older servers) was refused (\"server does not speak fixed
    newstyle\"), so it could not be a migration's source. Plain newstyle takes one option,
    NBD_OPT_EXPORT_NAME, and the client must not set the flag the server did not offer
    (section \"Client flags\"): it goes straight to EXPORT_NAME now, simple replies and
    no block status (the whole range reported as data)."""

    async def main(uri: str) -> None:
        async with await NbdClient.connect(uri) as c:
            assert (c.size, c.structured, c.allocation_context) == (SIZE, False, None)
            await c.write(4096, b"x" * 8192, fua=True)
            assert await c.read(0, 16384) == bytes(4096) + b"x" * 8192 + bytes(4096)
            assert await c.extents(0, SIZE) == [Extent(SIZE, 0)]

    with nbdkit(tmp_path, f"--mask-handshake={mask}", "memory", f"size={SIZE}") as k:
        run(main(k.uri))
        with pytest.raises(OptionError, match="plain newstyle"):  # it has no NBD_OPT_LIST
            run(list_exports(k.uri))


def test_unknown_export_and_no_server(tmp_path: Path) -> None:
    img = sparse_image(tmp_path / "x.img", 1 << 20)
    with serve_file(img, export="known") as s:
        assert run(list_exports(s.uri)) == [("known", "")]
        with pytest.raises(OptionError, match="unknown export"):
            run(NbdClient.connect(f"nbd://127.0.0.1:{s.port}/nope"))
        port = s.port
    with pytest.raises(DisconnectedError, match="cannot connect"):
        run(NbdClient.connect(f"nbd://127.0.0.1:{port}/known"))


def test_server_killed_fails_pending_requests(tmp_path: Path) -> None:
    """SIGKILL of the server: every pending request fails, none hangs."""
    img = sparse_image(tmp_path / "k.img", SIZE)

    async def main(s: Server) -> None:
        c = await NbdClient.connect(s.uri)
        await c.write(0, b"z" * 4096)
        os.kill(s.proc.pid, signal.SIGSTOP)  # freeze it so requests stay in flight
        futs = [asyncio.ensure_future(c.read(i * 4096, 4096)) for i in range(32)]
        await asyncio.sleep(0.2)
        assert not any(f.done() for f in futs)
        os.kill(s.proc.pid, signal.SIGKILL)
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert all(isinstance(r, DisconnectedError) for r in results), results
        with pytest.raises(DisconnectedError):
            await c.read(0, 1)
        await c.close()

    with serve_file(img) as s:
        run(main(s))


def test_replies_to_cancelled_requests_leave_the_connection_working(tmp_path: Path) -> None:
    """A caller that gives up (a timeout cancels its read or write) must not cost
    the others their connection when the late reply comes."""
    img = sparse_image(tmp_path / "c.img", SIZE)

    async def main(s: Server) -> None:
        async with await NbdClient.connect(s.uri) as c:
            await c.write(0, b"q" * 8192)
            os.kill(s.proc.pid, signal.SIGSTOP)  # the replies come late
            try:
                for op in (c.read(0, 4096), c.write(8192, b"w" * 4096), c.read(0, 1 << 20)):
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(op, 0.1)
            finally:
                os.kill(s.proc.pid, signal.SIGCONT)
            assert await c.read(0, 8192) == b"q" * 8192
            assert await c.read(8192, 4096) == b"w" * 4096
            assert not c.closed

    with serve_file(img) as s:
        run(main(s))


def test_empty_reads_and_writes_send_no_request(tmp_path: Path) -> None:
    img = sparse_image(tmp_path / "e.img", SIZE)

    async def main(s: Server) -> None:
        async with await NbdClient.connect(s.uri) as c:
            sent = c._cookies
            await c.write(4096, b"")
            await c.read_into(4096, memoryview(bytearray()))
            assert await c.read(4096, 0) == b""
            assert next(sent) == 1, "an empty call sent a request"

    with serve_file(img) as s:
        run(main(s))


def test_block_status_descriptors_past_the_request_are_cut_to_it(tmp_path: Path) -> None:
    page = 4096

    async def main() -> None:
        hz = STATE_HOLE | STATE_ZERO
        for answer, want in (  # asked: 4 pages
            ([Extent(3 * page, 0), Extent(page, hz)], [Extent(3 * page, 0), Extent(page, hz)]),
            ([Extent(1 << 20, hz)], [Extent(4 * page, hz)]),
            (
                [Extent(3 * page, 0), Extent(9 * page, hz), Extent(page, 0)],
                [Extent(3 * page, 0), Extent(page, hz)],
            ),
        ):
            server = NbdServer()
            server.add_export("vol", FixedMap(1 << 20, answer))
            host, port = await server.listen_tcp()
            try:
                c = await NbdClient.connect(f"nbd://{host}:{port}/vol")
                try:
                    assert await c.extents(0, 4 * page) == want
                finally:
                    await c.close()
            finally:
                await server.close(timeout=5)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_block_status_descriptor_of_length_0_is_a_protocol_error() -> None:
    """(Our server never sends one; a map walk given one would never move on.)"""
    with pytest.raises(ProtocolError, match="length 0"):
        _within([Extent(4096, 0), Extent(0, 0)], 8192)
    assert _within([Extent(4096, 0), Extent(4096, 3)], 4096) == [Extent(4096, 0)]


def test_a_block_status_answer_keeps_at_most_max_extents_and_req_one_one() -> None:
    """A long ask of a fragmented source may bring a huge answer: the client keeps
    MAX_EXTENTS of it (the walk asks on from where they end), and REQ_ONE brings one."""
    page, n = 4096, MAX_EXTENTS + 1000
    answer = [Extent(page, 0 if i % 2 else STATE_HOLE | STATE_ZERO) for i in range(n)]

    async def main() -> None:
        server = NbdServer()
        server.add_export("vol", FixedMap(n * page, answer))
        host, port = await server.listen_tcp()
        try:
            c = await NbdClient.connect(f"nbd://{host}:{port}/vol")
            try:
                assert await c.extents(0, n * page) == answer[:MAX_EXTENTS]
                assert await c.extents(0, n * page, one=True) == answer[:1]
            finally:
                await c.close()
        finally:
            await server.close(timeout=5)

    asyncio.run(asyncio.wait_for(main(), 30))
