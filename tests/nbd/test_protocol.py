"""The sans-IO NBD core in memory: golden frames, decoders three ways, the handshake.

No sockets here (STYLE.md habits 9 and 10). Golden frames are written out as
hex from the layouts in doc/proto.md of NetworkBlockDevice/nbd, so a change
of the wire format shows up as a diff against the spec, not against our own
builders. Every decoder is fed the whole stream at once, byte by byte, and
with trailing bytes of a next frame left over.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Mapping

import pytest

from emulator.nbd import protocol as p
from emulator.nbd.errors import (
    BackendError,
    OptionError,
    ProtocolError,
    RequestError,
    nbd_error,
)

h = bytes.fromhex  # bytes.fromhex skips the spaces that group the fields below

COOKIE = 0x0102030405060708
MIB = 1 << 20


# =========================================================================== golden frames
def test_magics_and_codes_match_the_spec() -> None:
    assert p.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert p.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert p.REPLY_MAGIC_OPT == 0x3E889045565A9
    assert p.REQUEST_MAGIC == 0x25609513
    assert p.SIMPLE_REPLY_MAGIC == 0x67446698
    assert p.STRUCTURED_REPLY_MAGIC == 0x668E33EF
    # section "Option types" / "Option reply types"
    assert (p.OPT_EXPORT_NAME, p.OPT_ABORT, p.OPT_LIST, p.OPT_STARTTLS) == (1, 2, 3, 5)
    assert (p.OPT_INFO, p.OPT_GO, p.OPT_STRUCTURED_REPLY) == (6, 7, 8)
    assert (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT) == (9, 10)
    assert (p.REP_ACK, p.REP_SERVER, p.REP_INFO, p.REP_META_CONTEXT) == (1, 2, 3, 4)
    assert p.REP_ERR_UNSUP == 2**31 + 1
    assert p.REP_ERR_INVALID == 2**31 + 3
    assert p.REP_ERR_UNKNOWN == 2**31 + 6
    assert p.REP_ERR_TOO_BIG == 2**31 + 9
    # section "Request types", "Structured reply types", "Error values"
    assert (p.CMD_READ, p.CMD_WRITE, p.CMD_DISC, p.CMD_FLUSH) == (0, 1, 2, 3)
    assert (p.CMD_TRIM, p.CMD_CACHE, p.CMD_WRITE_ZEROES, p.CMD_BLOCK_STATUS) == (4, 5, 6, 7)
    assert (p.REPLY_TYPE_NONE, p.REPLY_TYPE_OFFSET_DATA, p.REPLY_TYPE_OFFSET_HOLE) == (0, 1, 2)
    assert p.REPLY_TYPE_BLOCK_STATUS == 5
    assert (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET) == (2**15 + 1, 2**15 + 2)
    assert (p.EPERM, p.EIO, p.ENOMEM, p.EINVAL, p.ENOSPC) == (1, 5, 12, 22, 28)
    assert (p.EOVERFLOW, p.ENOTSUP, p.ESHUTDOWN) == (75, 95, 108)
    assert p.FLAG_SEND_DF == 1 << 7 and p.FLAG_SEND_FAST_ZERO == 1 << 11
    assert p.CMD_FLAG_FAST_ZERO == 1 << 4 and p.CMD_FLAG_REQ_ONE == 1 << 3


def test_golden_server_greeting() -> None:
    hs = p.ServerHandshake({})
    assert hs.data_to_send() == h("4e42444d41474943 49484156454f5054 0003")
    assert hs.data_to_send() == b""  # handed out once


def test_golden_option_request() -> None:
    assert p.build_option(p.OPT_LIST) == h("49484156454f5054 00000003 00000000")
    assert p.build_option(p.OPT_STRUCTURED_REPLY) == h("49484156454f5054 00000008 00000000")
    assert p.build_option(p.OPT_EXPORT_NAME, b"vol") == h("49484156454f5054 00000001 00000003 766f6c")


def test_golden_info_and_meta_requests() -> None:
    # namelen:u32 name nreq:u16 info:u16*
    assert p.build_info_request("vol", [p.INFO_NAME, p.INFO_BLOCK_SIZE]) == h(
        "00000003 766f6c 0002 0001 0003"
    )
    assert p.build_info_request("") == h("00000000 0000")
    go = p.build_option(p.OPT_GO, p.build_info_request("vol"))
    assert go == h("49484156454f5054 00000007 00000009 00000003 766f6c 0000")
    # namelen:u32 name nq:u32 (qlen:u32 q)*
    assert p.build_meta_context_request("vol", ["base:allocation"]) == h(
        "00000003 766f6c 00000001 0000000f 626173653a616c6c6f636174696f6e"
    )
    assert p.build_meta_context_request("", []) == h("00000000 00000000")


def test_golden_option_replies() -> None:
    assert p.build_option_reply(p.OPT_LIST, p.REP_ACK) == h("0003e889045565a9 00000003 00000001 00000000")
    assert p.build_option_reply(0x1234, p.REP_ERR_UNSUP, b"no") == h(
        "0003e889045565a9 00001234 80000001 00000002 6e6f"
    )
    # NBD_REP_SERVER: namelen:u32 name [description]
    assert p.build_option_reply(p.OPT_LIST, p.REP_SERVER, h("00000003") + b"vol") == h(
        "0003e889045565a9 00000003 00000002 00000007 00000003 766f6c"
    )


def test_golden_request_header() -> None:
    req = p.Request(p.CMD_FLAG_FUA, p.CMD_WRITE, COOKIE, 0x1000, 4)
    assert req.header() == h("25609513 0001 0001 0102030405060708 0000000000001000 00000004")
    read = p.Request(p.CMD_FLAG_DF, p.CMD_READ, 1, 2**64 - 1, 2**32 - 1)
    assert read.header() == h("25609513 0004 0000 0000000000000001 ffffffffffffffff ffffffff")


def test_golden_simple_reply() -> None:
    assert p.build_simple_reply(COOKIE) == h("67446698 00000000 0102030405060708")
    assert p.build_simple_reply(COOKIE, p.EIO) == h("67446698 00000005 0102030405060708")


def test_golden_structured_chunks() -> None:
    # OFFSET_DATA: header (length = 8 + data) + offset:u64 + data
    data_chunk = (
        p.OFFSET_DATA_HEADER.pack(
            p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, COOKIE, 8 + 4, 0x200
        )
        + b"abcd"
    )
    assert data_chunk == h("668e33ef 0001 0001 0102030405060708 0000000c 0000000000000200 61626364")
    # OFFSET_HOLE: length 12, offset:u64 hole size:u32
    hole = p.OFFSET_HOLE.pack(
        p.STRUCTURED_REPLY_MAGIC, 0, p.REPLY_TYPE_OFFSET_HOLE, COOKIE, 12, 0x10000, 0x8000
    )
    assert hole == h("668e33ef 0000 0002 0102030405060708 0000000c 0000000000010000 00008000")
    # a bare header (REPLY_TYPE_NONE closes a reply)
    assert p.build_structured_header(COOKIE, p.REPLY_TYPE_NONE, 0, p.REPLY_FLAG_DONE) == h(
        "668e33ef 0001 0000 0102030405060708 00000000"
    )


def test_golden_block_status_chunk() -> None:
    chunk = p.build_block_status_chunk(
        COOKIE, 1, [p.Extent(0x1000, 0), p.Extent(0x2000, p.STATE_HOLE | p.STATE_ZERO)]
    )
    assert chunk == h(
        "668e33ef 0001 0005 0102030405060708 00000014 00000001 00001000 00000000 00002000 00000003"
    )
    not_done = p.build_block_status_chunk(COOKIE, 7, [p.Extent(512, 0)], done=False)
    assert not_done == h("668e33ef 0000 0005 0102030405060708 0000000c 00000007 00000200 00000000")


def test_golden_error_chunks() -> None:
    # ERROR: error:u32 msglen:u16 msg, always with DONE
    assert p.build_error_chunk(COOKIE, p.EINVAL, "bad") == h(
        "668e33ef 0001 8001 0102030405060708 00000009 00000016 0003 626164"
    )
    assert p.build_error_chunk(COOKIE, p.EIO) == h(
        "668e33ef 0001 8001 0102030405060708 00000006 00000005 0000"
    )
    # ERROR_OFFSET: ... then offset:u64
    assert p.build_error_chunk(COOKIE, p.EIO, "x", offset=0x400) == h(
        "668e33ef 0001 8002 0102030405060708 0000000f 00000005 0001 78 0000000000000400"
    )


def test_error_chunk_message_is_capped_at_the_string_limit() -> None:
    chunk = p.build_error_chunk(1, p.EIO, "m" * 10000)
    ev = _decode_replies(chunk, lambda c: 0)[0][0][0]
    assert isinstance(ev, p.StructuredChunk)
    err, msg, off = p.parse_error_chunk(ev)
    assert (err, len(msg), off) == (p.EIO, p.MAX_STRING, None)


def test_messages_cut_at_the_string_limit_stay_utf8() -> None:
    """Regression (was a bug): a message over 4096 bytes was cut at byte 4096, also in the
    middle of a character, where doc/proto.md ("Conventions") has every string UTF-8: an
    INFO for an unknown export named by 4096 bytes of mostly '€' got an error reply that
    does not decode. Now cut before the character that does not fit."""
    chunk = p.build_error_chunk(1, p.EIO, "m" + "€" * 2000)
    ev = _decode_replies(chunk, lambda c: 0)[0][0][0]
    assert isinstance(ev, p.StructuredChunk)
    (_, n) = p.ERROR_CHUNK.unpack_from(ev.payload)
    raw = ev.payload[p.ERROR_CHUNK.size : p.ERROR_CHUNK.size + n]
    assert p.MAX_STRING - 3 < len(raw) <= p.MAX_STRING and raw.decode() == "m" + "€" * (len(raw) // 3)
    name = "x" + "€" * 1365  # 4096 bytes, the longest name: the message quoting it is longer
    (reply,) = ScriptedClient().go(name, opt=p.OPT_INFO)
    assert reply.type == p.REP_ERR_UNKNOWN and p.MAX_STRING - 3 < len(reply.data) <= p.MAX_STRING
    assert reply.data.decode().startswith("unknown export 'x€€")


# =========================================================================== request decoder
Decoded = tuple[int, int, int, int, int, bytes | None]

PIPELINE: list[tuple[Decoded, bytes]] = [
    (
        (0, p.CMD_READ, 1, 0, 4096, None),
        h("25609513 0000 0000 0000000000000001 0000000000000000 00001000"),
    ),
    (
        (p.CMD_FLAG_FUA, p.CMD_WRITE, 2, 512, 5, b"hello"),
        h("25609513 0001 0001 0000000000000002 0000000000000200 00000005 68656c6c6f"),
    ),
    (
        (0, p.CMD_FLUSH, 3, 0, 0, None),
        h("25609513 0000 0003 0000000000000003 0000000000000000 00000000"),
    ),
    (
        (0, p.CMD_WRITE, 4, 8, 0, b""),  # a zero-length WRITE carries no payload
        h("25609513 0000 0001 0000000000000004 0000000000000008 00000000"),
    ),
    (
        (p.CMD_FLAG_REQ_ONE, p.CMD_BLOCK_STATUS, 5, 4096, MIB, None),
        h("25609513 0008 0007 0000000000000005 0000000000001000 00100000"),
    ),
    (
        (0, p.CMD_WRITE, 6, 0, 3, b"\x00\xff\x00"),
        h("25609513 0000 0001 0000000000000006 0000000000000000 00000003 00ff00"),
    ),
    (
        (0, 0x4242, 7, 0, 0xFFFFFFFF, None),  # unknown type, absurd length: still a frame
        h("25609513 0000 4242 0000000000000007 0000000000000000 ffffffff"),
    ),
    (
        (0, p.CMD_DISC, 8, 0, 0, None),
        h("25609513 0000 0002 0000000000000008 0000000000000000 00000000"),
    ),
]
STREAM = b"".join(frame for _, frame in PIPELINE)
EXPECTED = [decoded for decoded, _ in PIPELINE]


def _snapshot(req: p.Request) -> Decoded:
    # A WRITE payload is a view valid until the next get_buffer(): copy it now.
    data = None if req.data is None else bytes(req.data)
    return (req.flags, req.type, req.cookie, req.offset, req.length, data)


def _drain(dec: p.RequestDecoder, out: list[Decoded]) -> None:
    while (req := dec.next_event()) is not None:
        out.append(_snapshot(req))


def _feed_copying(dec: p.RequestDecoder, data: bytes, step: int | None) -> list[Decoded]:
    """receive_data() in pieces of ``step`` bytes (None: all at once), draining between."""
    out: list[Decoded] = []
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        dec.receive_data(data[i : i + step])
        _drain(dec, out)
    return out


def _feed_zero_copy(dec: p.RequestDecoder, data: bytes, step: int) -> list[Decoded]:
    """The adapter's way: get_buffer(), fill at most ``step`` bytes, buffer_updated()."""
    out: list[Decoded] = []
    pos = 0
    while pos < len(data):
        buf = dec.get_buffer()
        assert len(buf) > 0, "decoder offered an empty buffer with data still to come"
        n = min(len(buf), step, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
        _drain(dec, out)
    return out


def test_request_header_size_is_28() -> None:
    assert p.REQUEST.size == 28
    for decoded, frame in PIPELINE:
        payload = decoded[5] or b""
        assert len(frame) == 28 + len(payload)


def test_request_decoder_whole_stream() -> None:
    dec = p.RequestDecoder()
    assert _feed_copying(dec, STREAM, None) == EXPECTED
    assert dec.buffered == 0
    assert dec.next_event() is None


def test_request_decoder_byte_by_byte() -> None:
    dec = p.RequestDecoder()
    assert _feed_copying(dec, STREAM, 1) == EXPECTED
    assert dec.buffered == 0


@pytest.mark.parametrize("tail", [1, 13, 27])
def test_request_decoder_trailing_bytes(tail: int) -> None:
    nxt = p.Request(0, p.CMD_READ, 99, 4096, 512).header()
    dec = p.RequestDecoder()
    assert _feed_copying(dec, STREAM + nxt[:tail], None) == EXPECTED
    assert dec.buffered == tail
    assert dec.next_event() is None
    dec.receive_data(nxt[tail:])
    assert _snapshot(dec.next_event()) == (0, p.CMD_READ, 99, 4096, 512, None)  # type: ignore[arg-type]
    assert dec.buffered == 0


def test_request_decoder_write_payload_split_across_receives() -> None:
    frame = PIPELINE[1][1]
    dec = p.RequestDecoder()
    dec.receive_data(frame[:30])  # header + 2 payload bytes
    assert dec.next_event() is None
    dec.receive_data(frame[30:])
    assert _snapshot(dec.next_event()) == EXPECTED[1]  # type: ignore[arg-type]


@pytest.mark.parametrize("step", [1, 7, 28, 29, 64, 1000])
@pytest.mark.parametrize("buffer_size", [64, 100])
def test_request_decoder_write_larger_than_receive_buffer(step: int, buffer_size: int) -> None:
    payload = bytes(range(256)) * 40  # 10240 bytes, far more than the buffer
    big = p.Request(0, p.CMD_WRITE, 10, 8192, len(payload)).header() + payload
    after = p.Request(0, p.CMD_READ, 11, 0, 512).header()
    stream = STREAM[:-28] + big + after + STREAM[-28:]  # before the DISC
    dec = p.RequestDecoder(buffer_size=buffer_size)
    got = _feed_zero_copy(dec, stream, step)
    assert got == [
        *EXPECTED[:-1],
        (0, p.CMD_WRITE, 10, 8192, len(payload), payload),
        (0, p.CMD_READ, 11, 0, 512, None),
        EXPECTED[-1],
    ]
    assert dec.buffered == 0


def test_request_decoder_big_write_payload_is_received_in_place() -> None:
    """A payload larger than the buffer lands straight in its own buffer: the
    decoder offers exactly the missing part of it, never more."""
    dec = p.RequestDecoder(buffer_size=64)
    dec.receive_data(p.Request(0, p.CMD_WRITE, 1, 0, 1000).header() + b"x" * 10)
    assert dec.next_event() is None
    buf = dec.get_buffer()
    assert len(buf) == 990
    buf[:] = b"y" * 990
    dec.buffer_updated(990)
    req = dec.next_event()
    assert req is not None and bytes(req.data or b"") == b"x" * 10 + b"y" * 990


def test_request_decoder_detached_buffer_keeps_earlier_payload() -> None:
    n = p.WRITE_COPY_MAX + 1  # larger payloads are views of the receive buffer
    dec = p.RequestDecoder(buffer_size=2 * n)
    dec.receive_data(p.Request(0, p.CMD_WRITE, 1, 0, n).header() + b"h" * n)
    req = dec.next_event()
    assert req is not None and req.data is not None
    held = req.data
    assert dec.shares_buffer(held)
    dec.detach_buffer()  # the adapter's call when a WRITE must outlive the next receive
    assert not dec.shares_buffer(held)
    dec.receive_data(p.Request(0, p.CMD_WRITE, 2, 0, n).header() + b"\xee" * n)  # lands at the front
    assert bytes(held) == b"h" * n


def test_request_decoder_copies_small_write_payloads() -> None:
    dec = p.RequestDecoder(buffer_size=128)
    dec.receive_data(PIPELINE[1][1])
    req = dec.next_event()
    assert req is not None and req.data == b"hello"
    assert isinstance(req.data, bytes) and not dec.shares_buffer(req.data)


def test_request_decoder_receive_buffer_full_without_draining() -> None:
    dec = p.RequestDecoder(buffer_size=64)
    with pytest.raises(ProtocolError, match="buffer full"):
        dec.receive_data(STREAM)  # more than 64 bytes without next_event() in between


@pytest.mark.parametrize("step", [None, 1])
def test_request_decoder_bad_magic_breaks_for_good(step: int | None) -> None:
    bad = h("25609514 0000 0000 0000000000000009 0000000000000000 00000200")
    good = PIPELINE[0][1]
    stream = good + bad + good
    dec = p.RequestDecoder()
    out: list[Decoded] = []
    step = step or len(stream)
    with pytest.raises(ProtocolError, match="magic"):
        for i in range(0, len(stream), step):
            dec.receive_data(stream[i : i + step])
            _drain(dec, out)
    assert out == [EXPECTED[0]]  # what came before the bad frame was parsed
    assert i < 2 * 28  # and it broke as soon as the bad header was whole
    for call in (dec.next_event, dec.get_buffer, lambda: dec.receive_data(good)):
        with pytest.raises(ProtocolError, match="magic"):
            call()


def test_request_decoder_events_before_bad_magic_are_delivered() -> None:
    bad = b"\x00" * 28
    dec = p.RequestDecoder()
    dec.receive_data(PIPELINE[0][1] + PIPELINE[1][1] + bad)
    assert _snapshot(dec.next_event()) == EXPECTED[0]  # type: ignore[arg-type]
    assert _snapshot(dec.next_event()) == EXPECTED[1]  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        dec.next_event()
    with pytest.raises(ProtocolError):
        dec.next_event()


def test_request_decoder_write_larger_than_max_payload() -> None:
    dec = p.RequestDecoder(max_payload=4096)
    dec.receive_data(p.Request(0, p.CMD_WRITE, 1, 0, 4096).header() + bytes(4096))
    assert dec.next_event() is not None  # exactly the maximum is fine
    dec.receive_data(p.Request(0, p.CMD_WRITE, 2, 0, 4097).header())
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.next_event()
    with pytest.raises(ProtocolError):
        dec.get_buffer()


def test_request_decoder_default_max_payload_is_32_mib() -> None:
    dec = p.RequestDecoder()
    dec.receive_data(p.Request(0, p.CMD_WRITE, 1, 0, p.MAX_BLOCK + 1).header())
    with pytest.raises(ProtocolError):
        dec.next_event()
    # READ of any length is not a framing problem (no payload follows it)
    dec = p.RequestDecoder()
    dec.receive_data(p.Request(0, p.CMD_READ, 1, 0, p.MAX_BLOCK + 1).header())
    req = dec.next_event()
    assert req is not None and req.length == p.MAX_BLOCK + 1


# =========================================================================== reply decoder
Event = tuple[object, bytes | bytearray | None]

REPLY_STREAM: list[tuple[bytes, Event]] = [
    (h("67446698 00000000 0000000000000001") + b"readdata", (p.SimpleReply(1, 0), b"readdata")),
    (h("67446698 00000005 0000000000000002"), (p.SimpleReply(2, p.EIO), None)),  # no data
    (h("67446698 00000000 0000000000000003"), (p.SimpleReply(3, 0), None)),  # a write's ack
    (
        h("668e33ef 0000 0001 0000000000000004 0000000c 0000000000001000 61626364"),
        (p.StructuredChunk(4, 0, p.REPLY_TYPE_OFFSET_DATA, h("0000000000001000 61626364")), None),
    ),
    (
        h("668e33ef 0001 0002 0000000000000004 0000000c 0000000000001004 00000ffc"),
        (p.StructuredChunk(4, 1, p.REPLY_TYPE_OFFSET_HOLE, h("0000000000001004 00000ffc")), None),
    ),
    (
        h("668e33ef 0001 0005 0000000000000005 00000014 00000001 00001000 00000000 00002000 00000003"),
        (
            p.StructuredChunk(
                5, 1, p.REPLY_TYPE_BLOCK_STATUS, h("00000001 00001000 00000000 00002000 00000003")
            ),
            None,
        ),
    ),
    (
        h("668e33ef 0001 8001 0000000000000006 00000009 00000016 0003 626164"),
        (p.StructuredChunk(6, 1, p.REPLY_TYPE_ERROR, h("00000016 0003 626164")), None),
    ),
    (
        h("668e33ef 0001 8002 0000000000000007 0000000f 00000005 0001 78 0000000000000200"),
        (p.StructuredChunk(7, 1, p.REPLY_TYPE_ERROR_OFFSET, h("00000005 0001 78 0000000000000200")), None),
    ),
    (
        h("668e33ef 0001 0000 0000000000000008 00000000"),
        (p.StructuredChunk(8, 1, p.REPLY_TYPE_NONE, b""), None),
    ),
]
REPLY_BYTES = b"".join(frame for frame, _ in REPLY_STREAM)
REPLY_EVENTS = [event for _, event in REPLY_STREAM]
READ_LENGTHS = {1: 8, 2: 8, 3: 0}  # what the client knows from its requests


def _decode_replies(
    data: bytes, read_length: Callable[[int], int], step: int | None = None
) -> tuple[list[Event], p.ReplyDecoder]:
    dec = p.ReplyDecoder(read_length)
    out: list[Event] = []
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        dec.receive_data(data[i : i + step])
        while (ev := dec.next_event()) is not None:
            out.append(ev)
    return out, dec


def _lengths(calls: list[int]) -> Callable[[int], int]:
    def read_length(cookie: int) -> int:
        calls.append(cookie)
        return READ_LENGTHS.get(cookie, 0)

    return read_length


def test_reply_decoder_golden_frames_match_the_builders() -> None:
    assert REPLY_STREAM[1][0] == p.build_simple_reply(2, p.EIO)
    assert REPLY_STREAM[5][0] == p.build_block_status_chunk(5, 1, [p.Extent(0x1000, 0), p.Extent(0x2000, 3)])
    assert REPLY_STREAM[6][0] == p.build_error_chunk(6, p.EINVAL, "bad")
    assert REPLY_STREAM[7][0] == p.build_error_chunk(7, p.EIO, "x", offset=0x200)


@pytest.mark.parametrize("step", [None, 1, 5, 16])
def test_reply_decoder_whole_and_split(step: int | None) -> None:
    calls: list[int] = []
    events, _ = _decode_replies(REPLY_BYTES, _lengths(calls), step)
    assert events == REPLY_EVENTS
    # asked only for successful simple replies, once each
    assert calls == [1, 3]


@pytest.mark.parametrize("tail", [1, 3, 4, 15, 19])
def test_reply_decoder_trailing_bytes(tail: int) -> None:
    nxt = p.build_structured_header(9, p.REPLY_TYPE_NONE, 0, p.REPLY_FLAG_DONE)
    nxt_data = p.build_simple_reply(1) + b"READDATA"  # a simple reply whose data is cut
    for frame, expect in (
        (nxt, (p.StructuredChunk(9, 1, p.REPLY_TYPE_NONE, b""), None)),
        (nxt_data, (p.SimpleReply(1, 0), b"READDATA")),
    ):
        events, dec = _decode_replies(REPLY_BYTES + frame[:tail], _lengths([]))
        assert events == REPLY_EVENTS
        assert dec.next_event() is None
        dec.receive_data(frame[tail:])
        assert dec.next_event() == expect
        assert dec.next_event() is None


def test_reply_decoder_bad_magic_breaks_for_good() -> None:
    dec = p.ReplyDecoder(lambda c: 0)
    dec.receive_data(p.build_simple_reply(1) + h("25609513 00000000 0000000000000002"))
    assert dec.next_event() == (p.SimpleReply(1, 0), None)
    with pytest.raises(ProtocolError, match="magic"):
        dec.next_event()
    with pytest.raises(ProtocolError):
        dec.next_event()
    with pytest.raises(ProtocolError):
        dec.receive_data(p.build_simple_reply(3))


def test_reply_decoder_rejects_huge_chunk_before_buffering_it() -> None:
    dec = p.ReplyDecoder(lambda c: 0, max_payload=1024)
    dec.receive_data(p.build_structured_header(1, p.REPLY_TYPE_OFFSET_DATA, 1025))
    with pytest.raises(ProtocolError, match="too large"):
        dec.next_event()


# ---- in place: a READ's data lands in the caller's buffer
def _socket_feed(dec: p.ReplyDecoder, data: bytes, chunk: int) -> list[Event]:
    """Feed like a transport does: receive at most ``chunk`` bytes into get_buffer()."""
    out: list[Event] = []
    view = memoryview(data)
    while view:
        buf = dec.get_buffer()
        n = min(len(buf), len(view), chunk)
        assert n > 0, "decoder offered no room"
        buf[:n] = view[:n]
        dec.buffer_updated(n)
        view = view[n:]
        while (ev := dec.next_event()) is not None:
            out.append(ev)
    return out


@pytest.mark.parametrize("chunk", [1, 7, 4096, 300_000, 1 << 30])
def test_reply_decoder_places_read_data_in_the_callers_buffer(chunk: int) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: more than the receive buffer
    dests = {
        1: (0, memoryview(bytearray(8))),  # simple reply
        2: (4096, memoryview(bytearray(len(big) + 16))),  # two OFFSET_DATA chunks
        3: (0, memoryview(bytearray(len(big)))),  # simple reply larger than the buffer
    }
    asked: list[int] = []

    def dest(cookie: int) -> tuple[int, memoryview] | None:
        asked.append(cookie)
        return dests.get(cookie)

    stream = (
        p.build_simple_reply(1) + b"readdata"
        + p.build_structured_header(2, p.REPLY_TYPE_OFFSET_DATA, 8 + 16)
        + p.U64.pack(4096 + len(big)) + b"T" * 16
        + p.build_simple_reply(9)  # a write's ack between them
        + p.build_structured_header(2, p.REPLY_TYPE_OFFSET_DATA, 8 + len(big), p.REPLY_FLAG_DONE)
        + p.U64.pack(4096) + big
        + p.build_simple_reply(3) + big
        + p.build_block_status_chunk(5, 1, [p.Extent(0x1000, 0)])
    )  # fmt: skip
    dec = p.ReplyDecoder(read_dest=dest, buffer_size=64 * 1024)
    events = _socket_feed(dec, stream, chunk)
    assert events == [
        (p.SimpleReply(1, 0), None),
        (p.StructuredChunk(2, 0, p.REPLY_TYPE_OFFSET_DATA, b"", placed=16), None),
        (p.SimpleReply(9, 0), None),
        (p.StructuredChunk(2, 1, p.REPLY_TYPE_OFFSET_DATA, b"", placed=len(big)), None),
        (p.SimpleReply(3, 0), None),
        (p.StructuredChunk(5, 1, p.REPLY_TYPE_BLOCK_STATUS, h("00000001 00001000 00000000")), None),
    ]
    assert bytes(dests[1][1]) == b"readdata"
    assert bytes(dests[2][1]) == big + b"T" * 16
    assert bytes(dests[3][1]) == big
    assert asked == [1, 2, 9, 2, 3]


def test_reply_decoder_grows_for_a_chunk_larger_than_its_buffer() -> None:
    extents = [p.Extent(4096, i % 4) for i in range(2000)]  # 16 KiB of BLOCK_STATUS
    frame = p.build_block_status_chunk(5, 1, extents)
    dec = p.ReplyDecoder(read_dest=lambda c: None, buffer_size=4096)
    [(ev, _)] = _socket_feed(dec, frame, 1500)
    assert isinstance(ev, p.StructuredChunk)
    assert p.parse_block_status_chunk(ev.payload) == (1, extents)


@pytest.mark.parametrize("off", [4096 - 1, 4096 + 5])
def test_reply_decoder_in_place_rejects_data_outside_the_request(off: int) -> None:
    dec = p.ReplyDecoder(read_dest=lambda c: (4096, memoryview(bytearray(8))))
    dec.receive_data(p.build_structured_header(1, p.REPLY_TYPE_OFFSET_DATA, 12) + p.U64.pack(off) + b"abcd")
    with pytest.raises(ProtocolError, match="outside the request"):
        dec.next_event()


def test_reply_decoder_needs_one_way_to_size_reads() -> None:
    with pytest.raises(ValueError):
        p.ReplyDecoder()
    with pytest.raises(ValueError):
        p.ReplyDecoder(lambda c: 0, read_dest=lambda c: None)


def test_parse_error_chunks() -> None:
    events, _ = _decode_replies(REPLY_STREAM[6][0] + REPLY_STREAM[7][0], lambda c: 0)
    plain, with_offset = (ev for ev, _ in events)
    assert isinstance(plain, p.StructuredChunk) and isinstance(with_offset, p.StructuredChunk)
    assert plain.done and with_offset.done
    assert p.parse_error_chunk(plain) == (p.EINVAL, "bad", None)
    assert p.parse_error_chunk(with_offset) == (p.EIO, "x", 0x200)


@pytest.mark.parametrize(
    ("type_", "payload", "match"),
    [
        (p.REPLY_TYPE_ERROR, h("00000005 00"), "too short"),
        (p.REPLY_TYPE_ERROR, h("00000005 0004 6162"), "overruns"),
        (p.REPLY_TYPE_ERROR_OFFSET, h("00000005 0000 00000000"), "wrong length"),
        (p.REPLY_TYPE_ERROR_OFFSET, h("00000005 0000 0000000000000000 00"), "wrong length"),
    ],
)
def test_parse_error_chunk_malformed(type_: int, payload: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        p.parse_error_chunk(p.StructuredChunk(1, 1, type_, payload))


def test_parse_block_status_chunk() -> None:
    ev = REPLY_EVENTS[5][0]
    assert isinstance(ev, p.StructuredChunk)
    ctx, extents = p.parse_block_status_chunk(ev.payload)
    assert ctx == 1
    assert extents == [p.Extent(0x1000, 0), p.Extent(0x2000, p.STATE_HOLE | p.STATE_ZERO)]
    for bad in (b"", h("000001"), h("00000001 00001000"), h("00000001 00001000 00000000 00")):
        with pytest.raises(ProtocolError):
            p.parse_block_status_chunk(bad)


def test_parse_option_reply_three_ways() -> None:
    frames = [
        p.build_option_reply(p.OPT_LIST, p.REP_SERVER, h("00000003") + b"vol"),
        p.build_option_reply(p.OPT_LIST, p.REP_ACK),
        p.build_option_reply(p.OPT_GO, p.REP_ERR_UNKNOWN, b"nope"),
    ]
    expected = [
        p.OptionReply(p.OPT_LIST, p.REP_SERVER, h("00000003") + b"vol"),
        p.OptionReply(p.OPT_LIST, p.REP_ACK, b""),
        p.OptionReply(p.OPT_GO, p.REP_ERR_UNKNOWN, b"nope"),
    ]
    stream = b"".join(frames)
    # whole (with trailing bytes of a next reply), and byte by byte
    for tail in (b"", frames[0][:7]):
        assert _parse_option_replies(stream + tail) == (expected, tail)
    buf = bytearray()
    got = []
    for b in stream:
        buf.append(b)
        r = p.parse_option_reply(buf)
        if r is not None:
            got.append(r[0])
            del buf[: r[1]]
    assert got == expected and not buf
    assert [r.is_error for r in expected] == [False, False, True]


def test_parse_option_reply_rejects_bad_frames() -> None:
    with pytest.raises(ProtocolError, match="magic"):
        p.parse_option_reply(h("4e42444d41474943 00000003 00000001 00000000"))
    with pytest.raises(ProtocolError, match="too large"):
        p.parse_option_reply(h("0003e889045565a9 00000003 00000001 7fffffff"))


def _parse_option_replies(data: bytes) -> tuple[list[p.OptionReply], bytes]:
    out = []
    while (r := p.parse_option_reply(data)) is not None:
        out.append(r[0])
        data = data[r[1] :]
    return out, data


# =========================================================================== server handshake
FLAGS = (
    p.FLAG_HAS_FLAGS
    | p.FLAG_SEND_FLUSH
    | p.FLAG_SEND_FUA
    | p.FLAG_SEND_TRIM
    | p.FLAG_SEND_WRITE_ZEROES
    | p.FLAG_SEND_DF
)  # 0x00ed
EXPORTS = {
    "vol": p.ExportInfo("vol", MIB, FLAGS, "a volume"),
    "ro": p.ExportInfo("ro", 4096, p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY),
    "flat": p.ExportInfo("flat", 8192, p.FLAG_HAS_FLAGS, allocation=False),
}
CLIENT_FLAGS = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES


class ScriptedClient:
    """A client driving a ServerHandshake in memory, one option at a time."""

    def __init__(
        self,
        exports: Mapping[str, p.ExportInfo] = EXPORTS,
        default: str | None = "vol",
        flags: int = CLIENT_FLAGS,
    ) -> None:
        self.hs = p.ServerHandshake(exports, default)
        self.greeting = self.hs.data_to_send()
        self.hs.receive_data(p.CLIENT_FLAGS.pack(flags))
        assert self.hs.data_to_send() == b""  # the flags get no answer

    def option(self, opt: int, data: bytes = b"") -> list[p.OptionReply]:
        self.hs.receive_data(p.build_option(opt, data))
        replies, rest = _parse_option_replies(self.hs.data_to_send())
        assert rest == b"", "server sent bytes that are not option replies"
        assert replies, "every option but EXPORT_NAME gets a reply"
        assert all(r.option == opt for r in replies)
        final = replies[-1]
        assert final.type == p.REP_ACK or final.is_error, "the last reply must be final"
        assert all(r.type not in (p.REP_ACK,) and not r.is_error for r in replies[:-1])
        return replies

    def go(self, name: str, infos: Iterable[int] = (), opt: int = p.OPT_GO) -> list[p.OptionReply]:
        return self.option(opt, p.build_info_request(name, infos))


def _info_export(replies: list[p.OptionReply]) -> tuple[int, int]:
    infos = [r.data for r in replies if r.type == p.REP_INFO and r.data[:2] == h("0000")]
    assert len(infos) == 1
    _, size, flags = p.INFO_EXPORT_FMT.unpack(infos[0])
    return size, flags


def test_handshake_greeting_then_options_phase() -> None:
    c = ScriptedClient()
    assert c.greeting == h("4e42444d41474943 49484156454f5054 0003")
    assert c.hs.phase is p.Phase.OPTIONS
    assert c.hs.no_zeroes


@pytest.mark.parametrize("flags", [4, CLIENT_FLAGS | 4, 0x80000001])
def test_handshake_bad_client_flags(flags: int) -> None:
    """An unknown flag: the server drops the connection (section "Client flags")."""
    hs = p.ServerHandshake(EXPORTS)
    hs.data_to_send()
    with pytest.raises(ProtocolError):
        hs.receive_data(p.CLIENT_FLAGS.pack(flags))
    assert hs.phase is p.Phase.CLOSED
    assert hs.close_reason
    with pytest.raises(ProtocolError):
        hs.receive_data(p.build_option(p.OPT_LIST))


def test_handshake_holds_options_back_past_its_output_budget() -> None:
    """Options pipelined by a client that does not read the replies wait in the core
    once OUTPUT_BUDGET bytes of replies do; ``receive_data(b"")`` after a send goes on,
    and the replies are those of the options one by one, in order."""
    many = {f"export-{i:03d}": p.ExportInfo(f"export-{i:03d}", MIB, FLAGS) for i in range(100)}
    c = ScriptedClient(many)
    per_list = sum(20 + len(r.data) for r in c.option(p.OPT_LIST))  # bytes of one LIST's replies
    n = 2 * p.ServerHandshake.OUTPUT_BUDGET // per_list + 3
    c.hs.receive_data(
        p.build_option(p.OPT_LIST) * n + p.build_option(p.OPT_GO, p.build_info_request("export-000"))
    )
    out = c.hs.data_to_send()
    assert p.ServerHandshake.OUTPUT_BUDGET <= len(out) < p.ServerHandshake.OUTPUT_BUDGET + per_list
    assert c.hs.buffered and c.hs.phase is p.Phase.OPTIONS
    while c.hs.phase is p.Phase.OPTIONS:
        c.hs.receive_data(b"")
        more = c.hs.data_to_send()
        assert more and len(more) < p.ServerHandshake.OUTPUT_BUDGET + per_list
        out += more
    replies, rest = _parse_option_replies(out)
    assert rest == b"" and c.hs.buffered == 0
    assert [r.type for r in replies] == ([p.REP_SERVER] * 100 + [p.REP_ACK]) * n + [
        p.REP_INFO,
        p.REP_INFO,
        p.REP_ACK,
    ]


def test_handshake_list() -> None:
    c = ScriptedClient()
    replies = c.option(p.OPT_LIST)
    assert [r.type for r in replies] == [p.REP_SERVER] * 3 + [p.REP_ACK]
    listed = {}
    for r in replies[:-1]:
        (n,) = p.U32.unpack_from(r.data)
        listed[r.data[4 : 4 + n].decode()] = r.data[4 + n :].decode()
    assert listed == {"vol": "a volume", "ro": "", "flat": ""}
    assert replies[0].data == h("00000003") + b"vol" + b"a volume"


def test_handshake_list_with_data_is_invalid() -> None:
    c = ScriptedClient()
    assert [r.type for r in c.option(p.OPT_LIST, b"x")] == [p.REP_ERR_INVALID]
    assert c.hs.phase is p.Phase.OPTIONS


def test_handshake_list_sees_exports_added_later() -> None:
    exports = dict(EXPORTS)
    c = ScriptedClient(exports)
    exports["new"] = p.ExportInfo("new", 512, p.FLAG_HAS_FLAGS)
    assert len(c.option(p.OPT_LIST)) == 5
    assert [r.type for r in c.go("new")][-1] == p.REP_ACK


def test_handshake_info_golden_and_stays_in_options() -> None:
    c = ScriptedClient()
    c.option(p.OPT_STRUCTURED_REPLY)
    replies = c.go("vol", [p.INFO_NAME, p.INFO_DESCRIPTION, p.INFO_BLOCK_SIZE], opt=p.OPT_INFO)
    frames = [p.build_option_reply(r.option, r.type, r.data) for r in replies]
    assert h("0003e889045565a9 00000006 00000003 0000000c 0000 0000000000100000 00ed") in frames
    assert h("0003e889045565a9 00000006 00000003 00000005 0001 766f6c") in frames
    assert h("0003e889045565a9 00000006 00000003 0000000a 0002 6120766f6c756d65") in frames
    assert h("0003e889045565a9 00000006 00000003 0000000e 0003 00000001 00001000 02000000") in frames
    assert frames[-1] == h("0003e889045565a9 00000006 00000001 00000000")
    assert c.hs.phase is p.Phase.OPTIONS
    assert c.hs.negotiated is None


def test_handshake_info_unknown_export() -> None:
    c = ScriptedClient()
    replies = c.go("nope", opt=p.OPT_INFO)
    assert [r.type for r in replies] == [p.REP_ERR_UNKNOWN]  # and no REP_INFO before it
    assert b"nope" in replies[0].data


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        h("000000"),
        h("00000010 766f6c 0000"),  # name overruns
        h("00000003 766f6c"),  # no request count
        h("00000003 766f6c 0002 0001"),  # fewer requests than announced
        h("00000003 766f6c 0000 00"),  # trailing byte
        h("00000002 fffe 0000"),  # not UTF-8
    ],
)
def test_handshake_info_go_malformed_is_invalid(payload: bytes) -> None:
    for opt in (p.OPT_INFO, p.OPT_GO):
        c = ScriptedClient()
        assert [r.type for r in c.option(opt, payload)] == [p.REP_ERR_INVALID]
        assert c.hs.phase is p.Phase.OPTIONS


def test_handshake_go_enters_transmission() -> None:
    c = ScriptedClient()
    c.option(p.OPT_STRUCTURED_REPLY)
    c.hs.receive_data(p.build_option(p.OPT_GO, p.build_info_request("vol", [p.INFO_BLOCK_SIZE])))
    out = c.hs.data_to_send()
    # No zero padding after the final ACK (section "NBD_OPT_INFO and NBD_OPT_GO").
    assert out.endswith(h("0003e889045565a9 00000007 00000001 00000000"))
    replies, rest = _parse_option_replies(out)
    assert rest == b""
    assert _info_export(replies) == (MIB, FLAGS)
    assert c.hs.phase is p.Phase.TRANSMISSION
    neg = c.hs.negotiated
    assert neg is not None
    assert (neg.export.name, neg.structured_replies, neg.allocation_context) == ("vol", True, None)
    assert c.hs.leftover == b""
    with pytest.raises(ProtocolError, match="over"):
        c.hs.receive_data(p.build_option(p.OPT_LIST))


def test_handshake_go_default_export() -> None:
    c = ScriptedClient()
    assert _info_export(c.go(""))[0] == MIB
    assert c.hs.negotiated is not None and c.hs.negotiated.export.name == "vol"


def test_handshake_go_unknown_export_then_retry() -> None:
    c = ScriptedClient()
    assert [r.type for r in c.go("nope")] == [p.REP_ERR_UNKNOWN]
    assert c.hs.phase is p.Phase.OPTIONS
    c2 = ScriptedClient(default=None)
    assert [r.type for r in c2.go("")] == [p.REP_ERR_UNKNOWN]  # no default export
    assert [r.type for r in c.go("ro")][-1] == p.REP_ACK
    assert c.hs.negotiated is not None and c.hs.negotiated.export.name == "ro"


def test_handshake_send_df_only_after_structured_replies() -> None:
    """Section "Transmission flags": the server "MUST leave [NBD_FLAG_SEND_DF]
    clear if structured replies have not been negotiated"."""
    c = ScriptedClient()
    c.option(p.OPT_STRUCTURED_REPLY)
    assert _info_export(c.go("vol", opt=p.OPT_INFO))[1] & p.FLAG_SEND_DF
    plain = ScriptedClient()
    for opt in (p.OPT_INFO, p.OPT_GO):
        _, flags = _info_export(plain.go("vol", opt=opt))
        assert not flags & p.FLAG_SEND_DF, f"{p.describe_flags(flags)} offered without structured replies"
    old = ScriptedClient()
    old.hs.receive_data(p.build_option(p.OPT_EXPORT_NAME, b"vol"))
    _, flags = p.EXPORT_NAME_REPLY.unpack(old.hs.data_to_send()[:10])
    assert not flags & p.FLAG_SEND_DF


def test_handshake_export_name_with_zeroes() -> None:
    c = ScriptedClient(flags=p.FLAG_C_FIXED_NEWSTYLE)
    assert not c.hs.no_zeroes
    c.option(p.OPT_STRUCTURED_REPLY)  # keeps SEND_DF legal in the golden frame
    c.hs.receive_data(p.build_option(p.OPT_EXPORT_NAME, b"vol"))
    assert c.hs.data_to_send() == h("0000000000100000 00ed") + bytes(124)
    assert c.hs.phase is p.Phase.TRANSMISSION


def test_handshake_export_name_no_zeroes() -> None:
    c = ScriptedClient()
    c.hs.receive_data(p.build_option(p.OPT_EXPORT_NAME, b"ro"))
    assert c.hs.data_to_send() == h("0000000000001000 0003")
    neg = c.hs.negotiated
    assert neg is not None and neg.export.name == "ro" and not neg.structured_replies


def test_handshake_export_name_default_and_unknown() -> None:
    c = ScriptedClient()
    c.hs.receive_data(p.build_option(p.OPT_EXPORT_NAME))
    assert c.hs.negotiated is not None and c.hs.negotiated.export.name == "vol"
    bad = ScriptedClient()
    with pytest.raises(ProtocolError, match="unknown export"):
        bad.hs.receive_data(p.build_option(p.OPT_EXPORT_NAME, b"nope"))
    assert bad.hs.phase is p.Phase.CLOSED
    assert bad.hs.data_to_send() == b""  # EXPORT_NAME cannot answer with an error


def test_handshake_structured_reply() -> None:
    c = ScriptedClient()
    assert [r.type for r in c.option(p.OPT_STRUCTURED_REPLY, b"x")] == [p.REP_ERR_INVALID]
    assert not c.hs.structured
    assert c.option(p.OPT_STRUCTURED_REPLY) == [p.OptionReply(p.OPT_STRUCTURED_REPLY, p.REP_ACK, b"")]
    assert c.hs.structured


@pytest.mark.parametrize(
    ("queries", "found"),
    [
        (["base:allocation"], True),
        ([], True),  # no query: every context
        (["base:"], True),  # the namespace wildcard
        (["x-other:thing", "base:allocation"], True),
        (["x-other:thing"], False),  # unknown namespaces are ignored, not errors
        (["base:nonesuch"], False),
    ],
)
def test_handshake_list_meta_context(queries: list[str], found: bool) -> None:
    c = ScriptedClient()
    c.option(p.OPT_STRUCTURED_REPLY)
    replies = c.option(p.OPT_LIST_META_CONTEXT, p.build_meta_context_request("vol", queries))
    if found:
        assert replies == [
            p.OptionReply(p.OPT_LIST_META_CONTEXT, p.REP_META_CONTEXT, h("00000000") + b"base:allocation"),
            p.OptionReply(p.OPT_LIST_META_CONTEXT, p.REP_ACK, b""),
        ]
    else:
        assert [r.type for r in replies] == [p.REP_ACK]
    # LIST selects nothing
    c.go("vol")
    assert c.hs.negotiated is not None and c.hs.negotiated.allocation_context is None


def test_handshake_meta_context_for_export_without_allocation() -> None:
    c = ScriptedClient()
    c.option(p.OPT_STRUCTURED_REPLY)
    req = p.build_meta_context_request("flat", ["base:allocation"])
    assert [r.type for r in c.option(p.OPT_LIST_META_CONTEXT, req)] == [p.REP_ACK]
    assert [r.type for r in c.option(p.OPT_SET_META_CONTEXT, req)] == [p.REP_ACK]


def test_handshake_set_meta_context_needs_structured_reply() -> None:
    c = ScriptedClient()
    req = p.build_meta_context_request("vol", ["base:allocation"])
    assert [r.type for r in c.option(p.OPT_SET_META_CONTEXT, req)] == [p.REP_ERR_INVALID]
    c.go("vol")
    assert c.hs.negotiated is not None and c.hs.negotiated.allocation_context is None


def test_handshake_set_meta_context_then_go() -> None:
    c = ScriptedClient()
    c.option(p.OPT_STRUCTURED_REPLY)
    replies = c.option(p.OPT_SET_META_CONTEXT, p.build_meta_context_request("vol", ["base:allocation"]))
    assert [r.type for r in replies] == [p.REP_META_CONTEXT, p.REP_ACK]
    (cid,) = p.U32.unpack_from(replies[0].data)
    assert cid != 0 and replies[0].data[4:] == b"base:allocation"
    c.go("vol")
    assert c.hs.negotiated is not None and c.hs.negotiated.allocation_context == cid


def test_handshake_set_meta_context_for_another_export_is_dropped_at_go() -> None:
    c = ScriptedClient()
    c.option(p.OPT_STRUCTURED_REPLY)
    c.option(p.OPT_SET_META_CONTEXT, p.build_meta_context_request("vol", ["base:allocation"]))
    c.go("ro")
    assert c.hs.negotiated is not None and c.hs.negotiated.allocation_context is None


def test_handshake_set_meta_context_wildcard_selects_nothing() -> None:
    """Section "The base: metadata namespace": ``base:`` MUST be ignored by SET."""
    c = ScriptedClient()
    c.option(p.OPT_STRUCTURED_REPLY)
    replies = c.option(p.OPT_SET_META_CONTEXT, p.build_meta_context_request("vol", ["base:"]))
    assert [r.type for r in replies] == [p.REP_ACK]
    c.go("vol")
    assert c.hs.negotiated is not None and c.hs.negotiated.allocation_context is None


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        h("00000003 766f6c"),  # no query count
        h("00000003 766f6c 00000001"),  # announced query missing
        h("00000003 766f6c 00000001 00000010 6261"),  # query overruns
        h("00000003 766f6c 00000000 00"),  # trailing byte
        h("00000003 766f6c 00100000"),  # absurd query count
    ],
)
def test_handshake_meta_context_malformed_is_invalid(payload: bytes) -> None:
    for opt in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
        c = ScriptedClient()
        c.option(p.OPT_STRUCTURED_REPLY)
        assert [r.type for r in c.option(opt, payload)] == [p.REP_ERR_INVALID]


@pytest.mark.parametrize("opt", [p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT])
def test_handshake_meta_context_with_too_many_queries_is_too_big(opt: int) -> None:
    """A well-formed request with more queries than the server takes (1024) is
    NBD_REP_ERR_TOO_BIG (section "NBD_OPT_LIST_META_CONTEXT"), not INVALID, which
    says the request is malformed; 1024 are still answered."""
    c = ScriptedClient()
    c.option(p.OPT_STRUCTURED_REPLY)
    many = p.build_meta_context_request("vol", ["base:allocation"] + ["x-other:thing"] * 1024)
    assert [r.type for r in c.option(opt, many)] == [p.REP_ERR_TOO_BIG]
    enough = p.build_meta_context_request("vol", ["base:allocation"] + ["x-other:thing"] * 1023)
    assert [r.type for r in c.option(opt, enough)] == [p.REP_META_CONTEXT, p.REP_ACK]


def test_handshake_meta_context_unknown_export() -> None:
    c = ScriptedClient()
    c.option(p.OPT_STRUCTURED_REPLY)
    req = p.build_meta_context_request("nope", ["base:allocation"])
    assert [r.type for r in c.option(p.OPT_SET_META_CONTEXT, req)] == [p.REP_ERR_UNKNOWN]


def test_handshake_failed_set_meta_context_clears_earlier_selection() -> None:
    """Section "NBD_OPT_SET_META_CONTEXT": issuing it "replaces all
    previously-set metadata contexts (including when this command fails)"."""
    c = ScriptedClient()
    c.option(p.OPT_STRUCTURED_REPLY)
    c.option(p.OPT_SET_META_CONTEXT, p.build_meta_context_request("vol", ["base:allocation"]))
    replies = c.option(p.OPT_SET_META_CONTEXT, h("00000003 766f6c"))  # malformed
    assert [r.type for r in replies] == [p.REP_ERR_INVALID]
    c.go("vol")
    assert c.hs.negotiated is not None
    assert c.hs.negotiated.allocation_context is None, "a failed SET left base:allocation selected"


@pytest.mark.parametrize("opt", [p.OPT_PEEK_EXPORT, p.OPT_EXTENDED_HEADERS, 12, 0x1234, 0xFFFFFFFF, 0])
def test_handshake_unknown_option_is_unsupported(opt: int) -> None:
    c = ScriptedClient()
    replies = c.option(opt, b"some data the server must skip")
    assert [r.type for r in replies] == [p.REP_ERR_UNSUP]
    assert c.option(p.OPT_LIST)[-1].type == p.REP_ACK  # the stream is still in step


def test_handshake_starttls_refused_without_tls() -> None:
    c = ScriptedClient()
    (reply,) = c.option(p.OPT_STARTTLS)
    # Section "NOTLS mode": ERR_POLICY or ERR_UNSUP, never TLS_REQD.
    assert reply.type in (p.REP_ERR_UNSUP, p.REP_ERR_POLICY)


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_handshake_abort(data: bytes) -> None:
    c = ScriptedClient()
    assert c.option(p.OPT_ABORT, data) == [p.OptionReply(p.OPT_ABORT, p.REP_ACK, b"")]
    assert c.hs.phase is p.Phase.CLOSED
    assert c.hs.negotiated is None


def test_handshake_abort_ignores_what_follows() -> None:
    c = ScriptedClient()
    c.hs.receive_data(p.build_option(p.OPT_ABORT) + p.build_option(p.OPT_LIST))
    replies, _ = _parse_option_replies(c.hs.data_to_send())
    assert [r.type for r in replies] == [p.REP_ACK]


def test_handshake_bad_option_magic() -> None:
    c = ScriptedClient()
    with pytest.raises(ProtocolError, match="magic"):
        c.hs.receive_data(h("4e42444d41474943 00000003 00000000"))
    assert c.hs.phase is p.Phase.CLOSED


def test_handshake_option_too_large() -> None:
    c = ScriptedClient()
    with pytest.raises(ProtocolError, match="too large"):
        c.hs.receive_data(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_LIST, p.MAX_OPTION_LENGTH + 1))
    ok = ScriptedClient()  # the largest allowed one is waited for, not refused
    ok.hs.receive_data(p.OPTION_HEADER.pack(p.IHAVEOPT, 0x99, p.MAX_OPTION_LENGTH))
    assert ok.hs.data_to_send() == b""
    ok.hs.receive_data(bytes(p.MAX_OPTION_LENGTH))
    assert [r.type for r in _parse_option_replies(ok.hs.data_to_send())[0]] == [p.REP_ERR_UNSUP]


def _transcript(exports: Mapping[str, p.ExportInfo] = EXPORTS) -> tuple[bytes, bytes]:
    """A whole client side of a negotiation, then requests behind the GO."""
    requests = p.Request(0, p.CMD_READ, 1, 0, 512).header() + PIPELINE[1][1]
    client = b"".join(
        [
            p.CLIENT_FLAGS.pack(CLIENT_FLAGS),
            p.build_option(p.OPT_LIST),
            p.build_option(0x77, b"unknown"),
            p.build_option(p.OPT_INFO, p.build_info_request("nope")),
            p.build_option(p.OPT_INFO, p.build_info_request("vol", [p.INFO_NAME])),
            p.build_option(p.OPT_STRUCTURED_REPLY),
            p.build_option(p.OPT_LIST_META_CONTEXT, p.build_meta_context_request("vol", [])),
            p.build_option(p.OPT_SET_META_CONTEXT, p.build_meta_context_request("vol", ["base:allocation"])),
            p.build_option(p.OPT_GO, p.build_info_request("vol")),
        ]
    )
    return client, requests


def test_handshake_three_ways_same_output_and_leftover() -> None:
    client, requests = _transcript()
    stream = client + requests

    whole = p.ServerHandshake(EXPORTS, "vol")
    whole.receive_data(stream)
    out_whole = whole.data_to_send()
    assert whole.phase is p.Phase.TRANSMISSION
    assert whole.leftover == requests

    bytewise = p.ServerHandshake(EXPORTS, "vol")
    pos = 0
    while bytewise.phase is not p.Phase.TRANSMISSION:
        bytewise.receive_data(stream[pos : pos + 1])
        pos += 1
    assert pos == len(client)  # transmission begins right after the GO
    assert bytewise.data_to_send() == out_whole
    assert bytewise.leftover == b""  # the adapter hands stream[pos:] to the decoder itself

    # trailing bytes: only part of the first request behind the GO
    partial = p.ServerHandshake(EXPORTS, "vol")
    partial.receive_data(client + requests[:5])
    assert partial.data_to_send() == out_whole
    assert partial.leftover == requests[:5]

    replies, rest = _parse_option_replies(out_whole[18:])
    assert rest == b""
    assert [(r.option, r.type) for r in replies] == [
        (p.OPT_LIST, p.REP_SERVER),
        (p.OPT_LIST, p.REP_SERVER),
        (p.OPT_LIST, p.REP_SERVER),
        (p.OPT_LIST, p.REP_ACK),
        (0x77, p.REP_ERR_UNSUP),
        (p.OPT_INFO, p.REP_ERR_UNKNOWN),
        (p.OPT_INFO, p.REP_INFO),
        (p.OPT_INFO, p.REP_INFO),
        (p.OPT_INFO, p.REP_INFO),
        (p.OPT_INFO, p.REP_ACK),
        (p.OPT_STRUCTURED_REPLY, p.REP_ACK),
        (p.OPT_LIST_META_CONTEXT, p.REP_META_CONTEXT),
        (p.OPT_LIST_META_CONTEXT, p.REP_ACK),
        (p.OPT_SET_META_CONTEXT, p.REP_META_CONTEXT),
        (p.OPT_SET_META_CONTEXT, p.REP_ACK),
        (p.OPT_GO, p.REP_INFO),
        (p.OPT_GO, p.REP_INFO),
        (p.OPT_GO, p.REP_ACK),
    ]
    neg = whole.negotiated
    assert neg is not None and neg.structured_replies and neg.allocation_context is not None

    # the leftover is the start of the transmission phase
    dec = p.RequestDecoder()
    dec.receive_data(whole.leftover)
    assert _snapshot(dec.next_event()) == (0, p.CMD_READ, 1, 0, 512, None)  # type: ignore[arg-type]
    assert _snapshot(dec.next_event()) == EXPECTED[1]  # type: ignore[arg-type]


def test_handshake_leftover_after_export_name() -> None:
    c = ScriptedClient()
    req = p.Request(0, p.CMD_FLUSH, 5, 0, 0).header()
    c.hs.receive_data(p.build_option(p.OPT_EXPORT_NAME, b"vol") + req)
    assert c.hs.phase is p.Phase.TRANSMISSION
    assert c.hs.leftover == req


def test_handshake_in_memory_pair_with_decoder() -> None:
    """A scripted client negotiates, then its requests are decoded by the
    transmission core and answered with replies its own decoder parses."""
    c = ScriptedClient()
    c.option(p.OPT_STRUCTURED_REPLY)
    c.go("vol")
    neg = c.hs.negotiated
    assert neg is not None
    server = p.RequestDecoder()
    client = p.ReplyDecoder(lambda cookie: 0)
    server.receive_data(p.Request(0, p.CMD_READ, 42, 0, 4).header())
    req = server.next_event()
    assert req is not None and (req.type, req.cookie) == (p.CMD_READ, 42)
    reply = (
        p.OFFSET_DATA_HEADER.pack(
            p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, req.cookie, 12, 0
        )
        + b"data"
    )
    client.receive_data(reply)
    ev = client.next_event()
    assert ev is not None and isinstance(ev[0], p.StructuredChunk)
    assert ev[0].cookie == 42 and ev[0].done and ev[0].payload == bytes(8) + b"data"


# =========================================================================== errors
@pytest.mark.parametrize(
    ("err", "fast_zero", "df", "expected"),
    [
        (errno.EPERM, False, False, p.EPERM),
        (errno.EROFS, False, False, p.EPERM),
        (errno.ENOSPC, False, False, p.ENOSPC),
        (errno.EDQUOT, False, False, p.ENOSPC),
        (errno.EFBIG, False, False, p.ENOSPC),
        (errno.EIO, False, False, p.EIO),
        (errno.ENOMEM, False, False, p.ENOMEM),
        (errno.EINVAL, False, False, p.EINVAL),
        (errno.ESHUTDOWN, False, False, p.ESHUTDOWN),
        (errno.ENOTSUP, True, False, p.ENOTSUP),
        (errno.ENOTSUP, False, False, p.EINVAL),  # only for FAST_ZERO requests
        (errno.EOPNOTSUPP, True, False, p.ENOTSUP),
        (errno.EOVERFLOW, False, True, p.EOVERFLOW),
        (errno.EOVERFLOW, False, False, p.EINVAL),  # only for DF requests
        (errno.EOVERFLOW, True, False, p.EINVAL),
        (errno.ENOENT, False, False, p.EINVAL),
        (errno.EAGAIN, False, False, p.EINVAL),
        (errno.EBADF, True, True, p.EINVAL),
        (0, False, False, p.EINVAL),
        (9999, False, False, p.EINVAL),
    ],
)
def test_nbd_error_mapping(err: int, fast_zero: bool, df: bool, expected: int) -> None:
    assert nbd_error(err, fast_zero=fast_zero, df=df) == expected


def test_nbd_error_results_are_spec_values() -> None:
    allowed = {p.EPERM, p.EIO, p.ENOMEM, p.EINVAL, p.ENOSPC, p.EOVERFLOW, p.ENOTSUP, p.ESHUTDOWN}
    for e in range(0, 200):
        for fz in (False, True):
            for df in (False, True):
                assert nbd_error(e, fast_zero=fz, df=df) in allowed


def test_error_classes_carry_their_codes() -> None:
    assert RequestError(p.ENOSPC, "pool full").error == p.ENOSPC
    assert str(RequestError(p.ENOSPC, "pool full")) == "ENOSPC: pool full"
    assert str(RequestError(p.EIO)) == "EIO"
    assert OptionError("refused", p.REP_ERR_UNKNOWN).reply == p.REP_ERR_UNKNOWN
    e = BackendError(errno.ENOSPC, "pool p1 is full")
    assert e.errno == errno.ENOSPC and str(e) == "pool p1 is full"
    assert str(BackendError(errno.EIO)) == "EIO"
