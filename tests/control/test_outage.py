"""A migration's calls to an array whose API is out for a moment: the array killed with SIGKILL
right after one of its answers and started again by `blockmig up` a second later, as a crash
and a supervisor's restart would have it. The array resumes what it ran (I4); the migration
rides the outage out, as its status polls did already (VolumeDriver.unreachable_window).

The migration (VolumeManager) runs in this process, so that the outage comes at the very call
a test names (a spy on ArrayApi.call kills the array once that call has its answer); the
arrays are real processes, killed and restarted for real.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from control.api_client import ArrayApi
from control.drivers.base import VolumeDriver
from control.manager import VolumeManager
from control.volumes import VolumeError

from .blockmig_env import BLOCK, ArraySpec, BlockmigEnv, Image, MiB, assert_content, fill, lun_of

pytestmark = pytest.mark.timeout(120)

ARRAYS = [
    ArraySpec("A", "unified", ("default", "gold")),
    ArraySpec("K", "unified"),
    # a slow target: a takeover it resumes after a restart lasts longer than `up`
    ArraySpec("L", "unified", migration_throttle=2),
]
#: an answer of an array's API that sets off the outage: (method, path, answer)
When = Callable[[str, str, Any], bool]
#: the call that starts a takeover (step 2)
START = ("POST", "/api/v1/migrations")


@pytest.fixture(scope="module")
def bm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockmigEnv]:
    with BlockmigEnv(tmp_path_factory.mktemp("outage") / "state") as env:  # always stops them
        env.up(ARRAYS)
        yield env


@pytest.fixture
def m(bm: BlockmigEnv) -> Iterator[VolumeManager]:
    mgr = VolumeManager(bm.state_dir)
    try:
        yield mgr
    finally:
        mgr.close()


def make(
    bm: BlockmigEnv, name: str, size: int = 4 * MiB, stride: int = 16 * BLOCK
) -> tuple[dict[str, Any], Image]:
    v = bm.create(name, size, "A")
    return v, fill(v["provider_location"]["uri"], size, seed=zlib.crc32(name.encode()), stride=stride)


@contextmanager
def outage(
    bm: BlockmigEnv,
    monkeypatch: pytest.MonkeyPatch,
    array: str,
    when: When,
    back_after: float | None = 1.0,
    at: str = "answer",
) -> Iterator[list[tuple[str, str]]]:
    """Kill ``array`` at a call to its API ``when`` holds for, and have `blockmig up` start it
    again ``back_after`` seconds later (None: at the end of the block). ``at``: "answer", once
    the call has its answer; "lost", the same, but the answer is lost: the call fails as one
    made to the killed array; "request": the array stops (SIGSTOP) as the call is made and is
    killed a moment later, before it reads the request (``when`` gets no answer: None). Yields
    the (method, path) of each call made to the array meanwhile (before it, in ``at="lost"``,
    the call whose answer is lost)."""
    url = bm.api(array).url
    real = ArrayApi.call
    calls: list[tuple[str, str]] = []
    restarts: list[threading.Thread] = []
    failed: list[BaseException] = []

    def restart(pid: int | None) -> None:
        try:
            if pid is not None:  # stopped: the call waits for an answer meanwhile
                time.sleep(0.5)
                bm.kill_array(array)
            time.sleep(back_after or 0.0)
            bm.up_again()
        except BaseException as e:  # said at the end of the block
            failed.append(e)

    def spy(
        self: ArrayApi, method: str, path: str, body: Any = None, query: dict[str, str] | None = None
    ) -> Any:
        if self.url != url:
            return real(self, method, path, body, query)
        calls.append((method, path))
        if at == "request" and not restarts and when(method, path, None):
            pid = bm.array_pids()[array]
            os.kill(pid, signal.SIGSTOP)
            restarts.append(threading.Thread(target=restart, args=(pid,), daemon=True))
            restarts[0].start()
            return real(self, method, path, body, query)
        answer = real(self, method, path, body, query)
        if at != "request" and not restarts and when(method, path, answer):
            bm.kill_array(array)
            restarts.append(threading.Thread(target=restart, args=(None,), daemon=True))
            if back_after is not None:
                restarts[0].start()
            if at == "lost":
                return real(self, method, path, body, query)  # to the killed array: its error
        return answer

    monkeypatch.setattr(ArrayApi, "call", spy)
    try:
        yield calls
    finally:
        monkeypatch.setattr(ArrayApi, "call", real)
        if restarts:
            if not restarts[0].is_alive() and back_after is None:
                restarts[0].start()
            restarts[0].join(timeout=60)
        assert not failed, failed
    assert restarts, f"array {array} was never killed: no call to its API set the outage off"


def answer_to(method: str, path: str) -> When:
    return lambda m, p, _: (m, p) == (method, path)


def test_the_target_killed_right_after_it_took_the_volume_over(
    bm: BlockmigEnv, m: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """K dies right after it answered the POST that starts its takeover (step 2) and is up a
    second later, resuming the takeover. Before: step 2's next call, a GET of the LUN, found
    K's API closed and failed the whole migration at once (back on A, in error)."""
    v, img = make(bm, "killed-after-takeover")
    with outage(bm, monkeypatch, "K", answer_to(*START)):
        started = m.migrate(v["id"], "K")
        assert started.migration_status == "migrating_attachable", started.migration
        end = m.follow(v["id"])
    assert (end.migration_status, end.host) == ("success", "K@unified#default"), end.migration
    assert lun_of(v) not in bm.luns("A")
    assert_content(end.provider_location["uri"], img)


def test_a_takeover_started_whose_answer_is_lost_is_not_started_twice(
    bm: BlockmigEnv, m: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """K takes the volume over, then dies before its answer comes (the answer lost), and is up
    a second later, resuming the takeover. Before: the start failed the migration at once;
    sent again blindly, K would refuse it (the LUN exists). Now K's migration of the LUN,
    asked once K answers, says the takeover began: it goes on, not started again."""
    v, img = make(bm, "takeover-answer-lost")
    with outage(bm, monkeypatch, "K", answer_to(*START), at="lost") as calls:
        started = m.migrate(v["id"], "K")
        assert started.migration_status == "migrating_attachable", started.migration
        end = m.follow(v["id"])
    assert calls.count(START) == 1, calls  # not sent again
    assert (end.migration_status, end.host) == ("success", "K@unified#default"), end.migration
    assert lun_of(v) not in bm.luns("A")
    assert_content(end.provider_location["uri"], img)


def test_a_takeover_start_the_target_never_read_is_sent_again_once_it_is_back(
    bm: BlockmigEnv, m: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """K stops as the start of its takeover is sent, dies before it reads it, and is up a
    second later. Before: the lost answer failed the migration at once. Now K, asked once it
    answers, has no migration of the LUN: the start is sent again, and the migration goes on."""
    v, img = make(bm, "takeover-start-unread")
    with outage(bm, monkeypatch, "K", answer_to(*START), at="request") as calls:
        started = m.migrate(v["id"], "K")
        assert started.migration_status == "migrating_attachable", started.migration
        end = m.follow(v["id"])
    assert calls.count(START) == 2, calls  # the one K never read, and the one it took
    assert (end.migration_status, end.host) == ("success", "K@unified#default"), end.migration
    assert lun_of(v) not in bm.luns("A")
    assert_content(end.provider_location["uri"], img)


def test_the_target_killed_right_after_it_said_its_copy_completed(
    bm: BlockmigEnv, m: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """K dies right after the follower saw its takeover completed (step 4) and is up a second
    later. Before: complete_migration_target's last call, a GET of the LUN, found K's API
    closed and failed the migration, though K had cut over and held the volume."""
    v, img = make(bm, "killed-after-cutover")
    path = f"/api/v1/migrations/{lun_of(v)}"

    def completed(method: str, p: str, answer: Any) -> bool:
        return (method, p) == ("GET", path) and answer.get("state") == "completed"

    started = m.migrate(v["id"], "K")
    assert started.migration_status == "migrating_attachable", started.migration
    with outage(bm, monkeypatch, "K", completed):
        end = m.follow(v["id"])
    assert (end.migration_status, end.host) == ("success", "K@unified#default"), end.migration
    assert lun_of(v) not in bm.luns("A")
    assert_content(end.provider_location["uri"], img)


def test_a_follower_that_finds_the_target_restarting_adopts_its_cutover(
    bm: BlockmigEnv, m: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command that ran step 2 died before step 3, K cut over since, and K restarts just
    as a follower takes the migration up (`blockmig up` after a kill -9). Before: the
    follower's first call, a GET of K's migration, failed it at once: back on A, in error,
    though K holds the volume (and hosts may have found it there)."""
    v, img = make(bm, "follower-finds-target-down")

    def dies(step: str) -> None:  # the command dies after step 2
        if step == "host":
            raise KeyboardInterrupt

    monkeypatch.setattr(m, "_inject", dies)
    with pytest.raises(KeyboardInterrupt):
        m.migrate(v["id"], "K")
    deadline = time.monotonic() + 30
    while (bm.array_migration("K", lun_of(v)) or {}).get("state") != "completed":
        assert time.monotonic() < deadline, bm.array_migration("K", lun_of(v))
        time.sleep(0.05)
    assert bm.db_migration(v["id"])["phase"] == "target"
    with outage(bm, monkeypatch, "K", answer_to("GET", "/api/v1/array")):
        bm.api("K").array_info()  # sets it off
        end = m.follow(v["id"])
    assert (end.migration_status, end.host) == ("success", "K@unified#default"), end.migration
    assert lun_of(v) not in bm.luns("A")
    assert_content(end.provider_location["uri"], img)


def test_a_target_that_stays_down_fails_the_migration_naming_it(
    bm: BlockmigEnv, m: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L dies after it took the volume over and does not come back: the migration is not
    held up for ever but fails once L's window has passed, saying which array did not
    answer, and the volume stays on A with its data (and `up` drops L's takeover)."""
    monkeypatch.setattr(VolumeDriver, "unreachable_window", 2.0)
    v, img = make(bm, "target-stays-down", 16 * MiB, stride=BLOCK)  # 8 s to copy at 2 MB/s
    with outage(bm, monkeypatch, "L", answer_to(*START), back_after=None):
        t0 = time.monotonic()
        with pytest.raises(VolumeError) as err:
            m.migrate(v["id"], "L")
        took = time.monotonic() - t0
        assert took < 10, took
        msg = str(err.value)
        assert msg.startswith(f"migration of {v['name']} failed at step target: array L does not answer"), msg
        d = bm.show(v["id"])
        assert (d["migration_status"], d["host"]) == ("error", "A@unified#default"), d
    d = bm.show(v["id"])  # `up` started L again and dropped its takeover
    assert (d["migration_status"], d["host"]) == ("error", "A@unified#default"), d
    assert lun_of(v) not in bm.luns("L")
    assert bm.api("A").get_lun(lun_of(v))["fenced"] is False
    assert_content(d["provider_location"]["uri"], img)


def test_the_source_killed_as_it_fences_the_volume_for_the_takeover(
    bm: BlockmigEnv, m: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fences the volume's LUN for K's takeover (step 2), dies before its answer comes, and
    is up a second later. Before: the migration failed at once, and so did lifting the fence
    (A down): the volume stayed fenced, in error. A fence is idempotent for its holder: it is
    asked for again once A answers, and the migration goes on."""
    v, img = make(bm, "source-killed-fencing")
    fence = ("POST", f"/api/v1/luns/{lun_of(v)}/fence")
    with outage(bm, monkeypatch, "A", answer_to(*fence), at="lost") as calls:
        started = m.migrate(v["id"], "K")
        assert started.migration_status == "migrating_attachable", started.migration
    assert calls.count(fence) > 1, calls  # asked again
    end = m.follow(v["id"])
    assert (end.migration_status, end.host) == ("success", "K@unified#default"), end.migration
    assert lun_of(v) not in bm.luns("A")
    assert_content(end.provider_location["uri"], img)


def test_the_source_killed_as_the_cleanup_deletes_its_lun(
    bm: BlockmigEnv, m: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """K has cut over; A stops as the follower asks it to delete the source LUN (step 4's
    end), dies before it reads it, and is up a second later. Before: the migration ended in
    error ("its source LUN may remain") with the volume on K, the LUN left on A until `up`
    or the next migrate or delete. A delete of a missing LUN succeeds: it is asked again."""
    v, img = make(bm, "source-killed-at-cleanup")
    started = m.migrate(v["id"], "K")
    assert started.migration_status == "migrating_attachable", started.migration
    delete = ("DELETE", f"/api/v1/luns/{lun_of(v)}")
    with outage(bm, monkeypatch, "A", answer_to(*delete), at="request") as calls:
        end = m.follow(v["id"])
    assert calls.count(delete) > 1, calls  # asked again
    assert (end.migration_status, end.host) == ("success", "K@unified#default"), end.migration
    assert lun_of(v) not in bm.luns("A")
    assert_content(end.provider_location["uri"], img)


@pytest.mark.parametrize("at", ["lost", "request"])
def test_a_pool_move_whose_start_loses_its_answer(
    bm: BlockmigEnv, m: VolumeManager, monkeypatch: pytest.MonkeyPatch, at: str
) -> None:
    """A, asked to move the volume's LUN to its pool gold (step 1), dies before its answer
    comes: after it began the move ("lost"), or before it read the request ("request"); it
    is up a second later. Before: the migration failed at once. Now A's migration of the
    LUN, asked once A answers, says: the move it resumed goes on (sent again, A would refuse
    it: the LUN migrates), or, none, the move is asked for again."""
    v, img = make(bm, f"move-start-{at}")
    move = ("POST", f"/api/v1/luns/{lun_of(v)}/move")
    with outage(bm, monkeypatch, "A", answer_to(*move), at=at) as calls:
        end = m.migrate(v["id"], "A#gold")
    assert calls.count(move) == (1 if at == "lost" else 2), calls
    assert (end.migration_status, end.host) == ("success", "A@unified#gold"), end.migration
    assert end.provider_location["pool"] == bm.api("A").get_lun(lun_of(v))["pool"] == "gold"
    assert_content(end.provider_location["uri"], img)


def test_a_follower_that_finds_the_array_restarting_follows_its_pool_move(
    bm: BlockmigEnv, m: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command that asked A to move the volume to its pool gold (step 1) died while it
    waited, A moved it since, and A restarts just as a follower takes the migration up.
    Before: the follower's first call, a GET of A's move, failed the migration at once
    (back in pool default, in error), though the LUN is in gold."""
    v, img = make(bm, "follower-finds-move-array-down")

    def dies(*args: Any, **kwargs: Any) -> dict[str, Any]:  # the command dies as it waits
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(VolumeDriver, "_follow", dies)
        with pytest.raises(KeyboardInterrupt):
            m.migrate(v["id"], "A#gold")
    deadline = time.monotonic() + 30
    while (bm.array_migration("A", lun_of(v)) or {}).get("state") != "completed":
        assert time.monotonic() < deadline, bm.array_migration("A", lun_of(v))
        time.sleep(0.05)
    assert bm.db_migration(v["id"])["phase"] == "source"
    with outage(bm, monkeypatch, "A", answer_to("GET", "/api/v1/array")):
        bm.api("A").array_info()  # sets it off
        end = m.follow(v["id"])
    assert (end.migration_status, end.host) == ("success", "A@unified#gold"), end.migration
    assert end.provider_location["pool"] == bm.api("A").get_lun(lun_of(v))["pool"] == "gold"
    assert_content(end.provider_location["uri"], img)
