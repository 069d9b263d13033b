"""A host still attached to the SOURCE while the volume migrates by remote takeover.

The target copies the source LUN; a write that reached the source directly after the
copier passed its region never reached the target, and the cutover dropped it (the
source LUN is deleted). The manager now fences the source LUN first: such a write fails
with EPERM instead, loudly, and every write the source acknowledged reaches the target.
On cancel or failure the source stays authoritative and the fence is lifted.
"""

from __future__ import annotations

import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.tools import LibnbdShell, libnbd_host

from .blockmig_env import BLOCK, ArraySpec, BlockmigEnv, Image, MiB, assert_content, fill, lun_of

pytestmark = pytest.mark.timeout(240)

ARRAYS = [
    ArraySpec("A", "unified"),
    ArraySpec("B", "unified", migration_throttle=2),  # 8 MiB take ~4 s: watchable
]
SIZE = 8 * MiB
HOT = MiB  # the host writes here: the first region, copied first
TAG = 0xF00D

# A host attached to the source that writes tagged blocks over [0, HOT) in a loop (FUA, so
# an ``ack`` is a write the source has for good) and logs every outcome to a file, until
# a line arrives on stdin. Prints ``ready`` once its first write was acknowledged.
_WRITER = r"""
import nbd, select, struct, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
hot, tag = int(sys.argv[3]), int(sys.argv[4])
with open(sys.argv[2], "w") as log:
    seq = 0
    while not select.select([sys.stdin], [], [], 0)[0]:
        seq += 1
        off = (seq * 4096) % hot
        try:
            h.pwrite(struct.pack("<QQ", tag, seq) * 256, off, nbd.CMD_FLAG_FUA)
            print("ack", off, seq, file=log, flush=True)
        except nbd.Error as e:
            print("err", off, seq, e.errno, file=log, flush=True)
            if e.errno != "EPERM":
                break  # the source LUN is gone (the cutover deleted it)
        if seq == 1:
            print("ready", flush=True)
        time.sleep(0.005)
"""


@pytest.fixture(scope="module")
def bm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockmigEnv]:
    with BlockmigEnv(tmp_path_factory.mktemp("fence") / "state") as env:  # always stops them
        env.up(ARRAYS)
        yield env


def make(bm: BlockmigEnv, name: str) -> tuple[dict[str, Any], Image]:
    v = bm.create(name, SIZE, "A")
    img = fill(v["provider_location"]["uri"], SIZE, seed=zlib.crc32(name.encode()), stride=BLOCK)
    return v, img


def wait_for(pred: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def stop_writer(writer: subprocess.Popen[str]) -> None:
    """Ask the _WRITER host to stop (a line on its stdin); kill it if it does not."""
    assert writer.stdin is not None
    if writer.poll() is None:
        try:
            writer.stdin.write("stop\n")
            writer.stdin.flush()
            writer.wait(20)
        except Exception:
            writer.kill()
            writer.wait(10)


def writer_outcomes(log: Path) -> tuple[list[tuple[int, int]], list[tuple[int, str]]]:
    """The _WRITER's log: (offset, seq) of each acknowledged write, (seq, errno) of each failed one."""
    outcomes = [line.split() for line in log.read_text().splitlines()]
    acked = [(int(o), int(s)) for kind, o, s, *_ in outcomes if kind == "ack"]
    errors = [(int(s), e) for kind, _, s, e in (x for x in outcomes if x[0] == "err")]
    return acked, errors


def acked_into(img: Image, acked: list[tuple[int, int]]) -> None:
    """Every acknowledged write must be on the target: the last one of each block wins."""
    for off, seq in acked:
        img.blocks[off] = struct.pack("<QQ", TAG, seq) * (BLOCK // 16)


def test_a_host_writing_to_the_source_through_a_takeover_loses_nothing(
    bm: BlockmigEnv, tmp_path: Path
) -> None:
    v, img = make(bm, "still-on-a")
    src_uri = v["provider_location"]["uri"]
    log = tmp_path / "writer.log"
    writer = libnbd_host(_WRITER, src_uri, str(log), str(HOT), str(TAG), ready="ready", stdin=True)
    try:
        d = bm.ok("migrate", v["id"], "B")
        assert d["migration_status"] == "migrating_attachable", d
        # the host keeps writing to A while B copies (several seconds) and cuts over
        end = bm.wait_migration(v["id"], timeout=120)
    finally:
        stop_writer(writer)
    assert end["migration_status"] == "success" and end["host"].startswith("B@"), end

    acked, errors = writer_outcomes(log)
    eperm = [s for s, e in errors if e == "EPERM"]
    assert acked, "the host's writes before the migration were acknowledged"
    last = log.read_text().splitlines()[-5:]
    assert eperm, f"no write of the host attached to the source failed with EPERM: {last}"
    assert max(s for _, s in acked) < min(eperm), "a write was acknowledged after the fence"
    acked_into(img, acked)
    assert_content(end["provider_location"]["uri"], img)
    assert lun_of(v) not in bm.luns("A")


def _host_before(bm: BlockmigEnv, v: dict[str, Any]) -> LibnbdShell:
    host = LibnbdShell(v["provider_location"]["uri"])
    assert host.write(0, 0x11, BLOCK) == ["ok"]
    return host


def test_cancelled_takeover_lifts_the_fence(bm: BlockmigEnv) -> None:
    v, img = make(bm, "cancelled")
    lun = lun_of(v)
    with _host_before(bm, v) as host:
        img.blocks[0] = b"\x11" * BLOCK
        d = bm.ok("migrate", v["id"], "B")
        assert d["migration_status"] == "migrating_attachable", d
        assert bm.api("A").get_lun(lun)["fenced"] is True
        r = host.write(0, 0x22, BLOCK)
        assert r[:2] == ["err", "EPERM"], r
        assert host.read(0, BLOCK) == b"\x11" * BLOCK  # reads keep working

        bm.api("B").call("POST", f"/api/v1/migrations/{lun}/cancel")
        end = bm.wait_migration(v["id"], timeout=60)

        assert end["migration_status"] == "error" and end["host"].startswith("A@"), end
        assert bm.api("A").get_lun(lun)["fenced"] is False
        assert host.write(0, 0x33, BLOCK) == ["ok"], "the source is authoritative again: writable"
        img.blocks[0] = b"\x33" * BLOCK
    assert_content(end["provider_location"]["uri"], img)
    assert lun not in bm.luns("B")
    d2 = bm.ok("migrate", v["id"], "B", "--wait", timeout=120)  # and it can be retried
    assert d2["migration_status"] == "success", d2
    assert_content(d2["provider_location"]["uri"], img)


@pytest.mark.parametrize("step", ["host", "complete"])
def test_failed_takeover_lifts_the_fence(bm: BlockmigEnv, step: str) -> None:
    v, img = make(bm, f"failed-{step}")
    lun = lun_of(v)
    with _host_before(bm, v) as host:
        img.blocks[0] = b"\x11" * BLOCK
        msg = bm.refused("migrate", v["id"], "B", "--wait", env={"BLOCKMIG_FAIL_AT": step})
        assert "failure injected" in msg, msg
        d = bm.show(v["id"])
        assert d["migration_status"] == "error" and d["host"].startswith("A@"), d
        assert bm.db_migration(v["id"]).get("fenced") is False, "the manager fenced, then lifted it"
        assert bm.api("A").get_lun(lun)["fenced"] is False
        assert host.write(0, 0x44, BLOCK) == ["ok"]
        img.blocks[0] = b"\x44" * BLOCK
    assert_content(d["provider_location"]["uri"], img)


def test_a_takeover_refused_by_another_holders_fence_leaves_that_fence(bm: BlockmigEnv) -> None:
    """The source LUN is fenced for someone else (another array taking it over by hand):
    the manager's fence is refused (409), and the failure path lifted the other holder's
    fence, hosts writing again behind that takeover's back. It leaves it now."""
    v, img = make(bm, "fenced-by-another")
    lun = lun_of(v)
    bm.api("A").fence_lun(lun, "array C by hand")
    msg = bm.refused("migrate", v["id"], "B", "--wait")
    assert "already fenced for 'array C by hand'" in msg, msg
    d = bm.show(v["id"])
    assert d["migration_status"] == "error" and d["host"].startswith("A@"), d
    assert bm.api("A").get_lun(lun).get("fence", {}).get("holder") == "array C by hand"
    with LibnbdShell(v["provider_location"]["uri"]) as host:
        r = host.write(0, 0x55, BLOCK)
        assert r[:2] == ["err", "EPERM"], r
    bm.ok("list")  # nor does the next command's recovery lift it
    assert bm.api("A").get_lun(lun)["fenced"] is True
    # once its holder lifted it, the volume migrates
    bm.api("A").unfence_lun(lun)
    d2 = bm.ok("migrate", v["id"], "B", "--wait", timeout=120)
    assert d2["migration_status"] == "success", d2
    assert_content(d2["provider_location"]["uri"], img)


def test_a_host_writing_to_the_source_through_a_host_copy_loses_nothing(tmp_path: Path) -> None:
    """The generic host copy (here forced; the only way onto a `plain` or `pooled` array)
    fenced nothing: a host still attached to the source (an in-use volume may migrate)
    wrote behind the copy, was acknowledged, and lost its writes when the source LUN
    went at the cleanup. The copy reads through a fence now, as a takeover does."""
    size = 32 * MiB  # the source's media takes 5 ms an I/O: the copy takes a while
    with BlockmigEnv(tmp_path / "state") as env:
        env.up([ArraySpec("A", "unified", media="fixed:5"), ArraySpec("B", "unified")])
        v = env.create("host-copied", size, "A")
        img = fill(v["provider_location"]["uri"], size, seed=7, stride=BLOCK)
        env.ok("attach", v["id"])  # in use: it may still migrate
        log = tmp_path / "writer.log"
        writer = libnbd_host(
            _WRITER, v["provider_location"]["uri"], str(log), str(HOT), str(TAG), ready="ready", stdin=True
        )
        try:
            d = env.ok("migrate", v["id"], "B", "--force-host-copy", "--wait", timeout=120)
        finally:
            stop_writer(writer)
        assert d["migration_status"] == "success" and d["host"].startswith("B@"), d
        acked, errors = writer_outcomes(log)
        assert acked, "the host's writes before the migration were acknowledged"
        if errors:
            first_error = min(s for s, _ in errors)
            assert max(s for _, s in acked) < first_error, "a write was acknowledged after one failed"
        acked_into(img, acked)
        assert_content(d["provider_location"]["uri"], img)
