"""NbdServer over real sockets: the spec's error rules, structured replies, pipelining.

The server runs in-process on its own event loop in a background thread,
bound to 127.0.0.1 port 0, serving MemoryBackends; it is stopped at the end
of the module. The peer is a small raw-socket client written here with the
protocol builders, so every byte on the wire is ours to choose (bad flags,
out-of-range requests, malformed frames) and every reply is checked for
its shape as well as for its error value. After each error the connection
must keep working: a good READ follows and must return the right bytes.

Section names in comments refer to doc/proto.md of NetworkBlockDevice/nbd.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from emulator.nbd import protocol as p
from emulator.nbd import server as nbd_server
from emulator.nbd.backend import Backend, MemoryBackend
from emulator.nbd.errors import OptionError
from emulator.nbd.server import NbdServer, serve_forever_loop

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
TIMEOUT = 5.0  # bounds every socket operation of these tests
KIB = 1024
MIB = 1 << 20
PAGE = 4096
GREETING = bytes.fromhex("4e42444d41474943 49484156454f5054 0003")
U64_MAX = 2**64 - 1


# =========================================================================== the server
async def write_pages(backend: Backend, content: bytes | bytearray) -> None:
    """Write the non-zero pages of ``content``: zero pages stay holes."""
    for off in range(0, len(content), PAGE):
        chunk = content[off : off + PAGE]
        if chunk.count(0) != len(chunk):
            await backend.write(off, bytes(chunk))


class ServerThread:
    """An NbdServer on its own event loop in a daemon thread (127.0.0.1, port 0)."""

    def __init__(self, default_export: str | None = None) -> None:
        self.loop = serve_forever_loop()
        self.server = NbdServer(default_export)
        self.port = 0
        self._names = itertools.count()
        self._thread = threading.Thread(target=self._run, name="nbd-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> ServerThread:
        self._thread.start()
        host, self.port = self.call(self.server.listen_tcp("127.0.0.1", 0))
        assert host == "127.0.0.1" and self.port > 0
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run ``coro`` on the server's loop (exports are only touched there)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add(
        self, name: str, backend: Backend, content: bytes | bytearray = b"", read_only: bool = False
    ) -> str:
        async def add() -> None:
            await write_pages(backend, content)
            self.server.add_export(name, backend, read_only=read_only)

        self.call(add())
        return name

    def fresh(
        self, size: int = MIB, content: bytes | bytearray = b"", prefix: str = "t", read_only: bool = False
    ) -> str:
        """A new MemoryBackend export under a name of its own."""
        return self.add(f"{prefix}{next(self._names)}", MemoryBackend(size), content, read_only)

    def remove(self, name: str) -> None:
        async def remove() -> None:
            self.server.remove_export(name)

        self.call(remove())

    def stop(self) -> None:
        try:
            if self._thread.is_alive():
                self.call(self.server.close(), timeout=15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            assert not self._thread.is_alive(), "server thread did not stop"
            self.loop.close()


# =========================================================================== the raw client
@dataclass
class Reply:
    """One complete reply; ``data`` is a READ's payload (reassembled if structured)."""

    cookie: int
    type: int
    error: int = 0
    message: str = ""
    data: bytes | bytearray | None = None
    chunks: list[p.StructuredChunk] = field(default_factory=list)
    simple: bool = True
    extents: list[p.Extent] | None = None


@dataclass
class _Pending:
    req: p.Request
    reply: Reply
    buf: bytearray | None = None
    covered: list[tuple[int, int]] = field(default_factory=list)
    content_chunks: int = 0


class RawClient:
    """A minimal NBD client over a blocking socket, built from the protocol builders.

    It checks what the spec requires of every reply it receives (cookies it
    sent, chunk types valid for the request, content chunks inside the request
    and not overlapping, DONE last, full coverage on success) and raises
    AssertionError on any violation.
    """

    def __init__(
        self,
        port: int,
        export: str,
        *,
        structured: bool = False,
        meta: str | None = None,
        export_name: bool = False,
        client_flags: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES,
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._in = bytearray()
        self._pending: dict[int, _Pending] = {}
        self._done: dict[int, Reply] = {}
        self._cookies = itertools.count(1)
        self._dec = p.ReplyDecoder(self._read_length)
        self.structured = False
        self.context_id: int | None = None
        self.size = 0
        self.flags = 0
        self.block_size: tuple[int, int, int] | None = None
        try:
            self._handshake(export, structured, meta, export_name, client_flags)
        except BaseException:
            self.sock.close()
            raise

    # ---- context manager
    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # ---- handshake
    def _recv_exact(self, n: int) -> bytes:
        while len(self._in) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"EOF after {len(self._in)} of {n} bytes")
            self._in += data
        out = bytes(self._in[:n])
        del self._in[:n]
        return out

    def option(self, opt: int, data: bytes = b"") -> list[p.OptionReply]:
        """Send one option, return its replies up to and including the final one."""
        self.sock.sendall(p.build_option(opt, data))
        replies = []
        while True:
            r = p.parse_option_reply(self._in)
            if r is None:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("EOF during option haggling")
                self._in += chunk
                continue
            rep, used = r
            del self._in[:used]
            assert rep.option == opt, f"reply to option {rep.option}, sent {opt}"
            replies.append(rep)
            if rep.type == p.REP_ACK or rep.is_error:
                return replies

    def _handshake(
        self, export: str, structured: bool, meta: str | None, export_name: bool, cflags: int
    ) -> None:
        assert self._recv_exact(18) == GREETING
        self.sock.sendall(p.CLIENT_FLAGS.pack(cflags))
        if structured:
            assert self.option(p.OPT_STRUCTURED_REPLY)[-1].type == p.REP_ACK
            self.structured = True
        if meta is not None:
            req = p.build_meta_context_request(meta, [p.BASE_ALLOCATION])
            replies = self.option(p.OPT_SET_META_CONTEXT, req)
            assert replies[-1].type == p.REP_ACK, replies
            for r in replies[:-1]:
                assert r.type == p.REP_META_CONTEXT and r.data[4:] == b"base:allocation"
                (self.context_id,) = p.U32.unpack_from(r.data)
        if export_name:
            self.sock.sendall(p.build_option(p.OPT_EXPORT_NAME, export.encode()))
            self.size, self.flags = p.EXPORT_NAME_REPLY.unpack(self._recv_exact(10))
            if not cflags & p.FLAG_C_NO_ZEROES:
                assert self._recv_exact(124) == bytes(124)
        else:
            replies = self.option(p.OPT_GO, p.build_info_request(export, [p.INFO_BLOCK_SIZE]))
            if replies[-1].is_error:
                raise OptionError(replies[-1].data.decode(errors="replace"), replies[-1].type)
            for r in replies[:-1]:
                assert r.type == p.REP_INFO
                (info,) = p.U16.unpack_from(r.data)
                if info == p.INFO_EXPORT:
                    _, self.size, self.flags = p.INFO_EXPORT_FMT.unpack(r.data)
                elif info == p.INFO_BLOCK_SIZE:
                    self.block_size = p.INFO_BLOCK_SIZE_FMT.unpack(r.data)[1:]
            assert self.flags & p.FLAG_HAS_FLAGS
        assert self._in == b"", "bytes after the end of the handshake"

    # ---- transmission
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(
        self,
        type_: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data: bytes | None = None,
        cookie: int | None = None,
    ) -> tuple[int, bytes]:
        """Register a request as pending and return (cookie, its bytes) unsent."""
        if cookie is None:
            cookie = next(self._cookies)
        req = p.Request(flags, type_, cookie, offset, length, data)
        self.expect(req)
        return cookie, req.header() + (data or b"")

    def expect(self, req: p.Request) -> None:
        """Await a reply to ``req`` (sent by other means); DISC gets none."""
        assert req.cookie not in self._pending, "cookie still in flight"
        if req.type != p.CMD_DISC:
            self._pending[req.cookie] = _Pending(req, Reply(req.cookie, req.type, simple=False))

    def submit(
        self,
        type_: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data: bytes | None = None,
        cookie: int | None = None,
    ) -> int:
        cookie, frame = self.frame(type_, offset, length, flags, data, cookie)
        self.sock.sendall(frame)
        return cookie

    def request(
        self, type_: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes | None = None
    ) -> Reply:
        return self.wait(self.submit(type_, offset, length, flags, data))

    def read(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(p.CMD_READ, offset, length, flags)

    def write(self, offset: int, data: bytes, flags: int = 0) -> Reply:
        return self.request(p.CMD_WRITE, offset, len(data), flags, data)

    def wait(self, cookie: int) -> Reply:
        while cookie not in self._done:
            if not self._pump():
                raise AssertionError(f"connection closed with {sorted(self._pending)} pending")
        return self._done.pop(cookie)

    def wait_all(self) -> dict[int, Reply]:
        while self._pending:
            if not self._pump():
                raise AssertionError(f"connection closed with {sorted(self._pending)} pending")
        done, self._done = self._done, {}
        return done

    def wait_eof(self) -> dict[int, Reply]:
        """Read until the server closes; return the replies that came."""
        while self._pump():
            pass
        done, self._done = self._done, {}
        return done

    @property
    def pending(self) -> list[int]:
        return sorted(self._pending)

    def _pump(self) -> bool:
        data = self.sock.recv(256 * KIB)
        if not data:
            return False
        self._dec.receive_data(data)
        while (ev := self._dec.next_event()) is not None:
            self._on_event(*ev)
        return True

    def _read_length(self, cookie: int) -> int:
        pend = self._pending.get(cookie)
        assert pend is not None, f"simple reply for cookie {cookie} that is not in flight"
        if pend.req.type == p.CMD_READ and not self.structured:
            return pend.req.length
        return 0

    def _on_event(self, ev: p.ReplyEvent, data: bytes | bytearray | None) -> None:
        pend = self._pending.get(ev.cookie)
        assert pend is not None, f"reply for cookie {ev.cookie} that is not in flight"
        req, reply = pend.req, pend.reply
        if isinstance(ev, p.SimpleReply):
            assert not pend.reply.chunks, "simple reply after structured chunks"
            if self.structured:
                # section "Structured reply chunk message"
                assert req.type != p.CMD_READ, "simple reply to READ after STRUCTURED_REPLY"
                assert req.type != p.CMD_BLOCK_STATUS or ev.error, "BLOCK_STATUS needs a chunk"
            reply.simple = True
            reply.error = ev.error
            reply.data = data
            self._finish(ev.cookie)
            return
        assert self.structured, "structured reply chunk without STRUCTURED_REPLY"
        reply.chunks.append(ev)
        t, payload = ev.type, ev.payload
        if t in (p.REPLY_TYPE_OFFSET_DATA, p.REPLY_TYPE_OFFSET_HOLE):
            assert req.type == p.CMD_READ, f"content chunk for {p.CMD_NAMES.get(req.type)}"
            if t == p.REPLY_TYPE_OFFSET_DATA:
                assert len(payload) >= 9
                (off,) = p.U64.unpack_from(payload)
                body = payload[8:]
                n = len(body)
            else:
                assert len(payload) == 12, "OFFSET_HOLE length must be 12"
                (off,) = p.U64.unpack_from(payload)
                (n,) = p.U32.unpack_from(payload, 8)
                body = bytes(n)
            assert n > 0, "content chunk of zero bytes"
            assert req.offset <= off and off + n <= req.offset + req.length, "chunk outside request"
            for o, ln in pend.covered:
                assert off + n <= o or o + ln <= off, "content chunks overlap"
            pend.covered.append((off, n))
            pend.content_chunks += 1
            if pend.buf is None:
                pend.buf = bytearray(req.length)
            pend.buf[off - req.offset : off - req.offset + n] = body
        elif t == p.REPLY_TYPE_BLOCK_STATUS:
            assert req.type == p.CMD_BLOCK_STATUS
            assert reply.extents is None, "two BLOCK_STATUS chunks for one context"
            ctx, extents = p.parse_block_status_chunk(payload)
            assert ctx == self.context_id
            assert extents and all(e.length > 0 for e in extents)
            if req.flags & p.CMD_FLAG_REQ_ONE:
                assert len(extents) == 1 and extents[0].length <= req.length
            else:
                assert sum(e.length for e in extents[:-1]) < req.length
            reply.extents = extents
        elif t in (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET):
            err, msg, off = p.parse_error_chunk(ev)
            assert err != 0, "error chunk with error 0"
            if off is not None:
                assert req.offset <= off < req.offset + req.length
            reply.error = reply.error or err
            reply.message = msg
        elif t == p.REPLY_TYPE_NONE:
            assert ev.done and payload == b""
        else:
            raise AssertionError(f"unexpected chunk type {t}")
        if ev.done:
            self._finish(ev.cookie)

    def _finish(self, cookie: int) -> None:
        pend = self._pending.pop(cookie)
        reply, req = pend.reply, pend.req
        if not reply.simple and reply.error == 0:
            if req.type == p.CMD_READ:
                assert sum(n for _, n in pend.covered) == req.length, "READ not fully covered"
                if req.flags & p.CMD_FLAG_DF:
                    assert pend.content_chunks <= 1, "DF READ answered in fragments"
                reply.data = bytes(pend.buf or b"")
            elif req.type == p.CMD_BLOCK_STATUS:
                assert reply.extents is not None, "successful BLOCK_STATUS without extents"
        self._done[cookie] = reply


# =========================================================================== fixtures
def _content(size: int, seed: int) -> bytes:
    """Pages 0 and 1 of every 4 hold random data, pages 2 and 3 are holes."""
    rng = random.Random(seed)
    out = bytearray(size)
    for page in range(size // PAGE):
        if page % 4 < 2:
            out[page * PAGE : (page + 1) * PAGE] = rng.randbytes(PAGE)
    return bytes(out)


RW = _content(MIB, 1)  # never modified by any test: errors must leave it alone
BIG = 64 * MIB


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerThread]:
    s = ServerThread()
    try:
        s.start()
        s.add("rw", MemoryBackend(MIB), RW)
        s.add("ro", MemoryBackend(MIB), RW, read_only=True)
        s.add("robk", MemoryBackend(MIB, read_only=True), RW)
        s.add("big", MemoryBackend(BIG))
        nofz = MemoryBackend(MIB)
        nofz.can_fast_zero = False
        s.add("nofz", nofz, RW)
        yield s
    finally:
        s.stop()


def assert_alive(c: RawClient, content: bytes = RW) -> None:
    """The connection still works: a good READ returns the right bytes."""
    for off, n in ((0, PAGE), (len(content) - 64 * KIB, 64 * KIB)):
        r = c.read(off, n)
        assert r.error == 0, f"good READ failed with {r.error} {r.message}"
        assert r.data == content[off : off + n]


def _error_name(e: int) -> str:
    return p.ERROR_NAMES.get(e, str(e))


def expect_error(r: Reply, error: int) -> None:
    assert r.error == error, f"got {_error_name(r.error)} ({r.message!r}), want {_error_name(error)}"
    assert r.data is None or r.data == b"", "an errored reply carried data"


# =========================================================================== handshake facts
def test_go_reports_export_and_block_sizes(srv: ServerThread) -> None:
    with RawClient(srv.port, "rw") as c:
        assert c.size == MIB
        assert not c.flags & p.FLAG_READ_ONLY
        assert c.flags & p.FLAG_SEND_FLUSH and c.flags & p.FLAG_SEND_FUA
        assert c.flags & p.FLAG_SEND_TRIM and c.flags & p.FLAG_SEND_WRITE_ZEROES
        assert c.block_size == (1, PAGE, p.MAX_BLOCK)
    for ro in ("ro", "robk"):
        with RawClient(srv.port, ro) as c:
            assert c.flags & p.FLAG_READ_ONLY
            offered = c.flags & (p.FLAG_SEND_TRIM | p.FLAG_SEND_WRITE_ZEROES | p.FLAG_SEND_FUA)
            assert not offered, p.describe_flags(c.flags)


def test_go_unknown_export_is_an_error_reply(srv: ServerThread) -> None:
    with pytest.raises(OptionError) as e:
        RawClient(srv.port, "no-such-export")
    assert e.value.reply == p.REP_ERR_UNKNOWN


@pytest.mark.parametrize("export_name", [False, True], ids=["go", "export_name"])
def test_send_df_only_with_structured_replies(srv: ServerThread, export_name: bool) -> None:
    """Section "Transmission flags": NBD_FLAG_SEND_DF "MUST [be left] clear if
    structured replies have not been negotiated"."""
    with RawClient(srv.port, "rw", structured=True, export_name=export_name) as c:
        assert c.flags & p.FLAG_SEND_DF
    with RawClient(srv.port, "rw", export_name=export_name) as c:
        assert not c.flags & p.FLAG_SEND_DF, p.describe_flags(c.flags)


def test_export_name_with_zeroes(srv: ServerThread) -> None:
    with RawClient(srv.port, "rw", export_name=True, client_flags=p.FLAG_C_FIXED_NEWSTYLE) as c:
        assert c.size == MIB
        assert_alive(c)


@pytest.mark.parametrize("flags", [0, p.FLAG_C_NO_ZEROES], ids=["zeroes", "no-zeroes"])
def test_a_newstyle_client_that_is_not_fixed_is_served(srv: ServerThread, flags: int) -> None:
    """Regression (was a bug): a client without NBD_FLAG_C_FIXED_NEWSTYLE (which it SHOULD,
    not MUST, set: section "Client flags"; libnbd with set_handshake_flags(0), older
    clients) was dropped at its flags, where nbdkit and qemu-nbd serve it: its
    NBD_OPT_EXPORT_NAME, the one option of plain newstyle, now goes to transmission."""
    with RawClient(srv.port, "rw", export_name=True, client_flags=flags) as c:
        assert c.size == MIB
        assert_alive(c)


def test_requests_pipelined_behind_go(srv: ServerThread) -> None:
    """Requests in the same packet as the GO are the transmission phase's first
    bytes: the server must not lose them (ServerHandshake.leftover)."""
    name = srv.fresh(content=RW)
    write = p.Request(0, p.CMD_WRITE, 2, 0, 5).header() + b"hello"
    stream = (
        p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)
        + p.build_option(p.OPT_GO, p.build_info_request(name))
        + p.Request(0, p.CMD_READ, 1, PAGE, PAGE).header()
        + write
        + p.Request(0, p.CMD_READ, 3, 0, 8).header()
        + p.Request(0, p.CMD_DISC, 4, 0, 0).header()
    )
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as sock:
        sock.sendall(stream)
        got = bytearray()
        while chunk := sock.recv(65536):
            got += chunk
    assert got[:18] == GREETING
    rest = bytes(got[18:])
    while (r := p.parse_option_reply(rest)) is not None and r[0].type != p.REP_ACK:
        rest = rest[r[1] :]
    assert r is not None and r[0].type == p.REP_ACK, "GO did not succeed"
    rest = rest[r[1] :]
    dec = p.ReplyDecoder(lambda cookie: {1: PAGE, 3: 8}.get(cookie, 0))
    dec.receive_data(rest)
    events = []
    while (ev := dec.next_event()) is not None:
        events.append(ev)
    assert events == [
        (p.SimpleReply(1, 0), RW[PAGE : 2 * PAGE]),
        (p.SimpleReply(2, 0), None),
        (p.SimpleReply(3, 0), b"hello" + RW[5:8]),
    ]


def test_handshake_timeout_closes_idle_client(srv: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nbd_server, "HANDSHAKE_TIMEOUT", 0.3)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as idle:
        t0 = time.monotonic()
        assert idle.recv(18) == GREETING
        with RawClient(srv.port, "rw") as busy:  # the timer ends with the handshake
            assert idle.recv(1) == b"", "idle client still connected"
            assert time.monotonic() - t0 < TIMEOUT - 1
            time.sleep(0.5)
            assert_alive(busy)


def test_handshake_timeout_spares_a_client_that_keeps_negotiating(
    srv: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``nbdinfo --list`` asks about each export in turn on one connection (with libnbd
    1.14 ~0.2 s an export): against an array of 300 LUNs it was cut off by the
    handshake timeout (30 s from connect) and failed. Now the clock restarts at each
    option answered, so only a client that stops negotiating is dropped."""
    monkeypatch.setattr(nbd_server, "HANDSHAKE_TIMEOUT", 0.3)
    name = srv.fresh()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as s:
        f = s.makefile("rb")
        assert f.read(18) == GREETING
        s.sendall((p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES).to_bytes(4, "big"))

        def option(opt: int, data: bytes = b"") -> list[p.OptionReply]:
            s.sendall(p.build_option(opt, data))
            replies = []
            while True:
                head = f.read(20)
                assert len(head) == 20, "the server closed the negotiating client"
                buf = head + f.read(int.from_bytes(head[16:], "big"))
                r = p.parse_option_reply(buf)
                assert r is not None
                replies.append(r[0])
                if r[0].type == p.REP_ACK or r[0].is_error:
                    return replies

        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.2:  # four timeouts' worth, one option at a time
            assert any(r.type == p.REP_SERVER for r in option(p.OPT_LIST))
            time.sleep(0.1)
        assert option(p.OPT_GO, p.build_info_request(name))[-1].type == p.REP_ACK
        s.sendall(p.Request(0, p.CMD_READ, 7, 0, 512).header())
        reply = f.read(16 + 512)
        assert reply[:16] == p.build_simple_reply(7) and len(reply) == 528


def _add_many_exports(s: ServerThread, n: int) -> None:
    """``n`` exports with names of ~100 bytes: a LIST brings ~35 KiB of replies per 300."""

    async def add() -> None:
        for i in range(n):
            s.server.add_export(f"volume-{i:04d}-" + "x" * 80, MemoryBackend(MIB))

    s.call(add())


def test_a_client_that_does_not_read_option_replies_holds_back_its_own_options() -> None:
    """16 bytes of NBD_OPT_LIST bring a reply per export. The server answered every
    option it received at once, so a client that pipelined LISTs and never read made
    it queue their replies without bound (with 3000 LUNs, ~0.5 MB held per 16 bytes
    sent; 8 MB per connection here). Now options wait unanswered while OUTPUT_BUDGET
    bytes of replies do, and are answered as the client takes them."""
    exports, lists = 300, 300
    s = ServerThread()
    try:
        s.start()
        _add_many_exports(s, exports)

        async def queued() -> int:
            return sum(c.transport.get_write_buffer_size() for c in s.server.connections if c.transport)

        with socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT) as sock:
            f = sock.makefile("rb")
            assert f.read(18) == GREETING
            sock.sendall(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE) + p.build_option(p.OPT_LIST) * lists)
            time.sleep(1.0)
            assert s.call(queued()) < MIB, "the server queues replies nobody reads"
            servers = acks = 0
            while acks < lists:
                head = f.read(20)
                assert len(head) == 20
                _, opt, rep, length = p.OPTION_REPLY_HEADER.unpack(head)
                f.read(length)
                assert opt == p.OPT_LIST
                servers += rep == p.REP_SERVER
                acks += rep == p.REP_ACK
            assert servers == exports * lists
            sock.sendall(p.build_option(p.OPT_EXPORT_NAME, b"volume-0000-" + b"x" * 80))
            size, _ = p.EXPORT_NAME_REPLY.unpack(f.read(10))
            assert size == MIB and f.read(124) == bytes(124)
    finally:
        s.stop()


def test_handshake_timeout_drops_a_client_that_does_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handshake timeout closed the connection, and a close waits until the client
    has taken the replies queued for it: a client that sent options and stopped
    reading kept its connection (and what was queued) after the timeout, forever."""
    monkeypatch.setattr(nbd_server, "HANDSHAKE_TIMEOUT", 0.3)
    s = ServerThread()
    try:
        s.start()
        _add_many_exports(s, 300)

        async def connections() -> int:
            return len(s.server.connections)

        with socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT) as sock:
            sock.sendall(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE) + p.build_option(p.OPT_LIST) * 300)
            deadline = time.monotonic() + TIMEOUT
            while s.call(connections()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s.call(connections()) == 0, "the timed-out client is still connected"
    finally:
        s.stop()


# =========================================================================== out of range
OUT_OF_RANGE = [
    ("read-tail", p.CMD_READ, MIB - 100, 200, p.EINVAL),
    ("read-at-end", p.CMD_READ, MIB, 1, p.EINVAL),
    ("read-u64-wrap", p.CMD_READ, U64_MAX, 2, p.EINVAL),
    ("write-tail", p.CMD_WRITE, MIB - 10, 20, p.ENOSPC),
    ("write-at-end", p.CMD_WRITE, MIB, 1, p.ENOSPC),
    ("write-far", p.CMD_WRITE, 2**62, 512, p.ENOSPC),
    ("zeroes-tail", p.CMD_WRITE_ZEROES, MIB - PAGE, 2 * PAGE, p.ENOSPC),
    ("zeroes-u64-wrap", p.CMD_WRITE_ZEROES, U64_MAX, 1, p.ENOSPC),
    ("trim-tail", p.CMD_TRIM, MIB - 1, 2, p.EINVAL),
    ("trim-far", p.CMD_TRIM, U64_MAX - 511, 1024, p.EINVAL),
    ("cache-at-end", p.CMD_CACHE, MIB, PAGE, p.EINVAL),
]


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize(
    ("type_", "offset", "length", "error"),
    [case[1:] for case in OUT_OF_RANGE],
    ids=[case[0] for case in OUT_OF_RANGE],
)
def test_out_of_range(
    srv: ServerThread, structured: bool, type_: int, offset: int, length: int, error: int
) -> None:
    """Section "Error values": ENOSPC for writes beyond the end, EINVAL for
    reads and trims; WRITE_ZEROES like WRITE (section "NBD_CMD_WRITE_ZEROES")."""
    with RawClient(srv.port, "rw", structured=structured) as c:
        data = bytes([0xAA]) * length if type_ == p.CMD_WRITE else None
        r = c.request(type_, offset, length, data=data)
        expect_error(r, error)
        if structured and type_ == p.CMD_READ:
            assert [ch.type for ch in r.chunks] == [p.REPLY_TYPE_ERROR]
        assert_alive(c)  # and nothing was written: the tail still reads as before


def test_block_status_out_of_range(srv: ServerThread) -> None:
    with RawClient(srv.port, "rw", structured=True, meta="rw") as c:
        for off, n in ((MIB - PAGE, 2 * PAGE), (MIB, 1), (U64_MAX, 1)):
            r = c.request(p.CMD_BLOCK_STATUS, off, n)
            expect_error(r, p.EINVAL)
            assert [ch.type for ch in r.chunks] == [p.REPLY_TYPE_ERROR]
        assert_alive(c)


ZERO_LENGTH = [p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES, p.CMD_CACHE, p.CMD_BLOCK_STATUS]


@pytest.mark.parametrize("type_", ZERO_LENGTH, ids=[p.CMD_NAMES[t] for t in ZERO_LENGTH])
def test_zero_length_is_invalid(srv: ServerThread, type_: int) -> None:
    with RawClient(srv.port, "rw", structured=True, meta="rw") as c:
        expect_error(c.request(type_, 4096, 0, data=b"" if type_ == p.CMD_WRITE else None), p.EINVAL)
        assert_alive(c)


def test_zero_length_read_simple(srv: ServerThread) -> None:
    with RawClient(srv.port, "rw") as c:
        expect_error(c.read(0, 0), p.EINVAL)
        assert_alive(c)


# =========================================================================== read-only
@pytest.mark.parametrize("export", ["ro", "robk"])
@pytest.mark.parametrize(
    ("type_", "flags"),
    [
        (p.CMD_WRITE, 0),
        (p.CMD_TRIM, 0),
        (p.CMD_WRITE_ZEROES, 0),
        (p.CMD_WRITE_ZEROES, p.CMD_FLAG_NO_HOLE),
    ],
    ids=["write", "trim", "zeroes", "zeroes-nohole"],
)
def test_read_only_export_refuses_writes(srv: ServerThread, export: str, type_: int, flags: int) -> None:
    with RawClient(srv.port, export) as c:
        data = b"\x55" * PAGE if type_ == p.CMD_WRITE else None
        expect_error(c.request(type_, 0, PAGE, flags, data), p.EPERM)
        assert_alive(c)  # page 0 still holds its data


def test_read_only_export_serves_reads_and_flush(srv: ServerThread) -> None:
    with RawClient(srv.port, "ro", structured=True) as c:
        r = c.read(0, MIB)
        assert r.error == 0 and r.data == RW
        assert c.request(p.CMD_FLUSH).error == 0


# =========================================================================== commands and flags
@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize("type_", [8, 9, 0x100, 0xFFFF])
def test_unknown_command(srv: ServerThread, structured: bool, type_: int) -> None:
    with RawClient(srv.port, "rw", structured=structured) as c:
        expect_error(c.request(type_, 0, PAGE), p.EINVAL)
        assert_alive(c)


BAD_FLAGS = [
    ("read-bit5", p.CMD_READ, 1 << 5),
    ("read-bit15", p.CMD_READ, 0x8000),
    ("read-nohole", p.CMD_READ, p.CMD_FLAG_NO_HOLE),
    ("read-reqone", p.CMD_READ, p.CMD_FLAG_REQ_ONE),
    ("write-nohole", p.CMD_WRITE, p.CMD_FLAG_NO_HOLE),
    ("write-df", p.CMD_WRITE, p.CMD_FLAG_DF),
    ("write-fastzero", p.CMD_WRITE, p.CMD_FLAG_FAST_ZERO),
    ("trim-reqone", p.CMD_TRIM, p.CMD_FLAG_REQ_ONE),
    ("zeroes-df", p.CMD_WRITE_ZEROES, p.CMD_FLAG_DF),
    ("zeroes-bit7", p.CMD_WRITE_ZEROES, 1 << 7),
    ("cache-nohole", p.CMD_CACHE, p.CMD_FLAG_NO_HOLE),
    ("flush-reqone", p.CMD_FLUSH, p.CMD_FLAG_REQ_ONE),
    ("status-df", p.CMD_BLOCK_STATUS, p.CMD_FLAG_DF),
    ("status-nohole", p.CMD_BLOCK_STATUS, p.CMD_FLAG_NO_HOLE),
]


@pytest.mark.parametrize(("type_", "flags"), [b[1:] for b in BAD_FLAGS], ids=[b[0] for b in BAD_FLAGS])
def test_flags_not_documented_for_the_command(srv: ServerThread, type_: int, flags: int) -> None:
    """Section "Error values": EINVAL for an unknown flag or one not documented
    as applicable to the request."""
    with RawClient(srv.port, "rw", structured=True, meta="rw") as c:
        offset, length = (0, 0) if type_ == p.CMD_FLUSH else (0, PAGE)
        data = b"\x66" * PAGE if type_ == p.CMD_WRITE else None
        r = c.request(type_, offset, length, flags, data)
        expect_error(r, p.EINVAL)
        if type_ == p.CMD_READ:
            # "MUST NOT use a simple reply for NBD_CMD_READ (even for the case
            # of an early NBD_EINVAL due to bad flags)"
            assert not r.simple and [ch.type for ch in r.chunks] == [p.REPLY_TYPE_ERROR]
        assert_alive(c)


def test_fast_zero_not_offered_is_invalid(srv: ServerThread) -> None:
    with RawClient(srv.port, "nofz") as c:
        assert c.flags & p.FLAG_SEND_WRITE_ZEROES and not c.flags & p.FLAG_SEND_FAST_ZERO
        expect_error(c.request(p.CMD_WRITE_ZEROES, 0, PAGE, p.CMD_FLAG_FAST_ZERO), p.EINVAL)
        assert_alive(c)  # page 0 was not zeroed


def test_fast_zero_offered_zeroes(srv: ServerThread) -> None:
    name = srv.fresh(content=RW)
    with RawClient(srv.port, name) as c:
        assert c.flags & p.FLAG_SEND_FAST_ZERO
        r = c.request(p.CMD_WRITE_ZEROES, 100, 3 * PAGE, p.CMD_FLAG_FAST_ZERO)
        # ENOTSUP is the only other answer the spec allows for a fast zero
        assert r.error in (0, p.ENOTSUP)
        expected = RW if r.error else RW[:100] + bytes(3 * PAGE) + RW[100 + 3 * PAGE :]
        assert c.read(0, MIB).data == expected


FUA_ELSEWHERE = [p.CMD_READ, p.CMD_FLUSH, p.CMD_CACHE, p.CMD_BLOCK_STATUS]


@pytest.mark.parametrize("type_", FUA_ELSEWHERE, ids=[p.CMD_NAMES[t] for t in FUA_ELSEWHERE])
def test_fua_accepted_on_every_command_when_offered(srv: ServerThread, type_: int) -> None:
    """Section "Command flags": NBD_CMD_FLAG_FUA "is valid for all commands,
    provided NBD_FLAG_SEND_FUA has been negotiated, in which case the server
    MUST accept all commands with this bit set (even by ignoring the bit)"."""
    with RawClient(srv.port, "rw", structured=True, meta="rw") as c:
        assert c.flags & p.FLAG_SEND_FUA
        offset, length = (0, 0) if type_ == p.CMD_FLUSH else (0, PAGE)
        r = c.request(type_, offset, length, p.CMD_FLAG_FUA)
        assert r.error == 0, f"{p.CMD_NAMES[type_]}+FUA refused: {_error_name(r.error)} {r.message!r}"
        if type_ == p.CMD_READ:
            assert r.data == RW[:PAGE]
        assert_alive(c)


def test_fua_write_trim_zeroes_succeed(srv: ServerThread) -> None:
    name = srv.fresh()
    with RawClient(srv.port, name) as c:
        assert c.write(0, b"x" * PAGE, p.CMD_FLAG_FUA).error == 0
        assert c.request(p.CMD_TRIM, PAGE, PAGE, p.CMD_FLAG_FUA).error == 0
        assert c.request(p.CMD_WRITE_ZEROES, 0, 10, p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE).error == 0
        assert c.read(0, 2 * PAGE).data == bytes(10) + b"x" * (PAGE - 10) + bytes(PAGE)


@pytest.mark.parametrize("flags", [p.CMD_FLAG_FUA, 1 << 5], ids=["fua", "unknown-bit"])
def test_disc_with_flags_still_disconnects_without_reply(srv: ServerThread, flags: int) -> None:
    """Section "NBD_CMD_DISC": "There is no reply to an NBD_CMD_DISC"; FUA is
    valid on every command when offered (section "Command flags"). qemu-nbd
    and nbdkit close on any DISC without looking at its flags."""
    with RawClient(srv.port, "rw") as c:
        assert c.flags & p.FLAG_SEND_FUA
        cookie, read = c.frame(p.CMD_READ, 0, PAGE)
        disc = p.Request(flags, p.CMD_DISC, 77, 0, 0).header()
        c.send_raw(read + disc)
        c.sock.settimeout(2.0)  # the connection must end; do not wait long if it does not
        data, closed = b"", False
        try:
            while chunk := c.sock.recv(65536):
                data += chunk
            closed = True
        except TimeoutError:
            pass
        replies = [p.SIMPLE_REPLY.unpack_from(data, 0)[1:]]  # (error, cookie) of the READ
        rest = data[p.SIMPLE_REPLY.size + PAGE :]
        while rest:
            replies.append(p.SIMPLE_REPLY.unpack_from(rest)[1:])
            rest = rest[p.SIMPLE_REPLY.size :]
        assert replies == [(0, cookie)] and closed, (
            f"DISC with flags 0x{flags:x}: replies (error, cookie) {replies}, "
            f"connection {'closed' if closed else 'still open after 2 s'}"
        )


def test_flush_with_offset_or_length_is_invalid(srv: ServerThread) -> None:
    with RawClient(srv.port, "rw") as c:
        expect_error(c.request(p.CMD_FLUSH, 0, PAGE), p.EINVAL)
        expect_error(c.request(p.CMD_FLUSH, PAGE, 0), p.EINVAL)
        assert c.request(p.CMD_FLUSH).error == 0
        assert_alive(c)


def test_df_without_structured_replies_is_invalid(srv: ServerThread) -> None:
    with RawClient(srv.port, "rw") as c:
        r = c.read(0, PAGE, p.CMD_FLAG_DF)
        expect_error(r, p.EINVAL)
        assert r.simple and r.data is None  # no payload follows an errored simple reply
        assert_alive(c)


def test_df_read_is_one_data_chunk(srv: ServerThread) -> None:
    """Section "NBD_CMD_READ": with DF at most one content chunk; a range with
    holes in it is sent as OFFSET_DATA with the zeroes present."""
    with RawClient(srv.port, "rw", structured=True) as c:
        r = c.read(PAGE, 256 * KIB, p.CMD_FLAG_DF)
        assert r.error == 0
        assert [ch.type for ch in r.chunks] == [p.REPLY_TYPE_OFFSET_DATA]
        assert r.data == RW[PAGE : PAGE + 256 * KIB]


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_read_larger_than_32_mib_is_invalid(srv: ServerThread, structured: bool) -> None:
    """Section "Block size constraints": EINVAL beyond the advertised maximum."""
    with RawClient(srv.port, "big", structured=structured) as c:
        assert c.size == BIG and c.block_size is not None and c.block_size[2] == p.MAX_BLOCK
        expect_error(c.read(0, p.MAX_BLOCK + 1), p.EINVAL)
        expect_error(c.read(MIB, 0xFFFFFFFF), p.EINVAL)
        r = c.read(BIG - PAGE, PAGE)
        assert r.error == 0 and r.data == bytes(PAGE)


def test_read_of_exactly_32_mib(srv: ServerThread) -> None:
    with RawClient(srv.port, "big", structured=True) as c:
        r = c.read(PAGE, p.MAX_BLOCK)
        assert r.error == 0 and r.data == bytes(p.MAX_BLOCK)
        assert p.REPLY_TYPE_OFFSET_HOLE in [ch.type for ch in r.chunks]  # all of it is a hole


# =========================================================================== block status
@pytest.mark.parametrize(
    ("structured", "meta"),
    [(False, None), (True, None), (True, "ro")],
    ids=["simple", "no-context", "context-for-other-export"],
)
def test_block_status_without_context_is_invalid(
    srv: ServerThread, structured: bool, meta: str | None
) -> None:
    """Section "Metadata querying": servers SHOULD reply EINVAL to BLOCK_STATUS
    without a context selected for the export in use."""
    with RawClient(srv.port, "rw", structured=structured, meta=meta) as c:
        if meta is not None:
            assert c.context_id is not None  # selected, but for another export
        expect_error(c.request(p.CMD_BLOCK_STATUS, 0, PAGE), p.EINVAL)
        assert_alive(c)


def test_block_status_reports_holes(srv: ServerThread) -> None:
    with RawClient(srv.port, "rw", structured=True, meta="rw") as c:
        r = c.request(p.CMD_BLOCK_STATUS, 0, 16 * PAGE)
        assert r.error == 0 and r.extents is not None
        pos = 0
        for e in r.extents:
            if e.flags & p.STATE_ZERO:
                assert RW[pos : pos + e.length] == bytes(e.length), f"non-zero bytes at {pos}"
            pos += e.length
        assert r.extents[:2] == [
            p.Extent(2 * PAGE, 0),
            p.Extent(2 * PAGE, p.STATE_HOLE | p.STATE_ZERO),
        ]
        one = c.request(p.CMD_BLOCK_STATUS, 100, 16 * PAGE, p.CMD_FLAG_REQ_ONE)
        assert one.extents == [p.Extent(2 * PAGE - 100, 0)]


class _OneRun(MemoryBackend):
    """All of it one run of data, whatever range is asked (as a remote source may say)."""

    async def extents(self, offset: int, length: int) -> list[p.Extent]:
        return [p.Extent(length, 0)]


@pytest.mark.parametrize("length", [0xFFFF_F001, 0xFFFF_FFFF])
def test_req_one_over_one_run_longer_than_4g_minus_4k_is_one_extent(srv: ServerThread, length: int) -> None:
    """Regression (was a bug): the server cut extents at 0xFFFFF000 bytes, so a REQ_ONE ask
    of more than that over one run got two descriptors, where section "NBD_CMD_BLOCK_STATUS"
    allows exactly one (the RawClient checks it)."""
    name = srv.add(f"onerun{length}", _OneRun(5 << 30))
    with RawClient(srv.port, name, structured=True, meta=name) as c:
        one = c.request(p.CMD_BLOCK_STATUS, 0, length, p.CMD_FLAG_REQ_ONE)
        assert one.error == 0 and one.extents is not None and len(one.extents) == 1, one
        assert 0 < one.extents[0].length <= length and one.extents[0].flags == 0
        every = c.request(p.CMD_BLOCK_STATUS, 0, length)  # without REQ_ONE: the whole range
        assert every.extents is not None and sum(e.length for e in every.extents) == length
        assert_alive(c, bytes(MIB))


# =========================================================================== structured errors
def test_structured_read_error_is_an_error_chunk(srv: ServerThread) -> None:
    with RawClient(srv.port, "rw", structured=True) as c:
        r = c.read(MIB - PAGE, 2 * PAGE)
        assert not r.simple
        assert len(r.chunks) == 1
        (ch,) = r.chunks
        assert (ch.type, ch.done) == (p.REPLY_TYPE_ERROR, True)
        err, msg, off = p.parse_error_chunk(ch)
        assert (err, off) == (p.EINVAL, None)
        assert msg, "an error chunk should say what went wrong"
        assert_alive(c)


# =========================================================================== pipelining
@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_pipelined_replies_all_arrive_matched_by_cookie(srv: ServerThread, structured: bool) -> None:
    name = srv.fresh()
    rng = random.Random(3)
    model = bytearray(MIB)
    with RawClient(srv.port, name, structured=structured) as c:
        frames = []
        expected: dict[int, int] = {}
        used: set[int] = set()
        for i in range(120):
            cookie = rng.getrandbits(64)
            while cookie in used:
                cookie = rng.getrandbits(64)
            used.add(cookie)
            kind = i % 3
            if kind == 0:  # a write to a block of its own
                off = (i // 3) * 8 * KIB + rng.randrange(100)
                data = rng.randbytes(rng.randrange(1, 6000))
                model[off : off + len(data)] = data
                _, f = c.frame(p.CMD_WRITE, off, len(data), 0, data, cookie)
                expected[cookie] = 0
            elif kind == 1:  # out of range: fails without disturbing the rest
                _, f = c.frame(p.CMD_READ, MIB - 10, 20, cookie=cookie)
                expected[cookie] = p.EINVAL
            else:
                _, f = c.frame(p.CMD_FLUSH, cookie=cookie)
                expected[cookie] = 0
            frames.append(f)
        assert len(c.pending) == 120  # all in flight at once
        c.send_raw(b"".join(frames))
        replies = c.wait_all()
        assert {k: r.error for k, r in replies.items()} == expected

        reads = {c.submit(p.CMD_READ, off, 8 * KIB): off for off in range(0, 40 * 8 * KIB, 8 * KIB)}
        got = c.wait_all()
        assert set(got) == set(reads)
        for cookie, off in reads.items():
            assert got[cookie].data == bytes(model[off : off + 8 * KIB])


def test_malformed_frame_after_pipelined_requests(srv: ServerThread) -> None:
    """Requests before a bad frame are answered; then only that connection ends."""
    with RawClient(srv.port, "rw") as a, RawClient(srv.port, "rw") as b:
        cookies = []
        frames = []
        for off in (0, PAGE, 8 * PAGE):
            cookie, f = a.frame(p.CMD_READ, off, PAGE)
            cookies.append(cookie)
            frames.append(f)
        bad = p.REQUEST.pack(0x25609514, 0, p.CMD_READ, 99, 0, PAGE)  # wrong magic
        a.send_raw(b"".join(frames) + bad)
        replies = a.wait_eof()
        assert sorted(replies) == sorted(cookies)
        for cookie, off in zip(cookies, (0, PAGE, 8 * PAGE), strict=True):
            assert replies[cookie].data == RW[off : off + PAGE]
        assert_alive(b)
    with RawClient(srv.port, "rw") as c:
        assert_alive(c)


def test_absurd_write_length_ends_the_connection(srv: ServerThread) -> None:
    name = srv.fresh(content=RW)
    with RawClient(srv.port, name) as c:
        cookie, f = c.frame(p.CMD_READ, 0, PAGE)
        c.send_raw(f + p.Request(0, p.CMD_WRITE, 7, 0, p.MAX_BLOCK + 1).header())
        replies = c.wait_eof()
        assert list(replies) == [cookie]  # no reply to the WRITE: the connection is gone
    with RawClient(srv.port, name) as c:
        assert c.read(0, MIB).data == RW


def test_truncated_write_is_never_applied(srv: ServerThread) -> None:
    name = srv.fresh(content=RW)
    with RawClient(srv.port, name) as c:
        assert c.write(0, b"\x11" * PAGE).error == 0
        header = p.Request(0, p.CMD_WRITE, 8, PAGE, 64 * KIB).header()
        c.send_raw(header + b"\x22" * (32 * KIB))  # half of the payload, then EOF
        c.sock.shutdown(socket.SHUT_WR)
        assert c.wait_eof() == {}
    with RawClient(srv.port, name) as c:
        assert c.read(0, MIB).data == b"\x11" * PAGE + RW[PAGE:]


def test_sparse_read_sends_holes(srv: ServerThread) -> None:
    model = bytearray(MIB)
    rng = random.Random(5)
    for off, n in ((0, PAGE), (64 * KIB, PAGE + 100), (200 * KIB, 100 * KIB), (700 * KIB, 10)):
        model[off : off + n] = rng.randbytes(n)
    name = srv.fresh(content=model)
    with RawClient(srv.port, name, structured=True) as c:
        for off, n in ((0, 512 * KIB), (1000, 100 * KIB), (512 * KIB, 512 * KIB), (0, 64 * KIB)):
            r = c.read(off, n)
            assert r.error == 0
            assert r.data == bytes(model[off : off + n])
            types = [ch.type for ch in r.chunks]
            assert p.REPLY_TYPE_OFFSET_HOLE in types, types
            assert [ch.done for ch in r.chunks] == [False] * (len(types) - 1) + [True]
            for ch in r.chunks:
                if ch.type == p.REPLY_TYPE_OFFSET_HOLE:
                    (hoff,) = p.U64.unpack_from(ch.payload)
                    (hlen,) = p.U32.unpack_from(ch.payload, 8)
                    assert model[hoff : hoff + hlen] == bytes(hlen)
        # below the sparse threshold: one data chunk, zeroes and all
        r = c.read(60 * KIB, 8 * KIB)
        assert [ch.type for ch in r.chunks] == [p.REPLY_TYPE_OFFSET_DATA]
        assert r.data == bytes(model[60 * KIB : 68 * KIB])


class CountedReads(MemoryBackend):
    """A MemoryBackend that counts the reads it was asked for; with ``wait``, each one
    waits a turn of the loop (the server then runs it in a Task, as a remote LUN's)."""

    def __init__(self, size: int, wait: bool) -> None:
        super().__init__(size)
        self.wait = wait
        self.reads = 0

    async def read_into(self, offset: int, buf: memoryview) -> None:
        self.reads += 1
        if self.wait:
            await asyncio.sleep(0)
        await super().read_into(offset, buf)


@pytest.mark.parametrize("wait", [False, True], ids=["at-once", "waiting"])
def test_a_host_that_does_not_read_its_replies_holds_back_its_own_requests(
    srv: ServerThread, wait: bool
) -> None:
    """Regression (was a bug): every request of one receive was answered before the replies
    went out, whatever they held, and up to 256 that waited on their Backend were taken: 40
    pipelined READs of 32 MiB (1120 bytes of requests) from a host that reads no reply took
    serve-file to 1.3 GiB, a thousand to 2.3 GiB (32 GiB for reads answered at once), the
    array's every LUN and host with it. Now the server takes no more of a host's requests
    once its replies back up (pause_writing) or 128 MiB of big requests wait on the Backend,
    and goes on with those left in its buffer once they drain; every reply then arrives."""
    backend = CountedReads(2 * 32 * MIB, wait)
    name = srv.add(f"slowreader-{wait}", backend)
    n, length = 16, 32 * MIB
    with RawClient(srv.port, name) as c:
        c.send_raw(b"".join(c.frame(p.CMD_READ, (i % 2) * length, length)[1] for i in range(n)))
        deadline, seen, since = time.monotonic() + 10, -1, time.monotonic()
        while backend.reads < n and time.monotonic() < deadline:  # until the server stops
            if backend.reads != seen:
                seen, since = backend.reads, time.monotonic()
            elif time.monotonic() - since > 0.5:
                break
            time.sleep(0.01)
        assert backend.reads <= 5, f"{backend.reads} replies of 32 MiB made for a host that reads none"
        replies = c.wait_all()
        assert len(replies) == n and all(r.error == 0 and r.data == bytes(length) for r in replies.values())
        assert backend.reads == n
        assert_alive(c, bytes(MIB))


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_disc_after_pipelined_writes_gets_every_reply(srv: ServerThread, structured: bool) -> None:
    """Section "NBD_CMD_DISC": the server MUST handle all outstanding requests
    before it closes; DISC itself has no reply."""
    name = srv.fresh()
    model = bytearray(MIB)
    rng = random.Random(11)
    with RawClient(srv.port, name, structured=structured) as c:
        frames, cookies = [], []
        for i in range(100):
            data = rng.randbytes(PAGE + 17)
            off = i * 10 * KIB
            model[off : off + len(data)] = data
            cookie, f = c.frame(p.CMD_WRITE, off, len(data), p.CMD_FLAG_FUA if i % 2 else 0, data)
            frames.append(f)
            cookies.append(cookie)
        frames.append(c.frame(p.CMD_DISC)[1])
        c.send_raw(b"".join(frames))
        replies = c.wait_eof()
        assert sorted(replies) == sorted(cookies)
        assert all(r.error == 0 for r in replies.values())
        assert c.pending == []
    with RawClient(srv.port, name) as c:
        assert c.read(0, MIB).data == bytes(model)


def test_server_still_serves_after_errors(srv: ServerThread) -> None:
    """A summary of the above on one connection, every error followed by a read."""
    with RawClient(srv.port, "rw", structured=True, meta="rw") as c:
        for type_, off, n, flags, err in [
            (p.CMD_READ, MIB, 1, 0, p.EINVAL),
            (99, 0, 1, 0, p.EINVAL),
            (p.CMD_TRIM, 0, PAGE, 1 << 9, p.EINVAL),
            (p.CMD_WRITE_ZEROES, MIB, PAGE, 0, p.ENOSPC),
            (p.CMD_BLOCK_STATUS, 0, 0, 0, p.EINVAL),
        ]:
            expect_error(c.request(type_, off, n, flags), err)
            assert_alive(c)


class HeldRead(MemoryBackend):
    """Reads wait for ``release`` (set from the test)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.release = asyncio.Event()
        self.waiting = 0

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        self.waiting += 1
        await self.release.wait()
        return await super().read(offset, length)


def test_a_reply_queued_as_its_host_resets_is_dropped_quietly() -> None:
    """Regression (was a bug): a reply queued to go out at the end of a loop turn
    (_flush_soon) whose connection was reset (RST) in that turn went to uvloop's closed
    transport: "RuntimeError: unable to perform operation on <TCPTransport closed=True>
    ... the handler is closed", a traceback in the array's log for every host that
    resets with replies pending. Nobody is left to answer: the reply is dropped."""
    from emulator.nbd.client import NbdClient
    from emulator.nbd.errors import DisconnectedError

    loop = serve_forever_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, ctx: errors.append(ctx))

    async def main() -> None:
        server = NbdServer()
        backend = HeldRead(MIB)
        server.add_export("held", backend)
        host, port = await server.listen_tcp("127.0.0.1", 0)
        try:
            client = await NbdClient.connect(f"nbd://{host}:{port}/held", timeout=TIMEOUT)
            read = asyncio.ensure_future(client.read(0, PAGE))
            while not backend.waiting:
                await asyncio.sleep(0.001)
            (conn,) = server.connections
            assert conn.transport is not None
            # The read ends and, in the same turn, the host's RST is seen: the read's
            # reply is queued behind connection_lost, for a transport closed by then.
            backend.release.set()
            conn.transport.abort()
            with pytest.raises(DisconnectedError):  # the client sees its connection go
                await asyncio.wait_for(read, TIMEOUT)
            await client.close()
            for _ in range(5):
                await asyncio.sleep(0)
        finally:
            await server.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert not errors, f"the loop logged: {errors[0].get('exception')!r}"
