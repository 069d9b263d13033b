"""Our client against a server that breaks the protocol in transmission.

The server here is a small scripted asyncio one on 127.0.0.1 port 0: a
plain handshake (structured replies, base:allocation, GO with the block
sizes a test chooses), then every request is answered by a function of the
test, so every reply byte is ours to get wrong. The client must never hand
its caller a wrong answer, crash, or leave a request waiting forever: a
reply it cannot trust breaks the connection and fails what is pending with
DisconnectedError. Every test is bounded by ``TIMEOUT``.

Section names refer to doc/proto.md of NetworkBlockDevice/nbd.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from emulator.nbd import protocol as p
from emulator.nbd.client import NbdClient, list_exports
from emulator.nbd.errors import DisconnectedError, ProtocolError, RequestError

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 10.0
SIZE = 1 << 20
FLAGS = p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH | p.FLAG_SEND_TRIM | p.FLAG_SEND_WRITE_ZEROES | p.FLAG_SEND_CACHE

#: answers one request: (type, flags, cookie, offset, length) -> reply bytes
Answer = Callable[[int, int, int, int, int], bytes]


def good(type_: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
    """What a correct server answers (data of 0xAB, all of it allocated)."""
    if type_ == p.CMD_READ:
        hdr = p.build_structured_header(cookie, p.REPLY_TYPE_OFFSET_DATA, length + 8, p.REPLY_FLAG_DONE)
        return hdr + p.U64.pack(offset) + b"\xab" * length
    if type_ == p.CMD_BLOCK_STATUS:
        return p.build_block_status_chunk(cookie, 1, [p.Extent(length, 0)])
    return p.build_simple_reply(cookie)


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def scripted_server(script: Script, export: str = "vol") -> AsyncIterator[str]:
    """An NBD server on 127.0.0.1 port 0 that greets each client (fixed newstyle, no
    zeroes), then runs ``script`` on the connection and closes it; yields its URI."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            w.write(p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
            await script(r, w)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"nbd://127.0.0.1:{srv.sockets[0].getsockname()[1]}/{export}"
    finally:
        srv.close()
        await srv.wait_closed()


@asynccontextmanager
async def bogus_server(
    answer: Answer, block_size: tuple[int, int, int] | None = None, meta_final: int = p.REP_ACK
) -> AsyncIterator[str]:
    """A server whose replies ``answer`` makes; yields its URI. ``meta_final``: its
    last reply to SET_META_CONTEXT (after it named base:allocation)."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(4)
        while True:
            _, opt, length = p.OPTION_HEADER.unpack(await r.readexactly(p.OPTION_HEADER.size))
            await r.readexactly(length)
            if opt == p.OPT_SET_META_CONTEXT:
                ctx = p.U32.pack(1) + p.BASE_ALLOCATION.encode()
                w.write(p.build_option_reply(opt, p.REP_META_CONTEXT, ctx))
            elif opt == p.OPT_GO:
                info = p.INFO_EXPORT_FMT.pack(p.INFO_EXPORT, SIZE, FLAGS)
                w.write(p.build_option_reply(opt, p.REP_INFO, info))
                if block_size is not None:
                    bs = p.INFO_BLOCK_SIZE_FMT.pack(p.INFO_BLOCK_SIZE, *block_size)
                    w.write(p.build_option_reply(opt, p.REP_INFO, bs))
            w.write(p.build_option_reply(opt, meta_final if opt == p.OPT_SET_META_CONTEXT else p.REP_ACK))
            if opt == p.OPT_GO:
                break
        while True:
            header = await r.readexactly(p.REQUEST.size)
            _, flags, type_, cookie, offset, length = p.REQUEST.unpack(header)
            if type_ == p.CMD_DISC:
                break
            if type_ == p.CMD_WRITE:
                await r.readexactly(length)
            w.write(answer(type_, flags, cookie, offset, length))

    async with scripted_server(script) as uri:
        yield uri


def run_against(
    answer: Answer,
    call: Callable[[NbdClient], Awaitable[Any]],
    block_size: tuple[int, int, int] | None = None,
    meta_final: int = p.REP_ACK,
) -> Any:
    """``call(client)`` against a server answering with ``answer`` (and offering
    ``block_size`` in its GO reply): its result or exception."""

    async def main() -> Any:
        async with bogus_server(answer, block_size, meta_final) as uri:
            c = await NbdClient.connect(uri, timeout=TIMEOUT)
            try:
                return await call(c)
            finally:
                await c.close(timeout=1)

    return asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def test_the_scripted_server_is_a_good_one() -> None:
    async def call(c: NbdClient) -> None:
        assert await c.read(4096, 100) == b"\xab" * 100
        assert await c.extents(0, 8192) == [p.Extent(8192, 0)]
        await c.write(0, b"x" * 10)

    run_against(good, call)


# =========================================================================== BLOCK_STATUS
def _none_done(type_: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
    return p.build_structured_header(cookie, p.REPLY_TYPE_NONE, 0, p.REPLY_FLAG_DONE)


def _simple_ok(type_: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
    return p.build_simple_reply(cookie)


@pytest.mark.parametrize(
    "answer, why",
    [(_none_done, "BLOCK_STATUS reply without extents"), (_simple_ok, "BLOCK_STATUS answered by a simple")],
    ids=["done-without-extents", "simple-reply"],
)
def test_a_block_status_success_without_extents_breaks_the_connection(answer: Answer, why: str) -> None:
    """Section "NBD_CMD_BLOCK_STATUS": success is a structured reply with at least one
    BLOCK_STATUS chunk. Without one, extents() waited forever (the request was taken
    out of the pending ones before the connection failed them), or returned None."""

    async def call(c: NbdClient) -> None:
        with pytest.raises(DisconnectedError, match=why):
            await asyncio.wait_for(c.extents(0, 8192), 5)
        assert c.closed

    run_against(answer, call)


def test_a_context_named_by_a_set_meta_context_that_then_failed_is_not_used() -> None:
    """SET_META_CONTEXT answered with base:allocation and then a final error sets no
    context; the client used the one named, and sent BLOCK_STATUS requests the server
    had not agreed to (section "NBD_CMD_BLOCK_STATUS": only contexts returned "without
    an error")."""
    sent: list[int] = []

    def answer(t: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
        sent.append(t)
        return good(t, flags, cookie, offset, length)

    async def call(c: NbdClient) -> None:
        assert c.allocation_context is None
        assert await c.extents(0, 8192) == [p.Extent(8192, 0)]  # all data, nothing asked

    run_against(answer, call, meta_final=p.REP_ERR_INVALID)
    assert p.CMD_BLOCK_STATUS not in sent


# =========================================================================== READ
def _data(cookie: int, offset: int, length: int, done: bool = False) -> bytes:
    flags = p.REPLY_FLAG_DONE if done else 0
    hdr = p.build_structured_header(cookie, p.REPLY_TYPE_OFFSET_DATA, length + 8, flags)
    return hdr + p.U64.pack(offset) + b"\xab" * length


def _hole(cookie: int, offset: int, length: int, done: bool = False) -> bytes:
    flags = p.REPLY_FLAG_DONE if done else 0
    hdr = p.build_structured_header(cookie, p.REPLY_TYPE_OFFSET_HOLE, 12, flags)
    return hdr + p.HOLE_BODY.pack(offset, length)


def _read_answer(make: Callable[[int, int, int], bytes]) -> Answer:
    def answer(type_: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
        return (
            make(cookie, offset, length)
            if type_ == p.CMD_READ
            else good(type_, flags, cookie, offset, length)
        )

    return answer


SHORT_READS = {
    "none-done": lambda c, o, n: p.build_structured_header(c, p.REPLY_TYPE_NONE, 0, p.REPLY_FLAG_DONE),
    "first-half": lambda c, o, n: _data(c, o, n // 2, done=True),
    "hole-then-none": lambda c, o, n: (
        _hole(c, o, n // 2) + p.build_structured_header(c, p.REPLY_TYPE_NONE, 0, p.REPLY_FLAG_DONE)
    ),
    "overlapping": lambda c, o, n: _data(c, o, n // 2 + 1) + _data(c, o + n // 2, n - n // 2, done=True),
}


@pytest.mark.parametrize("make", SHORT_READS.values(), ids=SHORT_READS.keys())
def test_a_structured_read_that_does_not_cover_the_request_breaks_the_connection(
    make: Callable[[int, int, int], bytes],
) -> None:
    """Section "Structured reply chunk message": a successful READ's chunks cover the
    whole request. The client took a DONE without them for success, and its caller got
    the zeroes of its own buffer for the data (a migration's copy would store them)."""

    async def call(c: NbdClient) -> None:
        with pytest.raises(DisconnectedError, match="READ 4096\\+8192 succeeded with"):
            await asyncio.wait_for(c.read(4096, 8192), 5)

    run_against(_read_answer(make), call)


def test_a_structured_read_of_data_and_hole_chunks_in_any_order_succeeds() -> None:
    def make(c: int, o: int, n: int) -> bytes:
        return _hole(c, o + n // 2, n - n // 2) + _data(c, o, n // 2, done=True)

    async def call(c: NbdClient) -> None:
        assert await c.read(4096, 8192) == b"\xab" * 4096 + bytes(4096)

    run_against(_read_answer(make), call)


@pytest.mark.parametrize("type_", [(1 << 15) | 3, 0xFFFF], ids=["0x8003", "0xffff"])
def test_an_unknown_error_chunk_fails_the_request_not_the_connection(type_: int) -> None:
    """Section "Structured reply types": a chunk type with bit 15 set is an error chunk;
    an unknown one MUST fail the reply, and transmission MAY go on. The client
    dropped the connection (every request in flight failed with it)."""

    def answer(t: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
        if t == p.CMD_READ and offset == 0:
            body = p.ERROR_CHUNK.pack(p.EIO, 3) + b"bad" + b"future fields"
            return p.build_structured_header(cookie, type_, len(body), p.REPLY_FLAG_DONE) + body
        return good(t, flags, cookie, offset, length)

    async def call(c: NbdClient) -> None:
        with pytest.raises(RequestError) as e:
            await asyncio.wait_for(c.read(0, 4096), 5)
        assert e.value.error == p.EIO and "bad" in str(e.value)
        assert not c.closed
        assert await c.read(4096, 10) == b"\xab" * 10

    run_against(answer, call)


# =========================================================================== block sizes
@pytest.mark.parametrize(
    "block_size",
    [
        (1, 4096, 0),
        (1, 4096, 1),
        (512, 4096, 256),
        (3, 4096, 3 << 20),
        (1 << 17, 1 << 17, 1 << 25),
        (512, 256, 1 << 20),
    ],
    ids=["max-0", "max-1", "max-below-min", "min-not-power-of-2", "min-over-64k", "preferred-below-min"],
)
def test_invalid_block_sizes_are_ignored(block_size: tuple[int, int, int]) -> None:
    """Section "Block size constraints". Requests are split at the maximum block size:
    a maximum of 0 made every read, write and cache fail with ValueError (a range()
    step of 0); 1 would have sent a 32 MiB read as 32M requests."""

    async def call(c: NbdClient) -> None:
        assert c.block_size == p.BlockSize()
        assert await c.read(0, SIZE) == b"\xab" * SIZE
        await c.write(4096, b"y" * 8192)
        await c.cache(0, 8192)
        await c.write_zeroes(0, 8192)

    run_against(good, call, block_size)


@pytest.mark.parametrize(
    "block_size", [(1, 4096, 0xFFFF_FFFF), (512, 4096, 32 << 20), (4096, 4096, 256 << 10), (1, 4096, SIZE)]
)
def test_valid_block_sizes_are_kept(block_size: tuple[int, int, int]) -> None:
    sent: list[int] = []

    def answer(type_: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
        sent.append(length)
        return good(type_, flags, cookie, offset, length)

    async def call(c: NbdClient) -> None:
        assert c.block_size == p.BlockSize(*block_size)
        assert await c.read(0, SIZE) == b"\xab" * SIZE

    run_against(answer, call, block_size)
    assert max(sent) == min(block_size[2], p.MAX_BLOCK, SIZE)


# =========================================================================== LIST
@asynccontextmanager
async def listing_server(replies: bytes) -> AsyncIterator[str]:
    """A server that answers NBD_OPT_LIST with ``replies``, then closes."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(4 + p.OPTION_HEADER.size)
        w.write(replies)
        await w.drain()

    async with scripted_server(script, export="") as uri:
        yield uri


def _server(data: bytes) -> bytes:
    return p.build_option_reply(p.OPT_LIST, p.REP_SERVER, data)


ACK = p.build_option_reply(p.OPT_LIST, p.REP_ACK)
BAD_LISTS = {
    "short": (_server(b"\0\0") + ACK, ProtocolError),
    "name-past-the-reply": (_server(p.U32.pack(10) + b"vol") + ACK, ProtocolError),
    "name-not-utf8": (_server(p.U32.pack(2) + b"\xff\xfe") + ACK, ProtocolError),
    "closed-half-way": (_server(p.U32.pack(3) + b"vol"), DisconnectedError),
}


@pytest.mark.parametrize("replies, error", BAD_LISTS.values(), ids=BAD_LISTS.keys())
def test_list_exports_with_malformed_replies_raises_an_nbd_error(replies: bytes, error: type) -> None:
    """list_exports raised struct.error, UnicodeDecodeError or IncompleteReadError
    (none of them an NbdError), or returned a name cut short."""

    async def main() -> None:
        async with listing_server(replies) as uri:
            with pytest.raises(error):
                await list_exports(uri, timeout=TIMEOUT)

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def test_list_exports_reads_names_and_descriptions() -> None:
    async def main() -> None:
        replies = _server(p.U32.pack(3) + b"vol" + b"a disk") + _server(p.U32.pack(0)) + ACK
        async with listing_server(replies) as uri:
            assert await list_exports(uri, timeout=TIMEOUT) == [("vol", "a disk"), ("", "")]

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))
