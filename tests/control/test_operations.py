"""Day-to-day operations on a state dir: what `blockmig` does when its files or arrays are
not as it left them.

- a damaged volumes.db (or one SQLite cannot write: read-only, full disk) gave a Python
  traceback; now a `blockmig: the volumes database ... ` error that names the file and
  what to do, and the file is left as it was;
- a damaged registry (arrays.json) said only "Expecting value: line 1 column 1" or gave a
  TypeError traceback; now it names the file and how to get the arrays back;
- the registry lost while its arrays ran: `blockmig up` unlinked each running array's
  runtime.json and then failed ("data dir ... is in use"), leaving arrays no command could
  stop; now it takes the running arrays over;
- an array killed -9 whose pid another process got since: `blockmig down` SIGTERMed (and
  SIGKILLed) that process, and `blockmig up` took it for the array and started nothing;
  now a pid counts as the array only while it runs `array serve` of that array's data dir;
- an array killed -9 and started again by `blockmig up` got new ports (port 0 in the
  config), so every URI recorded and given out (volume locations, attachments) led nowhere;
  now it gets its old ports back while they are free;
- two `blockmig up` at once left an array running that no registry named (`down` left it
  running); now `up` and `down` of a state dir take a lock;
- every command's recover() decoded every volume of the db to find the migrating ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from control.config import pid_alive
from control.manager import VolumeManager
from control.volumes import VolumesDB

from .blockmig_env import ArraySpec, BlockmigEnv

pytestmark = pytest.mark.timeout(180)

DAMAGED = b"this is no SQLite database, a disk or a copy cut it short\n" * 20


def _arrays_of(state_dir: Path) -> set[int]:
    """Pids of the array processes serving data dirs under ``state_dir``."""
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                args = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in args and any(a.startswith(str(state_dir).encode()) for a in args):
                if pid_alive(int(d)):
                    out.add(int(d))
    return out


@pytest.fixture
def bm(tmp_path: Path) -> Iterator[BlockmigEnv]:
    with BlockmigEnv(tmp_path / "state") as env:  # always stops what it started
        yield env


def test_a_damaged_volumes_db_gives_a_clear_error_and_is_left_alone(tmp_path: Path) -> None:
    env = BlockmigEnv(tmp_path / "state")
    env.state_dir.mkdir()
    db = env.state_dir / "volumes.db"
    db.write_bytes(DAMAGED)
    for args in (("list",), ("show", "v1"), ("create", "--size", "1M", "--host", "A", "--name", "v1")):
        msg = env.refused(*args)
        assert msg.startswith(f"the volumes database {db} is damaged (file is not a database)"), msg
        assert "restore it from a backup" in msg
    assert db.read_bytes() == DAMAGED


@contextmanager
def read_only_view(src: Path, view: Path) -> Iterator[Path]:
    """``src`` seen through a read-only bind mount (root alone may do that: else skip)."""
    view.mkdir()
    r = subprocess.run(["mount", "--bind", str(src), str(view)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount: {r.stderr.strip()}")
    try:
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        yield view
    finally:
        subprocess.run(["umount", str(view)], capture_output=True)


def test_a_read_only_state_dir_gives_a_clear_error(tmp_path: Path) -> None:
    """A state dir on a read-only mount (as root too): every volume command is refused
    naming the file and the state dir, and nothing changes."""
    state = tmp_path / "state"
    db = VolumesDB(state / "volumes.db")
    db.create("v1", 1 << 20, "A@unified#default")
    db.close()
    with read_only_view(state, tmp_path / "ro") as ro:
        env = BlockmigEnv(ro)
        for args in (("list",), ("show", "v1"), ("create", "--size", "1M", "--host", "A"), ("delete", "v1")):
            msg = env.refused(*args)
            assert msg.startswith(f"the volumes database {ro / 'volumes.db'}: "), msg
            assert f"the state dir {ro} and the files in it must be writable" in msg, msg
        (state / "arrays.json").write_text("{}")
        msg = env.refused("down")  # an OSError: its message, not its errno ("blockmig: 30")
        assert "Read-only file system" in msg and str(ro) in msg, msg
    assert [v.name for v in VolumesDB(state / "volumes.db").list()] == ["v1"]


@pytest.mark.parametrize(
    "text", ["{not json", '{"A": {"name": "A"}}', '["A"]'], ids=["not-json", "missing-keys", "not-a-map"]
)
def test_a_damaged_registry_gives_a_clear_error_and_is_left_alone(tmp_path: Path, text: str) -> None:
    env = BlockmigEnv(tmp_path / "state")
    env.state_dir.mkdir()
    reg = env.state_dir / "arrays.json"
    reg.write_text(text)
    for args in (("create", "--size", "1M", "--host", "A"), ("up",), ("down",)):
        msg = env.refused(*args)
        assert msg.startswith(f"the array registry {reg} is damaged"), msg
        assert "runtime.json" in msg and "blockmig up" in msg
    assert reg.read_text() == text


@pytest.mark.slow
def test_up_takes_over_arrays_that_run_when_the_registry_was_lost(bm: BlockmigEnv) -> None:
    bm.up([ArraySpec("A"), ArraySpec("B")])
    vol = bm.create_volume("v1", 1 << 20, "A")
    vol.write(0, b"kept" * 1024)
    pids = bm.array_pids()
    cfg = bm.state_dir / "arrays.toml"
    (bm.state_dir / "arrays.json").unlink()  # lost: a cleanup script, a restored backup ...
    try:
        bm.ok("up", "--config", str(cfg))
        assert bm.array_pids() == pids  # the same arrays, not a second (refused) start
        assert all((bm.state_dir / "arrays" / n / "runtime.json").exists() for n in pids)
        assert bm.volume("v1").read(0, 4096) == b"kept" * 1024
        bm.ok("attach", "v1")
        bm.ok("down")
        assert not any(pid_alive(p) for p in pids.values()), pids
    finally:  # without the fix no registry names them any more
        for pid in _arrays_of(bm.state_dir):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_an_array_killed_and_started_again_keeps_its_addresses(bm: BlockmigEnv) -> None:
    """Port 0 in the config: `up` after a kill -9 gave the array new ports, so every URI
    blockmig had recorded and given out (the volume's location, its attachments, what the
    hosts were told) led nowhere. Now it gets the ports it had while they are free."""
    bm.up([ArraySpec("A"), ArraySpec("B")])
    vol = bm.create_volume("v1", 1 << 20, "A")
    vol.write(0, b"kept" * 1024)
    att = bm.ok("attach", "v1")["data"]["uri"]
    before = json.loads((bm.state_dir / "arrays.json").read_text())
    for pid in bm.array_pids().values():
        os.kill(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.05)
    bm.ok("up", "--config", str(bm.state_dir / "arrays.toml"))
    after = json.loads((bm.state_dir / "arrays.json").read_text())
    for name in ("A", "B"):
        assert after[name]["pid"] != before[name]["pid"]
        assert (after[name]["nbd"], after[name]["api"]) == (before[name]["nbd"], before[name]["api"])
    shown = bm.show("v1")
    assert shown["provider_location"]["uri"] == att == shown["attachments"][0]["connection"]["uri"]
    assert bm.volume("v1").read(0, 4096) == b"kept" * 1024
    assert bm.ok("migrate", "v1", "B", "--wait")["migration_status"] == "success"


@pytest.mark.slow
def test_a_pid_reused_after_kill_9_is_never_signalled_and_the_array_restarts(bm: BlockmigEnv) -> None:
    bm.up([ArraySpec("A")])
    vol = bm.create_volume("v1", 1 << 20, "A")
    vol.write(0, b"kept" * 1024)
    pid = bm.array_pids()["A"]
    os.kill(pid, signal.SIGKILL)
    while pid_alive(pid):
        time.sleep(0.05)
    # Another process has the array's pid now (as after a reboot); stand-in: the registry
    # names one of ours.
    other = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        reg = bm.state_dir / "arrays.json"
        raw = json.loads(reg.read_text())
        raw["A"]["pid"] = other.pid
        reg.write_text(json.dumps(raw))
        bm.ok("up", "--config", str(bm.state_dir / "arrays.toml"))
        new = bm.array_pids()["A"]
        assert new != other.pid  # started again, not taken for running
        assert bm.volume("v1").read(0, 4096) == b"kept" * 1024
        raw = json.loads(reg.read_text())
        raw["A"]["pid"] = other.pid  # and `down` with that pid recorded ...
        reg.write_text(json.dumps(raw))
        bm.ok("down")
        assert other.poll() is None, "blockmig down signalled a process that is not the array"
    finally:
        other.kill()
        other.wait()
        if pid_alive(new):  # the array `down` could not know about in this test's registry
            os.kill(new, signal.SIGTERM)


def test_recover_reads_the_migrating_volumes_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command runs recover(): it decoded every volume of the db (5000 volumes: 40 ms
    each command, 0.1 ms at 10), now only those whose migration runs."""
    m = VolumeManager(tmp_path)
    vols = [m.db.create(f"v{i}", 1 << 20, "A@unified#default") for i in range(300)]
    for v in vols[:3]:
        m.db.update(v.id, status="available", migration_status="migrating", migration={"pid": os.getppid()})
    for v in vols[3:]:
        m.db.update(v.id, status="available", migration_status="success", migration={"phase": "done"})
    decoded = 0
    real = VolumesDB._row

    def counting(r: tuple[object, ...]) -> object:
        nonlocal decoded
        decoded += 1
        return real(r)

    monkeypatch.setattr(VolumesDB, "_row", staticmethod(counting))
    assert m.recover() == []  # a live follower pid: nothing to restart
    assert decoded == 3, f"recover() decoded {decoded} volumes for 3 that migrate"
    m.close()


@pytest.mark.slow
def test_up_run_twice_at_once_leaves_no_array_unrecorded(bm: BlockmigEnv) -> None:
    """Two `up`s at once (two terminals, a CI retry) each read the registry, started arrays
    and saved it, the last dropping what the other had started: arrays no registry named,
    which `down` left running for good."""
    cfg = bm.state_dir / "arrays.toml"
    bm.state_dir.mkdir(parents=True)
    cfg.write_text("\n".join(s.toml() for s in (ArraySpec("A"), ArraySpec("B"))))
    try:
        ps = [bm.popen("up", "--config", str(cfg)) for _ in range(3)]
        for p in ps:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        running = _arrays_of(bm.state_dir)
        assert set(bm.array_pids().values()) == running and len(running) == 2, (bm.array_pids(), running)
        bm.ok("down")
        deadline = time.monotonic() + 30
        while _arrays_of(bm.state_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _arrays_of(bm.state_dir), "`blockmig down` left arrays running"
    finally:
        for pid in _arrays_of(bm.state_dir):
            os.kill(pid, signal.SIGKILL)
