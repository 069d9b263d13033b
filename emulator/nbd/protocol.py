"""Sans-IO core of the NBD protocol (fixed newstyle).

Everything here is bytes in, events and bytes out: no sockets, no asyncio.
The server adapter (server.py), the client adapter (client.py) and the tests
share these definitions of the wire format. Section names in comments refer
to doc/proto.md of NetworkBlockDevice/nbd.

Names mirror the spec without the ``NBD_`` prefix.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from .errors import ProtocolError

# --------------------------------------------------------------------------- magics
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC_OPT = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --------------------------------------------------------------------------- handshake flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# --------------------------------------------------------------------------- options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR | 1
REP_ERR_POLICY = _REP_ERR | 2
REP_ERR_INVALID = _REP_ERR | 3
REP_ERR_PLATFORM = _REP_ERR | 4
REP_ERR_TLS_REQD = _REP_ERR | 5
REP_ERR_UNKNOWN = _REP_ERR | 6
REP_ERR_SHUTDOWN = _REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
REP_ERR_TOO_BIG = _REP_ERR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --------------------------------------------------------------------------- transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# --------------------------------------------------------------------------- commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# --------------------------------------------------------------------------- structured replies
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# base:allocation (section "base:allocation metadata context")
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"

# --------------------------------------------------------------------------- errors (section "Error values")
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

ERROR_NAMES = {
    EPERM: "EPERM",
    EIO: "EIO",
    ENOMEM: "ENOMEM",
    EINVAL: "EINVAL",
    ENOSPC: "ENOSPC",
    EOVERFLOW: "EOVERFLOW",
    ENOTSUP: "ENOTSUP",
    ESHUTDOWN: "ESHUTDOWN",
}

# --------------------------------------------------------------------------- limits
MAX_STRING = 4096  # names, descriptions, context queries (section "Metadata querying")
MAX_OPTION_LENGTH = 64 * 1024  # an option's payload; larger ones end the handshake
MAX_BLOCK = 32 * 1024 * 1024  # largest READ/WRITE payload we advertise and accept
PREFERRED_BLOCK = 4096
HANDSHAKE_ZEROES = bytes(124)

# --------------------------------------------------------------------------- wire formats
# Precompiled once: no struct.Struct on a hot path.
SERVER_GREETING = struct.Struct("!QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct("!I")
OPTION_HEADER = struct.Struct("!QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct("!QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct("!QH")  # size, transmission flags
REQUEST = struct.Struct("!IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct("!IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct("!IHHQI")  # magic, flags, type, cookie, length
OFFSET_DATA_HEADER = struct.Struct("!IHHQIQ")  # structured header + offset
OFFSET_HOLE = struct.Struct("!IHHQIQI")  # structured header + offset + hole size
HOLE_BODY = struct.Struct("!QI")  # OFFSET_HOLE payload: offset, hole size
ERROR_CHUNK = struct.Struct("!IH")  # error, message length
U16 = struct.Struct("!H")
U32 = struct.Struct("!I")
U64 = struct.Struct("!Q")
INFO_EXPORT_FMT = struct.Struct("!HQH")
INFO_BLOCK_SIZE_FMT = struct.Struct("!HIII")
EXTENT = struct.Struct("!II")


# =========================================================================== plain data
@dataclass(slots=True)
class Request:
    """One transmission request (section "Request message").

    Wire: ``magic:u32 flags:u16 type:u16 cookie:u64 offset:u64 length:u32``
    followed, for CMD_WRITE only, by ``length`` bytes of payload in ``data``.
    """

    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    data: memoryview | bytes | None = None

    def header(self) -> bytes:
        return REQUEST.pack(REQUEST_MAGIC, self.flags, self.type, self.cookie, self.offset, self.length)


@dataclass(slots=True, frozen=True)
class BlockSize:
    minimum: int = 1
    preferred: int = PREFERRED_BLOCK
    maximum: int = MAX_BLOCK


@dataclass(slots=True, frozen=True)
class ExportInfo:
    """What a server says about one export during negotiation."""

    name: str
    size: int
    flags: int
    description: str = ""
    block_size: BlockSize = field(default_factory=BlockSize)
    allocation: bool = True  # offers base:allocation


@dataclass(slots=True, frozen=True)
class Extent:
    """A run of bytes with the same base:allocation state (STATE_HOLE | STATE_ZERO bits)."""

    length: int
    flags: int


def describe_flags(flags: int) -> list[str]:
    names = [
        (FLAG_HAS_FLAGS, "HAS_FLAGS"),
        (FLAG_READ_ONLY, "READ_ONLY"),
        (FLAG_SEND_FLUSH, "SEND_FLUSH"),
        (FLAG_SEND_FUA, "SEND_FUA"),
        (FLAG_ROTATIONAL, "ROTATIONAL"),
        (FLAG_SEND_TRIM, "SEND_TRIM"),
        (FLAG_SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"),
        (FLAG_SEND_DF, "SEND_DF"),
        (FLAG_CAN_MULTI_CONN, "CAN_MULTI_CONN"),
        (FLAG_SEND_RESIZE, "SEND_RESIZE"),
        (FLAG_SEND_CACHE, "SEND_CACHE"),
        (FLAG_SEND_FAST_ZERO, "SEND_FAST_ZERO"),
    ]
    return [n for bit, n in names if flags & bit]


# =========================================================================== builders
def build_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def build_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(REPLY_MAGIC_OPT, option, reply, len(data)) + data


def build_info_request(name: str, infos: Iterable[int] = ()) -> bytes:
    """INFO/GO payload: ``namelen:u32 name nreq:u16 info:u16*``."""
    n = name.encode()
    infos = list(infos)
    return U32.pack(len(n)) + n + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)


def build_meta_context_request(name: str, queries: Iterable[str]) -> bytes:
    """LIST/SET_META_CONTEXT payload: ``namelen:u32 name nq:u32 (qlen:u32 q)*``."""
    n = name.encode()
    qs = [q.encode() for q in queries]
    return U32.pack(len(n)) + n + U32.pack(len(qs)) + b"".join(U32.pack(len(q)) + q for q in qs)


def build_simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def build_structured_header(cookie: int, type_: int, length: int, flags: int = 0) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, type_, cookie, length)


def encode_string(s: str) -> bytes:
    """``s`` as a protocol string: UTF-8 of at most MAX_STRING bytes, a longer one cut
    before the first character that does not fit whole (section "Conventions")."""
    b = s.encode()
    return b if len(b) <= MAX_STRING else b[:MAX_STRING].decode(errors="ignore").encode()


def build_error_chunk(cookie: int, error: int, message: str = "", offset: int | None = None) -> bytes:
    """REPLY_TYPE_ERROR(_OFFSET) with DONE: ``error:u32 msglen:u16 msg [offset:u64]``."""
    msg = encode_string(message)
    body = ERROR_CHUNK.pack(error, len(msg)) + msg
    type_ = REPLY_TYPE_ERROR
    if offset is not None:
        body += U64.pack(offset)
        type_ = REPLY_TYPE_ERROR_OFFSET
    return build_structured_header(cookie, type_, len(body), REPLY_FLAG_DONE) + body


def build_block_status_chunk(
    cookie: int, context_id: int, extents: Iterable[Extent], done: bool = True
) -> bytes:
    body = U32.pack(context_id) + b"".join(EXTENT.pack(e.length, e.flags) for e in extents)
    return (
        build_structured_header(cookie, REPLY_TYPE_BLOCK_STATUS, len(body), REPLY_FLAG_DONE if done else 0)
        + body
    )


# =========================================================================== request decoder
_REQUEST_SIZE = REQUEST.size
_SIMPLE_SIZE = SIMPLE_REPLY.size
_STRUCTURED_SIZE = STRUCTURED_REPLY.size
_unpack_u32 = U32.unpack_from
_unpack_simple = SIMPLE_REPLY.unpack_from
_unpack_structured = STRUCTURED_REPLY.unpack_from
_unpack_request = REQUEST.unpack_from  # bound once: this runs for every request


#: WRITE payloads up to this size that arrive whole are handed out as a copy
WRITE_COPY_MAX = 16 * 1024
#: a decoder moves its unparsed bytes to the front when less room than this is left
_MIN_ROOM = 4096
#: a decoder's receive buffer starts this small (an idle connection holds no more)
#: and grows to its full ``buffer_size`` once a receive fills it (see :meth:`_Receiver.shrink`)
INITIAL_BUFFER = 16 * 1024
E = TypeVar("E")


class _Receiver(Generic[E]):
    """What both transmission-phase decoders share: a buffer the adapter
    receives into (:meth:`get_buffer`, then :meth:`buffer_updated`), parsed
    from ``_start`` to ``_end``; a payload received in place (``_into``)
    while one is set; and no input at all after the first malformed frame.

    The buffer starts at ``INITIAL_BUFFER`` bytes and grows to ``buffer_size``
    when a receive fills it (a client sending faster than small receives
    drain); :meth:`shrink` gives the room back once the connection is idle.
    Hundreds of hosts mostly idle then hold 16 KiB each, not 256 KiB."""

    def __init__(self, buffer_size: int) -> None:
        self._max_size = buffer_size
        self._buf = bytearray(min(buffer_size, INITIAL_BUFFER))
        self._view = memoryview(self._buf)
        #: the buffer has grown past its initial size (see :meth:`shrink`)
        self.grown = False
        self._start = 0
        self._end = 0
        self._need = 0  # bytes the frame at _start needs in the buffer (0: it fits any)
        self._into: memoryview | None = None  # a payload being received in place
        self._into_got = 0
        self._broken: ProtocolError | None = None

    # ---- receiving
    def get_buffer(self) -> memoryview:
        if self._broken:
            raise self._broken
        if self._into is not None:
            return self._into[self._into_got :]
        buf = self._buf
        if self._start == self._end:
            self._start = self._end = 0
        elif len(buf) - self._end < _MIN_ROOM or len(buf) - self._start < self._need:
            self._move_tail(self._need)
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._into is not None:
            self._into_got += nbytes
        else:
            self._end += nbytes
            if self._end == len(self._buf) < self._max_size:
                # this receive filled the buffer: more is coming than it holds
                self._move_tail(self._max_size)

    def shrink(self) -> bool:
        """Give a grown buffer back (call it once the connection has been idle a
        while): True if it is back to its initial size. Only when empty: nothing
        unparsed and no payload being received."""
        if self.grown and self._into is None and self._start == self._end:
            self._buf = bytearray(min(self._max_size, INITIAL_BUFFER))
            self._view = memoryview(self._buf)
            self._start = self._end = 0
            self.grown = False
        return not self.grown

    def _move_tail(self, size: int, fresh: bool = False) -> None:
        """Move the unparsed bytes to the front: of a fresh buffer (``fresh``,
        or ``size`` larger than this one, which then is its size), else of this one."""
        n = self._end - self._start
        if fresh or size > len(self._buf):
            new = bytearray(max(size, len(self._buf)))
            new[:n] = self._view[self._start : self._end]
            self._buf, self._view = new, memoryview(new)
            self.grown = len(new) > INITIAL_BUFFER
        elif self._start:
            self._buf[:n] = self._view[self._start : self._end]
        self._start, self._end = 0, n

    # ---- parsing
    def next_event(self) -> E | None:
        """The next event, or None when more bytes are needed."""
        if self._broken:
            raise self._broken
        try:
            return self._next()
        except ProtocolError as e:
            self._broken = e
            raise

    def _next(self) -> E | None:
        raise NotImplementedError


class RequestDecoder(_Receiver[Request]):
    """Server side of the transmission phase: bytes in, :class:`Request` out.

    Zero-copy friendly: the adapter asks :meth:`get_buffer` where to receive
    and reports with :meth:`buffer_updated`. A WRITE payload that arrived
    whole in the receive buffer is handed out as a memoryview of that buffer,
    valid until the next :meth:`get_buffer` (up to ``WRITE_COPY_MAX`` bytes,
    a copy); the adapter detaches the buffer if it must keep a view longer.
    Larger payloads are received straight into a buffer of their own.

    Any malformed frame raises :class:`ProtocolError` and the decoder refuses
    further input: the adapter drops the connection, nothing is half-applied.
    """

    def __init__(self, max_payload: int = MAX_BLOCK, buffer_size: int = 256 * 1024) -> None:
        super().__init__(buffer_size)
        self._max_payload = max_payload
        self._pending: Request | None = None  # header parsed, payload being received (_into)

    def receive_data(self, data: bytes) -> None:
        """Copying convenience for tests and byte-by-byte feeding.

        Only feed as much as the caller will parse: events are produced by
        :meth:`next_event`, which must be drained between calls.
        """
        view = memoryview(data)
        while view:
            buf = self.get_buffer()
            if not buf:
                raise ProtocolError("receive buffer full: drain next_event() first")
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    def shares_buffer(self, data: object) -> bool:
        """True if ``data`` (a WRITE payload) is a view of the receive buffer."""
        return isinstance(data, memoryview) and data.obj is self._buf

    def detach_buffer(self) -> None:
        """Receive into a fresh buffer from now on.

        Call it when a WRITE payload handed out as a view of the receive
        buffer must outlive the next receive (its Backend call suspended).
        """
        self._move_tail(len(self._buf), fresh=True)

    # ---- parsing
    def _next(self) -> Request | None:
        pending = self._pending
        if pending is not None:
            assert self._into is not None
            if self._into_got < pending.length:
                return None
            pending.data = self._into
            self._pending = None
            self._into = None
            return pending
        start = self._start
        avail = self._end - start
        if avail < _REQUEST_SIZE:
            return None
        magic, flags, type_, cookie, offset, length = _unpack_request(self._buf, start)
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic 0x{magic:08x}")
        self._start = start = start + _REQUEST_SIZE
        req = Request(flags, type_, cookie, offset, length)
        if type_ != CMD_WRITE:
            return req
        if length > self._max_payload:
            raise ProtocolError(
                f"WRITE payload of {length} bytes exceeds the {self._max_payload} byte maximum"
            )
        avail -= _REQUEST_SIZE
        if avail >= length:
            if length <= WRITE_COPY_MAX:
                # Small: a copy costs less than a fresh receive buffer if the write waits.
                req.data = bytes(self._view[self._start : self._start + length])
            else:
                req.data = self._view[self._start : self._start + length]
            self._start += length
            return req
        # Payload spills past what we have: give it a buffer of its own.
        payload = memoryview(bytearray(length))
        payload[:avail] = self._view[self._start : self._end]
        self._start = self._end = 0
        self._pending = req
        self._into = payload
        self._into_got = avail
        return None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed (for tests)."""
        return self._end - self._start


# =========================================================================== reply decoder
@dataclass(slots=True)
class SimpleReply:
    """``magic:u32 error:u32 cookie:u64`` then, for a successful READ, the data."""

    cookie: int
    error: int


@dataclass(slots=True)
class StructuredChunk:
    """``magic:u32 flags:u16 type:u16 cookie:u64 length:u32`` then ``length`` bytes.

    An OFFSET_DATA chunk whose data the decoder put in the READ's buffer has an
    empty ``payload`` and says in ``placed`` how many bytes it put there (the
    client checks that a successful READ got all its bytes)."""

    cookie: int
    flags: int
    type: int
    payload: bytes
    placed: int = 0

    @property
    def done(self) -> bool:
        return bool(self.flags & REPLY_FLAG_DONE)


ReplyEvent = SimpleReply | StructuredChunk


def parse_error_chunk(chunk: StructuredChunk) -> tuple[int, str, int | None]:
    """Decode an error chunk into (error, message, offset or None)."""
    p = chunk.payload
    if len(p) < ERROR_CHUNK.size:
        raise ProtocolError("error chunk too short")
    err, mlen = ERROR_CHUNK.unpack_from(p)
    if ERROR_CHUNK.size + mlen > len(p):
        raise ProtocolError("error chunk message overruns the chunk")
    msg = bytes(p[ERROR_CHUNK.size : ERROR_CHUNK.size + mlen]).decode(errors="replace")
    off = None
    if chunk.type == REPLY_TYPE_ERROR_OFFSET:
        if len(p) != ERROR_CHUNK.size + mlen + 8:
            raise ProtocolError("error-offset chunk has the wrong length")
        (off,) = U64.unpack_from(p, ERROR_CHUNK.size + mlen)
    return err, msg, off


def parse_block_status_chunk(payload: bytes, limit: int | None = None) -> tuple[int, list[Extent]]:
    """``context_id:u32 (length:u32 flags:u32)*``; only the first ``limit`` extents
    if given (an answer that covers less than asked is valid: the caller asks again)."""
    if len(payload) < 4 or (len(payload) - 4) % EXTENT.size:
        raise ProtocolError("block status chunk has a bad length")
    (ctx,) = U32.unpack_from(payload)
    end = len(payload) if limit is None else min(len(payload), 4 + limit * EXTENT.size)
    return ctx, [Extent(*t) for t in EXTENT.iter_unpack(memoryview(payload)[4:end])]


class ReplyDecoder(_Receiver[tuple[ReplyEvent, bytes | bytearray | None]]):
    """Client side of the transmission phase: bytes in, reply events out.

    A simple reply's data length is not on the wire; the client knows it from
    the request. Tell the decoder through ``read_dest(cookie)``: the READ's
    ``(offset, buffer)`` (None for a request that is not a READ). The data of
    a simple reply or an OFFSET_DATA chunk then lands in that buffer, straight
    from the socket once it outgrows what arrived with its header, and the
    event carries no payload. Without ``read_dest``, ``read_length(cookie)``
    gives the length (0 if none) and the data comes out with the event.

    Zero-copy friendly like :class:`RequestDecoder`: the adapter asks
    :meth:`get_buffer` where to receive and reports with
    :meth:`buffer_updated`. Any malformed frame raises :class:`ProtocolError`
    and the decoder refuses further input.
    """

    def __init__(
        self,
        read_length: Callable[[int], int] | None = None,
        max_payload: int = MAX_BLOCK + 4096,
        read_dest: Callable[[int], tuple[int, memoryview] | None] | None = None,
        buffer_size: int = 256 * 1024,
    ) -> None:
        if (read_length is None) == (read_dest is None):
            raise ValueError("give exactly one of read_length and read_dest")
        super().__init__(buffer_size)
        self._read_length = read_length
        self._read_dest = read_dest
        self._max_payload = max_payload
        self._into_event: tuple[ReplyEvent, bytes | bytearray | None] | None = None  # once _into is full
        self._backlog = bytearray()  # fed by receive_data while a payload awaits next_event

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Copying convenience for tests and byte-by-byte feeding."""
        if self._backlog:
            self._backlog += data
            return
        view = memoryview(data)
        while view:
            buf = self.get_buffer()
            if not buf:
                if self._into is not None:  # a payload is complete: keep the rest for after it
                    self._backlog += view
                    return
                self._need = len(self._buf) * 2  # full of unparsed frames: make room
                continue
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    # ---- parsing: next_event() -> (event, read data of a simple reply or None) or None
    def _next(self) -> tuple[ReplyEvent, bytes | bytearray | None] | None:
        if self._into is not None:
            if self._into_got < len(self._into):
                return None
            done, self._into_event = self._into_event, None
            self._into = None
            if self._backlog:
                rest, self._backlog = self._backlog, bytearray()
                self.receive_data(rest)
            return done
        start = self._start
        avail = self._end - start
        if avail < 4:
            return None
        buf = self._buf
        (magic,) = _unpack_u32(buf, start)
        if magic == SIMPLE_REPLY_MAGIC:
            if avail < _SIMPLE_SIZE:
                return None
            _, error, cookie = _unpack_simple(buf, start)
            ev = SimpleReply(cookie, error)
            start += _SIMPLE_SIZE
            if error:
                self._start = start
                return ev, None
            if self._read_dest is None:
                assert self._read_length is not None
                return self._payload(ev, start, None, self._read_length(cookie))
            dest = self._read_dest(cookie)
            return self._payload(ev, start, None if dest is None else dest[1], 0)
        if magic == STRUCTURED_REPLY_MAGIC:
            if avail < _STRUCTURED_SIZE:
                return None
            _, flags, type_, cookie, length = _unpack_structured(buf, start)
            if length > self._max_payload:
                raise ProtocolError(f"structured reply chunk of {length} bytes is too large")
            if type_ == REPLY_TYPE_OFFSET_DATA and self._read_dest is not None:
                if length >= 8 and avail < _STRUCTURED_SIZE + 8:
                    self._need = _STRUCTURED_SIZE + 8
                    return None
                dest = self._read_dest(cookie)
                if dest is not None:
                    if length < 8:
                        raise ProtocolError("OFFSET_DATA chunk too short")
                    (off,) = U64.unpack_from(buf, start + _STRUCTURED_SIZE)
                    n = length - 8
                    rel = off - dest[0]
                    if rel < 0 or rel + n > len(dest[1]):
                        raise ProtocolError(f"OFFSET_DATA chunk at {off}+{n} outside the request")
                    placed = StructuredChunk(cookie, flags, type_, b"", n)  # the data is in place
                    return self._payload(placed, start + _STRUCTURED_SIZE + 8, dest[1][rel : rel + n], 0)
            if avail < _STRUCTURED_SIZE + length:
                self._need = _STRUCTURED_SIZE + length
                return None
            self._need = 0
            self._start = start + _STRUCTURED_SIZE + length
            payload = bytes(self._view[start + _STRUCTURED_SIZE : self._start])
            return StructuredChunk(cookie, flags, type_, payload), None
        raise ProtocolError(f"bad reply magic 0x{magic:08x}")

    def _payload(
        self, ev: ReplyEvent, pos: int, dest: memoryview | None, length: int
    ) -> tuple[ReplyEvent, bytes | bytearray | None] | None:
        """The data after a header at ``pos``: into ``dest`` (all of it), or
        ``length`` bytes returned with the event."""
        n = len(dest) if dest is not None else length
        have = self._end - pos
        self._need = 0
        if have >= n:
            self._start = pos + n
            if dest is not None:
                dest[:] = self._view[pos : pos + n]
                return ev, None
            return ev, (bytes(self._view[pos : pos + n]) if n else None)
        # The rest arrives straight into its place (a buffer of its own without one).
        out: bytearray | None = None
        if dest is None:
            out = bytearray(n)
            dest = memoryview(out)
        dest[:have] = self._view[pos : self._end]
        self._start = self._end = 0
        self._into, self._into_got = dest, have
        self._into_event = (ev, out)
        return None


# =========================================================================== server handshake
class Phase(enum.Enum):
    GREETING = "greeting"  # waiting for the client flags
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(slots=True)
class Negotiated:
    """What the handshake settled, handed to the transmission phase."""

    export: ExportInfo
    structured_replies: bool
    allocation_context: int | None  # meta context id of base:allocation, if set


class ServerHandshake:
    """Server side of the fixed-newstyle handshake as a sans-IO state machine.

    ``exports`` is read at every option, so exports added or removed while a
    client negotiates are seen. Call :meth:`receive_data`, send what
    :meth:`data_to_send` returns, and look at :attr:`phase`; once it is
    TRANSMISSION, :attr:`negotiated` says what was agreed and
    :attr:`leftover` holds any request bytes that came in behind the last
    option. CLOSED means: send what is pending, then close.

    Options are answered until ``OUTPUT_BUDGET`` bytes of replies wait in
    :meth:`data_to_send`; the rest stay buffered (:attr:`buffered`) until
    :meth:`receive_data` is called again, with ``b""`` once the replies are
    sent. A client that pipelines options and never reads the replies holds
    no more than that: 16 bytes of NBD_OPT_LIST each bring a reply per export.
    """

    ALLOCATION_ID = 1
    OUTPUT_BUDGET = 64 * 1024

    def __init__(self, exports: Mapping[str, ExportInfo], default_export: str | None = None):
        self._exports = exports
        self._default = default_export
        self._in = bytearray()
        greeting = SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        self._out: list[bytes] = [greeting]
        self._out_bytes = 0  # in _out, of option replies (see OUTPUT_BUDGET)
        self.phase = Phase.GREETING
        self.no_zeroes = False
        self.structured = False
        self.allocation_for: str | None = None  # export name the context was set for
        self.negotiated: Negotiated | None = None
        self.leftover = b""
        self.close_reason = ""

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        return out

    @property
    def buffered(self) -> int:
        """Bytes received and not yet processed (an option not complete yet, or
        options held back by OUTPUT_BUDGET)."""
        return len(self._in)

    def receive_data(self, data: bytes) -> None:
        if self.phase in (Phase.TRANSMISSION, Phase.CLOSED):
            raise ProtocolError(f"handshake is over ({self.phase.value})")
        self._in += data
        try:
            self._process()
        except ProtocolError as e:
            self.phase = Phase.CLOSED
            self.close_reason = str(e)
            raise

    # ---- internals
    def _lookup(self, name: str) -> ExportInfo | None:
        if name == "" and self._default is not None:
            name = self._default
        return self._exports.get(name)

    def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        reply = build_option_reply(opt, rep, data)
        self._out.append(reply)
        self._out_bytes += len(reply)

    def _error(self, opt: int, rep: int, message: str) -> None:
        self._reply(opt, rep, encode_string(message))

    def _process(self) -> None:
        buf = self._in
        if self.phase is Phase.GREETING:
            if len(buf) < CLIENT_FLAGS.size:
                return
            (cflags,) = CLIENT_FLAGS.unpack_from(buf)
            del buf[: CLIENT_FLAGS.size]
            # A client without FIXED_NEWSTYLE (a SHOULD) speaks plain newstyle: it sends
            # EXPORT_NAME alone, and its other options are answered all the same, as
            # section "Client flags" allows.
            if cflags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                raise ProtocolError(f"unknown client flags 0x{cflags:08x}")
            self.no_zeroes = bool(cflags & FLAG_C_NO_ZEROES)
            self.phase = Phase.OPTIONS
        while (
            self.phase is Phase.OPTIONS
            and len(buf) >= OPTION_HEADER.size
            and self._out_bytes < self.OUTPUT_BUDGET
        ):
            magic, opt, length = OPTION_HEADER.unpack_from(buf)
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic 0x{magic:016x}")
            if length > MAX_OPTION_LENGTH:
                raise ProtocolError(f"option {opt} payload of {length} bytes is too large")
            if len(buf) < OPTION_HEADER.size + length:
                return
            data = bytes(buf[OPTION_HEADER.size : OPTION_HEADER.size + length])
            del buf[: OPTION_HEADER.size + length]
            self._option(opt, data)
        if self.phase is Phase.TRANSMISSION:
            self.leftover = bytes(buf)
            buf.clear()

    def _option(self, opt: int, data: bytes) -> None:
        if opt == OPT_EXPORT_NAME:
            self._export_name(data)
        elif opt == OPT_ABORT:
            # Section "NBD_OPT_ABORT": the server SHOULD ack, then close.
            self._reply(opt, REP_ACK)
            self.phase = Phase.CLOSED
            self.close_reason = "client sent ABORT"
        elif opt == OPT_LIST:
            if data:
                self._error(opt, REP_ERR_INVALID, "LIST takes no data")
                return
            for info in list(self._exports.values()):
                n = info.name.encode()
                self._reply(opt, REP_SERVER, U32.pack(len(n)) + n + info.description.encode())
            self._reply(opt, REP_ACK)
        elif opt in (OPT_INFO, OPT_GO):
            self._info_go(opt, data)
        elif opt == OPT_STRUCTURED_REPLY:
            if data:
                self._error(opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            else:
                self.structured = True
                self._reply(opt, REP_ACK)
        elif opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            self._meta_context(opt, data)
        else:
            self._error(opt, REP_ERR_UNSUP, f"option {opt} is not supported")

    def _export_name(self, data: bytes) -> None:
        # Section "NBD_OPT_EXPORT_NAME": no option reply; unknown export -> close.
        try:
            name = data.decode()
        except UnicodeDecodeError:
            raise ProtocolError("export name is not UTF-8") from None
        info = self._lookup(name)
        if info is None:
            raise ProtocolError(f"unknown export {name!r}")
        self._out.append(EXPORT_NAME_REPLY.pack(info.size, self._flags(info)))
        if not self.no_zeroes:
            self._out.append(HANDSHAKE_ZEROES)
        self._enter_transmission(info)

    def _flags(self, info: ExportInfo) -> int:
        # Section "Transmission flags": SEND_DF MUST be clear without structured replies.
        return info.flags if self.structured else info.flags & ~FLAG_SEND_DF

    def _enter_transmission(self, info: ExportInfo) -> None:
        info = replace(info, flags=self._flags(info))
        ctx = self.ALLOCATION_ID if self.allocation_for == info.name else None
        self.negotiated = Negotiated(info, self.structured, ctx)
        self.phase = Phase.TRANSMISSION

    def _info_go(self, opt: int, data: bytes) -> None:
        """INFO/GO: ``namelen:u32 name nreq:u16 info:u16*``."""
        if len(data) < 4:
            self._error(opt, REP_ERR_INVALID, "INFO/GO payload too short")
            return
        (nlen,) = U32.unpack_from(data)
        if 4 + nlen + 2 > len(data):
            self._error(opt, REP_ERR_INVALID, "INFO/GO name overruns the payload")
            return
        try:
            name = data[4 : 4 + nlen].decode()
        except UnicodeDecodeError:
            self._error(opt, REP_ERR_INVALID, "export name is not UTF-8")
            return
        (nreq,) = U16.unpack_from(data, 4 + nlen)
        if 4 + nlen + 2 + 2 * nreq != len(data):
            self._error(opt, REP_ERR_INVALID, "INFO/GO request list has the wrong length")
            return
        requests = {U16.unpack_from(data, 6 + nlen + 2 * i)[0] for i in range(nreq)}
        info = self._lookup(name)
        if info is None:
            self._error(opt, REP_ERR_UNKNOWN, f"unknown export {name!r}")
            return
        self._reply(opt, REP_INFO, INFO_EXPORT_FMT.pack(INFO_EXPORT, info.size, self._flags(info)))
        if INFO_NAME in requests:
            self._reply(opt, REP_INFO, U16.pack(INFO_NAME) + info.name.encode())
        if INFO_DESCRIPTION in requests and info.description:
            self._reply(opt, REP_INFO, U16.pack(INFO_DESCRIPTION) + info.description.encode())
        # Always send block sizes: clients that did not ask may ignore them.
        bs = info.block_size
        self._reply(
            opt,
            REP_INFO,
            INFO_BLOCK_SIZE_FMT.pack(INFO_BLOCK_SIZE, bs.minimum, bs.preferred, bs.maximum),
        )
        self._reply(opt, REP_ACK)
        if opt == OPT_GO:
            self._enter_transmission(info)

    def _meta_context(self, opt: int, data: bytes) -> None:
        """``namelen:u32 name nq:u32 (qlen:u32 query)*`` (section "Metadata querying")."""
        if opt == OPT_SET_META_CONTEXT:
            # "replaces all previously-set metadata contexts (including when this command fails)"
            self.allocation_for = None
        if opt == OPT_SET_META_CONTEXT and not self.structured:
            self._error(opt, REP_ERR_INVALID, "SET_META_CONTEXT needs STRUCTURED_REPLY first")
            return
        try:
            name, queries = _parse_meta_request(data)
        except _TooManyQueries as e:
            # valid, only more than we take: section "NBD_OPT_LIST_META_CONTEXT" says
            # TOO_BIG (INVALID told the client its request was malformed)
            self._error(opt, REP_ERR_TOO_BIG, str(e))
            return
        except ValueError as e:
            self._error(opt, REP_ERR_INVALID, str(e))
            return
        info = self._lookup(name)
        if info is None:
            self._error(opt, REP_ERR_UNKNOWN, f"unknown export {name!r}")
            return
        if not info.allocation:
            match = False
        elif opt == OPT_LIST_META_CONTEXT:
            # An empty list asks for every context; "base:" for the whole namespace.
            match = not queries or any(q in (BASE_ALLOCATION, "base:") for q in queries)
        else:
            match = BASE_ALLOCATION in queries
        if opt == OPT_SET_META_CONTEXT:
            self.allocation_for = info.name if match else None
        if match:
            cid = self.ALLOCATION_ID if opt == OPT_SET_META_CONTEXT else 0
            self._reply(opt, REP_META_CONTEXT, U32.pack(cid) + BASE_ALLOCATION.encode())
        self._reply(opt, REP_ACK)


class _TooManyQueries(ValueError):
    pass


def _parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    pos = 0

    def string() -> str:
        nonlocal pos
        if pos + 4 > len(data):
            raise ValueError("meta context request truncated")
        (n,) = U32.unpack_from(data, pos)
        if n > MAX_STRING or pos + 4 + n > len(data):
            raise ValueError("meta context string overruns the payload")
        s = data[pos + 4 : pos + 4 + n]
        pos += 4 + n
        try:
            return s.decode()
        except UnicodeDecodeError:
            raise ValueError("meta context string is not UTF-8") from None

    name = string()
    if pos + 4 > len(data):
        raise ValueError("meta context request truncated")
    (nq,) = U32.unpack_from(data, pos)
    pos += 4
    if nq * 4 > len(data) - pos:
        raise ValueError(f"meta context request announces {nq} queries, more than it holds")
    if nq > 1024:
        raise _TooManyQueries(f"{nq} meta context queries is too many (at most 1024)")
    queries = [string() for _ in range(nq)]
    if pos != len(data):
        raise ValueError("meta context request has trailing bytes")
    return name, queries


# =========================================================================== option replies (client side)
@dataclass(slots=True)
class OptionReply:
    """``magic:u64 option:u32 type:u32 length:u32`` then ``length`` bytes."""

    option: int
    type: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & _REP_ERR)


def parse_option_reply(buf: bytes | bytearray) -> tuple[OptionReply, int] | None:
    """(reply, bytes consumed) or None when more bytes are needed."""
    if len(buf) < OPTION_REPLY_HEADER.size:
        return None
    magic, opt, rep, length = OPTION_REPLY_HEADER.unpack_from(buf)
    if magic != REPLY_MAGIC_OPT:
        raise ProtocolError(f"bad option reply magic 0x{magic:x}")
    if length > MAX_OPTION_LENGTH:
        raise ProtocolError(f"option reply of {length} bytes is too large")
    end = OPTION_REPLY_HEADER.size + length
    if len(buf) < end:
        return None
    return OptionReply(opt, rep, bytes(buf[OPTION_REPLY_HEADER.size : end])), end
