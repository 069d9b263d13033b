"""A migration the control layer runs, interrupted half-way.

An array killed with SIGKILL, then started again by `blockmig up`: the volume stays on its
authoritative side with its data, and what the array could not be told to undo while it was
down is undone once it is up (nothing leaked on it, nothing left running behind the volume's
record). A `migrate` interrupted with Ctrl-C: the migration goes on, and the next command
follows it (README: "Ctrl-C of a command that waits ...").
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from control.api_client import FINAL

from .blockmig_env import BLOCK, ArraySpec, BlockmigEnv, Image, MiB, assert_content, fill, lun_of

pytestmark = pytest.mark.timeout(180)

ARRAYS = [
    ArraySpec("S", "unified", media="fixed:2"),  # a host copy from here lasts seconds
    ArraySpec("P", "plain"),  # the host copy's target, killed by a test
    ArraySpec("Q", "unified", ("default", "gold"), migration_throttle=2),  # slow pool moves, killed
    ArraySpec("Y", "takeover-sync", migration_throttle=2),  # copies within step 2, slowly
]


@pytest.fixture(scope="module")
def bm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockmigEnv]:
    with BlockmigEnv(tmp_path_factory.mktemp("killed") / "state") as env:  # always stops them
        env.up(ARRAYS)
        yield env


def make(bm: BlockmigEnv, name: str, size: int, host: str, stride: int) -> tuple[dict[str, Any], Image]:
    v = bm.create(name, size, host)
    img = fill(v["provider_location"]["uri"], size, seed=zlib.crc32(name.encode()), stride=stride)
    return v, img


def _migrate_until(
    bm: BlockmigEnv,
    v: dict[str, Any],
    to: str,
    begun: Callable[[], bool],
    then: Callable[[subprocess.Popen[str]], None],
) -> tuple[int, str, str]:
    """`migrate VOL TO --wait`; once ``begun()``, ``then(its process)`` (a kill -9 of an
    array, a Ctrl-C). Its exit code, stdout and stderr."""
    p = bm.popen("migrate", v["id"], to, "--wait")
    try:
        deadline = time.monotonic() + 30
        while not begun():
            assert time.monotonic() < deadline and p.poll() is None, p.communicate(timeout=10)
            time.sleep(0.02)
        then(p)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    return p.returncode, out, err


def _copying(bm: BlockmigEnv, array: str, lun: str) -> Callable[[], bool]:
    return lambda: (bm.array_migration(array, lun) or {}).get("state") == "copying"


def test_a_host_copy_whose_target_dies_leaves_no_partial_lun_there(bm: BlockmigEnv) -> None:
    """P dies (kill -9) while a host copy writes to it. Before: the follower's delete of the
    partial copy failed too, that error replaced the copy's ("cannot reach the array API
    at ..."), and nothing recorded the LUN: once P was up again it kept the partial copy
    for good, also after the volume was deleted."""
    # 8192 runs of 4K, each read 2 ms, 4 at once: the copy lasts ~4 s
    v, img = make(bm, "host-copy-target-killed", 64 * MiB, "S", stride=8192)
    lun = lun_of(v)
    rc, out, err = _migrate_until(bm, v, "P", lambda: lun in bm.luns("P"), lambda p: bm.kill_array("P"))
    assert rc == 1 and err.startswith("blockmig: ") and "Traceback" not in err, (out, err)
    d = bm.show(v["id"])
    assert d["migration_status"] == "error" and d["host"] == "S@unified#default", d
    error = d["migration"]["error"]
    assert "partial copy" in error and "P" in error, error
    text = bm.run("show", v["id"]).stdout  # the volume is usable on S: "unusable until done" was untrue
    assert "migration:         S@unified#default -> P@plain#default (failed at a host copy)\n" in text, text
    assert_content(d["provider_location"]["uri"], img)
    # while P is down, its leftover cannot be removed: delete and migrate say so, and why
    left = "what its failed migration S@unified#default -> P@plain#default left could not be removed first"
    msg = bm.refused("delete", v["id"])
    assert msg.startswith(f"volume {v['name']} ({v['id']}) is not deleted: {left}: cannot reach"), msg
    msg = bm.refused("migrate", v["id"], "Y")
    stays = f"volume {v['name']} ({v['id']}) stays on S@unified#default, unchanged"
    assert msg.startswith(f"{stays}: {left}"), msg
    assert msg.endswith("(`blockmig up` starts the arrays; then retry)"), msg

    bm.up_again()  # P again, with the partial copy: `up` deletes it

    assert lun not in bm.luns("P"), "the partial copy stays on P"
    error = bm.show(v["id"])["migration"]["error"]  # it said the copy stays: not so any more
    assert error.endswith("; since: the partial copy on P was deleted"), error
    d2 = bm.ok("migrate", v["id"], "P", "--wait")
    assert d2["migration_status"] == "success" and d2["host"] == "P@plain#default", d2
    assert lun not in bm.luns("S")
    assert_content(d2["provider_location"]["uri"], img)
    bm.ok("delete", v["id"])
    assert lun not in bm.luns("P")


def test_a_partial_copy_on_an_array_no_config_names_any_more_does_not_block_delete(bm: BlockmigEnv) -> None:
    """A host copy's partial LUN recorded as left on an array (its target died mid-copy)
    that `up` no longer starts (its config dropped it): nothing can reach that LUN any
    more. Before: delete (and migrate) failed for good: "unknown array 'Z' in ..."."""
    v, _ = make(bm, "copy-left-on-a-gone-array", 1 * MiB, "S", stride=64 * 1024)
    mig = {
        "phase": "host-copy",
        "source": "S@unified#default",
        "target": "Z@plain#default",
        "started": time.time(),
        "error": "... the partial copy on Z could not be deleted",
        "copy_leftover": True,
    }
    bm.set_migration(v["id"], "error", mig)

    bm.ok("delete", v["id"])

    assert lun_of(v) not in bm.luns("S")


def test_a_delete_while_the_volumes_array_is_down_changes_nothing(bm: BlockmigEnv) -> None:
    """P, the volume's array, was killed. Before: delete marked the volume deleting, failed
    on the array and left it in error (attach and migrate refused from then on, delete the
    only way out) over an outage that `up` ends."""
    v, img = make(bm, "delete-array-down", 1 * MiB, "P", stride=64 * 1024)
    bm.kill_array("P")
    try:
        msg = bm.refused("delete", v["id"])
        assert msg.startswith(
            f"volume {v['name']} ({v['id']}) is not deleted: array P does not answer (cannot reach"
        ), msg
        assert bm.show(v["id"])["status"] == "available"
    finally:
        bm.up_again()
    assert_content(bm.show(v["id"])["provider_location"]["uri"], img)
    bm.ok("delete", v["id"])
    assert lun_of(v) not in bm.luns("P")


def test_a_retried_host_copy_does_not_say_its_deleted_partial_copy_stays(bm: BlockmigEnv) -> None:
    """A host copy that `blockmig down` stopped recorded its partial copy on P as left (P
    did not answer then); after `up` its follower deletes that copy and copies again.
    Before: when that copy failed too, the flag was still set and the error said "the
    partial copy on P could not be deleted" though it was, and nothing had failed so."""
    v, img = make(bm, "retried-host-copy", 1 * MiB, "S", stride=64 * 1024)
    mig = {
        "phase": "host-copy",
        "source": "S@unified#default",
        "target": "P@plain#default",
        "started": time.time(),
        "source_location": v["provider_location"],
        "error": "",
        "copy_leftover": True,
    }
    bm.set_migration(v["id"], "migrating", mig, dead_follower=True)

    bm.run("show", v["id"], env={"BLOCKMIG_FAIL_AT": "copy"})  # its follower's copy fails
    end = bm.wait_migration(v["id"])

    error = end["migration"]["error"]
    assert end["migration_status"] == "error" and "failure injected at step 'copy'" in error, end
    assert "partial copy" not in error, error
    assert lun_of(v) not in bm.luns("P")
    assert_content(end["provider_location"]["uri"], img)


def test_an_array_killed_during_a_pool_move_is_not_left_moving_behind_the_record(bm: BlockmigEnv) -> None:
    """Q dies (kill -9) while it moves a volume's LUN from pool default to gold at 2 MB/s:
    the migration fails, and stopping the move fails too. Before: `up` started Q again,
    which went on with the move by itself: the LUN ended in gold while the volume said
    Q#default, and the next `migrate ... Q#gold` failed with "already in pool 'gold'"
    (`migrate ... Q#default` was refused: "already on"). Now `up` stops the move, or
    takes the pool it ended in, and the record names where the LUN is."""
    v, img = make(bm, "pool-move-array-killed", 8 * MiB, "Q", stride=BLOCK)  # 4 s at 2 MB/s
    lun = lun_of(v)
    rc, out, err = _migrate_until(bm, v, "Q#gold", _copying(bm, "Q", lun), lambda p: bm.kill_array("Q"))
    assert rc == 1 and err.startswith("blockmig: ") and "Traceback" not in err, (out, err)
    d = bm.show(v["id"])
    assert d["migration_status"] == "error" and d["host"] == "Q@unified#default", d

    bm.up_again()  # Q again, with its move

    st = bm.array_migration("Q", lun) or {}
    assert st.get("state") in (None, *FINAL), f"Q still moves the LUN behind the volume's record: {st}"
    pool = bm.api("Q").get_lun(lun)["pool"]
    d = bm.show(v["id"])
    assert (d["host"], d["provider_location"]["pool"]) == (f"Q@unified#{pool}", pool), d
    assert_content(d["provider_location"]["uri"], img)
    d2 = bm.ok("migrate", v["id"], "Q#default" if pool == "gold" else "Q#gold", "--wait")
    assert d2["migration_status"] == "success", d2
    assert_content(d2["provider_location"]["uri"], img)


def _ctrl_c_while_copying(bm: BlockmigEnv, v: dict[str, Any], to: str, array: str) -> str:
    """`migrate VOL TO --wait`, Ctrl-C once ``array`` copies the volume's LUN: exit 130 with
    one line. The LUN's name."""
    lun = lun_of(v)
    rc, out, err = _migrate_until(bm, v, to, _copying(bm, array, lun), lambda p: p.send_signal(signal.SIGINT))
    assert (rc, err) == (130, "blockmig: interrupted\n"), (out, err)
    return lun


def test_ctrl_c_of_a_migrate_to_a_synchronous_target_lets_the_migration_go_on(bm: BlockmigEnv) -> None:
    """A takeover-sync target copies within step 2, which `migrate` runs itself (even
    without --wait). Ctrl-C there: "blockmig: interrupted", exit 130, and the README says
    the migration goes on. Before: the next command's follower found it "interrupted
    during step target" and cancelled the copy, leaving the volume on S in error."""
    v, img = make(bm, "sync-interrupted", 8 * MiB, "S", stride=BLOCK)  # 4 s at 2 MB/s
    lun = _ctrl_c_while_copying(bm, v, "Y", "Y")
    assert (bm.array_migration("Y", lun) or {}).get("state") == "copying"

    bm.show(v["id"])  # the next command: it restarts a follower
    end = bm.wait_migration(v["id"], timeout=60)

    assert end["migration_status"] == "success" and end["host"] == "Y@takeover-sync#default", end
    assert lun not in bm.luns("S")
    assert_content(end["provider_location"]["uri"], img)


def test_ctrl_c_of_a_migrate_during_a_pool_move_lets_the_move_go_on(bm: BlockmigEnv) -> None:
    """A pool move runs in step 1, which `migrate` waits for itself. Ctrl-C there: exit
    130, and the README says the migration goes on. Before: the next command's follower
    found it "interrupted during step source" and cancelled the array's move."""
    v, img = make(bm, "pool-move-interrupted", 8 * MiB, "Q", stride=BLOCK)  # 4 s at 2 MB/s
    lun = _ctrl_c_while_copying(bm, v, "Q#gold", "Q")

    bm.show(v["id"])  # the next command: it restarts a follower
    end = bm.wait_migration(v["id"], timeout=60)

    assert end["migration_status"] == "success" and end["host"] == "Q@unified#gold", end
    assert bm.api("Q").get_lun(lun)["pool"] == end["provider_location"]["pool"] == "gold", end
    assert_content(end["provider_location"]["uri"], img)


@pytest.mark.parametrize(("to", "array"), [("Y", "Y"), ("Q#gold", "Q")], ids=["takeover-sync", "pool-move"])
def test_show_gives_the_progress_of_a_copy_that_migrate_itself_waits_for(
    bm: BlockmigEnv, to: str, array: str
) -> None:
    """Not an interruption: `show` ("with the progress of a running migration") while a
    takeover-sync target copies in step 2, or an array moves the LUN between pools in step
    1. Before: no progress at all (only step 4 and host copies had one)."""
    host = "Q" if array == "Q" else "S"
    v, _ = make(bm, f"progress-{array}", 8 * MiB, host, stride=BLOCK)  # 4 s at 2 MB/s
    lun = lun_of(v)
    p = bm.popen("migrate", v["id"], to, "--wait")
    try:
        deadline = time.monotonic() + 30
        while (bm.array_migration(array, lun) or {}).get("state") != "copying":
            assert time.monotonic() < deadline and p.poll() is None, p.communicate(timeout=10)
            time.sleep(0.02)
        d = bm.show(v["id"])
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert d["migration_status"] == "starting", d
    progress = d["migration"]["progress"]
    assert progress is not None and progress["lun"] == lun and progress["total_bytes"] == 8 * MiB, d
    assert p.returncode == 0, out + err


def test_a_dead_followers_pid_taken_by_another_process_does_not_stall_the_migration(
    bm: BlockmigEnv,
) -> None:
    """The follower of a takeover dies (kill -9, or a reboot), and another process gets its
    pid. Before: every later command's recover() took the migration for followed (pid
    alive) and started no follower: steps 4-5 never ran, the volume stayed
    migrating_attachable for as long as that process lived (its source LUN kept, delete
    and migrate refused). The pid's process start time tells the two apart now."""
    v, img = make(bm, "follower-pid-reused", 8 * MiB, "S", stride=BLOCK)  # 4 s to Q at 2 MB/s
    d = bm.ok("migrate", v["id"], "Q")
    assert d["migration_status"] == "migrating_attachable", d
    pid = bm.db_migration(v["id"])["pid"]
    assert bm.is_follower(pid), pid
    os.kill(pid, signal.SIGKILL)
    other = subprocess.Popen(["sleep", "120"])  # a process with that pid now, as far as the record goes
    try:
        con = sqlite3.connect(bm.state_dir / "volumes.db", timeout=10)
        try:
            with con:
                mig = json.loads(
                    con.execute("SELECT migration FROM volumes WHERE id=?", (v["id"],)).fetchone()[0]
                )
                mig["pid"] = other.pid
                con.execute("UPDATE volumes SET migration=? WHERE id=?", (json.dumps(mig), v["id"]))
        finally:
            con.close()

        bm.show(v["id"])  # the next command: it must restart a follower
        end = bm.wait_migration(v["id"], timeout=30)
    finally:
        other.kill()
        other.wait()

    assert end["migration_status"] == "success" and end["host"] == "Q@unified#default", end
    assert lun_of(v) not in bm.luns("S")
    assert_content(end["provider_location"]["uri"], img)


def test_a_migration_whose_source_array_is_down_changes_nothing(bm: BlockmigEnv) -> None:
    """P, the volume's array, was killed. Before: migrate claimed the volume, failed at step
    2 with "cannot reach the array API at http://..." (no array named) and left
    migration_status error with a fence to lift; a target that does not answer was
    already refused before anything changed."""
    v, img = make(bm, "source-array-down", 1 * MiB, "P", stride=64 * 1024)
    bm.kill_array("P")
    try:
        msg = bm.refused("migrate", v["id"], "Q")
        assert msg.startswith(
            f"volume {v['name']} ({v['id']}) stays on P@plain#default, unchanged: array P does not "
            "answer (cannot reach"
        ), msg
        assert msg.endswith("start it (`blockmig up`) and retry"), msg
        status, mig = bm.db_row(v["id"])
        assert (status, mig) == (None, {}), (status, mig)
    finally:
        bm.up_again()
    d = bm.ok("migrate", v["id"], "Q", "--wait")
    assert d["migration_status"] == "success" and d["host"] == "Q@unified#default", d
    assert_content(d["provider_location"]["uri"], img)


def test_a_host_copy_reports_its_progress_while_it_copies(bm: BlockmigEnv) -> None:
    """Not an interruption: what `show` says while a host copy runs. Before: the copy
    reported only at the end of each 256 MiB window, so a volume up to that size showed
    0.0% for the whole copy, then success (and `migrate --wait`'s bar did not move)."""
    v, img = make(bm, "host-copy-progress", 64 * MiB, "S", stride=8192)  # ~4 s to copy
    d = bm.ok("migrate", v["id"], "P")
    assert d["migration_status"] == "migrating" and d["migration"]["phase"] == "host-copy", d
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while (row := bm.db_row(v["id"]))[0] == "migrating":
        if row[1].get("phase") == "host-copy":  # not its cleanup, which keeps no progress
            seen.append(int((row[1].get("progress") or {}).get("copied", 0)))
        assert time.monotonic() < deadline, f"the host copy still runs after 60 s: {row}"
        time.sleep(0.05)
    end = bm.show(v["id"])
    assert end["migration_status"] == "success", end
    assert any(0 < c < 64 * MiB for c in seen), f"no progress between 0 and the end: {sorted(set(seen))}"
    assert seen == sorted(seen), "progress went back"
    assert_content(end["provider_location"]["uri"], img)


def test_show_says_when_a_takeovers_source_is_not_connected(bm: BlockmigEnv) -> None:
    """S, the source of a takeover by Q, is killed while Q copies: the volume stays
    attachable on Q, but its writes and reads of regions not yet copied wait for S, then
    fail. Before: `show` said nothing of it (attachable: True, no error)."""
    v, img = make(bm, "source-killed", 8 * MiB, "S", stride=64 * 1024)  # 4 s at 2 MB/s
    d = bm.ok("migrate", v["id"], "Q")
    assert d["migration_status"] == "migrating_attachable", d
    bm.kill_array("S")
    try:
        deadline = time.monotonic() + 20
        while "\nsource:            not connected" not in (text := bm.run("show", v["id"]).stdout):
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        assert "up to the target's source retry window, then fail with EIO" in text, text
        assert "attachable:        True" in text, text
    finally:
        bm.up_again()
    end = bm.wait_migration(v["id"], timeout=60)
    assert end["migration_status"] == "success" and end["host"] == "Q@unified#default", end
    assert "\nsource:" not in bm.run("show", v["id"]).stdout
    assert_content(end["provider_location"]["uri"], img)
