"""doc/proto.md on a LUN while it migrates, seen by libnbd (strict checks off, so the
server's own answers show): BLOCK_STATUS is the source's map (REQ_ONE: one extent,
within the range, also across a region boundary), FAST_ZERO is not offered and so
EINVAL, requests at the last byte work and one byte past it fail as the spec says,
CACHE, 32 MiB and DF reads; what the host wrote is on the source (I1).

tests/nbd/test_interop_tools.py checks the same on a plain export; here the LUN is
half copied (some regions are read locally, the rest through the source).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest

from emulator.nbd.client import NbdClient
from tests.nbd.test_interop_tools import libnbd
from tests.servers import array_api, array_daemon
from tests.tools import need_libnbd

MiB = 1 << 20
SIZE = 48 * MiB
#: data runs of the source LUN (offset, length, byte); the rest are holes
DATA = [(0, MiB, 0x11), (4 * MiB, MiB + 4096, 0x22), (20 * MiB - 512, 8192, 0x33), (SIZE - MiB, MiB, 0x44)]

BODY = """
size = h.get_size()
def status(off, length, flags=0):
    got = []
    def cb(ctx, o, entries, e):
        got.append(list(entries))
        return 0
    try:
        h.block_status(length, off, cb, flags)
    except nbd.Error as e:
        return e.errno
    return got
out["size"] = size
out["can_fast_zero"] = h.can_fast_zero()
out["map"] = extents(h, 0, size)
out["one"] = [status(o, n, nbd.CMD_FLAG_REQ_ONE) for o, n in ONE]
out["status_past_end"] = status(size - 1, 2)
out["fast_zero"] = err(h.zero, 4096, 8 * MiB, nbd.CMD_FLAG_FAST_ZERO)
out["cache"] = [err(h.cache, 4 * MiB, 2 * MiB), err(h.cache, 1, size - 1), err(h.cache, 2, size - 1)]
out["read_last"] = [err(h.pread, 1, size - 1), err(h.pread, 2, size - 1), err(h.pread, 0, 0)]
out["read_max"] = [sha(h.pread(32 * MiB, 0)), err(h.pread, 32 * MiB + 1, 0)]
out["read_df"] = sha(h.pread(65536, 5 * MiB - 32768, nbd.CMD_FLAG_DF))
out["write_last"] = [err(h.pwrite, b"W", size - 1, nbd.CMD_FLAG_FUA), err(h.pwrite, b"WW", size - 1)]
out["zero_last"] = [err(h.zero, 2048, size - 4096, nbd.CMD_FLAG_NO_HOLE), err(h.zero, 2, size - 1)]
out["trim_last"] = [err(h.trim, 1024, size - 2048), err(h.trim, 2, size - 1)]
out["flush"] = err(h.flush)
"""
#: (offset, length) of the REQ_ONE asks: the whole LUN, across a region boundary, in a
#: dirty data region, from data into a hole, the last byte
ONE = [(0, SIZE), (MiB - 4096, 2 * MiB), (5 * MiB, 4096), (20 * MiB - 1024, 4 * MiB), (SIZE - 1, 1)]
MiB_DEF = f"MiB = {MiB}\nONE = {ONE!r}\n"


def source_bytes() -> bytearray:
    img = bytearray(SIZE)
    for off, n, byte in DATA:
        img[off : off + n] = bytes([byte]) * n
    return img


async def fill(uri: str) -> None:
    async with await NbdClient.connect(uri, timeout=10) as c:
        for off, n, byte in DATA:
            await c.write(off, bytes([byte]) * n)
        await c.flush()


async def read_all(uri: str) -> bytes:
    async with await NbdClient.connect(uri, timeout=10) as c:
        return bytes(await c.read(0, c.size))


@pytest.mark.timeout(60)
def test_a_migrating_lun_answers_as_the_spec_says(tmp_path: Path) -> None:
    need_libnbd()
    with array_daemon(tmp_path / "A", "A") as a, array_daemon(tmp_path / "B", "B") as b:
        array_api(a).create_lun("v", SIZE)
        asyncio.run(fill(a.uri("v")))
        src_map, _ = libnbd(a.uri("v"), MiB_DEF + 'out["map"] = extents(h, 0, h.get_size())')
        api = array_api(b)
        api.call("POST", "/api/v1/migrations", {"lun": "v", "source": a.uri("v"), "throttle": 1})
        deadline = time.monotonic() + 20
        while api.migration("v")["copied_bytes"] < MiB:  # region 0 is read locally
            assert time.monotonic() < deadline
            time.sleep(0.02)
        st = api.call("POST", "/api/v1/migrations/v/pause")
        assert 0 < st["clean_bytes"] < SIZE and st["dirty_bytes"], st
        out, _ = libnbd(b.uri("v"), MiB_DEF + BODY, strict=False)

        img = source_bytes()
        assert out["size"] == SIZE and out["can_fast_zero"] is False
        assert out["map"] == src_map["map"], "BLOCK_STATUS is not the source's map"
        for (off, length), got in zip(ONE, out["one"], strict=True):
            assert isinstance(got, list) and len(got) == 1 and len(got[0]) == 2, (off, got)
            n, flags = got[0]
            assert 0 < n <= length, (off, length, got)
            hole = not any(img[off : off + n])
            assert not (flags & 2) or hole, f"REQ_ONE at {off}: zero reported where data is: {got}"
        assert out["status_past_end"] == "EINVAL"
        assert out["fast_zero"] == "EINVAL", "FAST_ZERO is not advertised: EINVAL, not ENOTSUP"
        assert out["cache"] == [None, None, "EINVAL"]
        assert out["read_last"] == [None, "EINVAL", "EINVAL"]
        assert out["read_max"] == [hashlib.sha256(img[: 32 * MiB]).hexdigest(), "EINVAL"]
        assert out["read_df"] == hashlib.sha256(img[5 * MiB - 32768 : 5 * MiB + 32768]).hexdigest()
        assert out["write_last"] == [None, "ENOSPC"]
        assert out["zero_last"] == [None, "ENOSPC"]
        assert out["trim_last"] == [None, "EINVAL"]
        assert out["flush"] is None

        # The host's writes reached the source (I1): the NO_HOLE zeroes and the W at the
        # last byte; the trimmed KiB may read as anything and is not compared. The
        # migration then completes with them.
        img[SIZE - 4096 : SIZE - 2048] = bytes(2048)
        img[SIZE - 1] = ord("W")
        got = asyncio.run(read_all(a.uri("v")))
        skip = slice(SIZE - 2048, SIZE - 1024)  # trimmed
        assert got[: skip.start] == img[: skip.start] and got[skip.stop :] == img[skip.stop :]
        api.call("POST", "/api/v1/migrations/v/resume")
        api.call("PATCH", "/api/v1/migrations/v", {"throttle": 0})
        assert api.wait_migration("v", 30)["state"] == "completed"
        after = asyncio.run(read_all(b.uri("v")))
        assert after[: skip.start] == img[: skip.start] and after[skip.stop :] == img[skip.stop :]
