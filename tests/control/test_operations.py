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
- ... and when they are not (another program took its NBD port), or its config names
  another NBD address, `show` (and `list`, `detach`, `migrate`'s output) still gave the
  URIs recorded before; now every URI is made from the array's address in the registry,
  and an attachment whose host was given the old one says that host must re-attach;
- two `blockmig up` at once left an array running that no registry named (`down` left it
  running); now `up` and `down` of a state dir take a lock;
- every command's recover() decoded every volume of the db to find the migrating ones.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blockmig.testing import NbdDevice
from control.config import ArrayConfig, ArrayRecord, Registry, _same_address, down, pid_alive, url_address
from control.manager import VolumeManager
from control.volume_commands import reattach_notices
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


def test_an_up_interrupted_while_an_array_starts_leaves_no_array_down_cannot_stop(bm: BlockmigEnv) -> None:
    """Ctrl-C of `blockmig up` while it waited for an array to serve: the array (a session
    of its own, so the terminal's SIGINT missed it) ran on unrecorded, and `down` said
    "nothing was running" and left it running."""
    cfg = bm.state_dir / "arrays.toml"
    bm.state_dir.mkdir(parents=True)
    cfg.write_text("\n".join(s.toml() for s in (ArraySpec("A"), ArraySpec("B"))))
    try:
        p = bm.popen("up", "--config", str(cfg))
        deadline = time.monotonic() + 60
        while not _arrays_of(bm.state_dir) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _arrays_of(bm.state_dir), "no array started"
        p.send_signal(signal.SIGINT)  # `up` waits for it to serve
        _, err = p.communicate(timeout=60)
        assert (p.returncode, err) == (130, "blockmig: interrupted\n")
        bm.ok("down")
        deadline = time.monotonic() + 30
        while _arrays_of(bm.state_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _arrays_of(bm.state_dir), "`blockmig down` left arrays running"
    finally:
        for pid in _arrays_of(bm.state_dir):
            os.kill(pid, signal.SIGKILL)


def _occupy(uri: str) -> socket.socket:
    """A listening socket on the host and port of ``uri`` (another program took the port)."""
    where = urllib.parse.urlsplit(uri)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the dead array's TIME_WAITs
    deadline = time.monotonic() + 10
    while True:
        try:
            s.bind((where.hostname, where.port))
            break
        except OSError:
            if time.monotonic() >= deadline:
                s.close()
                raise
            time.sleep(0.1)
    s.listen()
    return s


def _read(uri: str, length: int) -> bytes:
    with NbdDevice(uri, timeout=10) as dev:
        return dev.read(0, length)


@pytest.mark.slow
def test_an_array_restarted_on_other_ports_gives_its_volumes_uris_that_work(bm: BlockmigEnv) -> None:
    """Its old NBD port taken by another program, `up` after a kill -9 starts the array on
    new ports: `show` gave the location and attachments recorded before (the port now
    another program's), so hosts were sent nowhere. The URIs are derived from the array's
    address now; an attachment given the old URI says its host must re-attach."""
    bm.up([ArraySpec("A"), ArraySpec("B")])
    vol = bm.create_volume("v1", 1 << 20, "A")
    data = os.urandom(1 << 20)
    vol.write(0, data)
    old = bm.ok("attach", "v1", "--host-name", "h1")["data"]["uri"]
    pid = bm.array_pids()["A"]
    os.kill(pid, signal.SIGKILL)
    while pid_alive(pid):
        time.sleep(0.05)
    with _occupy(old):
        r = bm.run("up", "--config", str(bm.state_dir / "arrays.toml"))
        assert r.returncode == 0, r.stderr
        nbd = json.loads((bm.state_dir / "arrays.json").read_text())["A"]["nbd"]
        assert not old.startswith(nbd + "/"), "the array got its old (taken) port"
        assert f"array A serves NBD at {nbd} now, not " in r.stderr and "must re-attach" in r.stderr
        shown = bm.show("v1")
        uri = shown["provider_location"]["uri"]
        assert uri.startswith(nbd + "/") and uri != old
        assert _read(uri, len(data)) == data
        att = shown["attachments"][0]
        assert att["connection"]["uri"] == uri and att["given_uri"] == old
        port = int(nbd.rsplit(":", 1)[1])
        assert (att["connection"]["port"], str(port)) == (port, att["connection"]["nbd_client"].split()[2])
        text = bm.run("show", "v1").stdout
        assert f"via {uri} (given {old}: " in text and "must re-attach" in text, text
        assert "\nmigration_status:  -\n" in text, text  # never migrated: as `list` says, not None
        again = bm.ok("attach", "v1", "--host-name", "h2")["data"]["uri"]
        assert again == uri and _read(again, len(data)) == data
        moved = bm.ok("migrate", "v1", "B", "--wait")  # attached: its records move to B
        assert moved["migration_status"] == "success" and moved["host"].startswith("B@")
        uri = moved["provider_location"]["uri"]
        assert _read(uri, len(data)) == data
        assert [n["uri"] for n in moved["reattach"]] == [uri, uri]
        assert all("given_uri" not in a for a in moved["attachments"])


@pytest.mark.slow
def test_an_array_whose_config_changed_its_nbd_address_gives_uris_that_work(bm: BlockmigEnv) -> None:
    """`down`, a new NBD port in the config, `up`: every volume on the array is reached at
    the new address (the registry is the only record of an array's address)."""
    bm.up([ArraySpec("A"), ArraySpec("B")])
    vol = bm.create_volume("v1", 1 << 20, "A")
    vol.write(0, b"kept" * 1024)
    old = vol.uri
    bm.ok("down")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = bm.state_dir / "arrays.toml"
    text = cfg.read_text()
    cfg.write_text(text.replace('nbd = "127.0.0.1:0"', f'nbd = "127.0.0.1:{port}"', 1))
    bm.ok("up", "--config", str(cfg))
    uri = bm.show("v1")["provider_location"]["uri"]
    assert uri == f"nbd://127.0.0.1:{port}/{vol.info['provider_location']['lun']}" != old
    assert _read(uri, 4096) == b"kept" * 1024
    assert bm.ok("attach", "v1")["data"]["uri"] == uri


def test_show_derives_uris_from_the_registry_for_rows_written_before(tmp_path: Path) -> None:
    """A volumes.db written before (a location and an attachment with an address of the
    past, no address at all, an array no longer in the registry) reads as it was, each
    URI taken from the array's address now."""
    reg = Registry(tmp_path)
    rec = ArrayRecord("A", "unified", "http://127.0.0.1:1", "nbd://127.0.0.1:7000", "t", str(tmp_path), 1)
    reg.save({"A": rec})
    m = VolumeManager(tmp_path)
    old = "nbd://127.0.0.1:6000/volume-x"
    conn = {"host": "127.0.0.1", "port": 6000, "export": "volume-x", "uri": old, "nbd_client": "nbd-client"}
    v = m.db.create("v1", 1 << 20, "A@unified#default")
    m.db.update(
        v.id,
        status="in-use",
        provider_location={"array": "A", "lun": "volume-x", "pool": "default", "uri": old},
        attachments=[
            {"id": "a1", "connector": {"host": "h1"}, "attached_at": 1.0, "host": v.host, "connection": conn},
            {
                "id": "a2",
                "connector": {"host": "h2"},
                "attached_at": 2.0,
                "host": "C@plain#default",
                "connection": {"uri": "nbd://10.0.0.9:10809/volume-x"},
            },
        ],
    )
    d = m.show("v1")
    assert d["provider_location"]["uri"] == "nbd://127.0.0.1:7000/volume-x"
    a1, a2 = d["attachments"]
    assert a1["connection"] == {
        "host": "127.0.0.1",
        "port": 7000,
        "export": "volume-x",
        "uri": "nbd://127.0.0.1:7000/volume-x",
        "nbd_client": "nbd-client 127.0.0.1 7000 /dev/nbd0 -N volume-x",
    }
    assert a1["given_uri"] == old
    assert a2["connection"]["uri"] == "nbd://10.0.0.9:10809/volume-x" and "given_uri" not in a2
    assert m.db.get(v.id).provider_location["uri"] == old  # nothing rewritten
    m.close()


def test_migrate_tells_hosts_given_an_old_address_to_re_attach() -> None:
    """`migrate`'s notices: a host given a URI of its array's old address must re-attach,
    also where a pool move re-pointed its record (the export stays on the array: the
    old URI differs only as the array moved), and not for the fence's EPERM."""
    new, old = "nbd://127.0.0.1:7000/volume-x", "nbd://127.0.0.1:6000/volume-x"
    d = {
        "host": "A@unified#fast",
        "migration_status": "success",
        "migration": {"source": "A@unified#default", "target": "A@unified#fast", "started": 5.0},
        "attachments": [
            {
                "id": "a1",
                "connector": {"host": "h1"},
                "host": "A@unified#fast",
                "connection": {"uri": new},
                "given_uri": old,
            },
            {
                "id": "a2",
                "connector": {"host": "h2"},
                "host": "A@unified#fast",
                "connection": {"uri": new},
                "moved_at": 6.0,
                "moved_from": {"host": "A@unified#default", "connection": {"uri": old}},
            },
            {"id": "a3", "connector": {"host": "h3"}, "host": "A@unified#fast", "connection": {"uri": new}},
        ],
    }
    notes = reattach_notices(d)
    assert [(n["attachment"], n["uri"], n["was"]) for n in notes] == [("a1", new, old), ("a2", new, old)]
    for n in notes:
        assert (
            f"the host must re-attach at {new}: array A serves at another address than the {old}"
            in n["message"]
        ), n
        assert "EPERM" not in n["message"]


def test_same_address_reads_ipv6_records_with_or_without_brackets(tmp_path: Path) -> None:
    """runtime.json wrote an IPv6 address without brackets (``nbd://::1:PORT``), which
    urlsplit reads as no port at all: `up` restarted such an array on new ports. Both forms
    are read now, and runtime.json writes brackets (ArrayApi needs them in its http://)."""
    try:
        probes = [socket.socket(socket.AF_INET6) for _ in range(2)]
    except OSError:
        pytest.skip("no IPv6 here")
    try:
        for s in probes:
            s.bind(("::1", 0))
        nbd_port, api_port = (s.getsockname()[1] for s in probes)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    finally:
        for s in probes:
            s.close()
    cfg = ArrayConfig("A", nbd="[::1]:0", api="[::1]:0", data_dir=str(tmp_path / "A"))
    for nbd, api in (
        (f"nbd://::1:{nbd_port}", f"http://::1:{api_port}"),
        (f"nbd://[::1]:{nbd_port}", f"http://[::1]:{api_port}"),
    ):
        rec = ArrayRecord("A", "unified", api, nbd, "t", str(tmp_path / "A"), 0)
        again = _same_address(cfg, rec, tmp_path)
        assert (again.nbd, again.api) == (f"[::1]:{nbd_port}", f"[::1]:{api_port}"), (nbd, again)
        assert rec.nbd_address() == ("::1", nbd_port)
        assert rec.connection("vol")["uri"] == f"nbd://[::1]:{nbd_port}/vol"
    assert url_address("http://127.0.0.1:8701") == ("127.0.0.1", 8701)
    with pytest.raises(ValueError):
        url_address("nbd://localhost/vol")


def test_down_keeps_the_addresses_up_needs_and_up_forgets_them(tmp_path: Path) -> None:
    """`down` removed arrays.json, so `up` with port 0 gave every array new ports (a
    takeover's target then dialed its source's old address for good). It keeps them in
    stopped.json now, which `up` reads (and empties) and nothing takes for running arrays."""
    reg = Registry(tmp_path)
    rec = ArrayRecord("A", "unified", "http://127.0.0.1:1", "nbd://127.0.0.1:2", "t", str(tmp_path), 0)
    reg.save({"A": rec})
    assert down(tmp_path, timeout=1) == []  # pid 0: not running
    assert not reg.path.exists() and reg.load() == {}
    assert reg.load_stopped() == {"A": rec}
    reg.stopped_path.write_text("{damaged")
    assert reg.load_stopped() == {}  # a hint only


@pytest.mark.slow
@pytest.mark.parametrize("port_taken", [False, True], ids=["same-port", "port-taken"])
def test_a_takeover_goes_on_across_down_and_up(bm: BlockmigEnv, port_taken: bool) -> None:
    """A volume migrating_attachable (B takes it over from A through the fence alias),
    `blockmig down`, `blockmig up`. Before: `up` gave A new ports (`down` forgot them), B
    kept dialing A's old address (host I/O that needed A failed with EIO, the copy never
    resumed), and the follower `down` cut off ended the migration in error. Now `up`
    gives A its ports back; where another program took A's NBD port meanwhile, `up` tells
    B the alias's new URI; the follower leaves a migration stopped by `down` to `up`."""
    bm.up([ArraySpec("A"), ArraySpec("B", migration_throttle=1)])  # 16 MiB: 16 s to copy
    size = 16 << 20
    vol = bm.create_volume("v1", size, "A")
    data = bytearray(os.urandom(size))
    vol.write(0, data)
    d = bm.ok("migrate", "v1", "B")
    assert d["migration_status"] == "migrating_attachable", d
    lun = d["provider_location"]["lun"]
    given = bm.db_row("v1")[1]["source_uri"]
    assert given.startswith(Registry(bm.state_dir).get("A").nbd + "/") and "~fence-" in given
    old = Registry(bm.state_dir).load()
    bm.ok("down")
    assert not (bm.state_dir / "arrays.json").exists()
    time.sleep(1.5)  # a follower would have polled B by now: it must leave the migration be
    status, mig = bm.db_row("v1")
    assert status == "migrating_attachable" and not mig.get("error"), (status, mig)
    assert not pid_alive(int(mig.get("pid") or 0)) or not bm.is_follower(int(mig["pid"]))
    with _occupy(given) if port_taken else _nothing():
        r = bm.run("up", "--config", str(bm.state_dir / "arrays.toml"))
        assert r.returncode == 0, r.stderr
        now = Registry(bm.state_dir).load()
        assert now["B"].api == old["B"].api and now["B"].nbd == old["B"].nbd
        if port_taken:
            assert now["A"].nbd != old["A"].nbd
            new = now["A"].connection(given.rsplit("/", 1)[1])["uri"]
            assert f"reaches its migration's source at {new} now (was {given})" in r.stderr, r.stderr
            assert bm.db_row("v1")[1]["source_uri"] == new
        else:
            assert (now["A"].nbd, now["A"].api) == (old["A"].nbd, old["A"].api), r.stderr
            new = given
        assert bm.api("B").migration(lun)["source"] == new
        # host I/O on B that needs the source (not copied yet: the end of the LUN)
        tail = os.urandom(4096)
        uri = bm.show("v1")["provider_location"]["uri"]
        with NbdDevice(uri, timeout=20) as dev:
            assert dev.read(size - (1 << 20), 4096) == data[size - (1 << 20) : size - (1 << 20) + 4096]
            dev.write(size - 4096, tail)
            dev.flush()
        data[size - 4096 :] = tail
        bm.api("B").update_migration(lun, throttle=0)
        end = bm.wait_migration("v1", timeout=60)
    assert end["migration_status"] == "success", end
    assert end["host"].startswith("B@") and not end["migration"]["error"], end
    uri = end["provider_location"]["uri"]
    assert uri == now["B"].connection(lun)["uri"]
    assert _read(uri, size) == data
    assert lun not in bm.luns("A")
    text = bm.run("show", "v1").stdout
    assert "migration_status:  success" in text and f"uri:               {uri}" in text, text


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@pytest.mark.slow
def test_up_forgets_a_stopped_array_no_longer_configured_and_its_migration_says_why_it_waits(
    bm: BlockmigEnv,
) -> None:
    """A volume migrating_attachable from A to B, `blockmig down`, then `up` with a config
    that names A only. Before: B's record stayed in stopped.json for good, and the migration
    waited for it with no word why (recover started no follower, `show` said nothing). Now
    `up` drops that record and says so on stderr, names the migration that waits for B, and
    `show` says why it waits; no follower runs it meanwhile (none fails it: which side holds
    the data is not known without B), and once a config names B again it goes on."""
    bm.up([ArraySpec("A"), ArraySpec("B", migration_throttle=1)])  # 16 MiB: 16 s to copy
    size = 16 << 20
    vol = bm.create_volume("v1", size, "A")
    data = os.urandom(size)
    vol.write(0, data)
    d = bm.ok("migrate", "v1", "B")
    assert d["migration_status"] == "migrating_attachable", d
    lun = d["provider_location"]["lun"]
    bm.ok("down")
    only_a = bm.state_dir / "only-a.toml"
    only_a.write_text(ArraySpec("A").toml())
    r = bm.run("up", "--config", str(only_a))
    assert r.returncode == 0, r.stderr
    reg = Registry(bm.state_dir)
    assert set(reg.load()) == {"A"} and reg.load_stopped() == {}, r.stderr
    assert "array B (stopped by `blockmig down`) is not in the config" in r.stderr, r.stderr
    assert "the migration of v1" in r.stderr and "waits: array(s) B: not running" in r.stderr, r.stderr
    r = bm.run("show", "v1")  # every command runs recover(): it must start no follower
    assert r.returncode == 0, r.stderr
    assert "\nwaiting:           array(s) B: not running" in r.stdout, r.stdout
    assert "(step 4: the target copies it, then cuts over)\n" in r.stdout, r.stdout  # not "(complete)"
    assert bm.show("v1")["migration"]["waiting"].startswith("array(s) B: not running")
    time.sleep(1.0)  # a follower would have failed the migration by now ("unknown array B")
    status, mig = bm.db_row("v1")
    assert status == "migrating_attachable" and not mig.get("error"), (status, mig)
    assert not pid_alive(int(mig.get("pid") or 0)) or not bm.is_follower(int(mig["pid"]))
    # B named again: it starts (on ports its config gives: its old ones were forgotten), and
    # the migration goes on
    r = bm.run("up", "--config", str(bm.state_dir / "arrays.toml"))
    assert r.returncode == 0, r.stderr
    assert "waits" not in r.stderr, r.stderr
    assert "waiting" not in bm.run("show", "v1").stdout
    bm.api("B").update_migration(lun, throttle=0)
    end = bm.wait_migration("v1", timeout=60)
    assert end["migration_status"] == "success" and end["host"].startswith("B@"), end
    assert _read(end["provider_location"]["uri"], size) == data


def test_a_command_needing_an_array_down_stopped_says_so(bm: BlockmigEnv) -> None:
    """create, migrate, delete. Before: "unknown array 'A' in STATE_DIR (arrays: none: run
    `blockmig up` first)", though `up` started it and `down` stopped it."""
    bm.up([ArraySpec("A")])
    bm.create_volume("v1", 1 << 20, "A")
    bm.ok("down")
    for argv in (("create", "--size", "1M", "--host", "A"), ("migrate", "v1", "A"), ("delete", "v1")):
        msg = bm.refused(*argv)
        assert msg.endswith("array 'A' was stopped by `blockmig down`; `blockmig up` starts it again"), msg
