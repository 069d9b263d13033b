"""An in-use volume migrates: its attachment records follow it.

A record (`blockmig attach`) names the array that serves the volume and the URI a host
uses there. When the volume moves (step 3 of a takeover, the end of a host copy, a pool
move) each record moves with it: initialize_connection on the new array, the same id,
the new host and connection, whence it moved; terminate_connection on the array it left.
A cancel or a failure that leaves the volume on the source moves them back. `detach` ends
the connection on the array the record names, and `blockmig migrate` tells each attached
host to re-attach at the new URI. Real arrays, real NBD: libnbd uses the recorded URIs.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from control.drivers.base import VolumeDriver
from control.manager import VolumeManager
from control.volumes import Volume, VolumeError
from tests.tools import LibnbdShell

from .blockmig_env import BLOCK, ArraySpec, BlockmigEnv, Image, MiB, assert_content, fill, lun_of

pytestmark = pytest.mark.timeout(240)

ARRAYS = [
    ArraySpec("A", "unified", ("default", "gold")),
    ArraySpec("B", "unified", migration_throttle=2),  # 8 MiB take ~4 s: watchable
    ArraySpec("Q", "unified", ("default", "gold"), migration_throttle=2),  # watchable pool moves
]
SIZE = 8 * MiB


@pytest.fixture(scope="module")
def bm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockmigEnv]:
    with BlockmigEnv(tmp_path_factory.mktemp("attachments") / "state") as env:  # always stops them
        env.up(ARRAYS)
        yield env


def make(bm: BlockmigEnv, name: str, size: int = SIZE) -> tuple[dict[str, Any], Image]:
    """A volume on A, every block written: its copy onto B takes ~4 s (B copies at 2 MB/s)."""
    v = bm.create(name, size, "A")
    img = fill(v["provider_location"]["uri"], size, seed=zlib.crc32(name.encode()), stride=BLOCK)
    return v, img


def records(bm: BlockmigEnv, vid: str) -> dict[str, dict[str, Any]]:
    """The volume's attachment records by id, as `show --json` has them."""
    return {a["id"]: a for a in bm.show(vid)["attachments"]}


def assert_points_at(bm: BlockmigEnv, a: dict[str, Any], array: str, lun: str) -> None:
    """The record names ``array`` and the connection that array gives for the LUN."""
    assert a["host"].startswith(f"{array}@"), a
    assert a["connection"] == bm.api(array).connection(lun), a


def use(uri: str, img: Image, byte: int) -> None:
    """A real NBD client (libnbd) at ``uri`` writes a block and reads it back; ``img`` learns it."""
    with LibnbdShell(uri) as host:
        r = host.write(BLOCK, byte, BLOCK)
        assert r == ["ok"], f"write through the recorded URI {uri}: {r}"
        assert host.read(BLOCK, BLOCK) == bytes([byte]) * BLOCK
    img.blocks[BLOCK] = bytes([byte]) * BLOCK


def test_records_follow_a_takeover_and_the_cli_says_reattach(bm: BlockmigEnv) -> None:
    v, img = make(bm, "in-use")
    lun = lun_of(v)
    att = bm.ok("attach", v["id"], "--host-name", "host1")
    aid, a_uri = att["attachment"], att["data"]["uri"]
    attached_at = records(bm, v["id"])[aid]["attached_at"]

    r = bm.run("migrate", v["id"], "B")  # the text a user reads

    assert r.returncode == 0, r.stdout + r.stderr
    b_uri = bm.api("B").connection(lun)["uri"]
    assert f"attachment {aid} (host host1): the host must re-attach at {b_uri}" in r.stdout, r.stdout
    assert f"writes to {a_uri} fail with EPERM" in r.stdout, r.stdout
    d = bm.show(v["id"])
    assert d["migration_status"] == "migrating_attachable", d
    a = records(bm, v["id"])[aid]
    assert_points_at(bm, a, "B", lun)  # step 3: the record moved with the host
    assert a["attached_at"] == attached_at and a["connector"] == {"host": "host1"}
    assert a["moved_from"]["host"].startswith("A@") and a["moved_from"]["connection"]["uri"] == a_uri
    use(a["connection"]["uri"], img, 0x61)  # B serves it: writes work (A's URI: EPERM)

    end = bm.wait_migration(v["id"], timeout=120)

    assert end["migration_status"] == "success", end
    a = {x["id"]: x for x in end["attachments"]}[aid]
    assert_points_at(bm, a, "B", lun)
    assert f"via {b_uri} (moved from {a_uri})" in bm.run("show", v["id"]).stdout
    assert lun not in bm.luns("A")
    use(a["connection"]["uri"], img, 0x62)
    assert_content(b_uri, img)
    r = bm.run("detach", v["id"])
    assert r.returncode == 0 and r.stderr == "", r.stdout + r.stderr
    assert bm.show(v["id"])["status"] == "available"


@pytest.fixture
def terminated(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(array, connector host) of every terminate_connection the drivers get, in this process."""
    calls: list[tuple[str, str]] = []

    def spy(self: VolumeDriver, volume: Volume, connector: dict[str, Any]) -> None:
        calls.append((self.array_name, connector["host"]))

    monkeypatch.setattr(VolumeDriver, "terminate_connection", spy)
    return calls


def test_connections_end_on_the_array_left_and_detach_ends_them_where_they_are(
    bm: BlockmigEnv, terminated: list[tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    v, img = make(bm, "terminated")
    m = VolumeManager(bm.state_dir)
    try:
        m.attach(v["id"], {"host": "host1"})
        caplog.set_level(logging.WARNING, logger="blockmig.control")

        vol = m.migrate(v["id"], "B")

        assert vol.migration_status == "migrating_attachable"
        assert terminated == [("A", "host1")], "step 3 ends the connection on the source"
        assert [a["host"] for a in vol.attachments] == [vol.host]
        terminated.clear()
        assert m.follow(v["id"]).migration_status == "success"
        assert terminated == [], "nothing moved at steps 4-5"

        vol = m.detach(v["id"])

        assert terminated == [("B", "host1")], "detach ends it on the array the volume lives on"
        assert vol.status == "available" and vol.attachments == []
        assert [r.getMessage() for r in caplog.records] == []
    finally:
        m.close()
    assert_content(bm.show(v["id"])["provider_location"]["uri"], img)


class Crash(BaseException):
    """The process dies here (nothing after it runs, no except clause catches it)."""


def test_a_crash_while_moving_the_records_leaves_them_true(
    bm: BlockmigEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manager dies at step 3 after B took the LUN over, while it gets the records'
    connections on B: nothing was written, so the volume and its records still name A;
    the next command's follower finds the migration interrupted and leaves it all on A."""
    v, img = make(bm, "crashed")
    lun = lun_of(v)
    aid = bm.ok("attach", v["id"], "--host-name", "host1")["attachment"]
    before = records(bm, v["id"])[aid]
    real = VolumeDriver.initialize_connection

    def dies_on_b(self: VolumeDriver, volume: Volume, connector: dict[str, Any]) -> dict[str, Any]:
        if self.array_name == "B":
            raise Crash
        return real(self, volume, connector)

    monkeypatch.setattr(VolumeDriver, "initialize_connection", dies_on_b)
    m = VolumeManager(bm.state_dir)
    try:
        with pytest.raises(Crash):
            m.migrate(v["id"], "B")
    finally:
        m.close()
    monkeypatch.undo()
    assert bm.array_migration("B", lun) is not None, "B had taken the LUN over"
    status, mig = bm.db_row(v["id"])
    assert status == "starting" and mig["phase"] == "target", (status, mig)
    assert records(bm, v["id"])[aid] == before  # (its pid is this live process: `show` starts no follower)

    m = VolumeManager(bm.state_dir)
    try:
        with pytest.raises(VolumeError, match="interrupted during step target"):
            m.follow(v["id"])  # what the next command's recovery runs
    finally:
        m.close()
    d = bm.show(v["id"])
    assert d["migration_status"] == "error" and d["host"].startswith("A@"), d
    assert d["attachments"] == [before]
    assert_points_at(bm, before, "A", lun)
    use(before["connection"]["uri"], img, 0x75)  # the fence was lifted
    assert_content(d["provider_location"]["uri"], img)
    bm.ok("detach", v["id"])


def test_a_cancelled_takeover_moves_the_records_back(bm: BlockmigEnv) -> None:
    v, img = make(bm, "cancelled")
    lun = lun_of(v)
    aid1 = bm.ok("attach", v["id"], "--host-name", "host1")["attachment"]
    d = bm.ok("migrate", v["id"], "B")
    assert d["migration_status"] == "migrating_attachable", d
    assert_points_at(bm, records(bm, v["id"])[aid1], "B", lun)
    # a second host attaches where the volume is served now
    att2 = bm.ok("attach", v["id"], "--host-name", "host2")
    assert att2["data"]["uri"] == bm.api("B").connection(lun)["uri"]

    bm.api("B").call("POST", f"/api/v1/migrations/{lun}/cancel")
    end = bm.wait_migration(v["id"], timeout=60)

    assert end["migration_status"] == "error" and end["host"].startswith("A@"), end
    recs = {a["id"]: a for a in end["attachments"]}
    assert set(recs) == {aid1, att2["attachment"]}
    for a in recs.values():  # the volume is on A again: so is every record
        assert_points_at(bm, a, "A", lun)
        assert a["moved_from"]["host"].startswith("B@"), a
    assert lun not in bm.luns("B")
    use(recs[aid1]["connection"]["uri"], img, 0x71)  # A is unfenced: writable through the record
    assert_content(end["provider_location"]["uri"], img)
    assert bm.ok("detach", v["id"])["status"] == "available"


def test_a_failure_after_step_3_moves_the_records_back(bm: BlockmigEnv) -> None:
    v, img = make(bm, "failed")
    lun = lun_of(v)
    aid = bm.ok("attach", v["id"], "--host-name", "host1")["attachment"]

    msg = bm.refused("migrate", v["id"], "B", "--wait", env={"BLOCKMIG_FAIL_AT": "complete"})

    assert "failure injected" in msg, msg
    d = bm.show(v["id"])
    assert d["migration_status"] == "error" and d["host"].startswith("A@"), d
    a = records(bm, v["id"])[aid]
    assert_points_at(bm, a, "A", lun)
    assert a["moved_from"]["host"].startswith("B@"), "moved to B at step 3, back to A at the failure"
    use(a["connection"]["uri"], img, 0x81)
    assert_content(d["provider_location"]["uri"], img)
    bm.ok("detach", v["id"])


def test_records_follow_a_host_copy(bm: BlockmigEnv) -> None:
    v, img = make(bm, "host-copied", 4 * MiB)
    lun = lun_of(v)
    aid = bm.ok("attach", v["id"], "--host-name", "host1")["attachment"]

    d = bm.ok("migrate", v["id"], "B", "--force-host-copy", "--wait", timeout=120)

    assert d["migration_status"] == "success" and d["host"].startswith("B@"), d
    a = {x["id"]: x for x in d["attachments"]}[aid]
    assert_points_at(bm, a, "B", lun)
    assert [n["attachment"] for n in d["reattach"]] == [aid], d["reattach"]
    assert d["reattach"][0]["uri"] == a["connection"]["uri"]
    use(a["connection"]["uri"], img, 0x91)
    assert_content(d["provider_location"]["uri"], img)
    bm.ok("detach", v["id"])


def test_a_pool_move_keeps_the_uri_and_names_the_new_pool(bm: BlockmigEnv) -> None:
    v, img = make(bm, "pool-moved", 4 * MiB)
    att = bm.ok("attach", v["id"], "--host-name", "host1")

    d = bm.ok("migrate", v["id"], "A#gold", "--wait")

    assert d["migration_status"] == "success" and d["host"] == "A@unified#gold", d
    a = {x["id"]: x for x in d["attachments"]}[att["attachment"]]
    assert a["host"] == "A@unified#gold", a
    assert a["connection"] == att["data"], "the same export on the same array: nothing to re-attach"
    assert d["reattach"] == []
    use(a["connection"]["uri"], img, 0xA1)
    assert_content(d["provider_location"]["uri"], img)
    bm.ok("detach", v["id"])


def test_a_volume_attaches_while_its_array_moves_it_between_pools(bm: BlockmigEnv) -> None:
    """During a pool move the array serves the LUN all along (same export, reads and
    writes). Before: `show` said "no array serves it to hosts until that ends" and attach
    was refused ("its target array does not serve it while copying")."""
    v = bm.create("attach-mid-move", SIZE, "Q")
    img = fill(v["provider_location"]["uri"], SIZE, seed=zlib.crc32(b"attach-mid-move"), stride=BLOCK)
    lun = lun_of(v)
    p = bm.popen("migrate", v["id"], "Q#gold", "--wait")
    try:
        deadline = time.monotonic() + 30
        while (bm.array_migration("Q", lun) or {}).get("state") != "copying":  # ~4 s at 2 MB/s
            assert time.monotonic() < deadline and p.poll() is None, p.communicate(timeout=10)
            time.sleep(0.02)
        d = bm.show(v["id"])
        assert d["migration_status"] == "starting", d
        assert d["attachable"] is True and "unavailable" not in d, d
        att = bm.ok("attach", v["id"], "--host-name", "host1")
        use(att["data"]["uri"], img, 0xB1)  # served, mid-move
        assert (bm.array_migration("Q", lun) or {}).get("state") == "copying", "the move ended first"
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, out + err

    d = bm.show(v["id"])
    assert d["migration_status"] == "success" and d["host"] == "Q@unified#gold", d
    a = records(bm, v["id"])[att["attachment"]]
    assert a["host"] == "Q@unified#gold" and a["connection"] == att["data"], a
    use(a["connection"]["uri"], img, 0xB2)
    assert_content(d["provider_location"]["uri"], img)
    bm.ok("detach", v["id"])
