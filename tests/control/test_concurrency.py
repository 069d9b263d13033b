"""Two commands on one volume at once, as two operators or two CI jobs run them.

Each `blockmig` command is its own process sharing volumes.db. Real arrays; one command
runs here (a VolumeManager, paused at the point where it has read the volume and not yet
acted on it), the other as a real `blockmig` process started in that pause. Exactly one
wins, the other gets a clear error, the record names where the data is, no LUN is lost
or leaked, and the data read back through the recorded URI is what was written.
"""

from __future__ import annotations

import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from control.drivers.base import VolumeDriver
from control.manager import VolumeManager
from control.volumes import Volume, VolumeError

from .blockmig_env import BLOCK, ArraySpec, BlockmigEnv, Image, MiB, assert_content, fill, lun_of

pytestmark = pytest.mark.timeout(180)

ARRAYS = [
    ArraySpec("A", "unified"),
    ArraySpec("B", "unified"),
    ArraySpec("S", "unified", media="fixed:2"),  # a host copy from here lasts seconds
    ArraySpec("P", "plain"),
]
SIZE = 4 * MiB
#: how long the paused command gives the other one to claim the volume: it does within a
#: second unless it waits for the paused one (the fix)
CLAIM_WINDOW = 3.0


@pytest.fixture(scope="module")
def bm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockmigEnv]:
    with BlockmigEnv(tmp_path_factory.mktemp("concurrency") / "state") as env:  # always stops them
        env.up(ARRAYS)
        yield env


@pytest.fixture
def m(bm: BlockmigEnv) -> Iterator[VolumeManager]:
    mgr = VolumeManager(bm.state_dir)
    yield mgr
    mgr.close()


def make(bm: BlockmigEnv, name: str, host: str = "A", size: int = SIZE) -> tuple[dict[str, Any], Image]:
    v = bm.create(name, size, host)
    img = fill(v["provider_location"]["uri"], size, seed=zlib.crc32(name.encode()), stride=4 * BLOCK)
    return v, img


def let_run(bm: BlockmigEnv, vid: str, p: subprocess.Popen[str]) -> None:
    """Give the command ``p`` its chance: once it claimed the volume (a migration starts),
    let it end; if it claims nothing within CLAIM_WINDOW, it waits for us."""
    deadline = time.monotonic() + CLAIM_WINDOW
    while p.poll() is None and time.monotonic() < deadline:
        if bm.db_row(vid)[0] is not None and bm.db_row(vid)[0] != "error":
            p.wait(timeout=60)
            return
        time.sleep(0.05)


def pause_before_acting(monkeypatch: pytest.MonkeyPatch, m: VolumeManager, meanwhile: Any) -> None:
    """``m`` runs ``meanwhile()`` once it has read the volume for a delete or a migrate,
    before its leftover cleanup and its checks act on what it read."""
    real = m._remove_leftover
    done: list[bool] = []

    def paused(v: Volume) -> None:
        if not done:
            done.append(True)
            meanwhile()
        real(v)

    monkeypatch.setattr(m, "_remove_leftover", paused)


def settle(bm: BlockmigEnv, vid: str) -> dict[str, Any] | None:
    """The volume once no migration of it runs (None: deleted)."""
    try:
        return bm.wait_migration(vid, timeout=60)
    except KeyError:
        return None


@pytest.mark.slow
def test_delete_while_a_migrate_runs_one_wins(
    bm: BlockmigEnv, m: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the delete acted on what it had read (not migrating) while `migrate --wait`
    moved the volume to B meanwhile: both exited 0, the record was gone, and B kept the
    volume's LUN for good (leaked), or the source LUN went under a running takeover."""
    v, img = make(bm, "delete-vs-migrate")
    procs: list[subprocess.Popen[str]] = []

    def migrate() -> None:
        procs.append(bm.popen("migrate", v["id"], "B", "--wait", "--json"))
        let_run(bm, v["id"], procs[0])

    pause_before_acting(monkeypatch, m, migrate)
    try:
        m.delete(v["id"])
        deleted = None
    except VolumeError as e:
        deleted = e
    out, err = procs[0].communicate(timeout=90)

    migrated = procs[0].returncode == 0
    assert migrated != (deleted is None), f"one must win: delete {deleted!r}, migrate {out}{err}"
    d = settle(bm, v["id"])
    if deleted is None:  # the delete won: the migrate says why it did nothing
        assert err.startswith("blockmig: ") and "Traceback" not in err, err
        assert "no volume" in err, err
        assert d is None
        assert lun_of(v) not in bm.luns("A") | bm.luns("B"), "a LUN of the deleted volume is left"
    else:
        assert "migrat" in str(deleted), deleted
        assert d is not None and d["migration_status"] == "success", d
        assert_content(d["provider_location"]["uri"], img)


@pytest.mark.slow
def test_an_attach_while_a_delete_checks_stops_the_delete(
    bm: BlockmigEnv, m: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the delete had read no attachment, a host attached meanwhile (exit 0), and the
    delete removed the LUN under it and the record with its attachment."""
    v, img = make(bm, "delete-vs-attach")
    att: list[dict[str, Any]] = []
    pause_before_acting(monkeypatch, m, lambda: att.append(bm.ok("attach", v["id"], "--host-name", "h1")))

    with pytest.raises(VolumeError, match="attached to 1 host"):
        m.delete(v["id"])

    d = bm.show(v["id"])
    assert d["status"] == "in-use" and [a["id"] for a in d["attachments"]] == [att[0]["attachment"]], d
    assert_content(att[0]["data"]["uri"], img)
    bm.ok("detach", v["id"])
    bm.ok("delete", v["id"])
    assert lun_of(v) not in bm.luns("A")


def test_an_attach_that_read_the_volume_before_a_delete_is_refused(
    bm: BlockmigEnv, m: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attach reads the volume (available), gets its connection; meanwhile a delete marks
    it `deleting` and removes the LUN. Before: the attach's update did not check the status:
    it said "attached" for a volume gone a moment later."""
    v, _ = make(bm, "attach-vs-deleting")
    deleting, go = threading.Event(), threading.Event()
    outcome: list[BaseException | None] = []
    real_delete, real_init = VolumeDriver.delete_volume, VolumeDriver.initialize_connection

    def delete_waits(self: VolumeDriver, volume: Volume) -> None:
        deleting.set()
        go.wait(30)
        real_delete(self, volume)

    def delete() -> None:
        other = VolumeManager(bm.state_dir)
        try:
            other.delete(v["id"])
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)
        finally:
            other.close()

    t = threading.Thread(target=delete)

    def init_then_delete(self: VolumeDriver, volume: Volume, connector: dict[str, Any]) -> dict[str, Any]:
        info = real_init(self, volume, connector)
        if not t.is_alive() and not outcome:
            t.start()  # the delete runs up to the array's LUN removal, the volume `deleting`
            assert deleting.wait(30)
        return info

    monkeypatch.setattr(VolumeDriver, "delete_volume", delete_waits)
    monkeypatch.setattr(VolumeDriver, "initialize_connection", init_then_delete)
    try:
        with pytest.raises(VolumeError, match="deleting"):
            m.attach(v["id"], {"host": "h1"})
    finally:
        go.set()
        t.join(60)
    assert outcome == [None], outcome
    with pytest.raises(KeyError):
        bm.db_row(v["id"])
    assert lun_of(v) not in bm.luns("A")


@pytest.mark.slow
def test_two_migrations_one_read_the_volume_before_the_other_ran(
    bm: BlockmigEnv, m: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The volume is on B after a migration whose source cleanup failed (its LUN left on A).
    Two `migrate ... A` at once: one had read the volume, then the other ran to its end.
    Before: the first cleaned up the "leftover" it had read, the LUN on A, which was by then
    the volume's only copy, then went on with its stale read (source B, LUN gone) and failed
    back to B: the record said B, no array held the data."""
    v, img = make(bm, "migrate-vs-migrate")
    lun = lun_of(v)
    r = bm.run("migrate", v["id"], "B", "--wait", env={"BLOCKMIG_FAIL_AT": "cleanup"})
    assert r.returncode == 1, r.stdout + r.stderr
    d = bm.show(v["id"])
    assert d["migration_status"] == "error" and d["host"].startswith("B@") and lun in bm.luns("A"), d
    procs: list[subprocess.Popen[str]] = []

    def migrate() -> None:
        procs.append(bm.popen("migrate", v["id"], "A", "--wait", "--json"))
        let_run(bm, v["id"], procs[0])

    pause_before_acting(monkeypatch, m, migrate)
    try:
        mine = m.migrate(v["id"], "A")
        mine = m.follow(v["id"])
        here: VolumeError | None = None
    except VolumeError as e:
        here = e
    out, err = procs[0].communicate(timeout=90)

    other = procs[0].returncode == 0
    assert other != (here is None), f"one must win: here {here!r}, the other {out}{err}"
    if here is None:
        assert mine.migration_status == "success", mine
        assert err.startswith("blockmig: ") and "Traceback" not in err, err
        assert "migrat" in err or "already on" in err, err
    end = settle(bm, v["id"])
    assert end is not None
    assert end["migration_status"] == "success" and end["host"].startswith("A@"), end
    assert lun not in bm.luns("B")
    assert_content(end["provider_location"]["uri"], img)


@pytest.mark.slow
def test_two_followers_started_at_once_run_one_host_copy(bm: BlockmigEnv, m: VolumeManager) -> None:
    """Two commands find a host copy's follower dead at the same moment and each start one
    (recover). Before: both copied, each first deleting the target LUN "left by an earlier
    try", i.e. the other's: the copy failed with the target's connection broken."""
    v, img = make(bm, "two-followers", host="S", size=16 * MiB)
    mine = m.migrate(v["id"], "P")
    assert mine.migration_status == "migrating" and mine.migration["phase"] == "host-copy", mine

    m.spawn_follower(v["id"])
    m.spawn_follower(v["id"])
    d = settle(bm, v["id"])

    assert d is not None
    assert d["migration_status"] == "success" and d["host"].startswith("P@"), d
    assert lun_of(v) not in bm.luns("S")
    assert_content(d["provider_location"]["uri"], img)
