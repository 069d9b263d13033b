"""Integrity of a migrating LUN under host I/O that races the copier.

Real processes and real NBD: two `blockmig array serve` daemons (A the source,
B the target) on 127.0.0.1 port 0, driven by the `blockmig` CLI; host I/O is
our NbdClient over several connections to B's export. A reference model
(numpy bytes + a "defined" mask) is updated ONLY after the array acknowledged
a request; requests in flight never overlap each other (reads included), so
the model is exact at every moment. After a TRIM the content is undefined:
those bytes leave the comparison until something is written there again.

1. concurrent random writes / zeroes / trims / reads / flushes while the
   migration copies (both modes, several seeds): reads equal the model at
   every moment, and after completion every byte of B's LUN does;
2. a hypothesis RuleBasedStateMachine run IN-PROCESS (NbdServer + a
   MemoryBackend as the source, a Migration into a sparse file) that checks
   after every step I1 (the source holds every acknowledged write), I2 (a
   CLEAN region of the target equals the source) and the progress bitmap
   (a region clean on disk is clean in memory), and compares the whole LUN
   when the migration is over;
3. cancel at random moments under a write load: the source is complete and
   correct (I1), B keeps serving it as a remote LUN, writes through B reach A;
4. cutover under a steady 4k write load: no write fails across the swap,
   the data is right, the pause is reported.

Tests marked ``Regression (fixed)`` pin a defect found while writing this file (see
the docstring of each); they fail until the bug is fixed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from control.api_client import ApiError
from emulator.array.file_backend import FileBackend
from emulator.array.lun import LunBackend
from emulator.array.media import MediaBackend
from emulator.array.models import parse_media
from emulator.mirror.migration import FINAL, Migration, MigrationConfig
from emulator.mirror.regions import CLEAN
from emulator.mirror.remote import RemoteBackend
from emulator.nbd.backend import Backend, MemoryBackend
from emulator.nbd.client import NbdClient
from emulator.nbd.server import NbdServer, serve_forever_loop
from tests.backends import finished as run_now
from tests.backends import started as as_started
from tests.servers import ArrayDaemon, array_api, array_daemon

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
KiB = 1 << 10
MiB = 1 << 20
CLI_TIMEOUT = 60.0

SIZE = 32 * MiB  # LUN size of the daemon tests
REGION = 256 * KiB  # 128 regions
PAGE = 4 * KiB


# =========================================================================== helpers
def cli(*args: str, check: bool = True, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """`python -m control.cli ARGS...`; on check, a non-zero exit fails the test with its output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    p = subprocess.run(
        [sys.executable, "-m", "control.cli", *args],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    if check and p.returncode != 0:
        pytest.fail(
            f"blockmig {' '.join(args)} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
        )
    return p


def cli_json(*args: str) -> Any:
    return json.loads(cli(*args, "--json").stdout)


def api_args(d: ArrayDaemon) -> tuple[str, ...]:
    return ("--api", d.api, "--token", d.token)


class Model:
    """What a LUN must read as: the acknowledged bytes; trimmed bytes are undefined."""

    def __init__(self, size: int, region: int) -> None:
        self.size = size
        self.region = region
        self.data = np.zeros(size, np.uint8)
        self.defined = np.ones(size, np.bool_)

    def write(self, off: int, data: bytes | bytearray) -> None:
        self.data[off : off + len(data)] = np.frombuffer(data, np.uint8)
        self.defined[off : off + len(data)] = True

    def zero(self, off: int, n: int) -> None:
        self.data[off : off + n] = 0
        self.defined[off : off + n] = True

    def forget(self, off: int, n: int) -> None:
        self.defined[off : off + n] = False

    def diff(self, off: int, got: bytes | bytearray, what: str = "read") -> str | None:
        """None if ``got`` (read at ``off``) matches every defined byte, else a description."""
        g = np.frombuffer(got, np.uint8)
        exp = self.data[off : off + len(g)]
        bad = np.flatnonzero((g != exp) & self.defined[off : off + len(g)])
        if bad.size == 0:
            return None
        first = off + int(bad[0])
        regions = sorted({int(x) for x in (off + bad) // self.region})
        return (
            f"{what} {off}+{len(g)}: {bad.size} byte(s) differ; first at {first} "
            f"(region {first // self.region}, got {int(g[bad[0]]):#04x}, expected {int(exp[bad[0]]):#04x}); "
            f"regions {regions[:12]}{' ...' if len(regions) > 12 else ''}"
        )


class Busy:
    """Byte ranges with a request in flight; a new request may not overlap one."""

    def __init__(self) -> None:
        self.ranges: set[tuple[int, int]] = set()

    def take(self, off: int, end: int) -> bool:
        if any(off < b and a < end for a, b in self.ranges):
            return False
        self.ranges.add((off, end))
        return True

    def release(self, off: int, end: int) -> None:
        self.ranges.discard((off, end))


def pick_range(rng: random.Random, size: int, max_len: int, region: int) -> tuple[int, int]:
    """A random (offset, length): 4k-aligned, straddling a region boundary, or anything."""
    kind = rng.random()
    if kind < 0.35:
        n = rng.randint(1, max(1, max_len // PAGE)) * PAGE
        off = rng.randrange(0, (size - n) // PAGE + 1) * PAGE
    elif kind < 0.6:
        n = rng.randint(2, max_len)
        boundary = rng.randrange(1, size // region) * region
        off = min(max(0, boundary - rng.randint(1, n - 1)), size - n)
    else:
        n = rng.randint(1, max_len)
        off = rng.randrange(0, size - n + 1)
    return off, n


# =========================================================================== daemon side
@pytest.fixture(scope="module")
def array_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ArrayDaemon, ArrayDaemon]]:
    """Array A (source) and array B (target) for the module, stopped at teardown."""
    tmp = tmp_path_factory.mktemp("arrays")
    with array_daemon(tmp / "A", "A") as a, array_daemon(tmp / "B", "B") as b:
        yield a, b


@pytest.fixture
def arrays(array_pair: tuple[ArrayDaemon, ArrayDaemon]) -> Iterator[tuple[ArrayDaemon, ArrayDaemon]]:
    """The pair, checked alive; each test uses LUNs of its own, all removed afterwards
    (a migration still running is cancelled first) so the next test starts light."""
    a, b = array_pair
    for d in (a, b):
        if d.proc.poll() is not None:
            pytest.fail(f"array {d.name} exited {d.proc.returncode} earlier:\n{d.output()[-3000:]}")
    yield a, b
    api_a, api_b = array_api(a), array_api(b)
    for api in (api_b, api_a):
        try:
            luns = [x["name"] for x in api.list_luns()]
        except ApiError:
            continue
        for name in luns:
            if api is api_b:
                try:
                    st = api.call("GET", f"/api/v1/migrations/{name}")
                    if st["state"] not in FINAL:
                        api.call("POST", f"/api/v1/migrations/{name}/cancel")
                except ApiError:
                    pass
            try:
                api.delete_lun(name, force=True)
            except ApiError:
                pass


async def read_all(uri: str, size: int, chunk: int = 4 * MiB) -> bytearray:
    c = await NbdClient.connect(uri)
    try:
        assert c.size == size, f"{uri} is {c.size} bytes, expected {size}"
        out = bytearray(size)
        view = memoryview(out)
        await asyncio.gather(*(c.read_into(o, view[o : o + chunk]) for o in range(0, size, chunk)))
        return out
    finally:
        await c.close()


def create_source(a: ArrayDaemon, lun: str, rng: random.Random, size: int = SIZE) -> Model:
    """A LUN on A: random data in most regions (some whole, some partly), holes elsewhere."""
    array_api(a).create_lun(lun, size)
    model = Model(size, REGION)
    writes: list[tuple[int, bytes]] = []
    for r in range(size // REGION):
        kind = rng.random()
        if kind < 0.45:
            writes.append((r * REGION, rng.randbytes(REGION)))
        elif kind < 0.65:
            lo = rng.randrange(0, REGION - 1)
            hi = rng.randint(lo + 1, REGION)
            writes.append((r * REGION + lo, rng.randbytes(hi - lo)))
    for off, data in writes:
        model.write(off, data)

    async def fill() -> None:
        c = await NbdClient.connect(a.uri(lun))
        try:
            await asyncio.gather(*(c.write(off, data) for off, data in writes))
            await c.flush()
        finally:
            await c.close()

    asyncio.run(fill())
    return model


def start_migration(
    a: ArrayDaemon, b: ArrayDaemon, lun: str, throttle: float, mode: str = "background"
) -> dict[str, Any]:
    st: dict[str, Any] = cli_json(
        "migration", "start", *api_args(b), "--source", a.uri(lun), "--lun", lun,
        "--throttle", str(throttle), "--region-size", str(REGION), "--mode", mode,
    )  # fmt: skip
    assert st["state"] in ("copying", "converging"), st
    assert st["mode"] == mode and st["region_size"] == REGION, st
    return st


@dataclass
class Workload:
    """Host I/O on several connections, checked against ``model`` as it goes."""

    model: Model
    seed: int
    weights: dict[str, float]
    max_len: dict[str, int]
    busy: Busy = field(default_factory=Busy)
    counts: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    migrating: bool = True  # the last status seen was not final
    writes_while_migrating: int = 0
    writes_after_end: int = 0
    max_write_latency: float = 0.0

    async def worker(self, c: NbdClient, wid: int, stop: asyncio.Event) -> None:
        rng = random.Random(self.seed * 1000 + wid)
        ops, weights = zip(*self.weights.items(), strict=True)
        m, size, region = self.model, self.model.size, self.model.region
        while not stop.is_set():
            op = rng.choices(ops, weights)[0]
            if op == "flush":
                off, n = 0, 0
            elif op == "write4k":  # what a filesystem sends: aligned 4k blocks
                off, n = rng.randrange(0, size // PAGE) * PAGE, PAGE
                if not self.busy.take(off, off + n):
                    await asyncio.sleep(0)
                    continue
            else:
                off, n = pick_range(rng, size, self.max_len[op], region)
                if not self.busy.take(off, off + n):
                    await asyncio.sleep(0)
                    continue
            try:
                t0 = time.perf_counter()
                if op in ("write", "write4k"):
                    data = rng.randbytes(n)
                    await c.write(off, data, fua=rng.random() < 0.2)
                    self.max_write_latency = max(self.max_write_latency, time.perf_counter() - t0)
                    m.write(off, data)
                    if self.migrating:
                        self.writes_while_migrating += 1
                    else:
                        self.writes_after_end += 1
                elif op == "read":
                    got = await c.read(off, n)
                    d = m.diff(off, got, f"conn {wid} read")
                    if d is not None:
                        self.mismatches.append(d)
                elif op == "zero":
                    await c.write_zeroes(off, n, may_trim=rng.random() < 0.5, fua=rng.random() < 0.2)
                    m.zero(off, n)
                elif op == "trim":
                    await c.trim(off, n, fua=rng.random() < 0.2)
                    m.forget(off, n)
                else:
                    await c.flush()
                self.counts[op] += 1
            except Exception as e:
                self.errors.append(f"conn {wid}: {op} {off}+{n}: {e!r}")
                if op not in ("read", "flush"):
                    m.forget(off, n)  # it may or may not have happened
                if len(self.errors) > 20:
                    stop.set()
            finally:
                if op != "flush":
                    self.busy.release(off, off + n)


async def drive(
    b: ArrayDaemon,
    lun: str,
    wl: Workload,
    connections: int,
    *,
    max_seconds: float,
    linger: float,
    load_seconds: float | None = None,
    cancel_after: float | None = None,
) -> dict[str, Any]:
    """Run ``wl`` on ``connections`` connections to B's ``lun`` while following the migration.

    The load stops ``linger`` seconds after the migration reached a final state,
    or after ``load_seconds``; the migration is followed until it ends or
    ``max_seconds`` pass (``timed_out``). With ``cancel_after``, `blockmig
    migration cancel` runs that many seconds in, while the load keeps going.
    Returns what was observed.
    """
    api = array_api(b)
    clients = [await NbdClient.connect(b.uri(lun)) for _ in range(connections)]
    stop = asyncio.Event()
    out: dict[str, Any] = {"states": [], "cancel": None}
    try:
        tasks = [asyncio.ensure_future(wl.worker(c, i, stop)) for i, c in enumerate(clients)]
        t0 = time.monotonic()
        ended_at: float | None = None
        cancel_task: asyncio.Future[Any] | None = None
        while True:
            now = time.monotonic()
            if cancel_after is not None and cancel_task is None and now - t0 >= cancel_after:
                before = await asyncio.to_thread(api.call, "GET", f"/api/v1/migrations/{lun}")
                out["state_before_cancel"] = before["state"]
                cancel_task = asyncio.ensure_future(
                    asyncio.to_thread(cli, "migration", "cancel", *api_args(b), lun, "--json", check=False)
                )
            st = await asyncio.to_thread(api.call, "GET", f"/api/v1/migrations/{lun}")
            if not out["states"] or out["states"][-1] != st["state"]:
                out["states"].append(st["state"])
            if st["mode"] != out.get("mode"):
                out.setdefault("modes", []).append(st["mode"])
                out["mode"] = st["mode"]
            if st["state"] in FINAL:
                wl.migrating = False
                if ended_at is None:
                    ended_at = time.monotonic()
                    out["seconds_to_end"] = ended_at - t0
            if ended_at is not None and time.monotonic() - ended_at >= linger:
                break
            if time.monotonic() - t0 > max_seconds:
                out["timed_out"] = True
                break
            if len(wl.errors) > 20:
                break
            if load_seconds is not None and time.monotonic() - t0 >= load_seconds and not stop.is_set():
                stop.set()
                out["load_stopped_in"] = out["states"][-1]
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*tasks)
        if cancel_task is not None:
            out["cancel"] = await cancel_task
    finally:
        stop.set()
        for c in clients:
            await c.close()
    return out


def check_workload(wl: Workload, b: ArrayDaemon) -> None:
    assert not wl.errors, (
        f"{len(wl.errors)} request(s) failed:\n"
        + "\n".join(wl.errors[:10])
        + ("\n--- array B log ---\n" + b.output()[-3000:])
    )
    assert not wl.mismatches, f"{len(wl.mismatches)} read(s) differ from the model:\n" + "\n".join(
        wl.mismatches[:10]
    )


def wait_completed(b: ArrayDaemon, lun: str, timeout: float = 60.0) -> dict[str, Any]:
    p = cli("migration", "wait", *api_args(b), lun, "--timeout", str(timeout), "--json", check=False)
    assert p.returncode == 0, f"migration wait exited {p.returncode}: {p.stdout}\n{p.stderr}"
    st: dict[str, Any] = json.loads(p.stdout)
    assert st["state"] == "completed", st
    return st


# --------------------------------------------------------------------------- 1
@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["background", "active"])
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_integrity_under_concurrent_writes(
    arrays: tuple[ArrayDaemon, ArrayDaemon], seed: int, mode: str
) -> None:
    """Random I/O on 4 connections races a throttled copy (the load stops after 1.5 s,
    the migration then completes): reads always equal the model, and so does the
    whole LUN after completion. Fails while the first Regression (fixed) below is open
    (active mode, entered on request or by the migration itself)."""
    a, b = arrays
    rng = random.Random(f"integrity-{seed}-{mode}")
    lun = f"vol{seed}{mode[0]}"
    model = create_source(a, lun, rng)
    start_migration(a, b, lun, throttle=24, mode=mode)
    wl = Workload(
        model,
        seed,
        weights={"write": 40, "read": 30, "zero": 12, "trim": 6, "flush": 2},
        max_len={"write": 96 * KiB, "read": 512 * KiB, "zero": 512 * KiB, "trim": 160 * KiB},
    )
    obs = asyncio.run(drive(b, lun, wl, connections=4, max_seconds=30, linger=0.0, load_seconds=1.5))
    print(f"seed {seed} mode {mode}: {dict(wl.counts)} {obs}")
    check_workload(wl, b)
    assert not obs.get("timed_out"), f"the migration did not end within 30 s: {obs}"
    assert wl.writes_while_migrating >= 100, (
        f"only {wl.writes_while_migrating} writes raced the copier: the test proves nothing"
    )
    st = wait_completed(b, lun)
    assert array_api(b).get_lun(lun)["state"] == "ready"
    got = asyncio.run(read_all(b.uri(lun), SIZE))
    d = model.diff(0, got, "B's LUN after the migration")
    assert d is None, f"{d}\nstatus: {st}"


# --------------------------------------------------------------------------- 3
@pytest.mark.timeout(90)
@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_cancel_at_a_random_moment_leaves_the_source_authoritative(
    arrays: tuple[ArrayDaemon, ArrayDaemon], seed: int
) -> None:
    """`blockmig migration cancel` at a random moment under a write load (I1)."""
    a, b = arrays
    rng = random.Random(f"cancel-{seed}")
    delay = [0.0, rng.uniform(0.05, 0.4), rng.uniform(0.4, 1.0), rng.uniform(1.0, 1.8)][seed % 4]
    lun = f"c{seed}"
    model = create_source(a, lun, rng)
    start_migration(a, b, lun, throttle=6, mode=rng.choice(["background", "active"]))
    wl = Workload(
        model,
        seed,
        weights={"write": 50, "read": 25, "zero": 12, "trim": 5, "flush": 3},
        max_len={"write": 96 * KiB, "read": 512 * KiB, "zero": 512 * KiB, "trim": 160 * KiB},
    )
    obs = asyncio.run(drive(b, lun, wl, connections=3, max_seconds=20, linger=0.3, cancel_after=delay))
    print(f"seed {seed}: cancel after {delay:.2f} s: {dict(wl.counts)} {obs}")
    check_workload(wl, b)
    assert "state_before_cancel" in obs, f"the migration ended before the cancel: {obs}"
    assert obs["state_before_cancel"] in ("copying", "converging", "cutover"), (
        f"the migration was already {obs['state_before_cancel']} at the cancel: lower the throttle"
    )
    cancel = obs["cancel"]
    assert cancel is not None and cancel.returncode == 0, cancel
    assert json.loads(cancel.stdout)["state"] == "cancelled"
    assert obs["states"][-1] == "cancelled", obs
    st = cli_json("migration", "status", *api_args(b), lun)
    assert st["state"] == "cancelled", st
    assert cli_json("lun", "show", *api_args(b), lun)["state"] == "remote"

    # I1: the source is complete and correct, byte for byte.
    src = asyncio.run(read_all(a.uri(lun), SIZE))
    d = model.diff(0, src, "source LUN on A after the cancel")
    assert d is None, d
    # B serves the source itself (trimmed bytes included).
    via_b = asyncio.run(read_all(b.uri(lun), SIZE))
    if via_b != src:
        bad = np.flatnonzero(np.frombuffer(via_b, np.uint8) != np.frombuffer(src, np.uint8))
        pytest.fail(f"B's LUN differs from A's in {bad.size} bytes, first at {int(bad[0])}")

    # Writes through B reach A.
    async def write_through() -> list[tuple[int, bytes]]:
        probes = []
        c = await NbdClient.connect(b.uri(lun))
        try:
            for i in range(8):
                off, n = pick_range(rng, SIZE, 64 * KiB, REGION)
                data = rng.randbytes(n)
                await c.write(off, data, fua=i % 2 == 0)
                probes.append((off, data))
            await c.flush()
        finally:
            await c.close()
        return probes

    probes = asyncio.run(write_through())
    after = asyncio.run(read_all(a.uri(lun), SIZE))
    for off, data in probes:
        model.write(off, data)
    d = model.diff(0, after, "A after writes through B")
    assert d is None, d


# --------------------------------------------------------------------------- 4
@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["background", "active"])
def test_cutover_under_a_steady_write_load(arrays: tuple[ArrayDaemon, ArrayDaemon], mode: str) -> None:
    """Aligned 4k writes on 2 connections, nonstop until 1 s after the migration completed (I5)."""
    a, b = arrays
    rng = random.Random(f"cutover-{mode}")
    lun = f"steady-{mode}"
    model = create_source(a, lun, rng)
    start_migration(a, b, lun, throttle=20, mode=mode)
    wl = Workload(model, 4, weights={"write4k": 1}, max_len={"write4k": PAGE})
    obs = asyncio.run(drive(b, lun, wl, connections=2, max_seconds=30, linger=1.0))
    print(
        f"mode {mode}: {wl.writes_while_migrating} writes while migrating, {wl.writes_after_end} after; "
        f"slowest write {wl.max_write_latency * 1e3:.1f} ms; {obs}"
    )
    check_workload(wl, b)
    assert not obs.get("timed_out"), f"no convergence within 30 s under a steady write load: {obs}"
    assert obs["states"][-1] == "completed", obs
    assert wl.writes_while_migrating >= 200 and wl.writes_after_end >= 20, (
        f"the load did not span the cutover: {wl.writes_while_migrating} before, {wl.writes_after_end} after"
    )
    st = wait_completed(b, lun)
    pause = st["cutover_pause_ms"]
    print(f"mode {mode}: cutover_pause_ms={pause} steps={st['cutover_steps']} passes={st['passes']}")
    assert isinstance(pause, int | float) and not isinstance(pause, bool) and pause > 0, st
    got = asyncio.run(read_all(b.uri(lun), SIZE))
    d = model.diff(0, got, "B's LUN after a cutover under load")
    assert d is None, d


# =========================================================================== in-process
class LoopThread:
    """An event loop (uvloop, as in the daemon) running in a background thread."""

    def __init__(self) -> None:
        self.loop = serve_forever_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mirror-test-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass
class InProc:
    lt: LoopThread
    server: NbdServer
    port: int
    tmp: Path
    serial: int = 0


@pytest.fixture(scope="module")
def inproc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProc]:
    lt = LoopThread()
    try:
        server = NbdServer()
        _, port = lt.run(server.listen_tcp("127.0.0.1", 0))
        try:
            yield InProc(lt, server, port, tmp_path_factory.mktemp("inproc"))
        finally:
            lt.run(server.close())
    finally:
        lt.stop()


class LocalMigration:
    """One Migration inside the loop: source = MemoryBackend served by NbdServer, target = sparse file."""

    def __init__(
        self, env: InProc, size: int, config: MigrationConfig, source: Backend | None = None
    ) -> None:
        env.serial += 1
        self.env = env
        self.name = f"m{env.serial}"
        self.size = size
        self.config = config
        self.src: Backend = source if source is not None else MemoryBackend(size)
        self.local = FileBackend(str(env.tmp / f"{self.name}.img"), create_size=size)
        self.lun = LunBackend(self.name, inner=self.local, pool=None, file=None)
        self.m = Migration(
            self.name,
            f"nbd://127.0.0.1:{env.port}/{self.name}",
            self.lun,
            self.local,
            env.tmp / f"{self.name}.progress",
            config,
            on_change=lambda m: None,
        )

    async def start(self, initial: list[tuple[int, bytes]]) -> None:
        for off, data in initial:
            await self.src.write(off, data)
        self.env.server.add_export(self.name, self.src)
        await self.m.start()

    async def snapshot_check(self, model: Model) -> str | None:
        """I1, I2 and the progress bitmap, checked atomically between two steps."""
        m = self.m
        if m.state == "completed" or m.regions is None or m.progress is None:
            return None
        regions, progress = m.regions, m.progress
        src = run_now(self.src.read(0, self.size))
        d = model.diff(0, src, f"I1: source while {m.state}")
        if d is not None:
            return d
        tgt = os.pread(self.local.fd, self.size, 0)  # synchronous: no step can run meanwhile
        rs = regions.region_size
        s = np.frombuffer(src, np.uint8).reshape(-1, rs)
        t = np.frombuffer(tgt, np.uint8).reshape(-1, rs)
        clean = (regions.state == CLEAN) & (regions.inflight == 0)
        differ = clean & (s != t).any(axis=1)
        if differ.any():
            r = int(np.flatnonzero(differ)[0])
            off = int(np.flatnonzero(s[r] != t[r])[0])
            return (
                f"I2: regions {np.flatnonzero(differ).tolist()} are CLEAN but the target differs "
                f"from the source (region {r} byte {off}: target {t[r][off]:#04x} source {s[r][off]:#04x}; "
                f"target_data={bool(regions.target_data[r])}, mode {m.mode}, state {m.state})"
            )
        stale = progress.disk_clean & (regions.state != CLEAN)
        if stale.any():
            return f"I4: regions {np.flatnonzero(stale).tolist()} are clean on disk but not in memory"
        return None

    async def allow_cutover(self, dirty: int) -> None:
        self.config.cutover_dirty = dirty

    async def finish(self, timeout: float) -> str:
        try:
            return await self.m.wait(timeout)
        except TimeoutError:
            return f"still {self.m.state} after {timeout} s"

    async def close(self) -> None:
        m = self.m
        if m.state not in FINAL:
            try:
                await m.cancel()
            except Exception:
                pass
        await m.shutdown()
        if isinstance(m.source, RemoteBackend):  # left open by a cancel: it served the LUN
            await m.source.aclose()
        self.env.server.exports.pop(self.name, None)
        await self.env.server.disconnect_export(self.name)
        self.local.close()


def full_source(rng: random.Random, size: int, region: int) -> tuple[list[tuple[int, bytes]], Model]:
    """Random data in every region, and the model that holds it."""
    initial = [(off, rng.randbytes(region)) for off in range(0, size, region)]
    model = Model(size, region)
    for off, data in initial:
        model.write(off, data)
    return initial, model


def initial_pages(rng: random.Random, size: int, fill: float) -> list[tuple[int, bytes]]:
    """Random data on about ``fill`` of the 4k pages, in runs; the rest are holes."""
    out = []
    pos = 0
    while pos < size:
        n = min(size - pos, rng.randint(1, 24) * PAGE)
        if rng.random() < fill:
            out.append((pos, rng.randbytes(n)))
        pos += n
    return out


HSIZE = 1 * MiB  # LUN of the state machine
HREGION = 64 * KiB  # 16 regions


@st.composite
def byte_range(draw: st.DrawFn, max_len: int) -> tuple[int, int]:
    n = draw(st.integers(1, max_len))
    if draw(st.booleans()):
        n = max(PAGE, n // PAGE * PAGE)
        return draw(st.integers(0, (HSIZE - n) // PAGE)) * PAGE, n
    return draw(st.integers(0, HSIZE - n)), n


class MigratingLunMachine(RuleBasedStateMachine):
    """Host I/O on a LUN whose data a throttled copier is moving underneath."""

    env: InProc  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.h: LocalMigration | None = None
        self.model = Model(HSIZE, HREGION)
        self.steps: list[str] = []  # what ran, for failure messages (timing makes replays flaky)

    def note(self, step: str) -> None:
        self.steps.append(step)

    def fail_msg(self, what: str) -> str:
        h = self.h
        where = f"migration {h.m.state}, mode {h.m.mode}, passes {h.m.passes}" if h else ""
        return f"{what}\n{where}\nlast steps:\n  " + "\n  ".join(self.steps[-25:])

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.env.lt.run(coro, timeout=20)

    @initialize(
        seed=st.integers(0, 2**32 - 1),
        mode=st.sampled_from(["background", "active"]),
        fill=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
        throttle_mbs=st.sampled_from([5, 20, 80]),
    )
    def start(self, seed: int, mode: str, fill: float, throttle_mbs: int) -> None:
        cfg = MigrationConfig(
            region_size=HREGION,
            mode=mode,
            throttle=throttle_mbs * 1e6,
            workers=2,
            checkpoint_interval=0.02,
            hot_window=0.02,
            cutover_dirty=-1,  # no cutover while the steps run; teardown allows it
            retry_window=5.0,
        )
        self.note(f"start(seed={seed}, mode={mode!r}, fill={fill}, throttle_mbs={throttle_mbs})")
        initial = initial_pages(random.Random(seed), HSIZE, fill)
        for off, data in initial:
            self.model.write(off, data)
        self.h = LocalMigration(self.env, HSIZE, cfg)
        self.run(self.h.start(initial))

    @property
    def lun(self) -> LunBackend:
        assert self.h is not None
        return self.h.lun

    @rule(r=byte_range(160 * KiB), fua=st.booleans(), seed=st.integers(0, 2**16), started=st.booleans())
    def write(self, r: tuple[int, int], fua: bool, seed: int, started: bool) -> None:
        """``started``: as the NBD server writes to a remote or migrating LUN, with
        start_write when the LUN takes it (the coroutine when it declines)."""
        off, n = r
        data = random.Random(seed).randbytes(n)
        self.note(f"write({off}, {n}, fua={fua}, started={started})")
        lun = self.lun
        if started:
            self.run(
                as_started(lambda d: lun.start_write(off, data, fua, d), lambda: lun.write(off, data, fua))
            )
        else:
            self.run(lun.write(off, data, fua))
        self.model.write(off, data)

    @rule(r=byte_range(256 * KiB), may_trim=st.booleans(), fua=st.booleans())
    def write_zeroes(self, r: tuple[int, int], may_trim: bool, fua: bool) -> None:
        off, n = r
        self.note(f"write_zeroes({off}, {n}, may_trim={may_trim}, fua={fua})")
        self.run(self.lun.write_zeroes(off, n, may_trim=may_trim, fua=fua))
        self.model.zero(off, n)

    @rule(r=byte_range(256 * KiB))
    def trim(self, r: tuple[int, int]) -> None:
        off, n = r
        self.note(f"trim({off}, {n})")
        self.run(self.lun.trim(off, n))
        self.model.forget(off, n)

    @rule(r=byte_range(512 * KiB), started=st.booleans())
    def read(self, r: tuple[int, int], started: bool) -> None:
        off, n = r
        self.note(f"read({off}, {n}, started={started})")
        lun = self.lun
        if started:
            got = self.run(as_started(lambda d: lun.start_read(off, n, d), lambda: lun.read(off, n)))
        else:
            got = self.run(lun.read(off, n))
        d = self.model.diff(off, got)
        assert d is None, self.fail_msg(d)

    @rule()
    def flush(self) -> None:
        self.note("flush()")
        self.run(self.lun.flush())

    @rule(ms=st.integers(0, 40))
    def let_the_copier_run(self, ms: int) -> None:
        self.note(f"sleep({ms} ms)")
        self.run(asyncio.sleep(ms / 1000))

    @invariant()
    def source_target_and_bitmap_agree(self) -> None:
        if self.h is not None:
            d = self.run(self.h.snapshot_check(self.model))
            assert d is None, self.fail_msg(d)

    def teardown(self) -> None:
        h = self.h
        if h is None:
            return
        try:
            self.run(h.allow_cutover(2 * HREGION))
            state = self.run(h.finish(10.0))
            assert state == "completed", self.fail_msg(f"migration ended {state}: {h.m.status()}")
            got = self.run(h.lun.read(0, HSIZE))
            d = self.model.diff(0, got, "whole LUN after the migration")
            assert d is None, self.fail_msg(d)
            assert h.lun.inner is h.local, "the LUN did not switch to its local copy"
        finally:
            self.run(h.close())


@pytest.mark.timeout(120)
def test_state_machine_io_racing_the_copier(inproc: InProc) -> None:
    """Reads, writes, zeroes, trims and flushes racing the copier, checked against a model (I1-I4)."""
    MigratingLunMachine.env = inproc
    run_state_machine_as_test(
        MigratingLunMachine,
        settings=settings(
            max_examples=30,
            stateful_step_count=40,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        ),
    )


# --------------------------------------------------------------------------- pinned bugs
async def _until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


@pytest.mark.timeout(60)
def test_regression_active_write_then_zeroes_of_a_dirty_region_are_lost(inproc: InProc) -> None:
    """Regression (fixed) (I2/I3): zeroes written over data that active mode put on the target are lost.

    In active mode a write to a CLEAN region goes to both sides
    (MigratingBackend._write_both, emulator/mirror/migrating.py) but never sets
    ``regions.target_data[r]``. A region that was copied as all-zero has
    ``target_data`` False, so once it is dirty again and the source reads as
    zero there, Copier.copy_region (emulator/mirror/copier.py, the
    ``if zero: if regions.target_data[r]`` branch) skips zeroing the target and
    marks the region CLEAN over the stale data. Reads are then served from the
    target: the host reads back data it had overwritten with zeroes (and after
    cutover the LUN keeps it for good).
    """
    size = 1 * MiB
    cfg = MigrationConfig(
        region_size=HREGION, mode="active", workers=2, cutover_dirty=-1,  # never cut over
        checkpoint_interval=0.02, hot_window=0.02,
    )  # fmt: skip
    h = LocalMigration(inproc, size, cfg)
    lt = inproc.lt
    data = random.Random(7).randbytes(8 * KiB)

    async def scenario() -> tuple[bytes, bytes, bytes]:
        m = h.m
        await h.start([])  # the source is all holes
        assert m.regions is not None
        regions = m.regions
        await _until(lambda: regions.dirty_count() == 0)  # copied as zero: target_data False
        await h.lun.write(0, data)  # region 0 is CLEAN: active mode writes both sides
        assert regions.state[0] == CLEAN
        m.pause()
        await asyncio.sleep(0.05)
        await h.lun.trim(32 * KiB, 4 * KiB)  # region 0 is dirty now
        await h.lun.write_zeroes(0, len(data))  # on the source only (region 0 is dirty)
        m.resume()
        await _until(lambda: regions.dirty_count() == 0)
        got = bytes(await h.lun.read(0, len(data)))
        src = bytes(await h.src.read(0, HREGION))
        tgt = bytes(await h.local.read(0, HREGION))
        return got, src, tgt

    try:
        got, src, tgt = lt.run(scenario())
    finally:
        lt.run(h.close())
    assert src[: len(data)] == bytes(len(data)), "the source did not get the zeroes"
    assert tgt == src, "I2: region 0 is CLEAN but the target still holds the data written before the zeroes"
    assert got == bytes(len(data)), "the host reads back data it had overwritten with zeroes"


@pytest.mark.timeout(60)
def test_regression_copier_trusts_an_allocation_map_read_while_a_write_was_in_flight(
    inproc: InProc,
) -> None:
    """Regression (fixed) (I2/I3): a write that was in flight when the copier read the source's
    allocation map is lost; the region is marked CLEAN over zeroes.

    Copier._runs (emulator/mirror/copier.py) caches BLOCK_STATUS for a whole
    window and snapshots ``regions.gen`` of the window just before asking; the
    cache is trusted later for any region whose generation did not change since.
    A host write bumps the generation in ``begin_write`` BEFORE it reaches the
    source, so a write still in flight at that moment (waiting on the source's
    media, here 100 ms, or on ProgressFile.ensure_dirty's fsync) has its new
    generation in the snapshot while the map still shows the old hole. When
    the write completes, copy_region of that region takes the stale "zero"
    run, skips it (``target_data`` is False on a fresh target) and marks the
    region CLEAN; reads then come from the target and return zeroes instead of
    the acknowledged data (and the migration completes that way).
    Expected: a map read while a write to a region was in flight (inflight > 0
    at the snapshot) must not be trusted for that region.
    """
    size = 1 * MiB
    cfg = MigrationConfig(region_size=HREGION, mode="background", workers=2, cutover_dirty=-1)
    source = MediaBackend(MemoryBackend(size), parse_media("fixed:100"))  # writes take 100 ms
    h = LocalMigration(inproc, size, cfg, source=source)
    data = random.Random(8).randbytes(16 * KiB)
    target_off = 5 * HREGION

    async def scenario() -> tuple[bytes, bytes, bytes, int]:
        m = h.m
        await h.start([])  # all holes: the first pass makes every region CLEAN at once
        assert m.regions is not None
        regions = m.regions
        await _until(lambda: regions.dirty_count() == 0)
        m.pause()
        await asyncio.sleep(0.05)
        await h.lun.trim(0, PAGE)  # region 0 changes: its next copy re-reads the map
        w = asyncio.ensure_future(h.lun.write(target_off, data))  # in flight for 100 ms
        await asyncio.sleep(0.01)
        assert regions.inflight[5] == 1
        m.resume()  # the copier re-reads the map (region 5 still a hole) while w is in flight
        await w
        await _until(lambda: regions.dirty_count() == 0)
        got = bytes(await h.lun.read(target_off, len(data)))
        src = bytes(await source.read(target_off, len(data)))
        tgt = bytes(await h.local.read(target_off, len(data)))
        return got, src, tgt, int(regions.state[5])

    try:
        got, src, tgt, state5 = inproc.lt.run(scenario())
    finally:
        inproc.lt.run(h.close())
    assert src == data, "the source did not get the write"
    assert state5 == CLEAN
    assert tgt == data, "I2: region 5 is CLEAN but the target holds zeroes where the source has the write"
    assert got == data, "the host reads zeroes instead of data whose write was acknowledged"


@pytest.mark.timeout(60)
def test_regression_active_mode_starves_under_light_writes_when_throttled(inproc: InProc) -> None:
    """Regression (fixed) (I5): a throttled active-mode migration never converges under a light write load.

    Copier.copy_region (emulator/mirror/copier.py) snapshots the region's
    generation and marks it COPYING, THEN waits for throttle tokens
    (``await self.throttle.take(ln)``) and reads; a host write to the region
    during that wait voids the copy. The wait is region_size / throttle (here
    1 MiB at 8 MB/s = 131 ms), so a region written more often than that never
    becomes clean, although the writes total 1/12 of the copy rate and active
    mode is documented to "converge under any write rate" (migrating.py). Every
    discarded copy also spends throttle budget. Expected: the migration
    completes within a few seconds (throttle tokens taken before the race
    window opens, i.e. before the generation snapshot); actual: every region
    stays dirty until the writes stop.
    """
    size = 8 * MiB
    region = 1 * MiB
    cfg = MigrationConfig(
        region_size=region, mode="active", throttle=8e6, workers=1, cutover_dirty=region,
    )  # fmt: skip
    h = LocalMigration(inproc, size, cfg)
    rng = random.Random(9)
    initial, model = full_source(rng, size, region)

    async def scenario() -> tuple[str, dict[str, Any], int]:
        m = h.m
        stop = asyncio.Event()
        writes = 0

        async def writer() -> None:  # one 4k write per region every 50 ms: 640 KB/s in all
            nonlocal writes
            while not stop.is_set():
                for r in range(size // region):
                    off = r * region + rng.randrange(region // PAGE) * PAGE
                    data = rng.randbytes(PAGE)
                    await h.lun.write(off, data)
                    model.write(off, data)
                    writes += 1
                    await asyncio.sleep(0.05 / (size // region))

        await h.start(initial)
        w = asyncio.ensure_future(writer())
        try:
            state = await m.wait(6.0)
        except TimeoutError:
            state = m.state
        stop.set()
        await w
        st = m.status()
        if state not in FINAL:
            state = f"still {state} after 6 s"
            await m.wait(20.0)  # once the writes stop it does complete
        return state, st, writes

    try:
        state, st, writes = inproc.lt.run(scenario(), timeout=40)
        got = inproc.lt.run(h.lun.read(0, size))
    finally:
        inproc.lt.run(h.close())
    d = model.diff(0, got, "LUN after the migration")
    assert d is None, d
    assert state == "completed", (
        f"{state} under {writes} 4k writes: {st['dirty_bytes']} of {size} bytes dirty after "
        f"{st['passes']} passes, copy rate {st['copy_rate']} B/s for a throttle of 8e6"
    )


def test_background_goes_active_within_its_first_pass_when_writes_undo_the_copy(inproc: InProc) -> None:
    """A throttled pass over a LUN takes long; writes to regions it already copied
    make them dirty again (1 MiB of copying for a 4k write). The migration must not
    wait for two whole passes to notice: once writes undo the copy at half its rate
    it goes active, says why, and still ends with every byte right."""
    size, region = 32 * MiB, 1 * MiB
    cfg = MigrationConfig(region_size=region, mode="background", throttle=4e6, workers=1)
    h = LocalMigration(inproc, size, cfg)
    rng = random.Random(11)
    initial, model = full_source(rng, size, region)

    async def scenario() -> tuple[str, int, str]:
        m = h.m
        await h.start(initial)
        deadline = time.monotonic() + 20
        while m.mode == "background" and time.monotonic() < deadline:
            assert m.regions is not None
            copied = np.flatnonzero(m.regions.state == CLEAN)
            if len(copied):
                off = int(rng.choice(copied)) * region + rng.randrange(region // PAGE) * PAGE
                data = rng.randbytes(PAGE)
                await h.lun.write(off, data)
                model.write(off, data)
            await asyncio.sleep(0.02)
        passes_at_switch = m.passes
        return m.mode_reason, passes_at_switch, await h.finish(30)

    try:
        reason, passes, state = inproc.lt.run(scenario(), timeout=60)
        got = inproc.lt.run(h.lun.read(0, size))
    finally:
        inproc.lt.run(h.close())
    assert "half the copy rate" in reason, f"never went active (or for another reason): {reason!r}"
    assert passes < 1, f"went active only after {passes} passes"
    assert state == "completed", state
    d = model.diff(0, got, "LUN after the migration")
    assert d is None, d


@pytest.mark.parametrize("path", ["write", "start_write"])
def test_regression_a_write_behind_one_that_clears_a_clean_bit_waits_until_that_is_durable(
    tmp_path: Path, path: str
) -> None:
    """Regression (fixed) (I4): a write to a region clean on disk waits until its bit is cleared
    durably (ProgressFile.ensure_dirty). The bit was cleared in memory at once, before the
    commit was written, so a second write to the region (another host, or the next request)
    found it not clean on disk, went straight to the source and was acknowledged while
    the file still said clean: a crash then (kill -9 before the commit's pwrite, a power cut
    before its fsync) resumed with the region clean, its local bytes older than that write."""
    from emulator.mirror.migrating import MigratingBackend
    from emulator.mirror.regions import HEADER_SIZE, ProgressFile, RegionMap

    syncing = threading.Event()
    release = threading.Event()
    durable: list[bool] = []  # region 0's bit in the file, at each fsync

    def fsync(fd: int) -> None:
        if durable:  # the first (setting the bit) goes through
            syncing.set()
            release.wait(10)
        durable.append(bool(os.pread(fd, 1, HEADER_SIZE)[0] & 0x80))

    async def main() -> list[bool]:
        regions = RegionMap(4 * HREGION, HREGION)
        progress = ProgressFile(tmp_path / "progress", regions, {}, fsync=fsync)
        progress.create()
        source, target = MemoryBackend(regions.size), MemoryBackend(regions.size)
        mb = MigratingBackend(source, target, regions, progress)
        regions.state[0] = CLEAN
        progress.disk_clean[0] = True
        await progress.commit()  # region 0 is clean on disk
        first = asyncio.ensure_future(mb.write(0, b"1" * PAGE))
        await _until(syncing.is_set)  # its commit waits in fsync
        at_ack: list[bool] = []
        second: asyncio.Future[Any]
        if path == "write":
            second = asyncio.ensure_future(mb.write(PAGE, b"2" * PAGE))
            second.add_done_callback(lambda _: at_ack.append(durable[-1]))
        else:
            second = asyncio.get_running_loop().create_future()

            def done(result: Any, error: Exception | None) -> None:
                at_ack.append(durable[-1])
                second.set_result(None)

            if not mb.start_write(PAGE, b"2" * PAGE, False, done):
                second = asyncio.ensure_future(mb.write(PAGE, b"2" * PAGE))
                second.add_done_callback(lambda _: at_ack.append(durable[-1]))
        for _ in range(20):  # a MemoryBackend source answers within a loop turn or two
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, second)
        await progress.close()
        return at_ack

    try:
        at_ack = asyncio.run(main())
    finally:
        release.set()
    assert at_ack == [False], f"a write was acknowledged while region 0 was clean on disk: {at_ack}"


def test_regression_a_progress_file_that_cannot_be_written_fails_the_migration_not_hangs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (fixed) (I7): a commit of the progress file that failed (EIO, a full or
    read-only data dir) killed the committer and never woke its waiters: a host write to
    a region clean on disk hung for good (ensure_dirty), and so did the migration at its
    next checkpoint, its state still "copying". The waiters get the error now: the
    write fails with EIO, the migration fails and its LUN serves the source directly."""
    from emulator.mirror.regions import ProgressFile
    from emulator.nbd.errors import BackendError
    from tests.backends import local_migration

    async def main() -> None:
        size = 4 * HREGION
        source, target = MemoryBackend(size), MemoryBackend(size)
        await source.write(0, b"s" * size)
        cfg = MigrationConfig(region_size=HREGION, throttle=0.2e6, checkpoint_interval=0.01, hot_window=0)
        m = local_migration(source, target, tmp_path, cfg)
        await m.start()
        mb, regions, progress = m.backend, m.regions, m.progress
        assert mb is not None and regions is not None and progress is not None
        await asyncio.wait_for(_until(lambda: progress.disk_clean[0]), 10)  # clean on disk

        def broken(self: ProgressFile, data: bytes) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(ProgressFile, "_write", broken)
        with pytest.raises(BackendError):
            await asyncio.wait_for(mb.write(0, b"h" * PAGE), 10)
        assert await asyncio.wait_for(m.wait(), 10) == "failed"
        assert "progress" in m.last_error, m.last_error
        await source.write(0, b"h" * PAGE)  # what the host writes from now on reaches the source
        assert await mb.read(0, PAGE) == b"h" * PAGE

    asyncio.run(main())
