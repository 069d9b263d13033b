"""asyncio NBD client: negotiate GO, structured replies and base:allocation,
then pipeline requests (many in flight, completed out of order).

    async with await NbdClient.connect("nbd://127.0.0.1:10809/vol") as c:
        data = await c.read(0, 4096)
        await c.write(4096, data, fua=True)
        for e in await c.extents(0, c.size): ...

Failed requests raise :class:`RequestError` carrying the NBD error; a broken
connection fails every pending request with :class:`DisconnectedError`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

from . import protocol as p
from .backend import Done
from .errors import DisconnectedError, OptionError, ProtocolError, RequestError

log = logging.getLogger("blockmig.nbd.client")

DEFAULT_PORT = 10809
#: requests queued on the transport beyond this wait for it to drain
WRITE_BUFFER_MAX = 4 << 20
_ERROR_CHUNK = 1 << 15  # the bit of every error chunk type
#: replies to one option before its final one (ACK or an error) that the client takes:
#: GO brings ~4 (INFO_EXPORT and the three infos asked), SET_META_CONTEXT one a context
#: asked for; the spec sets no number (a server "MAY send" NBD_REP_INFO replies), so
#: one that never stops would keep the client reading until the connect timeout
MAX_OPTION_REPLIES = 64
#: exports list_exports takes, and bytes of their names and descriptions: libnbd stopped
#: at 10000 names when it kept them (before nbd_opt_list handed them to a callback)
MAX_EXPORTS = 10_000
MAX_LIST_BYTES = 8 << 20
#: extents kept of one BLOCK_STATUS answer (the rest is asked again): a 4 GiB ask of
#: 4 KiB runs could bring 1M, 100+ MB of objects; this many cover 512 MiB at 4 KiB
MAX_EXTENTS = 1 << 17


def without_user(uri: str, mask: str = "") -> str:
    """``uri`` with its ``user@`` part (a password too, if any) replaced by ``mask``."""
    netloc = urllib.parse.urlsplit(uri).netloc
    if "@" not in netloc:
        return uri
    return uri.replace(netloc, mask + netloc.rpartition("@")[2], 1)  # the first: the authority


@dataclass(slots=True, frozen=True)
class Address:
    """Where an NBD server is: TCP host/port or a unix socket, plus export name."""

    export: str = ""
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    socket: str | None = None

    @classmethod
    def parse(cls, uri: str) -> Address:
        """Parse ``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``."""
        try:
            u = urllib.parse.urlsplit(uri)
        except ValueError as e:  # e.g. an unclosed [ of an IPv6 address
            raise ValueError(f"{uri!r}: {e}") from None
        if "@" in u.netloc:
            # The NBD URI spec's user@ is a TLS username, which we cannot use; a password
            # there would be stored with the migration and shown back: refuse it unread.
            shown = without_user(uri, "***@")
            raise ValueError(f"{shown!r}: a user@ part is a TLS user name, and NBD here has no TLS")
        export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
        if u.scheme == "nbd":
            if not u.hostname:
                raise ValueError(f"{uri!r}: nbd:// needs a host, e.g. nbd://127.0.0.1:10809/vol")
            try:
                port = u.port
            except ValueError:
                raise ValueError(f"{uri!r}: bad port") from None
            if port == 0:
                # no server listens on port 0: taken for "no port", it dialed 10809 (another
                # server, perhaps) and the error named a URI the caller never gave
                raise ValueError(f"{uri!r}: bad port 0 (port 0 means any free port only to a listener)")
            return cls(export, u.hostname, port or DEFAULT_PORT)
        if u.scheme == "nbd+unix":
            q = urllib.parse.parse_qs(u.query)
            if "socket" not in q:
                raise ValueError(f"{uri!r}: nbd+unix:// needs ?socket=PATH")
            return cls(export, socket=q["socket"][0])
        raise ValueError(f"{uri!r}: not an nbd:// or nbd+unix:// URI (TLS schemes are not supported)")

    def uri(self) -> str:
        name = urllib.parse.quote(self.export)
        if self.socket:
            return f"nbd+unix:///{name}?socket={self.socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"


@dataclass(slots=True)
class _Pending:
    type: int
    offset: int
    length: int
    #: who waits: a Future (the coroutine API), or ``done`` (start_read / start_write)
    future: asyncio.Future[Any] | None
    buf: memoryview | None = None  # READ destination
    extents: list[p.Extent] | None = None
    error: RequestError | None = None
    done: Done | None = None
    value: Any = None  # what ``done`` gets on success: a READ's bytearray
    seen: int = 0  # bytes of a structured READ's data and hole chunks so far


class _Wire(asyncio.BufferedProtocol):
    """The client's socket. During the handshake it buffers bytes for
    :meth:`readexactly`; in transmission it receives into the reply
    decoder's buffer (a READ's data straight into the caller's) and hands
    each batch to ``on_replies``."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._hs = bytearray()
        self._hs_recv = bytearray(64 * 1024)
        self._waiter: asyncio.Future[None] | None = None
        self.decoder: p.ReplyDecoder | None = None
        self.on_replies: Callable[[], None] | None = None
        self.on_lost: Callable[[Exception], None] | None = None
        self.lost: Exception | None = None
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._paused = False  # the transport has paused our writing
        self._drainers: list[asyncio.Future[None]] = []  # one per caller waiting in drain()

    # ---- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.decoder is not None:
            return self.decoder.get_buffer()
        return memoryview(self._hs_recv)

    def buffer_updated(self, nbytes: int) -> None:
        if self.decoder is not None:
            self.decoder.buffer_updated(nbytes)
            assert self.on_replies is not None
            self.on_replies()
            return
        self._hs += self._hs_recv[:nbytes]
        self._wake()

    def eof_received(self) -> bool:
        return False  # close: a server that half-closes has nothing more to say

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = DisconnectedError(f"server closed the connection{f': {exc}' if exc else ''}")
        self._wake()
        self.resume_writing()
        if self.on_lost is not None:
            self.on_lost(self.lost)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drainers, self._drainers = self._drainers, []
        for f in drainers:
            if not f.done():  # its caller may have been cancelled
                f.set_result(None)

    # ---- for the handshake
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def readexactly(self, n: int) -> bytes:
        while len(self._hs) < n:
            if self.lost is not None:
                raise asyncio.IncompleteReadError(bytes(self._hs), n)
            self._waiter = self.loop.create_future()
            await self._waiter
        out = bytes(self._hs[:n])
        del self._hs[:n]
        return out

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def start_transmission(
        self, decoder: p.ReplyDecoder, on_replies: Callable[[], None], on_lost: Callable[[Exception], None]
    ) -> None:
        """From now on bytes go to ``decoder`` (after any left over from the handshake)."""
        self.decoder, self.on_replies, self.on_lost = decoder, on_replies, on_lost
        self._hs_recv = bytearray()  # the handshake's receive buffer is not needed any more
        if self._hs:
            decoder.receive_data(self._hs)
            self._hs.clear()
            on_replies()
        if self.lost is not None:
            on_lost(self.lost)

    async def drain(self) -> None:
        """Wait while the transport has paused our writing.

        Each caller waits on a Future of its own, as asyncio's streams do: a
        shared one is cancelled for all when one caller is cancelled, and a
        second request run eagerly (the server's run_eager) that awaits it
        before the first one's Task has taken it fails with "await wasn't used
        with future" (host writes to a backed-up source failed with EIO)."""
        if self._paused:
            f = self.loop.create_future()
            self._drainers.append(f)
            await f

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _all(futs: list[asyncio.Future[Any]]) -> Awaitable[Any]:
    """What to await for the requests of one call: one (the usual case) needs no gather."""
    return futs[0] if len(futs) == 1 else asyncio.gather(*futs)


def _within(extents: list[p.Extent], length: int) -> list[p.Extent]:
    """A BLOCK_STATUS answer as the caller may use it. A descriptor of length 0 is a
    protocol error (a caller walking the map would never move on); descriptors past
    the requested length are cut to it, as qemu's client does."""
    out, pos = [], 0
    for e in extents:
        if e.length == 0:
            raise ProtocolError("BLOCK_STATUS descriptor of length 0")
        if pos >= length:
            break
        out.append(e if pos + e.length <= length else p.Extent(length - pos, e.flags))
        pos += e.length
    return out


def _resolve(pend: _Pending, result: Any, error: Exception | None) -> None:
    """End one request, unless its caller cancelled it: a reply to a request
    nobody waits for any more must not break the connection for the others."""
    if pend.done is not None:
        try:
            pend.done(pend.value if error is None else None, error)
        except Exception:  # the caller's bug must not break the connection
            log.exception(
                "completion of %s %d+%d failed", p.CMD_NAMES.get(pend.type), pend.offset, pend.length
            )
    fut = pend.future
    if fut is None or fut.done():
        return
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)
        fut.exception()  # mark retrieved: a caller may have gone


async def _open(addr: Address, timeout: float) -> _Wire:
    loop = asyncio.get_running_loop()
    if addr.socket:
        coro = loop.create_unix_connection(_Wire, addr.socket)
    else:
        coro = loop.create_connection(_Wire, addr.host, addr.port)
    try:
        _, wire = await asyncio.wait_for(coro, timeout)
    except (TimeoutError, OSError) as e:
        raise DisconnectedError(f"cannot connect to {addr.uri()}: {e or 'timed out'}") from None
    return wire


class _Handshake:
    """The client's side of option haggling over a stream."""

    def __init__(self, wire: _Wire, uri: str):
        self.wire, self.uri = wire, uri
        self.no_zeroes = False
        self.fixed = False  # fixed newstyle: options other than EXPORT_NAME may be sent

    async def greet(self) -> None:
        data = await self.wire.readexactly(p.SERVER_GREETING.size)
        magic, opt, hflags = p.SERVER_GREETING.unpack(data)
        if magic != p.NBDMAGIC:
            raise ProtocolError(f"{self.uri}: not an NBD server (magic 0x{magic:x})")
        if opt != p.IHAVEOPT:
            raise ProtocolError(f"{self.uri}: oldstyle servers are not supported")
        # The client sets only flags the server offered (section "Client flags").
        self.fixed = bool(hflags & p.FLAG_FIXED_NEWSTYLE)
        cflags = p.FLAG_C_FIXED_NEWSTYLE if self.fixed else 0
        if hflags & p.FLAG_NO_ZEROES:
            cflags |= p.FLAG_C_NO_ZEROES
            self.no_zeroes = True
        self.wire.write(p.CLIENT_FLAGS.pack(cflags))

    async def option(
        self,
        opt: int,
        what: str,
        data: bytes = b"",
        each: Callable[[p.OptionReply], None] | None = None,
        most: int = MAX_OPTION_REPLIES,
    ) -> p.OptionReply:
        """Send one option and read its replies up to the final one (ACK or an
        error), which it returns. The others go to ``each`` one at a time and are
        not kept, so a server streaming replies costs no memory; past ``most`` of
        them the handshake ends with ProtocolError (a server that never stops would
        keep the client until the connect timeout). ``what`` names the option in
        errors."""
        self.wire.write(p.build_option(opt, data))
        count = 0
        while True:
            hdr = await self.wire.readexactly(p.OPTION_REPLY_HEADER.size)
            _, _, _, length = p.OPTION_REPLY_HEADER.unpack(hdr)
            if length > p.MAX_OPTION_LENGTH:
                raise ProtocolError(f"{self.uri}: {what}: option reply of {length} bytes")
            parsed = p.parse_option_reply(hdr + await self.wire.readexactly(length))
            assert parsed is not None
            rep = parsed[0]
            if rep.option != opt:
                raise ProtocolError(f"{self.uri}: reply to option {rep.option}, expected {opt}")
            if rep.type == p.REP_ACK or rep.is_error:
                return rep
            count += 1
            if count > most:
                raise ProtocolError(
                    f"{self.uri}: {what}: the server sent more than {most} replies without"
                    " ending them (a broken or hostile server); giving up"
                )
            if each is not None:
                each(rep)


def _valid_block_size(bs: p.BlockSize, size: int) -> bool:
    """Block sizes as section "Block size constraints" allows them: a minimum that is a
    power of 2 up to 64 KiB, a preferred size that is a power of 2 not below it, and a
    maximum that is 0xffffffff or a multiple of the minimum at least as large as the
    preferred size or the export, whichever is smaller (and never below the minimum)."""
    mn, pref, mx = bs.minimum, bs.preferred, bs.maximum
    if not (0 < mn <= 65536 and mn & (mn - 1) == 0 and pref >= mn and pref & (pref - 1) == 0):
        return False
    return mx == 0xFFFF_FFFF or (mx >= mn and mx % mn == 0 and mx >= min(pref, size))


def _option_error(uri: str, what: str, rep: p.OptionReply) -> OptionError:
    names = {
        p.REP_ERR_UNSUP: "not supported",
        p.REP_ERR_POLICY: "refused by policy",
        p.REP_ERR_INVALID: "invalid",
        p.REP_ERR_PLATFORM: "not available on this platform",
        p.REP_ERR_TLS_REQD: "TLS required",
        p.REP_ERR_UNKNOWN: "unknown export",
        p.REP_ERR_SHUTDOWN: "server shutting down",
        p.REP_ERR_BLOCK_SIZE_REQD: "block size required",
        p.REP_ERR_TOO_BIG: "too big",
    }
    msg = rep.data.decode(errors="replace")
    why = names.get(rep.type, f"error 0x{rep.type:x}")
    return OptionError(f"{uri}: {what}: {why}" + (f" ({msg})" if msg else ""), rep.type)


async def list_exports(uri: str, timeout: float = 10.0) -> list[tuple[str, str]]:
    """(name, description) of every export the server lists, up to MAX_EXPORTS of
    them and MAX_LIST_BYTES of their names and descriptions: a server listing more
    (or one that never ends its list) fails it with ProtocolError rather than grow
    the caller's memory until the timeout."""
    addr = Address.parse(uri)
    out: list[tuple[str, str]] = []
    kept = 0

    def take(rep: p.OptionReply) -> None:
        nonlocal kept
        if rep.type != p.REP_SERVER:
            return
        if len(out) == MAX_EXPORTS:
            raise ProtocolError(
                f"{addr.uri()}: LIST: the server lists more than {MAX_EXPORTS} exports,"
                " more than list_exports takes"
            )
        kept += len(rep.data)
        if kept > MAX_LIST_BYTES:
            raise ProtocolError(
                f"{addr.uri()}: LIST: the server lists more than {MAX_LIST_BYTES >> 20} MiB of export"
                " names and descriptions, more than list_exports takes"
            )
        out.append(_server_reply(addr.uri(), rep.data))

    wire = await _open(addr, timeout)
    try:
        hs = _Handshake(wire, addr.uri())
        await asyncio.wait_for(hs.greet(), timeout)
        if not hs.fixed:
            raise OptionError(f"{addr.uri()}: LIST: the server speaks plain newstyle, which lists nothing")
        # other replies than NBD_REP_SERVER are skipped, but counted too
        final = await asyncio.wait_for(
            hs.option(p.OPT_LIST, "LIST", each=take, most=2 * MAX_EXPORTS), timeout
        )
        if final.is_error:
            raise _option_error(addr.uri(), "LIST", final)
        wire.write(p.build_option(p.OPT_ABORT))
        return out
    except asyncio.IncompleteReadError:
        raise DisconnectedError(f"{addr.uri()}: server closed the connection during LIST") from None
    except TimeoutError:
        raise DisconnectedError(f"{addr.uri()}: LIST timed out") from None
    finally:
        wire.close()


def _server_reply(uri: str, data: bytes) -> tuple[str, str]:
    """NBD_REP_SERVER: ``namelen:u32 name description`` (section "NBD_OPT_LIST")."""
    n = p.U32.unpack_from(data)[0] if len(data) >= 4 else -1
    if not 0 <= n <= len(data) - 4:
        raise ProtocolError(f"{uri}: LIST: an NBD_REP_SERVER reply of {len(data)} bytes names {n}")
    try:
        return data[4 : 4 + n].decode(), data[4 + n :].decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"{uri}: LIST: an export name or description is not UTF-8") from None


class _GoInfo:
    """What NBD_REP_INFO replies to GO say, taken one reply at a time (a later one of
    a type replaces an earlier); malformed and unknown ones are skipped."""

    def __init__(self) -> None:
        self.export: tuple[int, int] | None = None  # size, transmission flags
        self.description = ""
        self.block_size: p.BlockSize | None = None

    def take(self, rep: p.OptionReply) -> None:
        if rep.type != p.REP_INFO or len(rep.data) < 2:
            return
        (itype,) = p.U16.unpack_from(rep.data)
        if itype == p.INFO_EXPORT and len(rep.data) == p.INFO_EXPORT_FMT.size:
            _, size, flags = p.INFO_EXPORT_FMT.unpack(rep.data)
            self.export = size, flags
        elif itype == p.INFO_DESCRIPTION:
            self.description = rep.data[2:].decode(errors="replace")
        elif itype == p.INFO_BLOCK_SIZE and len(rep.data) == p.INFO_BLOCK_SIZE_FMT.size:
            _, mn, pref, mx = p.INFO_BLOCK_SIZE_FMT.unpack(rep.data)
            self.block_size = p.BlockSize(mn, pref, mx)


class NbdClient:
    """A connected NBD export. Create with :meth:`connect`."""

    def __init__(self) -> None:
        self.address = Address()
        self.size = 0
        self.flags = 0
        self.description = ""
        self.block_size = p.BlockSize()
        self.structured = False
        self.allocation_context: int | None = None
        self._wire: _Wire | None = None
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, _Pending] = {}
        self._out: list[bytes | bytearray | memoryview] = []  # requests not yet handed to the transport
        self._send_pending = False
        self._cookies = itertools.count(1)
        self._decoder = p.ReplyDecoder(read_dest=self._read_dest)
        self._broken: Exception | None = None
        self._max_request = p.MAX_BLOCK

    # ---- connection
    @classmethod
    async def connect(
        cls,
        uri: str,
        *,
        structured: bool = True,
        allocation: bool = True,
        timeout: float = 10.0,
    ) -> NbdClient:
        """Connect and negotiate; raises DisconnectedError/OptionError/ProtocolError."""
        self = cls()
        self.address = addr = Address.parse(uri)
        wire = await _open(addr, timeout)
        try:
            await asyncio.wait_for(self._negotiate(wire, structured, allocation), timeout)
        except asyncio.IncompleteReadError:
            wire.close()
            raise DisconnectedError(
                f"{addr.uri()}: server closed the connection during the handshake"
            ) from None
        except TimeoutError:
            wire.close()
            raise DisconnectedError(f"{addr.uri()}: handshake timed out") from None
        except BaseException:
            wire.close()
            raise
        self._wire, self._transport, self._loop = wire, wire.transport, wire.loop
        wire.start_transmission(self._decoder, self._on_replies, self._on_lost)
        return self

    async def _negotiate(self, wire: _Wire, structured: bool, allocation: bool) -> None:
        uri, name = self.address.uri(), self.address.export
        hs = _Handshake(wire, uri)
        await hs.greet()
        if not hs.fixed:  # plain newstyle: EXPORT_NAME is its one option
            await self._export_name(hs, name)
            return
        if structured:
            rep = await hs.option(p.OPT_STRUCTURED_REPLY, "STRUCTURED_REPLY")
            self.structured = rep.type == p.REP_ACK
        if self.structured and allocation:
            named: list[int] = []

            def context(rep: p.OptionReply) -> None:
                if rep.type == p.REP_META_CONTEXT and rep.data[4:] == p.BASE_ALLOCATION.encode():
                    named[:] = p.U32.unpack_from(rep.data)

            rep = await hs.option(
                p.OPT_SET_META_CONTEXT,
                "SET_META_CONTEXT",
                p.build_meta_context_request(name, [p.BASE_ALLOCATION]),
                context,
            )
            # Only if it succeeded (section "NBD_CMD_BLOCK_STATUS": contexts returned
            # "without an error"); after a final error reply none is set.
            if rep.type == p.REP_ACK and named:
                self.allocation_context = named[0]
        info = _GoInfo()
        last = await hs.option(
            p.OPT_GO,
            f"GO to export {name!r}",
            p.build_info_request(name, [p.INFO_NAME, p.INFO_DESCRIPTION, p.INFO_BLOCK_SIZE]),
            info.take,
        )
        if last.type == p.REP_ERR_UNSUP:
            await self._export_name(hs, name)
            return
        if last.is_error:
            raise _option_error(uri, f"GO to export {name!r}", last)
        if info.export is None:
            raise ProtocolError(f"{uri}: GO succeeded without NBD_INFO_EXPORT")
        self.size, self.flags = info.export
        self.description = info.description
        if info.block_size is not None:
            if _valid_block_size(info.block_size, self.size):
                self.block_size = info.block_size
            else:
                # Requests are split at the maximum: 0 crashed every read and write (a
                # range() step of 0), 1 would send a 32 MiB read as 32M requests.
                log.warning("%s: ignoring invalid block sizes %s", uri, info.block_size)
        self._max_request = min(self.block_size.maximum, p.MAX_BLOCK)

    async def _export_name(self, hs: _Handshake, name: str) -> None:
        """Fallback for servers without GO (section "NBD_OPT_EXPORT_NAME")."""
        hs.wire.write(p.build_option(p.OPT_EXPORT_NAME, name.encode()))
        data = await hs.wire.readexactly(p.EXPORT_NAME_REPLY.size)
        self.size, self.flags = p.EXPORT_NAME_REPLY.unpack(data)
        if not hs.no_zeroes:
            await hs.wire.readexactly(len(p.HANDSHAKE_ZEROES))
        self._max_request = p.MAX_BLOCK

    def _waitable(self, pend: _Pending) -> asyncio.Future[Any]:
        if pend.future is None:  # started with a ``done`` callback: a Future to wait on as well
            assert self._loop is not None
            pend.future = self._loop.create_future()
        return pend.future

    def abort(self, reason: str) -> None:
        """Drop the connection now: every pending request fails with DisconnectedError."""
        err = DisconnectedError(f"{self.address.uri()}: {reason}")
        self._broken = err
        self._fail_all(err)
        if self._transport is not None:
            self._transport.abort()

    async def close(self, timeout: float = 5.0) -> None:
        """Send DISC after the requests in flight (waiting up to ``timeout`` seconds
        for them: a server may have stopped answering), then close."""
        wire, t = self._wire, self._transport
        if wire is None or t is None:
            return
        self._wire = None
        if self._pending and self._broken is None:
            futs = [self._waitable(x) for x in list(self._pending.values())]
            _, late = await asyncio.wait(futs, timeout=timeout)
            if late:
                self.abort(f"closing with {len(late)} request(s) unanswered after {timeout:g} s")
        self._send_out()
        if self._broken is None and not t.is_closing():
            t.write(p.Request(0, p.CMD_DISC, next(self._cookies), 0, 0).header())
        t.close()
        try:
            await asyncio.wait_for(asyncio.shield(wire.closed), timeout)
        except TimeoutError:
            t.abort()
        self._transport = None
        self._fail_all(DisconnectedError(f"{self.address.uri()}: connection closed"))

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---- capabilities
    @property
    def read_only(self) -> bool:
        return bool(self.flags & p.FLAG_READ_ONLY)

    def can(self, flag: int) -> bool:
        return bool(self.flags & flag)

    @property
    def closed(self) -> bool:
        return self._wire is None or self._broken is not None

    # ---- requests
    def _read_dest(self, cookie: int) -> tuple[int, memoryview] | None:
        pend = self._pending.get(cookie)
        if pend is None:
            raise ProtocolError(f"reply for unknown cookie {cookie}")
        return (pend.offset, pend.buf) if pend.buf is not None else None

    def _submit(
        self,
        type_: int,
        offset: int,
        length: int,
        flags: int = 0,
        payload: bytes | bytearray | memoryview | None = None,
        buf: memoryview | None = None,
    ) -> asyncio.Future[Any]:
        if self._broken is not None:
            raise DisconnectedError(f"{self.address.uri()}: connection is broken: {self._broken}")
        loop = self._loop
        if self._wire is None or loop is None:
            raise DisconnectedError(f"{self.address.uri()}: client is closed")
        fut: asyncio.Future[Any] = loop.create_future()
        self._enqueue(loop, _Pending(type_, offset, length, fut, buf), flags, payload)
        return fut

    def _enqueue(
        self,
        loop: asyncio.AbstractEventLoop,
        pend: _Pending,
        flags: int,
        payload: bytes | bytearray | memoryview | None,
    ) -> None:
        """Give ``pend`` a cookie and queue its request; all go out at the end of this iteration."""
        cookie = next(self._cookies)
        self._pending[cookie] = pend
        out = self._out
        out.append(p.REQUEST.pack(p.REQUEST_MAGIC, flags, pend.type, cookie, pend.offset, pend.length))
        if payload is not None:
            out.append(payload)
        if not self._send_pending:  # the first request of this loop iteration: send all at its end
            self._send_pending = True
            loop.call_soon(self._send_out)

    def _start(
        self, pend: _Pending, flags: int = 0, payload: bytes | bytearray | memoryview | None = None
    ) -> bool:
        """The coroutine-free path of one request: False when it cannot take it."""
        offset, length = pend.offset, pend.length
        loop = self._loop
        if (
            self._broken is not None
            or self._wire is None
            or loop is None
            or not 0 < length <= self._max_request
            or offset < 0
            or offset + length > self.size
            or (self._transport is not None and self._transport.get_write_buffer_size() > WRITE_BUFFER_MAX)
        ):
            return False
        self._enqueue(loop, pend, flags, payload)
        return True

    def start_read(self, offset: int, length: int, done: Done) -> bool:
        """Begin a READ of one request's size without a coroutine, or return False
        (closed, broken, too long, out of range, or the transport is backed up: use
        :meth:`read`). Once it returned True, ``done(bytearray, None)`` or
        ``done(None, error)`` is called exactly once, from the event loop, later."""
        buf = bytearray(length)
        pend = _Pending(p.CMD_READ, offset, length, None, memoryview(buf), done=done, value=buf)
        return self._start(pend)

    def start_write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool, done: Done) -> bool:
        """:meth:`start_read` for a WRITE: ``done(None, None)`` once the server has it.
        ``data`` must stay unchanged until ``done`` runs."""
        pend = _Pending(p.CMD_WRITE, offset, len(data), None, done=done)
        return self._start(pend, p.CMD_FLAG_FUA if fua else 0, data)

    def _send_out(self) -> None:
        self._send_pending = False
        out, self._out = self._out, []
        t = self._transport
        if out and t is not None and not t.is_closing():
            t.writelines(out)

    async def _drain(self) -> None:
        t, wire = self._transport, self._wire
        if t is not None and wire is not None and t.get_write_buffer_size() > WRITE_BUFFER_MAX:
            await wire.drain()

    def _check_range(self, what: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RequestError(
                p.EINVAL,
                f"{what} {offset}+{length} is outside export {self.address.export!r} of {self.size} bytes",
            )

    async def read_into(self, offset: int, buf: memoryview, df: bool = False) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf`` (split as the server requires)."""
        self._check_range("read", offset, len(buf))
        flags = p.CMD_FLAG_DF if df and self.structured else 0
        step = self._max_request
        futs = [
            self._submit(p.CMD_READ, offset + i, min(step, len(buf) - i), flags, buf=buf[i : i + step])
            for i in range(0, len(buf), step)
        ]
        await self._drain()
        await _all(futs)

    async def read(self, offset: int, length: int, df: bool = False) -> bytearray:
        buf = bytearray(length)
        if length:
            await self.read_into(offset, memoryview(buf), df)
        return buf

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        self._check_range("write", offset, len(view))
        flags = p.CMD_FLAG_FUA if fua else 0
        step = self._max_request
        futs = [
            self._submit(p.CMD_WRITE, offset + i, len(view[i : i + step]), flags, payload=view[i : i + step])
            for i in range(0, len(view), step)
        ]
        await self._drain()
        await _all(futs)

    async def _ranged(self, type_: int, offset: int, length: int, flags: int, limited: bool = False) -> None:
        """``limited``: within the server's maximum block size, like READ and WRITE (CACHE, and
        WRITE_ZEROES without FAST_ZERO: section "Block size constraints"); else only as
        lengths are u32 on the wire."""
        name = p.CMD_NAMES[type_]
        self._check_range(name, offset, length)
        step = self._max_request if limited else 0xFFFF_F000
        futs = [self._submit(type_, offset + i, min(step, length - i), flags) for i in range(0, length, step)]
        await _all(futs)

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        flags = (0 if may_trim else p.CMD_FLAG_NO_HOLE) | (p.CMD_FLAG_FAST_ZERO if fast else 0)
        flags |= p.CMD_FLAG_FUA if fua else 0
        await self._ranged(p.CMD_WRITE_ZEROES, offset, length, flags, limited=not fast)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._ranged(p.CMD_TRIM, offset, length, p.CMD_FLAG_FUA if fua else 0)

    async def cache(self, offset: int, length: int) -> None:
        await self._ranged(p.CMD_CACHE, offset, length, 0, limited=True)

    async def flush(self) -> None:
        await self._submit(p.CMD_FLUSH, 0, 0)

    async def extents(self, offset: int, length: int, one: bool = False) -> list[p.Extent]:
        """base:allocation extents from ``offset`` (may cover less than ``length``);
        with ``one``, the server's first extent only (REQ_ONE).

        Without a negotiated context, the whole range is reported as data.
        """
        self._check_range("block status", offset, length)
        if self.allocation_context is None:
            return [p.Extent(length, 0)]
        length = min(length, 0xFFFF_F000)
        flags = p.CMD_FLAG_REQ_ONE if one else 0
        result: list[p.Extent] = await self._submit(p.CMD_BLOCK_STATUS, offset, length, flags)
        return result[:1] if one else result

    # ---- replies
    def _on_replies(self) -> None:
        """Bytes arrived: complete every reply they finish (called by the wire)."""
        dec, on_reply = self._decoder, self._on_reply
        try:
            while (item := dec.next_event()) is not None:
                on_reply(item[0])  # (a READ's data is in its buffer already)
        except Exception as e:
            self._on_lost(e)
            if self._transport is not None:
                self._transport.abort()

    def _on_lost(self, e: Exception) -> None:
        if self._broken is not None:
            return
        err = DisconnectedError(f"{self.address.uri()}: {e}")
        self._broken = err
        self._fail_all(err)

    def _fail_all(self, err: Exception) -> None:
        pending, self._pending = self._pending, {}
        for x in pending.values():
            _resolve(x, None, err)

    def _on_reply(self, ev: p.ReplyEvent) -> None:
        pend = self._pending.get(ev.cookie)
        if pend is None:
            raise ProtocolError(f"reply for unknown cookie {ev.cookie}")
        # A ProtocolError is raised with the request still in _pending: the broken
        # connection fails it with the others (taken out first, it waited forever).
        if isinstance(ev, p.SimpleReply):
            if ev.error:
                error: RequestError | None = self._error(pend, ev.error, "")
            elif pend.type == p.CMD_BLOCK_STATUS:
                # success needs a BLOCK_STATUS chunk: extents() returned None for this one
                raise ProtocolError("BLOCK_STATUS answered by a simple reply")
            else:
                error = None  # a READ's data is in its buffer already
            del self._pending[ev.cookie]
            _resolve(pend, None, error)
            return
        self._on_chunk(pend, ev)
        if ev.done:
            if pend.error is None:
                if pend.type == p.CMD_READ and pend.seen != pend.length:
                    # Section "Structured reply chunk message": on success the chunks cover
                    # the whole READ. Short, the caller got the zeroes of its own buffer for
                    # data; over, two chunks overlap (a copy would then be wrong somewhere).
                    raise ProtocolError(
                        f"structured READ {pend.offset}+{pend.length} succeeded with "
                        f"{pend.seen} bytes of data and holes"
                    )
                if pend.type == p.CMD_BLOCK_STATUS and not pend.extents:
                    raise ProtocolError("BLOCK_STATUS reply without extents")
            del self._pending[ev.cookie]
            _resolve(pend, pend.extents, pend.error)

    def _on_chunk(self, pend: _Pending, ch: p.StructuredChunk) -> None:
        t = ch.type
        if t == p.REPLY_TYPE_NONE:
            return
        if t & _ERROR_CHUNK:
            # Section "Structured reply types": a type with bit 15 set is an error chunk,
            # known or not; an unknown one fails the request, not the connection (it made
            # us hard-disconnect, failing every request in flight and, through a
            # RemoteBackend, retrying this one into the same answer until its window ended).
            err, msg, _ = p.parse_error_chunk(ch)
            if pend.error is None:
                pend.error = self._error(pend, err, msg)
            return
        if t == p.REPLY_TYPE_OFFSET_DATA and pend.type == p.CMD_READ:
            pend.seen += ch.placed  # the decoder checked it and put the data in place
            return
        if t == p.REPLY_TYPE_OFFSET_HOLE and pend.type == p.CMD_READ:
            if len(ch.payload) != 12:
                raise ProtocolError("OFFSET_HOLE chunk has the wrong length")
            off, n = p.HOLE_BODY.unpack(ch.payload)
            start = off - pend.offset
            if start < 0 or start + n > pend.length:
                raise ProtocolError(f"OFFSET_HOLE chunk at {off}+{n} outside the request")
            assert pend.buf is not None
            pend.buf[start : start + n] = bytes(n)
            pend.seen += n
            return
        if t == p.REPLY_TYPE_BLOCK_STATUS and pend.type == p.CMD_BLOCK_STATUS:
            ctx, extents = p.parse_block_status_chunk(ch.payload, MAX_EXTENTS)
            if ctx == self.allocation_context:
                pend.extents = _within(extents, pend.length)
            return
        raise ProtocolError(f"unexpected chunk type {t} for {p.CMD_NAMES.get(pend.type)}")

    def _error(self, pend: _Pending, error: int, msg: str) -> RequestError:
        name = p.CMD_NAMES.get(pend.type, str(pend.type))
        where = f"{name} {pend.offset}+{pend.length} on {self.address.uri()}"
        return RequestError(error, f"{where}: {msg}" if msg else where)
