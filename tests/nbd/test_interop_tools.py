"""Interop: our NBD server (`blockmig serve-file`) against real NBD peers.

nbdinfo, nbdcopy, nbddump, qemu-img, qemu-io, fio's nbd engine and libnbd
(python3-libnbd, importable only under Debian's /usr/bin/python3) each talk
to a real serve-file subprocess on 127.0.0.1 port 0 (or a unix socket in
tmp_path). What a peer sees is checked against the backing file itself: its
bytes, and its holes through SEEK_DATA/SEEK_HOLE.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from tests.files import sparse_runs as file_map
from tests.servers import MemoryExport, serve_exports, serve_file
from tests.tools import LIBNBD_PYTHON, need, need_libnbd, run

pytestmark = pytest.mark.interop

MiB = 1 << 20

# nbdinfo --map types (base:allocation bits: STATE_HOLE=1, STATE_ZERO=2)
DATA, HOLE_ZERO = 0, 3


# --------------------------------------------------------------------------- helpers
def sparse_file(path: Path, size: int, writes: Iterable[tuple[int, bytes]] = ()) -> Path:
    """A sparse file of ``size`` bytes with ``writes`` (offset, data) put in place."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            os.pwrite(f.fileno(), data, off)
    return path


def merge(runs: Iterable[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for off, n, kind in runs:
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, kind)
        else:
            out.append((off, n, kind))
    return out


def expected_map(size: int, writes: Iterable[tuple[int, int]], block: int) -> list[tuple[int, int, bool]]:
    """The map a filesystem with ``block``-sized blocks gives after ``writes``."""
    blocks: set[int] = set()
    for off, n in writes:
        blocks.update(range(off // block, (off + n - 1) // block + 1))
    runs = [
        (b * block, min(block, size - b * block), b in blocks) for b in range((size + block - 1) // block)
    ]
    return merge(runs)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def nbdinfo_json(uri: str, *args: str) -> Any:
    return json.loads(run(["nbdinfo", "--json", *args, uri]).stdout)


def qemu_io(uri: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["qemu-io", "-f", "raw"]
    for c in commands:
        cmd += ["-c", c]
    return run([*cmd, uri], check=check)


_LIBNBD_PRELUDE = r"""
import hashlib, json, sys
import nbd

def err(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        return e.errno or str(e.errnum)
    return None

def sha(b):
    return hashlib.sha256(b).hexdigest()

def extents(h, off, length):
    "[offset, length, flags] of base:allocation over [off, off+length)."
    res, end = [], off + length
    while off < end:
        got = []
        def cb(ctx, o, entries, e):
            if ctx == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(entries)
            return 0
        h.block_status(end - off, off, cb)
        if not got:
            raise RuntimeError(f"empty block status reply at {off}")
        for i in range(0, len(got), 2):
            n = min(got[i], end - off)
            res.append([off, n, got[i + 1]])
            off += n
            if off >= end:
                break
    return res

h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
CONFIG = json.loads(sys.argv[2])
if not CONFIG.get("structured", True):
    h.set_request_structured_replies(False)
if not CONFIG.get("strict", True):
    h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
out = {}
"""

_LIBNBD_EPILOGUE = r"""
h.shutdown()
print("RESULT " + json.dumps(out))
"""


def libnbd(
    uri: str,
    body: str,
    *,
    structured: bool = True,
    strict: bool = True,
    debug: bool = False,
) -> tuple[dict[str, Any], str]:
    """Run ``body`` under /usr/bin/python3 with a libnbd handle ``h`` connected to ``uri``.

    ``body`` fills the dict ``out``; returns (out, stderr).
    """
    script = _LIBNBD_PRELUDE + body + _LIBNBD_EPILOGUE
    env = dict(os.environ)
    if debug:
        env["LIBNBD_DEBUG"] = "1"
    config = json.dumps({"structured": structured, "strict": strict})
    p = run([LIBNBD_PYTHON, "-c", script, uri, config], env=env)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, f"libnbd script printed no result: {p.stdout!r} {p.stderr[-2000:]!r}"
    return json.loads(line[-1][len("RESULT ") :]), p.stderr


def parse_nbddump(text: str, size: int) -> bytes:
    """Rebuild the bytes from nbddump's hexdump (``*`` squashes repeated lines)."""
    out = bytearray()
    prev: bytes | None = None
    squashed = False
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.strip() in ("*", "\u2606"):
            squashed = True
            continue
        addr, _, rest = line.partition(": ")
        off = int(addr, 16)
        data = bytes.fromhex(rest.split(" |", 1)[0].replace(" ", ""))
        if squashed:
            assert prev is not None and len(prev) == 16
            while len(out) < off:
                out += prev
            squashed = False
        assert len(out) == off, f"nbddump line at 0x{off:x} but {len(out)} bytes rebuilt"
        out += data
        prev = data
    if squashed:  # the dump ended inside a run of repeated lines
        assert prev is not None
        while len(out) < size:
            out += prev
    return bytes(out)


# --------------------------------------------------------------------------- nbdinfo
@pytest.mark.parametrize("size", [64 * MiB, 10_000_019], ids=["64MiB", "unaligned"])
def test_nbdinfo_json_describes_the_export(tmp_path: Path, size: int) -> None:
    need("nbdinfo")
    img = sparse_file(tmp_path / "disk.img", size)
    with serve_file(img, "--description", "LUN 7 of pool gold", export="lun7") as srv:
        info = nbdinfo_json(srv.uri)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    [e] = info["exports"]
    assert e["export-name"] == "lun7"
    assert e["description"] == "LUN 7 of pool gold"
    assert e["export-size"] == size
    assert "base:allocation" in e["contexts"]
    flags = {k: v for k, v in e.items() if k.startswith(("is_", "can_"))}
    assert flags == {
        "is_rotational": False,
        "is_read_only": False,
        "can_cache": True,
        "can_df": True,
        "can_fast_zero": True,
        "can_flush": True,
        "can_fua": True,
        "can_multi_conn": True,
        "can_trim": True,
        "can_zero": True,
    }
    assert (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]) == (
        1,
        4096,
        33554432,
    )


def test_nbdinfo_unknown_export_name_is_refused(tmp_path: Path) -> None:
    need("nbdinfo")
    img = sparse_file(tmp_path / "disk.img", MiB)
    with serve_file(img, export="lun1") as srv:
        p = run(["nbdinfo", "--json", f"nbd://127.0.0.1:{srv.port}/nosuch"], check=False)
        assert p.returncode != 0
        assert "nosuch" in p.stderr or "unknown" in p.stderr.lower(), p.stderr
        # ... and the server still serves the right name afterwards.
        assert nbdinfo_json(srv.uri)["exports"][0]["export-name"] == "lun1"


def test_read_only_export_refuses_every_write(tmp_path: Path) -> None:
    need("nbdinfo", "nbdcopy", "qemu-io")
    need_libnbd()
    img = sparse_file(tmp_path / "disk.img", 4 * MiB, [(MiB, random.randbytes(64 * 1024))])
    before = sha256(img)
    src = tmp_path / "src.bin"
    src.write_bytes(random.randbytes(4 * MiB))
    with serve_file(img, "--read-only") as srv:
        [e] = nbdinfo_json(srv.uri)["exports"]
        assert e["is_read_only"] is True
        assert (e["can_trim"], e["can_zero"], e["can_fast_zero"], e["can_fua"]) == (
            False,
            False,
            False,
            False,
        )
        # Clients refuse by themselves...
        assert run(["nbdcopy", str(src), srv.uri], check=False).returncode != 0
        assert qemu_io(srv.uri, "write -P 0x55 0 4096", check=False).returncode != 0
        # ... and a client that sends the writes anyway gets EPERM from the server.
        out, _ = libnbd(
            srv.uri,
            """
out["write"] = err(h.pwrite, b"x" * 4096, 0)
out["write_fua"] = err(h.pwrite, b"x" * 512, 4096, nbd.CMD_FLAG_FUA)
out["trim"] = err(h.trim, 65536, 1048576)
out["zero"] = err(h.zero, 65536, 0)
out["read"] = sha(h.pread(65536, 1048576))
out["flush"] = err(h.flush)
""",
            strict=False,
        )
    assert out["write"] == "EPERM"
    assert out["write_fua"] == "EPERM"
    assert out["trim"] == "EPERM"
    assert out["zero"] == "EPERM"
    assert out["flush"] is None
    assert out["read"] == hashlib.sha256(read_at(img, MiB, 65536)).hexdigest()
    assert sha256(img) == before


def test_nbdinfo_map_matches_the_files_holes(tmp_path: Path) -> None:
    need("nbdinfo")
    size = 16 * MiB
    writes = [
        (0, random.randbytes(4096)),
        (MiB, random.randbytes(64 * 1024)),
        (5 * MiB + 4096, random.randbytes(8192)),
        (9 * MiB + 100, b"unaligned!"),  # dirties the whole 4 KiB block around it
        (12 * MiB - 10, random.randbytes(20)),  # straddles two blocks
        (size - 4096, random.randbytes(4096)),
    ]
    img = sparse_file(tmp_path / "disk.img", size, writes)
    block = os.stat(img).st_blksize
    want = expected_map(size, [(o, len(d)) for o, d in writes], block)
    # The filesystem must agree with our model, or the test proves nothing.
    assert file_map(img) == want, "tmp_path's filesystem does not keep holes block-exactly"
    with serve_file(img) as srv:
        got_json = json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)
        text = run(["nbdinfo", "--map", srv.uri]).stdout
    got = merge((e["offset"], e["length"], e["type"] == DATA) for e in got_json)
    assert got == want
    assert {e["type"] for e in got_json} <= {DATA, HOLE_ZERO}
    # Text form: one line per extent, "offset length type description".
    rows = [ln.split() for ln in text.splitlines() if ln.strip()]
    assert merge((int(r[0]), int(r[1]), r[3] == "data") for r in rows) == want


def test_nbdinfo_list_shows_every_export(tmp_path: Path) -> None:
    need("nbdinfo")
    exports = [
        MemoryExport("gold/lun0", 1 * MiB, "first LUN of pool gold"),
        MemoryExport("gold/lun1", 2 * MiB + 512, "second LUN, unaligned size"),
        MemoryExport("silver/lun0", 3 * MiB, "a read-only LUN", read_only=True),
    ]
    with serve_exports(*exports) as srv:
        info = nbdinfo_json(srv.uri, "--list")
    got = {e["export-name"]: e for e in info["exports"]}
    assert set(got) == {e.name for e in exports}
    for want in exports:
        e = got[want.name]
        assert e["description"] == want.description
        assert e["export-size"] == want.size
        assert e["is_read_only"] is want.read_only
        assert unquote(e["uri"]).endswith("/" + want.name), e["uri"]


# --------------------------------------------------------------------------- data movers
def test_nbdcopy_round_trip(tmp_path: Path) -> None:
    need("nbdcopy")
    size = 24 * MiB + 12345  # unaligned tail
    data = bytearray(random.randbytes(size))
    data[8 * MiB : 12 * MiB] = bytes(4 * MiB)  # a zero run nbdcopy may send as zeroes
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    img = sparse_file(tmp_path / "disk.img", size)
    back = tmp_path / "back.bin"
    with serve_file(img) as srv:
        run(["nbdcopy", str(src), srv.uri])
        run(["nbdcopy", srv.uri, str(back)])
    assert srv.proc.returncode == 0, "serve-file did not exit cleanly on SIGTERM"
    assert img.read_bytes() == data, "the backing file differs from what nbdcopy wrote"
    assert back.read_bytes() == data, "nbdcopy read back different bytes"
    assert run(["cmp", str(src), str(back)], check=False).returncode == 0


def test_qemu_img_compare_local_file_and_export(tmp_path: Path) -> None:
    need("qemu-img")
    img = sparse_file(
        tmp_path / "disk.img",
        8 * MiB,
        [(0, random.randbytes(MiB)), (5 * MiB + 7, random.randbytes(100_000))],
    )
    local = tmp_path / "local.raw"
    shutil.copyfile(img, local)
    with serve_file(img, "--read-only") as srv:
        same = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(local), srv.uri], check=False)
        assert same.returncode == 0, same.stdout + same.stderr
        assert "identical" in same.stdout
        # One flipped byte in the local copy must be found through the export.
        with open(local, "r+b") as f:
            f.seek(5 * MiB + 50_176)
            b = f.read(1)
            f.seek(5 * MiB + 50_176)
            f.write(bytes([b[0] ^ 0xFF]))
        diff = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(local), srv.uri], check=False)
    assert diff.returncode == 1, diff.stdout + diff.stderr
    assert f"offset {5 * MiB + 50_176}" in diff.stdout


SIZE_IO = 8 * MiB
QEMU_IO_PATTERNS = [  # (pattern, offset, length), none overlapping
    (0x11, 0, 4096),
    (0x22, 8193, 1),  # a single unaligned byte
    (0x33, 12287, 2),  # straddles a 4 KiB boundary
    (0x44, 65536 + 513, 70_000),  # unaligned start and length
    (0x55, 3 * MiB - 3, 2 * MiB + 6),  # large and unaligned at both ends
    (0x66, SIZE_IO - 4096 - 7, 4096 + 6),  # ends one byte short of the end
    (0x77, SIZE_IO - 1, 1),  # the last byte of the export
]


def test_qemu_io_patterns_at_aligned_unaligned_and_final_offsets(tmp_path: Path) -> None:
    need("qemu-io")
    img = sparse_file(tmp_path / "disk.img", SIZE_IO)
    with serve_file(img) as srv:
        qemu_io(srv.uri, *(f"write -P 0x{p:02x} {o} {n}" for p, o, n in QEMU_IO_PATTERNS))
        # Read back over a fresh connection.
        r = qemu_io(srv.uri, *(f"read -P 0x{p:02x} {o} {n}" for p, o, n in QEMU_IO_PATTERNS))
        assert "verification failed" not in r.stdout + r.stderr
        # The same check must be able to fail: a wrong pattern is caught.
        bad = qemu_io(srv.uri, f"read -P 0x99 {SIZE_IO - 1} 1", check=False)
        assert bad.returncode != 0 and "verification failed" in bad.stdout + bad.stderr
        # Past the end is refused.
        past = qemu_io(srv.uri, f"write -P 0x12 {SIZE_IO - 512} 1024", check=False)
        assert past.returncode != 0 or "error" in (past.stdout + past.stderr).lower()
    # Server side: the file holds exactly those patterns, zeroes elsewhere.
    want = bytearray(SIZE_IO)
    for p, o, n in QEMU_IO_PATTERNS:
        want[o : o + n] = bytes([p]) * n
    assert img.read_bytes() == want


def test_qemu_img_convert_from_export_to_qcow2_and_raw(tmp_path: Path) -> None:
    need("qemu-img")
    size = 16 * MiB
    img = sparse_file(
        tmp_path / "disk.img",
        size,
        [
            (0, random.randbytes(2 * MiB)),
            (7 * MiB + 3, random.randbytes(1_000_001)),
            (size - 512, random.randbytes(512)),
        ],
    )
    qcow = tmp_path / "out.qcow2"
    raw = tmp_path / "out.raw"
    with serve_file(img, "--read-only") as srv:
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", srv.uri, str(qcow)])
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, str(raw)])
    assert raw.read_bytes() == img.read_bytes()
    r = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow), str(img)], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(run(["qemu-img", "info", "--output=json", str(qcow)]).stdout)
    assert info["virtual-size"] == size
    # Holes of the export stayed holes: the qcow2 holds about the data, not 16 MiB.
    assert info["actual-size"] < 8 * MiB


def test_qemu_img_convert_from_local_file_into_export(tmp_path: Path) -> None:
    need("qemu-img")
    size = 16 * MiB
    data = bytearray(random.randbytes(size))
    data[4 * MiB : 9 * MiB + 17] = bytes(5 * MiB + 17)  # zeroes that must overwrite junk
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    img = tmp_path / "disk.img"
    img.write_bytes(b"\xaa" * size)  # junk the copy must replace everywhere
    with serve_file(img) as srv:
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri])
        r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri], check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    assert img.read_bytes() == data


# --------------------------------------------------------------------------- fio
def _fio(tmp_path: Path, uri: str, tag: str, *extra: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / f"fio-{tag}.json"
    cmd = [
        "fio",
        "--name=v",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=32M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--output-format=json",
        f"--output={out}",
        *extra,
    ]
    p = run(cmd, check=False, cwd=tmp_path)  # cwd: fio drops a verify state file there
    text = out.read_text()
    assert "{" in text, f"fio wrote no JSON: {p.stdout} {p.stderr}"
    return p.returncode, json.loads(text[text.index("{") :])["jobs"][0]


def test_fio_randwrite_with_crc32c_verify_at_iodepth_32(tmp_path: Path) -> None:
    need("fio")
    if "nbd" not in run(["fio", "--enghelp"], check=False).stdout:
        pytest.skip("this fio has no nbd ioengine")
    assert "uri" in run(["fio", "--enghelp=nbd"]).stdout  # the engine takes --uri=
    img = sparse_file(tmp_path / "disk.img", 32 * MiB)
    with serve_file(img) as srv:
        rc, job = _fio(tmp_path, srv.uri, "write", "--do_verify=1")
        assert (rc, job["error"]) == (0, 0)
        assert job["write"]["io_bytes"] == 32 * MiB
        assert job["read"]["io_bytes"] == 32 * MiB  # the verify pass read it all back
        rc, job = _fio(tmp_path, srv.uri, "verify", "--verify_only")
        assert (rc, job["error"]) == (0, 0)
        assert job["read"]["io_bytes"] == 32 * MiB
        # The verify can fail: corrupt one block behind the server's back.
        with open(img, "r+b") as f:
            f.seek(12 * 4096)
            f.write(random.randbytes(4096))
        rc, job = _fio(tmp_path, srv.uri, "corrupt", "--verify_only")
        assert rc != 0 and job["error"] != 0


# --------------------------------------------------------------------------- libnbd / nbddump
def test_nbddump_shows_the_files_bytes(tmp_path: Path) -> None:
    need("nbddump")
    size = MiB
    img = sparse_file(
        tmp_path / "disk.img",
        size,
        [
            (0x100, b"hello, blockmig"),
            (0x8003, random.randbytes(40)),
            (0x20000, bytes(range(256)) * 64),  # 16 KiB of a repeating line: squashed
            (size - 1, b"\xff"),
        ],
    )
    with serve_file(img, "--read-only") as srv:
        text = run(["nbddump", srv.uri]).stdout
    assert "68 65 6c 6c 6f" in text  # "hello"
    assert parse_nbddump(text, size) == img.read_bytes()


def test_libnbd_reads_known_bytes_over_tcp_and_unix_socket(tmp_path: Path) -> None:
    need_libnbd()
    size = 8 * MiB
    writes = [(0, random.randbytes(12345)), (3 * MiB - 1, random.randbytes(2 * MiB + 2)), (size - 3, b"END")]
    img = sparse_file(tmp_path / "disk.img", size, writes)
    sock = tmp_path / "nbd.sock"
    ranges = [
        (0, 12345),
        (1, 100),
        (3 * MiB - 1, 2 * MiB + 2),
        (2 * MiB, 4 * MiB),
        (size - 3, 3),
        (0, size // 2),
        (size - 4 * MiB, 4 * MiB),
    ]
    body = f"""
out["size"] = h.get_size()
out["reads"] = [sha(h.pread(n, o)) for o, n in {ranges!r}]
out["structured"] = h.get_structured_replies_negotiated()
"""
    with serve_file(img, "--unix", str(sock)) as srv:
        for uri in (srv.uri, f"nbd+unix:///?socket={sock}"):
            out, _ = libnbd(uri, body)
            assert out["size"] == size
            assert out["structured"] is True
            assert out["reads"] == [hashlib.sha256(read_at(img, o, n)).hexdigest() for o, n in ranges], uri
        # Without structured replies every read comes back as a simple reply.
        out, _ = libnbd(srv.uri, body, structured=False)
        assert out["structured"] is False
        assert out["reads"] == [hashlib.sha256(read_at(img, o, n)).hexdigest() for o, n in ranges]


def test_libnbd_trim_zero_flush_cache_and_block_status_reach_the_file(tmp_path: Path) -> None:
    need_libnbd()
    size = 8 * MiB
    img = sparse_file(tmp_path / "disk.img", size, [(0, random.randbytes(6 * MiB))])
    allocated_before = os.stat(img).st_blocks * 512
    assert allocated_before >= 6 * MiB
    with serve_file(img) as srv:
        out, _ = libnbd(
            srv.uri,
            """
out["trim"] = err(h.trim, 1048576, 1048576)                       # [1M, 2M) -> hole
out["zero"] = err(h.zero, 1048576, 3 * 1048576)                   # [3M, 4M) may trim
out["zero_no_hole"] = err(h.zero, 262144, 4 * 1048576, nbd.CMD_FLAG_NO_HOLE)
out["zero_fast"] = err(h.zero, 131072, 5 * 1048576, nbd.CMD_FLAG_FAST_ZERO)
out["zero_fua"] = err(h.zero, 4096, 5 * 1048576 + 524288, nbd.CMD_FLAG_FUA)
out["trim_fua"] = err(h.trim, 65536, 5 * 1048576 + 655360, nbd.CMD_FLAG_FUA)
out["write_hole"] = err(h.pwrite, b"in the hole", 7 * 1048576 + 3)
out["write_fua"] = err(h.pwrite, b"F" * 8192, 6 * 1048576 + 8192, nbd.CMD_FLAG_FUA)
out["flush"] = err(h.flush)
out["cache"] = err(h.cache, 2 * 1048576, 0)
out["zeroed_reads"] = [h.pread(n, o) == bytes(n) for o, n in [
    (1048576, 1048576), (3 * 1048576, 1048576), (4 * 1048576, 262144),
    (5 * 1048576, 131072), (5 * 1048576 + 524288, 4096), (5 * 1048576 + 655360, 65536)]]
out["extents"] = extents(h, 0, h.get_size())
out["req_one"] = []
def one(ctx, o, entries, e):
    out["req_one"].append(list(entries))
    return 0
h.block_status(h.get_size(), 0, one, nbd.CMD_FLAG_REQ_ONE)
out["can"] = [h.can_trim(), h.can_zero(), h.can_fast_zero(), h.can_flush(), h.can_cache(),
              h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)]
""",
        )
        fmap = file_map(img)
    assert out["can"] == [True] * 6
    for op in (
        "trim",
        "zero",
        "zero_no_hole",
        "zero_fast",
        "zero_fua",
        "trim_fua",
        "write_hole",
        "write_fua",
        "flush",
        "cache",
    ):
        assert out[op] is None, f"{op} failed: {out[op]}"
    assert all(out["zeroed_reads"]), out["zeroed_reads"]
    # The file: zeroes where the client zeroed, the write landed in the old hole.
    content = img.read_bytes()
    for o, n in [
        (MiB, MiB),
        (3 * MiB, MiB),
        (4 * MiB, 256 * 1024),
        (5 * MiB, 128 * 1024),
        (5 * MiB + 512 * 1024, 4096),
        (5 * MiB + 640 * 1024, 65536),
    ]:
        assert content[o : o + n] == bytes(n), f"[{o}, +{n}) is not zero in the file"
    assert content[7 * MiB + 3 : 7 * MiB + 14] == b"in the hole"
    assert content[6 * MiB + 8192 : 6 * MiB + 16384] == b"F" * 8192
    # Trimmed and may-trim zeroed ranges became holes in the file.
    for o, n in [(MiB, MiB), (3 * MiB, MiB), (5 * MiB, 128 * 1024), (5 * MiB + 640 * 1024, 65536)]:
        assert any(not d and s <= o and o + n <= s + ln for s, ln, d in fmap), (
            f"[{o}, +{n}) is not a hole in the file: {fmap}"
        )
    # NO_HOLE kept the blocks allocated: only the punched ranges were released.
    punched = MiB + MiB + 128 * 1024 + 4096 + 65536
    allocated_after = os.stat(img).st_blocks * 512
    written = 4096 + 8192  # the two writes into the old hole
    want_after = allocated_before - punched + written
    # (ext4 may add an extent-tree block or a few as the file fragments.)
    assert want_after <= allocated_after <= want_after + 64 * 1024, (
        f"allocated {allocated_after}, expected about {want_after}: did NO_HOLE punch, or a trim not punch?"
    )
    # block_status reports exactly the file's map; REQ_ONE gives a single extent.
    got = merge((o, n, not f & 1) for o, n, f in out["extents"])
    assert got == fmap
    assert all(f in (0, 3) for _, _, f in out["extents"])
    assert len(out["req_one"]) == 1 and len(out["req_one"][0]) == 2
    assert out["req_one"][0][0] == fmap[0][1] and out["req_one"][0][1] == (0 if fmap[0][2] else 3)


def test_bad_requests_fail_alone_and_the_server_keeps_serving(tmp_path: Path) -> None:
    need_libnbd()
    size = 4 * MiB
    img = sparse_file(tmp_path / "disk.img", size, [(size - 4096, random.randbytes(4096))])
    with serve_file(img) as srv:
        out, _ = libnbd(
            srv.uri,
            f"""
S = {size}
out["read_past_end"] = err(h.pread, 4096, S - 100)
out["write_past_end"] = err(h.pwrite, b"x" * 4096, S - 100)
out["trim_past_end"] = err(h.trim, 8192, S - 4096)
out["zero_past_end"] = err(h.zero, 8192, S)
out["zero_length_read"] = err(h.pread, 0, 0)
out["bs_past_end"] = err(h.block_status, 10, S, lambda *a: 0)
out["read_too_big"] = err(h.pread, 32 * 1048576 + 1, 0)
out["tail"] = sha(h.pread(4096, S - 4096))
""",
            strict=False,
        )
        # A second, fresh connection works too.
        again, _ = libnbd(srv.uri, f'out["tail"] = sha(h.pread(4096, {size} - 4096))')
    assert out["read_past_end"] == "EINVAL"
    assert out["write_past_end"] == "ENOSPC"
    assert out["trim_past_end"] == "EINVAL"
    assert out["zero_past_end"] == "ENOSPC"
    assert out["zero_length_read"] == "EINVAL"
    assert out["bs_past_end"] == "EINVAL"
    assert out["read_too_big"] in ("EINVAL", "EOVERFLOW", "ENOMEM")
    want = hashlib.sha256(read_at(img, size - 4096, 4096)).hexdigest()
    assert out["tail"] == want
    assert again["tail"] == want
    assert img.stat().st_size == size


def test_df_flag_is_not_advertised_without_structured_replies(tmp_path: Path) -> None:
    """proto.md, "Transmission flags": NBD_FLAG_SEND_DF "MUST [be left] clear if
    structured replies have not been negotiated". libnbd logs the flags the
    server sent (``eflags``) and notes when it has to ignore a DF claim."""
    need_libnbd()
    img = sparse_file(tmp_path / "disk.img", MiB)
    with serve_file(img) as srv:
        out, log = libnbd(srv.uri, 'out["df"] = h.can_df()', structured=False, debug=True)
        sr, _ = libnbd(srv.uri, 'out["df"] = h.can_df()')
    assert sr["df"] is True  # with structured replies DF is offered
    m = re.search(r"eflags: 0x([0-9a-f]+)", log)
    assert m, log[-2000:]
    eflags = int(m.group(1), 16)
    assert not eflags & (1 << 7), (
        f"server sent NBD_FLAG_SEND_DF (eflags 0x{eflags:x}) to a client that did not "
        "negotiate structured replies"
    )
    assert "ignoring claim of df" not in log
    assert out["df"] is False


def test_structured_reads_send_holes_as_hole_chunks(tmp_path: Path) -> None:
    """A large read over a sparse range comes back as OFFSET_DATA/OFFSET_HOLE
    chunks that tile the request and follow the file's holes; with DF it is a
    single data chunk. Either way the bytes are the file's."""
    need_libnbd()
    size = 2 * MiB
    writes = [
        (64 * 1024, random.randbytes(64 * 1024)),
        (512 * 1024 + 100, random.randbytes(5000)),
        (size - 4096, random.randbytes(4096)),
    ]
    img = sparse_file(tmp_path / "disk.img", size, writes)
    with serve_file(img, "--read-only") as srv:
        out, _ = libnbd(
            srv.uri,
            """
def chunks(flags):
    got = []
    def cb(buf, off, status, error):
        got.append([off, len(buf), status, sha(buf)])
        return 0
    data = h.pread_structured(1048576, 0, cb, flags)
    return got, sha(data)
out["plain"] = chunks(0)
out["df"] = chunks(nbd.CMD_FLAG_DF)
out["READ_DATA"], out["READ_HOLE"] = nbd.READ_DATA, nbd.READ_HOLE
""",
        )
    want_sha = hashlib.sha256(read_at(img, 0, MiB)).hexdigest()
    fmap = [(o, min(n, MiB - o), d) for o, n, d in file_map(img) if o < MiB]
    for name in ("plain", "df"):
        got, whole = out[name]
        assert whole == want_sha, name
        got.sort()
        pos = 0
        for off, n, _, _ in got:  # the chunks tile [0, 1 MiB) exactly
            assert off == pos, (name, got)
            pos += n
        assert pos == MiB
    df_chunks = out["df"][0]
    assert [c[2] for c in df_chunks] == [out["READ_DATA"]]
    plain = merge((off, n, status == out["READ_DATA"]) for off, n, status, _ in out["plain"][0])
    assert plain == fmap, "hole chunks do not follow the file's holes"
