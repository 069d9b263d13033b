"""asyncio NBD server: a thin adapter around protocol.py that serves Backends.

One :class:`NbdServer` serves many exports to many clients; each connection
is a BufferedProtocol that feeds the sans-IO core, runs each request
eagerly (a Task only when the Backend must wait), and sends the replies of
one receive pass with a single ``writelines``. Replies may go out of order.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import logging
import os
import signal
import socket
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

from . import protocol as p
from .backend import Backend
from .eager import run_eager
from .errors import BackendError, ProtocolError, nbd_error

log = logging.getLogger("blockmig.nbd.server")

#: a client that completes no option for this long is dropped before transmission;
#: one that keeps negotiating is not (``nbdinfo --list`` asks about each export in
#: turn on one connection: ~0.2 s an export with libnbd 1.14, 10 min for 3000 LUNs)
HANDSHAKE_TIMEOUT = 30.0
#: reads at least this large look for holes and send them as OFFSET_HOLE chunks;
#: for smaller ones an lseek costs more than the zeroes on the wire
SPARSE_READ_MIN = 64 * 1024
#: reads at least this large go from the page cache to the socket with sendfile(2)
#: when the Backend offers a file (see _Connection._send_file)
ZERO_COPY_MIN = 64 * 1024
#: pause reading from a client with this many requests waiting on its Backend
MAX_INFLIGHT = 256
#: ... or with this many bytes of READs and WRITEs of ZERO_COPY_MIN or more waiting on it
#: (256 requests of 32 MiB would hold 8 GiB: their data, read or to be written)
MAX_INFLIGHT_BYTES = 128 << 20
#: a client that sent nothing for this long gives its grown receive buffer back
IDLE_SHRINK = 1.0

_CMD_FLAGS = {
    p.CMD_READ: p.CMD_FLAG_DF,
    p.CMD_WRITE: p.CMD_FLAG_FUA,
    p.CMD_DISC: 0,
    p.CMD_FLUSH: 0,
    p.CMD_TRIM: p.CMD_FLAG_FUA,
    p.CMD_CACHE: 0,
    p.CMD_WRITE_ZEROES: p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FAST_ZERO,
    p.CMD_BLOCK_STATUS: p.CMD_FLAG_REQ_ONE,
}
_MODIFYING = (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
# hot-path names bound once (module attribute lookups cost per request)
_pack_offset_data = p.OFFSET_DATA_HEADER.pack
_pack_simple = p.SIMPLE_REPLY.pack
_SR_MAGIC, _SIMPLE_MAGIC = p.STRUCTURED_REPLY_MAGIC, p.SIMPLE_REPLY_MAGIC
_DONE, _OFFSET_DATA = p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA
_CMD_READ = p.CMD_READ


async def _read_all(backend: Backend, runs: list[tuple[int, int]]) -> list[bytes | bytearray]:
    """The data runs of one reply; from a remote source all at once, where one
    after another each would cost a round trip (a local file's reads need no
    Task each: mostly page-cache hits, done without waiting)."""
    if len(runs) <= 1 or not backend.remote:
        return [await backend.read(o, n) for o, n in runs]
    results = await asyncio.gather(*(backend.read(o, n) for o, n in runs), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r  # every read has ended: none is left running unawaited
    return cast(list[bytes | bytearray], results)


@dataclass(slots=True)
class Export:
    """A Backend under a name."""

    name: str
    backend: Backend
    description: str = ""
    read_only: bool = False
    #: left out of NBD_OPT_LIST: reachable only by whoever was told its name
    hidden: bool = False

    def info(self) -> p.ExportInfo:
        b = self.backend
        ro = self.read_only or b.read_only
        flags = p.FLAG_HAS_FLAGS | p.FLAG_SEND_DF
        if ro:
            flags |= p.FLAG_READ_ONLY
        if b.can_flush:
            flags |= p.FLAG_SEND_FLUSH
        if b.can_fua and not ro:
            flags |= p.FLAG_SEND_FUA
        if b.can_trim and not ro:
            flags |= p.FLAG_SEND_TRIM
        if b.can_zero and not ro:
            flags |= p.FLAG_SEND_WRITE_ZEROES
            if b.can_fast_zero:
                flags |= p.FLAG_SEND_FAST_ZERO
        if b.can_cache:
            flags |= p.FLAG_SEND_CACHE
        if b.can_multi_conn:
            flags |= p.FLAG_CAN_MULTI_CONN
        if b.rotational:
            flags |= p.FLAG_ROTATIONAL
        bs = p.BlockSize(b.min_block, max(p.PREFERRED_BLOCK, b.min_block))
        return p.ExportInfo(self.name, b.size, flags, self.description, bs, allocation=b.can_extents)


class _ExportTable(Mapping[str, p.ExportInfo]):
    """The live view of exports that the handshake core reads."""

    def __init__(self, server: NbdServer) -> None:
        self._server = server

    def __getitem__(self, name: str) -> p.ExportInfo:
        return self._server.exports[name].info()

    def __iter__(self) -> Iterator[str]:
        return iter([n for n, e in self._server.exports.items() if not e.hidden])

    def __len__(self) -> int:
        return sum(1 for e in self._server.exports.values() if not e.hidden)


class NbdServer:
    """Serve Backends as NBD exports (fixed newstyle only)."""

    def __init__(self, default_export: str | None = None) -> None:
        self.exports: dict[str, Export] = {}
        self.default_export = default_export
        self._servers: list[asyncio.AbstractServer] = []
        self.connections: set[_Connection] = set()
        self._table = _ExportTable(self)

    # ---- exports
    def add_export(
        self,
        name: str,
        backend: Backend,
        description: str = "",
        read_only: bool = False,
        hidden: bool = False,
    ) -> Export:
        if name in self.exports:
            raise ValueError(f"export {name!r} already exists")
        if len(name.encode()) > p.MAX_STRING:
            raise ValueError("export name is longer than 4096 bytes")
        if len(description.encode()) > p.MAX_STRING:  # libnbd drops a handshake that sends one
            raise ValueError("export description is longer than 4096 bytes")
        e = self.exports[name] = Export(name, backend, description, read_only, hidden)
        return e

    def _clients(self, name: str) -> list[_Connection]:
        return [c for c in self.connections if c.export is not None and c.export.name == name]

    def set_read_only(self, name: str, read_only: bool) -> None:
        """Make export ``name`` read-only (or writable again) for everyone, also for
        clients connected now: those negotiated writes, so from now on theirs fail
        with EPERM (a client that negotiated READ_ONLY stays so). Writes already in
        flight may still land: see :meth:`inflight`."""
        self.exports[name].read_only = read_only
        for c in self._clients(name):
            c.set_writable(not read_only)

    def inflight(self, name: str) -> list[asyncio.Task[None]]:
        """The requests in flight on the clients of export ``name``, as Tasks. (I/O
        begun with start_write, which only a remote LUN's Backend offers, is not
        among them.)"""
        return [t for c in self._clients(name) for t in c._inflight]

    def remove_export(self, name: str) -> Export:
        """Stop offering ``name``; connected clients keep their Backend."""
        return self.exports.pop(name)

    async def disconnect_export(self, name: str, timeout: float = 5.0) -> None:
        """Drop every client of export ``name`` (after a forced delete), as :meth:`close` does."""
        await _drop(self._clients(name), timeout, f"export {name} deleted")

    def clients_of(self, name: str) -> int:
        return len(self._clients(name))

    # ---- listening
    async def listen_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True, backlog=128)
        self._servers.append(srv)
        addr = srv.sockets[0].getsockname()
        return addr[0], addr[1]

    async def listen_unix(self, path: str) -> str:
        """Listen on the unix socket ``path``; one a server still listens on is EADDRINUSE.
        (asyncio removes a socket file before it binds: a second serve-file took a running
        one's socket over, and removed it when it stopped, for both.) A stale one, which
        no server listens on, is replaced."""
        if _unix_socket_in_use(path):
            raise OSError(errno.EADDRINUSE, "Address already in use (a server listens there)")
        loop = asyncio.get_running_loop()
        srv = await loop.create_unix_server(lambda: _Connection(self), path)
        self._servers.append(srv)
        return path

    async def close(self, timeout: float = 5.0) -> None:
        """Stop listening, let in-flight requests finish (up to ``timeout`` seconds:
        one may wait on an unreachable source), then close every connection."""
        for s in self._servers:
            s.close()
        await _drop(list(self.connections), timeout, "server stopping")
        for s in self._servers:
            await s.wait_closed()
        self._servers.clear()


def _unix_socket_in_use(path: str) -> bool:
    """A server accepts connections on the unix socket ``path`` (connecting to one answers
    at once, or EAGAIN when its backlog is full)."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False  # create_unix_server refuses what is no socket itself
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            return True
        except OSError:
            return False  # ECONNREFUSED: stale, its server is gone
    return True


async def _drop(conns: list[_Connection], timeout: float, why: str) -> None:
    """Close ``conns`` as if each had sent DISC (in-flight requests finish, their
    replies go out), and abort those still open after ``timeout`` seconds: a request
    may wait on an unreachable source, and the close of a client that stopped
    reading waits for it to take its last replies, forever."""
    for c in conns:
        c.shutdown()
    if conns:
        await asyncio.wait([c.closed for c in conns], timeout=timeout)
    for c in conns:
        if not c.closed.done():
            c.abort_now(f"{why}: {c.stuck_on()} after {timeout:g} s")


class _Connection(asyncio.BufferedProtocol):
    """One client: handshake, then transmission."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.export: Export | None = None
        self.transport: asyncio.Transport | None = None
        self._hs: p.ServerHandshake | None = p.ServerHandshake(server._table, server.default_export)
        self._hs_buf = bytearray(4096)
        self._dec: p.RequestDecoder | None = None
        self._backend: Backend | None = None
        self._size = 0
        self._structured = False
        self._alloc_ctx: int | None = None
        self._flags = 0
        self._writable = False  # WRITE, TRIM, WRITE_ZEROES allowed (see set_writable)
        self._refused_warned = False
        self._out: list[Any] = []
        self._in_receive = False
        self._flush_pending = False
        self._inflight: set[asyncio.Task[None]] = set()
        self._started = 0  # requests begun with Backend.start_read / start_write, not yet done
        self._disconnecting = False
        self._paused_reasons = 0  # bit 1: write buffer full, 2: too many in flight, 4: too many bytes
        self._held = 0  # bytes of the big READs and WRITEs in flight (MAX_INFLIGHT_BYTES)
        self._timer: asyncio.TimerHandle | None = None
        self._zsock: socket.socket | None = None  # a dup of the transport's, for sendfile
        self._shrink_timer: asyncio.TimerHandle | None = None  # armed while _dec has grown
        self._received = False  # since the shrink timer was armed
        self.peer = ""
        # bound once: asyncio.get_running_loop() costs a getpid(2) per call on 3.11
        self._loop = loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()

    # ---- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack alike
        self.transport = t = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        assert self._hs is not None
        t.write(self._hs.data_to_send())
        self._timer = self._loop.call_later(HANDSHAKE_TIMEOUT, self._hs_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self._zsock is not None:
            self._zsock.close()
        if self._timer:
            self._timer.cancel()
        if self._shrink_timer:
            self._shrink_timer.cancel()
        for t in self._inflight:
            t.cancel()
        if not self.closed.done():
            self.closed.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._dec is not None:
            return self._dec.get_buffer()
        return memoryview(self._hs_buf)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            dec = self._dec
            if dec is not None:
                dec.buffer_updated(nbytes)
                self._process()
                self._received = True
                if dec.grown and self._shrink_timer is None:
                    self._shrink_timer = self._loop.call_later(IDLE_SHRINK, self._shrink_if_idle)
            else:
                self._handshake(bytes(self._hs_buf[:nbytes]))
        except ProtocolError as e:
            self._abort(f"protocol error: {e}")

    def _shrink_if_idle(self) -> None:
        """A grown receive buffer (up to 256 KiB) goes back to its initial size once
        the client has sent nothing for IDLE_SHRINK seconds: hundreds of hosts that
        once wrote fast and now idle would otherwise each keep one."""
        self._shrink_timer = None
        dec = self._dec
        if dec is None or self.transport is None or self.transport.is_closing():
            return
        if self._received or not dec.shrink():
            self._received = False
            self._shrink_timer = self._loop.call_later(IDLE_SHRINK, self._shrink_if_idle)

    def pause_writing(self) -> None:
        self._pause(1)

    def resume_writing(self) -> None:
        self._resume(1)

    def eof_received(self) -> bool | None:
        # Let in-flight requests finish, then close (a client may half-close).
        self._disconnect()
        return True

    # ---- handshake
    def _hs_timeout(self) -> None:
        if self._dec is None:
            self._abort("handshake timed out")
            if self.transport is not None:
                # a close waits until the client has taken the replies queued for it:
                # one that stopped reading them (and so stopped negotiating) kept its
                # connection and its buffers for as long as it liked
                self.transport.abort()

    def _handshake(self, data: bytes) -> None:
        hs = self._hs
        assert hs is not None and self.transport is not None
        while True:
            try:
                hs.receive_data(data)
            finally:
                out = hs.data_to_send()
                if out:
                    self.transport.write(out)
                    if hs.phase is p.Phase.OPTIONS and self._timer is not None:
                        # an option was answered: the client makes progress, restart its clock
                        self._timer.cancel()
                        self._timer = self._loop.call_later(HANDSHAKE_TIMEOUT, self._hs_timeout)
            # The core holds options back once OUTPUT_BUDGET bytes of replies wait: go on
            # while the client takes them; once the transport pauses us, _resume goes on.
            if not (out and hs.buffered and hs.phase is p.Phase.OPTIONS and not self._paused_reasons):
                break
            data = b""
        if hs.phase is p.Phase.CLOSED:
            self.transport.close()
        elif hs.phase is p.Phase.TRANSMISSION:
            neg = hs.negotiated
            assert neg is not None
            export = self.server.exports.get(neg.export.name)
            if export is None:  # removed while we negotiated
                self._abort(f"export {neg.export.name!r} went away")
                return
            if self._timer:
                self._timer.cancel()
            self.export = export
            self._backend = export.backend
            self._size = neg.export.size
            self._flags = neg.export.flags
            self._writable = not self._flags & p.FLAG_READ_ONLY
            self._structured = neg.structured_replies
            self._alloc_ctx = neg.allocation_context
            sock = self.transport.get_extra_info("socket")
            if sock is not None and export.backend.zero_copy_fd(ZERO_COPY_MIN) is not None:
                # our own handle on the socket, for sendfile (the transport's is hidden)
                self._zsock = socket.socket(fileno=os.dup(sock.fileno()))
                self._zsock.setblocking(False)
            self._hs = None
            self._hs_buf = bytearray()  # not needed any more
            self._dec = p.RequestDecoder()
            if hs.leftover:
                self._dec.receive_data(hs.leftover)
                self._process()

    # ---- transmission
    def _process(self) -> None:
        dec = self._dec
        assert dec is not None
        self._in_receive = True
        try:
            # Paused (our replies back up: pause_writing, or too many in flight), requests
            # wait in the buffer, not in memory as replies: _resume takes them up again.
            while not self._disconnecting and not self._paused_reasons:
                req = dec.next_event()
                if req is None:
                    break
                self._dispatch(req)
                if req.length >= ZERO_COPY_MIN and req.type == _CMD_READ:
                    self._flush_out()  # a big reply goes now: the transport may pause us
        finally:
            self._in_receive = False
            self._flush_out()

    def _flush_out(self) -> None:
        self._flush_pending = False
        if self._out and self.transport is not None:
            out, self._out = self._out, []
            try:
                self.transport.writelines(out)
            except RuntimeError:
                # uvloop refuses a closed transport: a reply queued in the turn its host
                # reset the connection, nobody left to answer (a traceback in the log).
                if not self.transport.is_closing():
                    raise

    def _flush_soon(self) -> None:
        """Replies finished outside a receive pass (their Backend waited) go out
        together at the end of this loop iteration: one send for all of them."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush_out)

    def _send(self, *parts: Any) -> None:
        self._out.extend(parts)
        if not self._in_receive:
            self._flush_soon()

    def _dispatch(self, req: p.Request) -> None:
        t = req.type
        if not (  # a plain READ or WRITE inside the export passes every check of _validate
            req.flags == 0
            and (t == p.CMD_READ or (t == p.CMD_WRITE and self._writable))
            and 0 < req.length <= p.MAX_BLOCK
            and req.offset + req.length <= self._size
        ):
            if t == p.CMD_DISC:  # never replied to, whatever its flags (section "NBD_CMD_DISC")
                self._disconnect()
                return
            err = self._validate(req)
            if err is not None:
                self._send_error(req, err[0], err[1])
                return
        starts = self._backend is not None and self._backend.can_start_io
        if t == p.CMD_READ:
            if starts and req.length < SPARSE_READ_MIN and self._start_read(req):
                return
            coro = self._read(req)
        elif t == p.CMD_WRITE:
            if starts and self._start_write(req):
                return
            coro = self._write(req)
        else:
            coro = self._other(req)
        task = run_eager(coro, self._loop)
        if task is None:
            return
        if t == p.CMD_WRITE and self._dec is not None and self._dec.shares_buffer(req.data):
            # The suspended write holds a view of the receive buffer:
            # receive what follows into a fresh one.
            self._dec.detach_buffer()
        self._inflight.add(task)
        if req.length >= ZERO_COPY_MIN and t <= p.CMD_WRITE:  # a big READ or WRITE
            self._hold(req.length)
            task.add_done_callback(functools.partial(self._held_task_done, req.length))
        else:
            task.add_done_callback(self._task_done)
        if self._busy() >= MAX_INFLIGHT:
            self._pause(2)

    def _busy(self) -> int:
        """Requests waiting on the Backend: Tasks, and I/O begun with start_read / start_write."""
        return len(self._inflight) + self._started

    # A Backend that offers start_read / start_write (a remote LUN) takes a plain
    # READ or WRITE without a coroutine or a Task; its ``done`` callback replies.
    def _start_read(self, req: p.Request) -> bool:
        assert self._backend is not None
        if not self._backend.start_read(req.offset, req.length, functools.partial(self._read_done, req)):
            return False
        self._begun()
        return True

    def _start_write(self, req: p.Request) -> bool:
        assert self._backend is not None and req.data is not None
        fua = bool(req.flags & p.CMD_FLAG_FUA)
        if not self._backend.start_write(req.offset, req.data, fua, functools.partial(self._write_done, req)):
            return False
        if self._dec is not None and self._dec.shares_buffer(req.data):
            self._dec.detach_buffer()  # the Backend holds a view of it until done
        if req.length >= ZERO_COPY_MIN:
            self._hold(req.length)
        self._begun()
        return True

    def _hold(self, nbytes: int) -> None:
        self._held += nbytes
        if self._held > MAX_INFLIGHT_BYTES:
            self._pause(4)

    def _begun(self) -> None:
        self._started += 1
        if self._busy() >= MAX_INFLIGHT:
            self._pause(2)

    def _read_done(self, req: p.Request, data: Any, error: Exception | None) -> None:
        if error is not None:
            self._started_done(req, error)
        elif self._structured:
            header = _pack_offset_data(_SR_MAGIC, _DONE, _OFFSET_DATA, req.cookie, req.length + 8, req.offset)
            self._started_done(req, None, header, data)
        else:
            self._started_done(req, None, _pack_simple(_SIMPLE_MAGIC, 0, req.cookie), data)

    def _write_done(self, req: p.Request, result: Any, error: Exception | None) -> None:
        self._started_done(req, error, _pack_simple(_SIMPLE_MAGIC, 0, req.cookie))

    def _started_done(self, req: p.Request, error: Exception | None, *reply: Any) -> None:
        """A started I/O ended: its error, or ``reply``, goes to the client."""
        self._started -= 1
        if req.length >= ZERO_COPY_MIN:  # (a started READ is smaller: never held)
            self._held -= req.length
        if self.transport is None or self.transport.is_closing():
            pass  # the client went away (abort): nobody to answer
        elif error is not None:
            self._backend_failed(req, error)
        else:
            self._out.extend(reply)
            if not self._in_receive:
                self._flush_soon()
        self._io_done()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._io_done()

    def _held_task_done(self, nbytes: int, task: asyncio.Task[None]) -> None:
        self._held -= nbytes
        self._task_done(task)

    def _io_done(self) -> None:
        if self._busy() < MAX_INFLIGHT // 2:
            self._resume(2)
        if self._held <= MAX_INFLIGHT_BYTES // 2:
            self._resume(4)
        if self._disconnecting and not self._busy():
            self._close_now()

    def _validate(self, req: p.Request) -> tuple[int, str] | None:
        """The spec's checks, in nbdkit's order; (NBD error, message) or None."""
        t = req.type
        allowed = _CMD_FLAGS.get(t)
        if allowed is None:
            return p.EINVAL, f"unknown command {t}"
        name = p.CMD_NAMES[t]
        if self._flags & p.FLAG_SEND_FUA:
            allowed |= p.CMD_FLAG_FUA  # section "Command flags": valid on every command once offered
        if req.flags & ~allowed:
            return p.EINVAL, f"{name}: flags 0x{req.flags:x} not allowed"
        if req.flags & p.CMD_FLAG_DF and not self._structured:
            return p.EINVAL, "READ: DF needs structured replies"
        if req.flags & p.CMD_FLAG_FAST_ZERO and not self._flags & p.FLAG_SEND_FAST_ZERO:
            return p.EINVAL, "WRITE_ZEROES: FAST_ZERO not offered"
        if t in _MODIFYING and not self._writable:
            if not self._flags & p.FLAG_READ_ONLY and not self._refused_warned:
                # it negotiated writes: say once why they fail now, not at every request
                self._refused_warned = True
                log.warning(
                    "connection %s: export %s was made read-only (fenced) after it connected; "
                    "its writes fail with EPERM",
                    self.peer,
                    self._name(),
                )
            return p.EPERM, f"{name}: export is read-only"
        if t == p.CMD_FLUSH:
            if req.offset or req.length:
                return p.EINVAL, "FLUSH: offset and length must be 0"
            return None
        if req.length == 0:
            return p.EINVAL, f"{name}: zero length"
        if req.offset + req.length > self._size:
            err = p.ENOSPC if t in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.EINVAL
            return err, (
                f"{name}: offset {req.offset} + length {req.length} is beyond the end "
                f"of the export ({self._size} bytes)"
            )
        if t == p.CMD_READ and req.length > p.MAX_BLOCK:
            return p.EINVAL, f"READ: length {req.length} exceeds the {p.MAX_BLOCK} byte maximum"
        if t == p.CMD_TRIM and not self._flags & p.FLAG_SEND_TRIM:
            return p.EINVAL, "TRIM not supported"
        if t == p.CMD_WRITE_ZEROES and not self._flags & p.FLAG_SEND_WRITE_ZEROES:
            return p.EINVAL, "WRITE_ZEROES not supported"
        if t == p.CMD_CACHE and not self._flags & p.FLAG_SEND_CACHE:
            return p.EINVAL, "CACHE not supported"
        if t == p.CMD_BLOCK_STATUS and self._alloc_ctx is None:
            return p.EINVAL, "BLOCK_STATUS: no metadata context was negotiated"
        return None

    def _send_error(self, req: p.Request, error: int, message: str) -> None:
        if self._structured and req.type in (p.CMD_READ, p.CMD_BLOCK_STATUS):
            self._send(p.build_error_chunk(req.cookie, error, message))
        else:
            self._send(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, req.cookie))

    def _backend_failed(self, req: p.Request, e: Exception) -> None:
        if isinstance(e, BackendError):
            err = nbd_error(
                e.errno,
                fast_zero=bool(req.flags & p.CMD_FLAG_FAST_ZERO),
                df=bool(req.flags & p.CMD_FLAG_DF),
            )
            msg = str(e)
        else:
            log.exception("%s on export %s failed", p.CMD_NAMES.get(req.type), self._name())
            err, msg = p.EIO, f"internal error: {e!r}"
        self._send_error(req, err, msg)

    def _name(self) -> str:
        return self.export.name if self.export else "?"

    async def _read(self, req: p.Request) -> None:
        backend = self._backend
        assert backend is not None
        off, length, cookie = req.offset, req.length, req.cookie
        try:
            if not self._structured:
                header = _pack_simple(_SIMPLE_MAGIC, 0, cookie)
                if length >= ZERO_COPY_MIN and self._send_file(header, off, length):
                    return
                data = await backend.read(off, length)
                self._send(header, data)
                return
            if length >= SPARSE_READ_MIN and not req.flags & p.CMD_FLAG_DF and backend.can_extents:
                await self._sparse_read(req)
                return
            data = await backend.read(off, length)
            out = self._out
            out.append(_pack_offset_data(_SR_MAGIC, _DONE, _OFFSET_DATA, cookie, length + 8, off))
            out.append(data)
            if not self._in_receive:
                self._flush_soon()
        except Exception as e:
            self._backend_failed(req, e)

    def _send_file(self, header: bytes, offset: int, length: int) -> bool:
        """Send a READ reply: ``header``, then ``length`` bytes of the
        Backend's file at ``offset`` with sendfile(2), page cache to socket
        without a copy through Python (nbdkit's file plugin preads, then sends).

        Only when the Backend offers its file and the transport has nothing
        queued, so our bytes cannot interleave with its own; whatever the
        socket does not take now is read and queued on the transport. False
        when nothing was sent: the caller takes the normal path. Once the
        header is out, a failure can only drop the connection.
        """
        t, sock, backend = self.transport, self._zsock, self._backend
        if t is None or sock is None or backend is None or t.is_closing() or t.get_write_buffer_size():
            return False
        fd = backend.zero_copy_fd(length, offset)
        if fd is None:
            return False
        try:
            n = sock.send(header, socket.MSG_MORE)  # the data follows at once
        except OSError:  # EAGAIN; a dead socket is the transport's to report
            return False
        sent = 0
        try:
            if n < len(header):  # rare: the socket took part of the header
                t.write(header[n:])
            else:
                while sent < length:
                    k = os.sendfile(sock.fileno(), fd, offset + sent, length - sent)
                    if k == 0:  # end of file: the file shrank, pread tells
                        break
                    sent += k
        except BlockingIOError:
            pass
        except OSError as e:
            self._abort(f"READ at {offset}: {e} (after the reply header was sent)")
            return True
        if sent < length:
            try:
                data = os.pread(fd, length - sent, offset + sent)
            except OSError as e:
                data = b""
                log.warning("READ at %d on export %s: %s", offset, self._name(), e)
            if len(data) != length - sent:
                self._abort(f"READ at {offset}: short read after the reply header was sent")
                return True
            t.write(data)
        return True

    async def _sparse_read(self, req: p.Request) -> None:
        """Structured read that sends holes as OFFSET_HOLE chunks."""
        backend = self._backend
        assert backend is not None
        off, end, cookie = req.offset, req.offset + req.length, req.cookie
        runs: list[tuple[int, int, bool]] = []  # (offset, length, is_hole)
        pos = off
        while pos < end and len(runs) <= 16:
            for ext in await backend.extents_for_read(pos, end - pos):
                n = min(ext.length, end - pos)
                if n <= 0:
                    break
                hole = bool(ext.flags & p.STATE_ZERO)
                if runs and runs[-1][2] == hole:
                    o, ln, h = runs[-1]
                    runs[-1] = (o, ln + n, h)
                else:
                    runs.append((pos, n, hole))
                pos += n
                if pos >= end:
                    break
        if pos < end or len(runs) > 16 or not any(h for _, _, h in runs):
            # too fragmented or no holes: one data chunk
            header = _pack_offset_data(_SR_MAGIC, _DONE, _OFFSET_DATA, cookie, end - off + 8, off)
            if self._send_file(header, off, end - off):
                return
            runs = [(off, end - off, False)]
        datas = iter(await _read_all(backend, [(o, n) for o, n, hole in runs if not hole]))
        parts: list[Any] = []
        last = len(runs) - 1
        for i, (o, n, hole) in enumerate(runs):
            flags = p.REPLY_FLAG_DONE if i == last else 0
            if hole:
                parts.append(
                    p.OFFSET_HOLE.pack(
                        p.STRUCTURED_REPLY_MAGIC, flags, p.REPLY_TYPE_OFFSET_HOLE, cookie, 12, o, n
                    )
                )
            else:
                data = next(datas)
                parts.append(
                    p.OFFSET_DATA_HEADER.pack(
                        p.STRUCTURED_REPLY_MAGIC, flags, p.REPLY_TYPE_OFFSET_DATA, cookie, n + 8, o
                    )
                )
                parts.append(data)
        # All chunks of one reply go out together, so a failure half-way
        # sends a single error chunk rather than a partial reply.
        self._send(*parts)

    async def _write(self, req: p.Request) -> None:
        backend = self._backend
        assert backend is not None and req.data is not None
        try:
            await backend.write(req.offset, req.data, bool(req.flags & p.CMD_FLAG_FUA))
        except Exception as e:
            self._backend_failed(req, e)
            return
        self._out.append(_pack_simple(_SIMPLE_MAGIC, 0, req.cookie))
        if not self._in_receive:
            self._flush_soon()

    async def _other(self, req: p.Request) -> None:
        backend = self._backend
        assert backend is not None
        t, off, length, f = req.type, req.offset, req.length, req.flags
        try:
            if t == p.CMD_FLUSH:
                await backend.flush()
            elif t == p.CMD_TRIM:
                await backend.trim(off, length, bool(f & p.CMD_FLAG_FUA))
            elif t == p.CMD_WRITE_ZEROES:
                await backend.write_zeroes(
                    off,
                    length,
                    may_trim=not f & p.CMD_FLAG_NO_HOLE,
                    fast=bool(f & p.CMD_FLAG_FAST_ZERO),
                    fua=bool(f & p.CMD_FLAG_FUA),
                )
            elif t == p.CMD_CACHE:
                await backend.cache(off, length)
            elif t == p.CMD_BLOCK_STATUS:
                await self._block_status(req)
                return
        except Exception as e:
            self._backend_failed(req, e)
            return
        self._send(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, req.cookie))

    async def _block_status(self, req: p.Request) -> None:
        backend = self._backend
        assert backend is not None and self._alloc_ctx is not None
        if req.flags & p.CMD_FLAG_REQ_ONE:  # a remote source is asked for one only
            # Exactly one descriptor, no longer than the request (section "NBD_CMD_BLOCK_STATUS"),
            # whose length is a u32 already: not split like the rest below.
            e = await backend.first_extent(req.offset, req.length)
            out = [p.Extent(min(e.length, req.length), e.flags)]
        else:
            # Lengths on the wire are u32: split what is longer.
            out = []
            limit = 0xFFFFF000
            for e in await backend.extents(req.offset, req.length):
                n = e.length
                while n > 0:
                    out.append(p.Extent(min(n, limit), e.flags))
                    n -= limit
        self._send(p.build_block_status_chunk(req.cookie, self._alloc_ctx, out))

    def set_writable(self, writable: bool) -> None:
        """Revoke (or give back) write access after the handshake; never more than
        the client negotiated."""
        self._writable = writable and not self._flags & p.FLAG_READ_ONLY

    # ---- flow control and teardown
    def _pause(self, reason: int) -> None:
        if not self._paused_reasons and self.transport is not None:
            self.transport.pause_reading()
        self._paused_reasons |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused_reasons & reason:
            return
        self._paused_reasons &= ~reason
        if self._paused_reasons or self.transport is None or self._disconnecting:
            return
        if self._dec is not None and not self._in_receive:  # (in _process, its loop goes on)
            # the requests left in the buffer first: reading again may bring EOF behind them
            try:
                self._process()
            except ProtocolError as e:
                self._abort(f"protocol error: {e}")
                return
            if self._paused_reasons or self._disconnecting:
                return
        elif self._hs is not None and self._hs.buffered and self._hs.phase is p.Phase.OPTIONS:
            # options held back while the client did not take our replies (OUTPUT_BUDGET)
            try:
                self._handshake(b"")
            except ProtocolError as e:
                self._abort(f"protocol error: {e}")
                return
            if self._paused_reasons or self._disconnecting or self.transport.is_closing():
                return
        self.transport.resume_reading()

    def _disconnect(self) -> None:
        """DISC or EOF: stop reading, finish what is in flight, close."""
        self._disconnecting = True
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.pause_reading()
            except (RuntimeError, OSError):
                pass
        if not self._busy():
            if self._in_receive:
                self._loop.call_soon(self._close_now)
            else:
                self._close_now()

    def _close_now(self) -> None:
        self._flush_out()
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Server stopping: like DISC from our side."""
        if self._dec is None:
            self._abort("server shutting down")
        else:
            self._disconnect()

    def stuck_on(self) -> str:
        """Why a close has not finished: for the log line of :meth:`abort_now`."""
        if self._busy():
            return f"{self._busy()} request(s) still in flight"
        unsent = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return f"the client does not read its replies ({unsent} bytes unsent)"

    def abort_now(self, why: str) -> None:
        """Close at once, whatever is in flight."""
        self._abort(why, logging.WARNING)
        if self.transport is not None:
            self.transport.abort()

    def _abort(self, why: str, level: int = logging.INFO) -> None:
        log.log(level, "closing connection %s (export %s): %s", self.peer, self._name(), why)
        self._disconnecting = True
        for t in self._inflight:
            t.cancel()
        if self.transport is not None:
            self._flush_out()
            self.transport.close()


def keep_freed_memory() -> None:
    """Make glibc keep freed request buffers instead of returning them at once.

    Every big READ reply is a fresh ``bytes`` and every big WRITE payload a
    fresh buffer. By default glibc trims the heap (brk) when a 1 MiB block
    is freed and the next request faults the pages back in, 256 faults per
    MiB: that costs more than the pread itself. Serve blocks up to 32 MiB
    (MAX_BLOCK, glibc's cap) from the heap and keep up to 64 MiB free on it.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return
    mallopt(_M_MMAP_THRESHOLD, p.MAX_BLOCK)
    mallopt(_M_TRIM_THRESHOLD, 2 * p.MAX_BLOCK)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h


def serve_forever_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for a serving process (uvloop when installed).

    Also calls :func:`keep_freed_memory`.
    """
    keep_freed_memory()
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()


def stop_event() -> asyncio.Event:
    """An Event set once the process gets SIGTERM or SIGINT, which are handled from now on.
    A serving process takes it before it says it is ready: a stop sent as soon as that line
    (or runtime.json) appears is then a graceful stop, not death by the signal's default
    action (half of such stops were, the final flush skipped)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def format_listen(host: str, port: int) -> str:
    return f"nbd://{host}:{port}" if ":" not in host else f"nbd://[{host}]:{port}"


def uris(host: str, port: int, names: Iterable[str]) -> list[str]:
    base = format_listen(host, port)
    return [f"{base}/{n}" for n in names]
