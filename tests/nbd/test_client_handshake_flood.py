"""Our client against a server that never ends its replies to an option.

The spec sets no number of replies before an option's final one (a server
"MAY send" NBD_REP_INFO replies to GO, and lists every export with one
NBD_REP_SERVER each), and the client kept every reply until the final one:
a broken or hostile server streaming them grew the client's memory until the
connect timeout, then the connect failed as a timeout. Now the client takes
each reply as it comes and keeps none, fails after MAX_OPTION_REPLIES of them
with a ProtocolError naming the server, the option and the cause, and
list_exports takes at most MAX_EXPORTS exports and MAX_LIST_BYTES of names
and descriptions (libnbd stopped at 10000 names when it kept them).

The server here is a scripted asyncio one on 127.0.0.1 port 0 that answers
every option as a good server would but the one a test floods, to which it
sends ``count`` replies (pacing on the client's reads) and then nothing, the
connection left open. Section names refer to doc/proto.md of
NetworkBlockDevice/nbd.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from emulator.nbd import client as cl
from emulator.nbd import protocol as p
from emulator.nbd.client import NbdClient, list_exports
from emulator.nbd.errors import DisconnectedError, ProtocolError
from tests.nbd.test_client_bogus_server import scripted_server

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 10.0  # the connect timeout: a flood must fail well before it
SIZE = 1 << 20
FLAGS = p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH


@asynccontextmanager
async def flooding_server(flood: int, reply: Callable[[int], bytes], count: int) -> AsyncIterator[str]:
    """A server that answers option ``flood`` with ``reply(i)`` for i in range(count)
    and then nothing more; every other option as a good server would. Yields its URI."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(4)
        while True:
            _, opt, length = p.OPTION_HEADER.unpack(await r.readexactly(p.OPTION_HEADER.size))
            await r.readexactly(length)
            if opt == flood:
                for i in range(count):
                    w.write(reply(i))
                    await w.drain()  # at the client's pace: it is the client's memory we look at
                await r.read()  # nothing more: wait for the client to go
                return
            if opt == p.OPT_SET_META_CONTEXT:
                ctx = p.U32.pack(1) + p.BASE_ALLOCATION.encode()
                w.write(p.build_option_reply(opt, p.REP_META_CONTEXT, ctx))
            elif opt == p.OPT_GO:
                info = p.INFO_EXPORT_FMT.pack(p.INFO_EXPORT, SIZE, FLAGS)
                w.write(p.build_option_reply(opt, p.REP_INFO, info))
            w.write(p.build_option_reply(opt, p.REP_ACK))
            if opt == p.OPT_GO:
                await r.read()
                return

    async with scripted_server(script) as uri:
        yield uri


def measured(
    call: Callable[[str], Awaitable[Any]], flood: int, reply: Callable[[int], bytes], count: int
) -> tuple[BaseException | None, int, float]:
    """``call(uri)`` against a server flooding ``flood``: (its exception, the peak
    of memory traced while it ran, seconds it took)."""

    async def main() -> tuple[BaseException | None, int, float]:
        async with flooding_server(flood, reply, count) as uri:
            tracemalloc.start()
            start = time.monotonic()
            try:
                await call(uri)
                err: BaseException | None = None
            except Exception as e:
                err = e
            took = time.monotonic() - start
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return err, peak, took

    return asyncio.run(asyncio.wait_for(main(), 3 * TIMEOUT))


async def connect(uri: str) -> None:
    c = await NbdClient.connect(uri, timeout=TIMEOUT)
    await c.close(timeout=1)


def _info(i: int) -> bytes:  # an NBD_INFO_DESCRIPTION of 16 KiB
    return p.build_option_reply(p.OPT_GO, p.REP_INFO, p.U16.pack(p.INFO_DESCRIPTION) + b"d" * (16 << 10))


def _context(i: int) -> bytes:  # base:allocation named again and again, 16 KiB padded
    data = p.U32.pack(1) + p.BASE_ALLOCATION.encode()
    return p.build_option_reply(p.OPT_SET_META_CONTEXT, p.REP_META_CONTEXT, data + b"x" * (16 << 10))


FLOODS = {
    "GO-infos": (p.OPT_GO, _info, "GO to export 'vol'"),
    "meta-contexts": (p.OPT_SET_META_CONTEXT, _context, "SET_META_CONTEXT"),
}
FLOOD = 4000  # replies of 16 KiB: 64 MiB the client kept before


@pytest.mark.parametrize("flood, reply, what", FLOODS.values(), ids=FLOODS.keys())
def test_a_server_that_never_ends_its_replies_fails_the_connect_at_once(
    flood: int, reply: Callable[[int], bytes], what: str
) -> None:
    err, peak, took = measured(connect, flood, reply, FLOOD)
    assert peak < 4 << 20, f"{peak >> 20} MiB traced (was 60+: every reply kept)"
    assert isinstance(err, ProtocolError), repr(err)
    msg = str(err)
    assert msg.startswith("nbd://127.0.0.1:") and what in msg
    assert f"more than {cl.MAX_OPTION_REPLIES} replies" in msg
    assert took < TIMEOUT / 2  # not the connect timeout


def test_a_go_with_many_infos_below_the_cap_still_connects() -> None:
    """Unknown and repeated infos are skipped, as before (section "NBD_OPT_INFO and
    NBD_OPT_GO": a client MUST ignore information types it does not recognize)."""
    unknown = p.build_option_reply(p.OPT_GO, p.REP_INFO, p.U16.pack(0x7777) + b"?" * 100)
    infos = [unknown] * (cl.MAX_OPTION_REPLIES - 2) + [
        p.build_option_reply(p.OPT_GO, p.REP_INFO, p.INFO_EXPORT_FMT.pack(p.INFO_EXPORT, SIZE, FLAGS)),
        p.build_option_reply(p.OPT_GO, p.REP_INFO, p.U16.pack(p.INFO_DESCRIPTION) + b"a disk"),
        p.build_option_reply(p.OPT_GO, p.REP_ACK),
    ]

    async def call(uri: str) -> None:
        c = await NbdClient.connect(uri, timeout=TIMEOUT)
        try:
            assert (c.size, c.flags, c.description) == (SIZE, FLAGS, "a disk")
        finally:
            await c.close(timeout=1)

    err, _, _ = measured(call, p.OPT_GO, lambda i: infos[i], len(infos))
    assert err is None, repr(err)


# =========================================================================== LIST
async def listing(uri: str) -> None:
    await list_exports(uri, timeout=TIMEOUT)


def _export(i: int) -> bytes:
    name = f"lun-{i}".encode()
    return p.build_option_reply(p.OPT_LIST, p.REP_SERVER, p.U32.pack(len(name)) + name)


def _long_export(i: int) -> bytes:  # names and descriptions as long as the spec allows
    name = f"{i:04096d}".encode()
    return p.build_option_reply(p.OPT_LIST, p.REP_SERVER, p.U32.pack(len(name)) + name + b"d" * p.MAX_STRING)


def test_list_exports_of_a_server_that_never_ends_its_list_stops_at_max_exports() -> None:
    err, peak, took = measured(listing, p.OPT_LIST, _export, 3 * cl.MAX_EXPORTS)
    assert isinstance(err, ProtocolError), repr(err)
    assert str(err).startswith("nbd://127.0.0.1:")
    assert f"LIST: the server lists more than {cl.MAX_EXPORTS} exports" in str(err)
    assert peak < 8 << 20, f"{peak >> 20} MiB traced"
    assert took < TIMEOUT / 2


def test_list_exports_keeps_at_most_max_list_bytes_of_names() -> None:
    n = 2 * cl.MAX_LIST_BYTES // (2 * p.MAX_STRING)  # 16 MiB of names and descriptions
    err, peak, took = measured(listing, p.OPT_LIST, _long_export, n)
    assert isinstance(err, ProtocolError), repr(err)
    assert f"more than {cl.MAX_LIST_BYTES >> 20} MiB of export names and descriptions" in str(err)
    assert peak < cl.MAX_LIST_BYTES + (4 << 20), f"{peak >> 20} MiB traced"
    assert took < TIMEOUT / 2


def test_list_exports_takes_a_list_of_max_exports() -> None:
    """The bound is not below it: MAX_EXPORTS exports, then the ACK, are listed."""
    replies = [_export(i) for i in range(cl.MAX_EXPORTS)] + [p.build_option_reply(p.OPT_LIST, p.REP_ACK)]
    got: list[tuple[str, str]] = []

    async def call(uri: str) -> None:
        got.extend(await list_exports(uri, timeout=TIMEOUT))

    err, _, _ = measured(call, p.OPT_LIST, lambda i: replies[i], len(replies))
    assert err is None, repr(err)
    assert len(got) == cl.MAX_EXPORTS and got[-1] == (f"lun-{cl.MAX_EXPORTS - 1}", "")


def test_list_exports_of_a_server_that_stops_answering_times_out_with_an_nbd_error() -> None:
    """It raised a bare TimeoutError, not an NbdError as connect's 'handshake timed out'."""

    async def call(uri: str) -> None:
        with pytest.raises(DisconnectedError, match=r"^nbd://127\.0\.0\.1:\d+/vol: LIST timed out$"):
            await list_exports(uri, timeout=0.5)

    err, _, _ = measured(call, p.OPT_LIST, _export, 10)
    assert err is None, repr(err)
