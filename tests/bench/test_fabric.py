"""bench.fabric: namespaces, shaped links, teardown on every exit, and the loopback fallback.

The namespace tests make real namespaces (named ``bmfab-PID-SEQ-NODE``, unique to
this run) and skip, saying why, only where namespaces cannot be made at all.
Timing assertions are lower bounds (a loaded machine only makes things slower).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import fabric as fm
from bench.fabric import PROFILES, Fabric, FabricProfile, LinkProfile, measure_rtt, rtt_summary

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def require_namespaces() -> None:
    reason = fm.unavailable_reason()
    if reason is not None:
        print(f"SKIP: network namespaces unavailable: {reason}")
        pytest.skip(f"network namespaces unavailable: {reason}")


def up(fab: Fabric) -> Fabric:
    """Enter ``fab`` and insist it really made namespaces (a fallback here is a bug)."""
    fab.__enter__()
    if not fab.namespaced:
        fab.__exit__(None, None, None)
        pytest.fail(f"fabric fell back although namespaces are available: {fab.fallback_reason}")
    return fab


def gone(names: list[str]) -> bool:
    existing = set(fm.list_fabric_namespaces())
    return not any(n in existing for n in names)


def root_ifs_gone(ifs: list[str]) -> bool:
    return not any(Path("/sys/class/net", i).exists() for i in ifs)


def readline(p: subprocess.Popen[str], timeout: float = 30.0) -> str:
    assert p.stdout is not None
    r, _, _ = select.select([p.stdout], [], [], timeout)
    return p.stdout.readline() if r else ""


# ---------------------------------------------------------------- profiles and the wire, no root needed


def test_profiles() -> None:
    for name in ("loopback", "local", "fc", "metro", "wan"):
        assert PROFILES[name].name == name
    assert not PROFILES["loopback"].namespaces
    assert all(PROFILES[n].namespaces for n in ("local", "fc", "metro", "wan"))
    assert not PROFILES["local"].host_link.shaped and not PROFILES["local"].array_link.shaped
    assert PROFILES["fc"].array_link.delay_ms == 0.05
    metro = PROFILES["metro"].array_link
    assert (metro.delay_ms, metro.jitter_ms) == (0.5, 0.05)
    assert metro.per_direction() == {
        "delay_ms": 0.25,
        "jitter_ms": 0.025,
        "rate_mbit": 10_000,
        "loss_pct": 0.0,
    }
    with pytest.raises(ValueError):
        LinkProfile(delay_ms=-1)
    with pytest.raises(ValueError):
        LinkProfile(loss_pct=101)
    with pytest.raises(ValueError):
        Fabric(PROFILES["local"], nodes=("host", "A", "A"))
    with pytest.raises(ValueError):
        Fabric(PROFILES["local"], nodes=("host", "_wire"))
    with pytest.raises(ValueError, match="bad node name"):
        Fabric(PROFILES["local"], nodes=("host", "A\n"))


class FakeSock:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, b: bytes) -> int:
        self.sent.append(bytes(b))
        return len(b)


def lane(**kw: Any) -> tuple[fm._Lane, FakeSock]:
    d = {"delay_ms": 0.0, "jitter_ms": 0.0, "rate_mbit": None, "loss_pct": 0.0, **kw}
    out = FakeSock()
    return fm._Lane("t", out, d), out  # type: ignore[arg-type]


def test_wire_lane_delay_jitter_rate_loss() -> None:
    rnd = random.Random(1)
    ln, out = lane(delay_ms=10.0)
    ln.push(b"a", 0.0, rnd)
    assert ln.flush(0.005) == pytest.approx(0.010) and out.sent == []
    assert ln.flush(0.010) is None and out.sent == [b"a"]

    ln, out = lane(delay_ms=5.0, jitter_ms=4.0)  # jitter never reorders
    for i in range(200):
        ln.push(str(i).encode(), i * 0.0001, rnd)
    releases = [t for t, _ in ln.q]
    assert releases == sorted(releases) and min(releases) >= 0.001
    ln.flush(10.0)
    assert out.sent == [str(i).encode() for i in range(200)]

    ln, out = lane(rate_mbit=1.0)  # 125000 bytes/s: ten 1250-byte frames take 0.1 s
    for _ in range(10):
        ln.push(b"x" * 1250, 0.0, rnd)
    assert ln.q[-1][0] == pytest.approx(0.1)

    ln, out = lane(loss_pct=100.0)
    ln.push(b"x", 0.0, rnd)
    assert not ln.q and ln.lost == 1

    ln, out = lane(delay_ms=1.0)
    for _ in range(fm._QUEUE_FRAMES + 5):
        ln.push(b"x", 0.0, rnd)
    assert len(ln.q) == fm._QUEUE_FRAMES and ln.dropped == 5


# ---------------------------------------------------------------- fallback


def test_loopback_profile_uses_no_namespaces() -> None:
    before = fm.list_fabric_namespaces()
    with Fabric(PROFILES["loopback"]) as fab:
        assert not fab.namespaced and fab.fallback_reason is None
        assert fab.addr("A") == fab.addr("B") == fab.addr("host") == "127.0.0.1"
        assert fab.wrap("A", ["echo", "hi"]) == ["echo", "hi"]
        p = fab.popen("B", [sys.executable, "-c", "print('in B')"], stdout=subprocess.PIPE, text=True)
        assert p.communicate(timeout=30)[0] == "in B\n"
        d = fab.describe()
        assert d["mode"] == "loopback" and d["namespaced"] is False and d["links"] == []
        rtt = measure_rtt(fab, "host", "A", count=3)
        assert rtt["count"] == 3
    assert fm.list_fabric_namespaces() == before
    with pytest.raises(KeyError):
        fab.addr("C")


def test_forced_fallback_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKMIG_FABRIC_FALLBACK", "test")
    with Fabric(PROFILES["metro"]) as fab:
        assert not fab.namespaced
        assert fab.fallback_reason and "BLOCKMIG_FABRIC_FALLBACK=test" in fab.fallback_reason
        assert "NOT shaped" in fab.fallback_reason  # metro asked for delay it does not get
        assert fab.addr("A") == "127.0.0.1" and fab.wrap("A", ["true"]) == ["true"]
        assert fab.describe()["fallback_reason"] == fab.fallback_reason


def test_pyroute2_error_falls_back_and_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    require_namespaces()
    from pyroute2 import netns

    real_create = netns.create
    made: list[str] = []

    def create(name: str, libc: Any = None) -> None:
        if made:  # the first namespace is made, the second fails
            raise OSError(errno.EPERM, "simulated: Operation not permitted")
        real_create(name)
        made.append(name)

    monkeypatch.setattr(netns, "create", create)
    with Fabric(PROFILES["local"]) as fab:
        assert not fab.namespaced
        assert fab.fallback_reason and "simulated" in fab.fallback_reason
        assert fab.addr("B") == "127.0.0.1" and fab.namespace("A") is None
    assert made and gone(made)


def test_no_capabilities_falls_back(tmp_path: Path) -> None:
    """A real unprivileged process (setpriv to nobody, no capabilities) gets the loopback fabric."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop to an unprivileged user")
    code = (
        "import json; from bench.fabric import Fabric, PROFILES\n"
        "with Fabric(PROFILES['metro']) as f: print(json.dumps([f.namespaced, f.fallback_reason]))"
    )
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)},
    )
    if r.returncode != 0 and "Permission denied" in r.stderr:
        pytest.skip(f"nobody cannot run this interpreter: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    namespaced, reason = json.loads(r.stdout.strip().splitlines()[-1])
    assert namespaced is False and "CAP_NET_ADMIN" in reason


# ---------------------------------------------------------------- real namespaces


def test_metro_round_trips_include_the_configured_delay() -> None:
    require_namespaces()
    prof = PROFILES["metro"]
    fab = up(Fabric(prof))
    try:
        names = [n for n in (fab.namespace("A"), fab.namespace("B")) if n]
        assert len(names) == 2 and not (set(names) - set(fm.list_fabric_namespaces()))
        d = fab.describe()
        assert d["namespaced"] and d["shaper"] in ("netem", "wire")
        kinds = {tuple(link["nodes"]): (link["kind"], link["via"]) for link in d["links"]}
        assert kinds == {
            ("host", "A"): ("host", d["shaper"]),
            ("host", "B"): ("host", d["shaper"]),
            ("A", "B"): ("array", d["shaper"]),
        }
        rtt = {
            (a, b): measure_rtt(fab, a, b, count=10) for a, b in [("host", "A"), ("host", "B"), ("A", "B")]
        }
    finally:
        fab.__exit__(None, None, None)
    print("metro RTTs (ms):", {f"{a}->{b}": (r["min_ms"], r["p50_ms"]) for (a, b), r in rtt.items()})
    for (a, b), r in rtt.items():
        lp = prof.array_link if "host" not in (a, b) else prof.host_link
        assert r["min_ms"] >= lp.delay_ms - lp.jitter_ms, (a, b, r)
        assert r["p50_ms"] >= lp.delay_ms, (a, b, r)
        assert r["p50_ms"] < lp.delay_ms + 100, (a, b, r)  # sane, however loaded the machine
    assert gone(names)


def test_removed_after_an_exception_with_processes_still_running() -> None:
    require_namespaces()
    with pytest.raises(RuntimeError, match="boom"):
        with Fabric(PROFILES["metro"]) as fab:
            assert fab.namespaced, fab.fallback_reason
            names = [fab.namespace("A"), fab.namespace("B"), fab._wire_ns]
            ifs = list(fab._root_ifs)
            sleeper = fab.popen("A", ["sleep", "60"])
            # one not started by popen: the teardown finds it in the namespace
            stray = subprocess.Popen(fab.wrap("B", ["sleep", "60"]))
            raise RuntimeError("boom")
    assert sleeper.poll() is not None
    assert stray.wait(10) is not None
    assert gone([n for n in names if n]) and root_ifs_gone(ifs)
    assert fab.wire_stats is not None  # the wire reported its counters on the way out


SCRIPT = """
import json, sys, time
from bench.fabric import Fabric, PROFILES
with Fabric(PROFILES[sys.argv[1]]) as f:
    print(json.dumps({"namespaced": f.namespaced, "reason": f.fallback_reason,
                      "ns": [f.namespace(n) for n in f.nodes if f.namespace(n)] + [f._wire_ns],
                      "ifs": f._root_ifs}), flush=True)
    time.sleep(60)
"""


def start_script(tmp_path: Path, profile: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    p = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, profile],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    line = readline(p, 60)
    assert line, f"fabric script said nothing (exit {p.poll()})"
    info: dict[str, Any] = json.loads(line)
    assert info["namespaced"], info["reason"]
    info["ns"] = [n for n in info["ns"] if n]
    assert not (set(info["ns"]) - set(fm.list_fabric_namespaces()))
    return p, info


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_removed_on_sigterm_and_sigint(tmp_path: Path, sig: signal.Signals) -> None:
    require_namespaces()
    p, info = start_script(tmp_path, "metro")
    p.send_signal(sig)
    rc = p.wait(30)
    assert rc == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGINT)
    assert gone(info["ns"]) and root_ifs_gone(info["ifs"])


STUBBORN = """
import json, signal, subprocess, sys, time
from bench.fabric import Fabric, PROFILES
if sys.argv[1:] == ["own-sigterm"]:  # as bench.suite does: the Fabric keeps out of it
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
with Fabric(PROFILES["metro"]) as f:
    # ignores SIGTERM: the teardown waits for it, then kills it
    p = f.popen("A", ["sh", "-c", "trap '' TERM; echo trapped; sleep 60"], stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"trapped\\n"
    print(json.dumps({"ns": [f.namespace(n) for n in f.nodes if f.namespace(n)] + [f._wire_ns],
                      "ifs": f._root_ifs, "pid": p.pid}), flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_does_not_cut_the_teardown_short(tmp_path: Path, second: signal.Signals) -> None:
    """Ctrl-C, then Ctrl-C again (or a SIGTERM, to a caller with a SIGTERM handler of its
    own, as bench.suite) while the teardown waits for a process: it used to abort the
    teardown, leaving the namespaces and what ran in them."""
    require_namespaces()
    p = subprocess.Popen(
        [sys.executable, "-c", STUBBORN, *(["own-sigterm"] if second == signal.SIGTERM else [])],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    info: dict[str, Any] = {"ns": []}
    try:
        line = readline(p, 60)
        assert line, f"fabric script said nothing (exit {p.poll()})"
        info = json.loads(line)
        info["ns"] = [n for n in info["ns"] if n]
        p.send_signal(signal.SIGINT)
        time.sleep(1.0)  # the teardown gives the stubborn process 3 s after its SIGTERM
        assert p.poll() is None
        p.send_signal(second)
        rc = p.wait(30)
        # the second signal is delivered once the teardown is done
        assert rc in (-signal.SIGINT, 128 + signal.SIGTERM), rc
        assert gone(info["ns"]) and root_ifs_gone(info["ifs"])
        assert not fm._pid_alive(info["pid"]) or fm._is_zombie(info["pid"])
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        fm.sweep_stale()  # what a cut-short teardown left


def test_stale_sweep_after_kill_9(tmp_path: Path) -> None:
    require_namespaces()
    p, info = start_script(tmp_path, "metro")
    wire_ns = next(n for n in info["ns"] if n.endswith(fm.WIRE))
    wire_pids = fm.pids_in_netns(wire_ns)
    assert wire_pids
    p.kill()
    p.wait(10)
    assert not gone(info["ns"])  # nobody cleaned up: that is the sweep's job
    deadline = time.monotonic() + 15
    while any(fm._pid_alive(w) and not fm._is_zombie(w) for w in wire_pids):
        assert time.monotonic() < deadline, "the wire outlived its owner"
        time.sleep(0.1)
    # a live run's namespace is never swept
    mine = f"{fm.NS_PREFIX}{os.getpid()}-9999-X"
    from pyroute2 import netns

    netns.create(mine)
    try:
        removed = fm.sweep_stale()
        assert set(info["ns"]) <= set(removed) and mine not in removed
        assert gone(info["ns"])
        deadline = time.monotonic() + 10  # root-side veths go with their namespaces (asynchronously)
        while not root_ifs_gone(info["ifs"]):
            assert time.monotonic() < deadline, info["ifs"]
            time.sleep(0.1)
    finally:
        netns.remove(mine)


def test_blockmig_in_a_is_reachable_from_host_and_b(tmp_path: Path) -> None:
    require_namespaces()
    from emulator.nbd.client import NbdClient

    img = tmp_path / "disk.img"
    with Fabric(PROFILES["metro"]) as fab:
        assert fab.namespaced, fab.fallback_reason
        srv = fab.popen(
            "A",
            [
                sys.executable,
                "-m",
                "control.cli",
                "serve-file",
                str(img),
                "--size",
                "8M",
                "--export",
                "vol",
                "--listen",
                f"{fab.addr('A')}:0",
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        m = re.search(r"at (nbd://\S+)", readline(srv, 60))
        assert m, f"serve-file did not start (exit {srv.poll()})"
        uri = m.group(1)
        assert fab.addr("A") in uri
        for node in ("host", "B"):
            r = subprocess.run(
                fab.wrap(node, ["nbdinfo", "--json", uri]), capture_output=True, text=True, timeout=60
            )
            assert r.returncode == 0, (node, r.stderr)
            assert json.loads(r.stdout)["exports"][0]["export-size"] == 8 << 20

        async def roundtrip() -> None:  # 4 MiB through the shaped host link, byte for byte
            data = os.urandom(4 << 20)
            async with await NbdClient.connect(uri) as c:
                await c.write(1 << 20, data, fua=True)
                assert await c.read(1 << 20, len(data)) == data

        asyncio.run(asyncio.wait_for(roundtrip(), 60))
    if fab.shaper == "wire":  # B's nbdinfo went over the array link, the host's over a host link
        assert fab.wire_stats and fab.wire_stats["A-B:ab"]["frames"] > 0
        assert fab.wire_stats["host-A:ab"]["bytes"] > 4 << 20


RX = """
import socket, sys
s = socket.create_server((sys.argv[1], 0)); print(s.getsockname()[1], flush=True)
c, _ = s.accept(); n = 0
while n < int(sys.argv[2]):
    n += len(c.recv(1 << 20))
c.sendall(b"k")
"""
TX = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2]))); n = int(sys.argv[3])
t = time.monotonic(); s.sendall(b"x" * n); s.recv(1); print(time.monotonic() - t)
"""


def test_rate_limits_the_array_link_and_nodes_without_host() -> None:
    require_namespaces()
    prof = FabricProfile("t-rate", LinkProfile(), LinkProfile(rate_mbit=40))
    size = 2 << 20  # 0.42 s at 40 Mbit/s
    with Fabric(prof, nodes=("A", "B")) as fab:
        assert fab.namespaced, fab.fallback_reason
        rx = fab.popen(
            "B", [sys.executable, "-c", RX, fab.addr("B"), str(size)], stdout=subprocess.PIPE, text=True
        )
        port = readline(rx).strip()
        out = subprocess.run(
            fab.wrap("A", [sys.executable, "-c", TX, fab.addr("B"), port, str(size)]),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        elapsed = float(out)
    assert elapsed >= 0.8 * size * 8 / 40e6, elapsed


def test_parallel_fabrics_do_not_collide() -> None:
    require_namespaces()
    with Fabric(PROFILES["local"]) as f1, Fabric(PROFILES["local"]) as f2:
        assert f1.namespaced and f2.namespaced, (f1.fallback_reason, f2.fallback_reason)
        assert f1.namespace("A") != f2.namespace("A")
        assert f1.addr("A") != f2.addr("A") and f1.addr("host") != f2.addr("host")
        for f in (f1, f2):
            assert measure_rtt(f, "host", "A", count=2)["count"] == 2
            assert measure_rtt(f, "B", "A", count=2)["count"] == 2


def test_netem_request_is_well_formed() -> None:
    """The kernel netem path: accepted, or refused only because the kernel lacks sch_netem."""
    require_namespaces()
    from pyroute2.netlink.exceptions import NetlinkError

    with Fabric(PROFILES["local"]) as fab:
        assert fab.namespaced, fab.fallback_reason
        lp = LinkProfile(delay_ms=1.0, jitter_ms=0.2, rate_mbit=100, loss_pct=0.5)
        try:
            fab._add_netem("A", "to-B", lp)
        except NetlinkError as e:
            assert e.code in (errno.ENOENT, errno.EOPNOTSUPP), e
            pytest.skip(f"kernel has no sch_netem ({e}); the userspace wire shapes instead")
        finally:
            fab._close_sockets()
        out = subprocess.run(
            ["ip", "-n", str(fab.namespace("A")), "qdisc", "show", "dev", "to-B"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "netem" in out and "delay" in out, out


def test_forced_netem_shaper_needs_the_kernel_module() -> None:
    require_namespaces()
    with Fabric(PROFILES["fc"], shaper="netem") as fab:
        if fab.namespaced:  # the kernel has sch_netem: both ends of every link got a qdisc
            assert fab.shaper == "netem"
            assert {link["via"] for link in fab.describe()["links"]} == {"netem"}
            assert measure_rtt(fab, "A", "B", count=5)["p50_ms"] >= 0.05
        else:
            assert fab.fallback_reason and "netem" in fab.fallback_reason
            assert fab.addr("A") == "127.0.0.1"


def test_rtt_summary_p50_is_the_median() -> None:
    """Of an even count, the mean of the two middle round trips (it was the upper one)."""
    assert rtt_summary([4.0, 1.0, 3.0, 2.0]) == {"min_ms": 1.0, "p50_ms": 2.5, "max_ms": 4.0}
    assert rtt_summary([0.3, 0.1, 0.2])["p50_ms"] == 0.2
