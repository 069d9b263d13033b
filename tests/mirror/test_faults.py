"""Fault injection on live migrations between two real array daemons.

Every array is a real `blockmig array serve` process (tests.servers.array_daemon)
on 127.0.0.1 port 0; the fabric between them is, where asked, a real nbdkit
(nbd plugin + delay/error/pause filters). Migrations are started with the
`blockmig migration start` CLI and followed through the array's API. Host I/O
is our NbdClient on B's export. A reference model holds what the LUN must
contain: it changes ONLY when a write was acknowledged; a write that failed or
was cut off by a crash may or may not have landed, so both contents are then
accepted for its block (and nothing else).

1. kill -9 of the TARGET array mid-copy (several seeds and points) under a
   light write load, restart on the same data dir: the migration resumes by
   itself, the data is the model's, and the re-copied part is small when the
   kill came late (I4); kill -9 right after completion: the LUN is ready and
   whole after the restart;
2. the SOURCE goes away: SIGSTOP for ~2 s (I/O waits, nothing lost), kill -9
   and restart on the same port (the migration reconnects), and with
   ``--source-retry-window 1`` reads of not-yet-copied regions fail with EIO
   within about the window while clean regions are still read locally (I6);
3. a faulty fabric (nbdkit nbd plugin with error, delay and pause filters)
   between the arrays: the copy completes with A's data, every acknowledged
   write is on A (I1, I6: nothing marked clean on a failed copy);
4. a full target pool: the migration fails clearly and the LUN keeps serving
   the source as a remote LUN (I7).

Tests marked ``Regression (fixed)`` pin a defect found while writing this file (see the
docstring of each); they fail until the bug is fixed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emulator.nbd.client import NbdClient
from emulator.nbd.errors import DisconnectedError, NbdError, RequestError
from tests.servers import ArrayDaemon, array_api, array_daemon, stop

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token"
MiB = 1 << 20
BLOCK = 4096
EIO = 5
LUN = "vol"
RUNNING = ("copying", "converging", "cutover")
FINAL = ("completed", "failed", "cancelled")
CLI_TIMEOUT = 30.0


# --------------------------------------------------------------------------- helpers
def cli(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "control.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def start_migration(b: ArrayDaemon, source: str, *extra: str) -> dict[str, Any]:
    """`blockmig migration start` on B; the JSON status it prints."""
    r = cli(
        "migration",
        "start",
        "--api",
        b.api,
        "--token",
        TOKEN,
        "--source",
        source,
        "--lun",
        LUN,
        "--json",
        *extra,
    )
    assert r.returncode == 0, f"migration start failed ({r.returncode}): {r.stdout}\n{r.stderr}"
    st: dict[str, Any] = json.loads(r.stdout)
    return st


def cli_status(b: ArrayDaemon) -> dict[str, Any]:
    r = cli("migration", "status", "--api", b.api, "--token", TOKEN, LUN, "--json")
    assert r.returncode == 0, f"migration status failed: {r.stdout}\n{r.stderr}"
    st: dict[str, Any] = json.loads(r.stdout)
    return st


api = partial(array_api, timeout=20)


async def status(d: ArrayDaemon) -> dict[str, Any]:
    st: dict[str, Any] = await asyncio.to_thread(api(d).call, "GET", f"/api/v1/migrations/{LUN}")
    return st


def clean_fraction(st: dict[str, Any]) -> float:
    total, dirty = int(st["total_bytes"]), int(st["dirty_bytes"])
    return (total - dirty) / total


def brief(st: dict[str, Any]) -> str:
    keys = (
        "state",
        "mode",
        "dirty_bytes",
        "copied_bytes",
        "passes",
        "source_connected",
        "recopied_regions_on_resume",
        "last_error",
    )
    return json.dumps({k: st.get(k) for k in keys})


async def poll(
    d: ArrayDaemon,
    pred: Callable[[dict[str, Any]], bool],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> dict[str, Any]:
    """Poll the migration status of B until ``pred`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        st = await status(d)
        if pred(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s; last status {brief(st)}")
        await asyncio.sleep(interval)


async def wait_final(d: ArrayDaemon, timeout: float) -> dict[str, Any]:
    return await poll(d, lambda s: s["state"] in FINAL, timeout, "migration end", 0.1)


def run(coro: Awaitable[None], timeout: float) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, timeout)

    asyncio.run(bounded())


async def write_all(uri: str, data: bytes | bytearray | memoryview, chunk: int = 8 * MiB) -> None:
    async with await NbdClient.connect(uri) as c:
        view = memoryview(data)
        await asyncio.gather(*(c.write(o, view[o : o + chunk]) for o in range(0, len(data), chunk)))
        await c.flush()


async def read_all(uri: str, size: int, chunk: int = 8 * MiB) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    async with await NbdClient.connect(uri) as c:
        assert c.size == size, f"{uri} is {c.size} bytes, expected {size}"
        await asyncio.gather(*(c.read_into(o, view[o : o + chunk]) for o in range(0, size, chunk)))
    return buf


def sigcont(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)


class Model:
    """What a LUN must hold: ``base`` (acknowledged writes) plus, per 4 KiB block,
    the contents of writes whose outcome is unknown (failed or cut off)."""

    def __init__(self, data: bytes | bytearray) -> None:
        assert len(data) % BLOCK == 0
        self.base = bytearray(data)
        self.maybe: dict[int, list[bytes]] = {}

    @property
    def size(self) -> int:
        return len(self.base)

    def unsure(self, off: int, data: bytes) -> None:
        self.maybe.setdefault(off // BLOCK, []).append(bytes(data))

    def ack(self, off: int, data: bytes) -> None:
        self.base[off : off + len(data)] = data
        for blk in range(off // BLOCK, (off + len(data)) // BLOCK):
            self.maybe.pop(blk, None)

    def accepts(self, off: int, data: bytes | bytearray) -> bool:
        for i in range(0, len(data), BLOCK):
            got = bytes(data[i : i + BLOCK])
            blk = (off + i) // BLOCK
            if got != self.base[off + i : off + i + BLOCK] and got not in self.maybe.get(blk, ()):
                return False
        return True

    def bad_blocks(self, actual: bytes | bytearray) -> list[int]:
        """Offsets of the blocks of ``actual`` (the whole LUN) that no model content explains."""
        assert len(actual) == self.size
        exp = np.frombuffer(self.base, np.uint8).reshape(-1, BLOCK)
        got = np.frombuffer(actual, np.uint8).reshape(-1, BLOCK)
        bad = np.flatnonzero((exp != got).any(axis=1)).tolist()
        return [b * BLOCK for b in bad if bytes(got[b]) not in self.maybe.get(b, ())]

    def check(self, actual: bytes | bytearray, where: str) -> None:
        bad = self.bad_blocks(actual)
        assert not bad, (
            f"{where}: {len(bad)} block(s) of 4 KiB hold neither an acknowledged write nor the data "
            f"before it; first offsets {[hex(o) for o in bad[:8]]}"
        )


@dataclass
class Load:
    """A light host load on one connection: one request at a time, writes update the model
    only once acknowledged, reads are checked against the model."""

    model: Model
    rng: random.Random
    interval: float = 0.1
    read_share: float = 0.3
    hot_bytes: int = 2 * MiB  # half the requests go to this hot area at the start of the LUN
    span: tuple[int, int] | None = None  # else the whole LUN
    acked: int = 0
    write_errors: Counter[int] = field(default_factory=Counter)
    reads_ok: int = 0
    read_errors: Counter[int] = field(default_factory=Counter)
    bad_reads: list[str] = field(default_factory=list)
    disconnects: int = 0
    max_latency: float = 0.0

    def _offset(self) -> int:
        lo, hi = self.span or (0, self.model.size)
        if self.rng.random() < 0.5:
            hi = min(hi, lo + self.hot_bytes)
        return self.rng.randrange(lo // BLOCK, hi // BLOCK) * BLOCK

    async def run(self, uri: str, stop: asyncio.Event) -> None:
        c = await NbdClient.connect(uri)
        try:
            while not stop.is_set():
                off = self._offset()
                t0 = time.monotonic()
                if self.rng.random() < self.read_share:
                    try:
                        got = await c.read(off, BLOCK)
                    except RequestError as e:
                        self.read_errors[e.error] += 1
                    else:
                        self.reads_ok += 1
                        if not self.model.accepts(off, got):
                            self.bad_reads.append(f"read at {off:#x} returned data the model never held")
                else:
                    data = self.rng.randbytes(BLOCK)
                    self.model.unsure(off, data)  # in flight: it may land or not
                    try:
                        await c.write(off, data)
                    except RequestError as e:
                        self.write_errors[e.error] += 1
                    else:
                        self.model.ack(off, data)
                        self.acked += 1
                self.max_latency = max(self.max_latency, time.monotonic() - t0)
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        except DisconnectedError:
            self.disconnects += 1  # the array died: the request in flight stays "unsure"
        finally:
            with suppress(NbdError, OSError):
                await c.close()

    def summary(self) -> str:
        return (
            f"acked writes {self.acked}, failed writes {dict(self.write_errors)}, reads ok "
            f"{self.reads_ok}, failed reads {dict(self.read_errors)}, disconnects {self.disconnects}, "
            f"max latency {self.max_latency:.2f} s"
        )


class Running:
    """A Load running as a task until stopped."""

    def __init__(self, load: Load, uri: str) -> None:
        self.load = load
        self.stop_event = asyncio.Event()
        self.task = asyncio.ensure_future(load.run(uri, self.stop_event))

    async def stop(self) -> Load:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 60)
        assert not self.load.bad_reads, self.load.bad_reads[:5]
        return self.load


def make_data(seed: int, size: int, data_bytes: int | None = None) -> bytes:
    """``data_bytes`` of seeded random data, the rest zeroes."""
    n = size if data_bytes is None else data_bytes
    return np.random.default_rng(seed).bytes(n) + bytes(size - n)


async def new_source(a: ArrayDaemon, data: bytes, data_bytes: int | None = None) -> Model:
    """LUN ``vol`` on A holding ``data`` (only its first ``data_bytes`` are written: holes after)."""
    await asyncio.to_thread(api(a).create_lun, LUN, len(data))
    await write_all(a.uri(LUN), memoryview(data)[:data_bytes])
    return Model(data)


@contextmanager
def two_arrays(tmp_path: Path, *b_args: str) -> Iterator[tuple[ExitStack, ArrayDaemon, ArrayDaemon]]:
    with ExitStack() as stack:
        a = stack.enter_context(array_daemon(tmp_path / "a", "A"))
        b = stack.enter_context(array_daemon(tmp_path / "b", "B", *b_args))
        yield stack, a, b


async def restart(stack: ExitStack, data_dir: Path, name: str, *args: str) -> ArrayDaemon:
    d: ArrayDaemon = await asyncio.to_thread(stack.enter_context, array_daemon(data_dir, name, *args))
    return d


# --------------------------------------------------------------------------- 1. kill -9 the target
KILL_POINTS = [  # (seed, kill when this fraction of the LUN is clean: low, high)
    (1, 0.25, 0.45),
    (2, 0.72, 0.92),
    (3, 0.72, 0.92),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed,lo,hi", KILL_POINTS, ids=[f"seed{s}-{lo}-{hi}" for s, lo, hi in KILL_POINTS])
def test_kill_9_of_the_target_mid_copy_resumes_and_recopies_little(
    tmp_path: Path, seed: int, lo: float, hi: float
) -> None:
    size, throttle = 64 * MiB, 8  # MB/s: the first pass takes ~8 s
    rng = random.Random(seed)
    at = rng.uniform(lo, hi)
    with two_arrays(tmp_path) as (stack, a, b):

        async def body() -> None:
            model = await new_source(a, make_data(seed, size))
            t0 = time.monotonic()
            await asyncio.to_thread(start_migration, b, a.uri(LUN), "--throttle", str(throttle))
            load = Load(model, rng, interval=0.2)
            run1 = Running(load, b.uri(LUN))
            before = await poll(
                b,
                lambda s: clean_fraction(s) >= at or s["state"] not in RUNNING,
                30,
                f"{at:.0%} of the LUN clean",
            )
            assert before["state"] in RUNNING, f"the migration ended before the kill: {brief(before)}"
            b.sigkill()
            t_kill = time.monotonic() - t0
            await run1.stop()
            assert load.disconnects <= 1, load.summary()

            b2 = await restart(stack, b.data_dir, "B")
            after = await status(b2)
            assert after["state"] in (*RUNNING, "completed"), f"not resumed: {brief(after)}"
            lun = await asyncio.to_thread(api(b2).get_lun, LUN)
            assert lun["state"] in ("migrating", "ready"), lun
            recopied = after["recopied_regions_on_resume"] * after["region_size"]
            run2 = Running(load, b2.uri(LUN))
            done = await wait_final(b2, 40)
            await run2.stop()
            assert done["state"] == "completed", brief(done)
            lun = await asyncio.to_thread(api(b2).get_lun, LUN)
            assert lun["state"] == "ready", lun
            model.check(await read_all(b2.uri(LUN), size), "B after the resumed migration")
            # The source is still there (the manager removes it later): it holds the same bytes
            # as long as no write came after the cutover, so only the model is compared above.

            print(
                f"\n[kill-target seed={seed}] killed at {t_kill:.1f} s with "
                f"{clean_fraction(before):.1%} of {size >> 20} MiB clean in memory; re-copied on "
                f"resume {after['recopied_regions_on_resume']} regions = {recopied >> 20} MiB = "
                f"{recopied / size:.1%} of the LUN; dirty in memory at the kill "
                f"{before['dirty_bytes'] >> 20} MiB; total {time.monotonic() - t0:.1f} s; {load.summary()}"
            )
            # Nothing believed clean that was not clean before the crash (a few regions of slack:
            # the copy went on for up to one poll interval after the last status).
            slack = 4 * after["region_size"]
            assert recopied >= before["dirty_bytes"] - slack, (
                f"the resume believes {size - recopied} bytes clean, but only "
                f"{size - before['dirty_bytes']} were clean in memory just before the kill"
            )
            assert recopied < size, "the resume re-copies the whole LUN (I4: only a bounded part)"
            if clean_fraction(before) >= 0.7:
                assert recopied < size // 2, (
                    f"killed with {clean_fraction(before):.0%} clean, the resume re-copies "
                    f"{recopied / size:.0%} of the LUN"
                )

        run(body(), 100)


@pytest.mark.timeout(60)
def test_kill_9_of_the_target_right_after_completion(tmp_path: Path) -> None:
    size = 32 * MiB
    rng = random.Random(7)
    with two_arrays(tmp_path) as (stack, a, b):

        async def body() -> None:
            model = await new_source(a, make_data(7, size))
            await asyncio.to_thread(start_migration, b, a.uri(LUN))
            load = Load(model, rng, interval=0.02)
            run1 = Running(load, b.uri(LUN))
            done = await poll(b, lambda s: s["state"] in FINAL, 30, "completion", interval=0.01)
            assert done["state"] == "completed", brief(done)
            # A few writes acknowledged after the cutover (on B's local copy only), then the crash.
            await asyncio.sleep(0.2)
            b.sigkill()
            await run1.stop()
            assert load.acked > 0, load.summary()

            b2 = await restart(stack, b.data_dir, "B")
            lun = await asyncio.to_thread(api(b2).get_lun, LUN)
            assert lun["state"] == "ready", lun
            st = await asyncio.to_thread(cli_status, b2)
            assert st["state"] == "completed", brief(st)
            model.check(await read_all(b2.uri(LUN), size), "B restarted after completion")
            # And it is writable as a plain local LUN.
            run2 = Running(load, b2.uri(LUN))
            await asyncio.sleep(0.5)
            await run2.stop()
            assert not load.write_errors, load.summary()
            model.check(await read_all(b2.uri(LUN), size), "B after more writes")
            print(f"\n[kill-after-completion] {load.summary()}")

        run(body(), 50)


# --------------------------------------------------------------------------- 2. the source goes away
@pytest.mark.timeout(60)
def test_sigstop_of_the_source_for_2s_loses_nothing_and_completes(tmp_path: Path) -> None:
    size = 32 * MiB
    rng = random.Random(11)
    with two_arrays(tmp_path) as (stack, a, b):
        stack.callback(sigcont, a.proc)  # runs before the daemons are stopped

        async def body() -> None:
            model = await new_source(a, make_data(11, size))
            await asyncio.to_thread(start_migration, b, a.uri(LUN), "--throttle", "8")
            # The load stays in the second half, so the first regions stay clean once copied.
            load = Load(model, rng, interval=0.05, span=(size // 2, size))
            run1 = Running(load, b.uri(LUN))
            await poll(b, lambda s: clean_fraction(s) >= 0.3, 20, "30% clean")
            async with await NbdClient.connect(b.uri(LUN)) as h:
                a.proc.send_signal(signal.SIGSTOP)
                t_stop = time.monotonic()
                try:
                    # The last region is not copied yet: its read needs the source and must wait.
                    far = asyncio.ensure_future(h.read(size - BLOCK, BLOCK))
                    near_t = time.monotonic()
                    near = await asyncio.wait_for(h.read(2 * MiB, BLOCK), 5)  # clean: read locally
                    near_s = time.monotonic() - near_t
                    await asyncio.sleep(2.0)
                    assert not far.done(), "a read that needs a stopped source returned"
                finally:
                    a.proc.send_signal(signal.SIGCONT)
                got = await asyncio.wait_for(far, 30)
                far_s = time.monotonic() - t_stop
            assert model.accepts(2 * MiB, near), "read of a clean region during the stop: wrong data"
            assert near_s < 1.0, f"read of a clean region took {near_s:.2f} s while the source was stopped"
            assert model.accepts(size - BLOCK, got), "read that waited for the source: wrong data"
            assert far_s >= 1.9, far_s
            done = await wait_final(b, 30)
            load = await run1.stop()
            assert done["state"] == "completed", brief(done)
            assert not load.write_errors and not load.read_errors, load.summary()
            model.check(await read_all(b.uri(LUN), size), "B after the source was stopped for 2 s")
            print(
                f"\n[sigstop-source] read needing the source waited {far_s:.2f} s, clean read "
                f"{near_s * 1e3:.1f} ms; {load.summary()}"
            )

        run(body(), 50)


@pytest.mark.timeout(60)
def test_kill_9_of_the_source_and_restart_on_its_port_reconnects_and_completes(tmp_path: Path) -> None:
    size = 32 * MiB
    rng = random.Random(13)
    with two_arrays(tmp_path) as (stack, a, b):

        async def body() -> None:
            model = await new_source(a, make_data(13, size))
            await asyncio.to_thread(start_migration, b, a.uri(LUN), "--throttle", "8")
            load = Load(model, rng, interval=0.05)
            run1 = Running(load, b.uri(LUN))
            await poll(b, lambda s: clean_fraction(s) >= 0.3, 20, "30% clean")
            port = a.nbd_port
            a.sigkill()
            t_kill = time.monotonic()
            down = await poll(b, lambda s: not s["source_connected"], 10, "source_connected false")
            assert down["state"] in RUNNING, brief(down)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t_kill)))
            a2 = await restart(stack, a.data_dir, "A", "--nbd-listen", f"127.0.0.1:{port}")
            assert a2.nbd_port == port
            up = await poll(b, lambda s: s["source_connected"], 15, "source_connected true again")
            t_up = time.monotonic() - t_kill
            done = await wait_final(b, 30)
            load = await run1.stop()
            assert done["state"] == "completed", brief(done)
            assert up["state"] in (*RUNNING, "completed"), brief(up)
            # The outage (~1-3 s) is far inside the default 30 s retry window: nothing failed.
            assert not load.write_errors and not load.read_errors, load.summary()
            model.check(await read_all(b.uri(LUN), size), "B after the source restarted")
            print(f"\n[kill-source] reconnected {t_up:.2f} s after the kill; {load.summary()}")

        run(body(), 50)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_source_gone_longer_than_the_retry_window_fails_reads_with_eio(tmp_path: Path, how: str) -> None:
    """With --source-retry-window 1, a source that is gone (killed: connection refused) or hung
    (SIGSTOP: the TCP connection stays up, nothing answers) must fail I/O that needs it with
    EIO after about 1 s, while clean regions are still read locally.

    Regression (fixed) (how=stopped): a hung source is never timed out. RemoteBackend._call
    (emulator/mirror/remote.py, ``return await fn(c)``) awaits the NBD reply with no deadline;
    the retry window only starts once the connection is seen closed. So a host read of a
    not-yet-copied region hangs as long as the source is stopped (here: the 8 s bound of the
    test) instead of EIO after ~1 s (I6). Killed sources work.
    """
    size = 32 * MiB
    with two_arrays(tmp_path, "--source-retry-window", "1") as (stack, a, b):
        stack.callback(sigcont, a.proc)

        async def body() -> None:
            model = await new_source(a, make_data(17, size))
            await asyncio.to_thread(start_migration, b, a.uri(LUN), "--throttle", "8")
            await poll(b, lambda s: clean_fraction(s) >= 0.3, 20, "30% clean")
            port = a.nbd_port
            async with await NbdClient.connect(b.uri(LUN)) as h:
                if how == "killed":
                    a.sigkill()
                else:
                    a.proc.send_signal(signal.SIGSTOP)
                t0 = time.monotonic()
                # An already copied clean region: served by B alone.
                near = await asyncio.wait_for(h.read(0, BLOCK), 5)
                near_s = time.monotonic() - t0
                assert model.accepts(0, near), "clean region read during the outage: wrong data"
                assert near_s < 1.0, f"clean region read took {near_s:.2f} s during the outage"
                # The last region is not copied: the read needs the source.
                t1 = time.monotonic()
                try:
                    got = await asyncio.wait_for(h.read(size - BLOCK, BLOCK), 8)
                except TimeoutError:
                    pytest.fail(
                        f"source {how}: a read of a not-yet-copied region hung for 8 s; "
                        "expected EIO within about the 1 s retry window (I6)"
                    )
                except RequestError as e:
                    far_s = time.monotonic() - t1
                    assert e.error == EIO, e
                else:
                    pytest.fail(
                        f"source {how}: read of a not-yet-copied region succeeded "
                        f"({model.accepts(size - BLOCK, got)=})"
                    )
                assert 0.5 <= far_s < 8, f"EIO after {far_s:.2f} s with a 1 s retry window"
                # A write needs the source too (I1): it must fail, not be acknowledged.
                data = os.urandom(BLOCK)
                model.unsure(size - 2 * BLOCK, data)
                t2 = time.monotonic()
                with pytest.raises(RequestError) as ei:
                    await asyncio.wait_for(h.write(size - 2 * BLOCK, data), 8)
                write_s = time.monotonic() - t2
                assert ei.value.error == EIO, ei.value
                st = await status(b)
                assert st["state"] in RUNNING, f"the migration must wait for its source: {brief(st)}"
                if how == "killed":
                    assert not st["source_connected"], brief(st)
                    await restart(stack, a.data_dir, "A", "--nbd-listen", f"127.0.0.1:{port}")
                else:
                    a.proc.send_signal(signal.SIGCONT)
                done = await wait_final(b, 30)
                assert done["state"] == "completed", brief(done)
                got = await h.read(size - BLOCK, BLOCK)
                assert model.accepts(size - BLOCK, got)
            model.check(await read_all(b.uri(LUN), size), f"B after the source was {how}")
            print(
                f"\n[source {how} > window] clean read {near_s * 1e3:.1f} ms, EIO read after "
                f"{far_s:.2f} s, EIO write after {write_s:.2f} s"
            )

        run(body(), 50)


# --------------------------------------------------------------------------- 3. faulty fabric
@dataclass
class Fabric:
    proc: subprocess.Popen[bytes]
    uri: str
    control: str
    stderr: Path

    def command(self, c: bytes) -> bytes:
        """Send 'p' (pause: answered once requests in flight are done) or 'r' (resume)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)
            s.connect(self.control)
            s.sendall(c)
            return s.recv(1)

    def injected(self) -> Counter[str]:
        text = self.stderr.read_text(errors="replace")
        return Counter(re.findall(r"injecting \w+ error into (\w+)", text))


@contextmanager
def fabric(tmp_path: Path, upstream: str, *params: str) -> Iterator[Fabric]:
    """nbdkit's nbd plugin to ``upstream`` through the pause, error and delay filters, on a
    unix socket; its log goes to a file (the error filter logs every injection)."""
    if not shutil.which("nbdkit"):
        pytest.skip("nbdkit is not installed (make install)")
    sock = str(tmp_path / "fabric.sock")
    ctl = str(tmp_path / "fabric.ctl")
    err = tmp_path / "fabric.err"
    cmd = [
        "nbdkit",
        "-f",
        "-U",
        sock,
        "--filter=pause",
        "--filter=error",
        "--filter=delay",
        "nbd",
        f"uri={upstream}",
        f"pause-control={ctl}",
        *params,
    ]
    with open(err, "wb") as ef:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=ef, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (os.path.exists(sock) and os.path.exists(ctl)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit did not start: {err.read_text(errors='replace')}")
            time.sleep(0.02)
        yield Fabric(proc, f"nbd+unix:///?socket={sock}", ctl, err)
    finally:
        stop(proc)  # type: ignore[arg-type]


@pytest.mark.timeout(90)
def test_faulty_fabric_errors_delays_and_a_pause_lose_nothing(tmp_path: Path) -> None:
    """Migrate from nbdkit (nbd plugin -> A) with injected EIO on reads, writes and block status,
    2 ms delays and a 1 s pause, under a write load through B. Errors are injected while the
    first half of the LUN is copied (while a trigger file exists): every error costs the copier
    a back-off of up to 2 s, so a whole run with errors would be slow."""
    size = 32 * MiB
    rng = random.Random(23)
    trigger = tmp_path / "inject-errors"
    trigger.touch()
    with two_arrays(tmp_path) as (stack, a, b):

        async def body() -> None:
            model = await new_source(a, make_data(23, size))
            fab = stack.enter_context(
                fabric(
                    tmp_path,
                    a.uri(LUN),
                    "error=EIO",
                    f"error-file={trigger}",
                    "error-pread-rate=15%",
                    "error-pwrite-rate=5%",
                    "error-extents-rate=10%",
                    "rdelay=2ms",
                    "wdelay=2ms",
                )
            )
            await asyncio.to_thread(start_migration, b, fab.uri, "--throttle", "8")
            load = Load(model, rng, interval=0.03)
            run1 = Running(load, b.uri(LUN))
            await poll(b, lambda s: clean_fraction(s) >= 0.2, 30, "20% clean")
            assert await asyncio.to_thread(fab.command, b"p") == b"P"
            t_pause = time.monotonic()
            paused = await status(b)
            await asyncio.sleep(1.0)
            assert await asyncio.to_thread(fab.command, b"r") == b"R"
            t_paused = time.monotonic() - t_pause
            await poll(
                b, lambda s: clean_fraction(s) >= 0.5 or s["state"] not in ("copying",), 40, "50% clean"
            )
            trigger.unlink()
            await run1.stop()
            st = await status(b)
            assert st["state"] in RUNNING and st["state"] != "cutover", (
                f"test set-up: the writes must all be made before the cutover: {brief(st)}"
            )
            # I1: every acknowledged write is on the source already.
            model.check(await read_all(a.uri(LUN), size), "A (direct) after the writes through B")
            done = await wait_final(b, 60)
            assert done["state"] == "completed", brief(done)
            on_b = await read_all(b.uri(LUN), size)
            on_a = await read_all(a.uri(LUN), size)
            model.check(on_b, "B after a migration over a faulty fabric")
            assert on_a == on_b, "B's copy differs from A's (something was marked clean on a failed copy)"
            injected = fab.injected()
            print(
                f"\n[faulty fabric] injected {dict(injected)}; paused {t_paused:.2f} s "
                f"(migration {paused['state']}); passes {done['passes']}; {load.summary()}"
            )
            assert injected["pread"] >= 1, f"no read error was injected: {dict(injected)}"
            assert load.acked > 20, load.summary()

        run(body(), 80)


# --------------------------------------------------------------------------- 4. full target pool
@pytest.mark.timeout(60)
def test_full_target_pool_fails_the_migration_and_the_lun_serves_the_source(tmp_path: Path) -> None:
    """A 64 MiB LUN holding 40 MiB of data, migrated into a 16 MiB pool: the migration must end
    'failed' with an error naming the full pool, and the LUN must keep serving the source
    ('remote'), which holds every acknowledged write (I7, I1).

    Regression (fixed): the migration never fails; it stays 'copying' forever, retrying every 2 s with
    last_error "target: pool 'default' is full ...". Migration._loop
    (emulator/mirror/migration.py, ``except BackendError as e:  # the source is unreachable``)
    catches the copier's TargetError -- a subclass of BackendError (copier.py,
    ``class TargetError(BackendError)``) -- and treats it as a source outage, so the
    ``except TargetError`` in Migration._run that would call _to_remote("failed") is never
    reached from a copy pass. While it loops, host writes through B to regions not copied yet
    are refused with ENOSPC although they only go to the source (see the next test).
    """
    size, data_bytes = 64 * MiB, 40 * MiB
    rng = random.Random(29)
    with two_arrays(tmp_path, "--pool", "default=16M") as (stack, a, b):

        async def body() -> None:
            model = await new_source(a, make_data(29, size, data_bytes), data_bytes)
            await asyncio.to_thread(start_migration, b, a.uri(LUN))
            load = Load(model, rng, interval=0.02)
            run1 = Running(load, b.uri(LUN))
            deadline = time.monotonic() + 10
            while (end := await status(b))["state"] not in FINAL and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await run1.stop()
            print(f"\n[full pool] {brief(end)}; host I/O during the migration: {load.summary()}")
            # Whatever happened, the source must hold every acknowledged write (I1).
            model.check(await read_all(a.uri(LUN), size), "A (direct) after the writes through B")
            assert end["state"] == "failed", f"not failed after 10 s: {brief(end)}"
            err = end["last_error"].lower()
            assert "pool" in err and ("full" in err or "space" in err), end["last_error"]
            lun = await asyncio.to_thread(api(b).get_lun, LUN)
            assert lun["state"] == "remote", lun
            # The LUN now serves the source: reads and writes pass through to A.
            run2 = Running(load, b.uri(LUN))
            await asyncio.sleep(1.0)
            await run2.stop()
            assert not load.write_errors and not load.read_errors, load.summary()
            model.check(await read_all(b.uri(LUN), size), "B (remote) after the failure")
            model.check(await read_all(a.uri(LUN), size), "A after writes through B's remote LUN")

        run(body(), 50)


@pytest.mark.timeout(60)
def test_a_remote_lun_takes_writes_when_its_pool_is_full(tmp_path: Path) -> None:
    """After a cancel, B's LUN is 'remote': its writes go to the source only, so a full pool on
    B must not refuse them (I1, I7: the other LUNs of a full pool keep working).

    Regression (fixed): LunBackend.write (emulator/array/lun.py, ``self._charge(offset, len(data))``)
    charges the LUN's pool for every write whatever its inner Backend is; for a remote (or
    migrating) LUN the write never lands in the local file, but Pool.charge counts the holes of
    that (trimmed) file and refuses the write with ENOSPC once another LUN filled the pool.
    """
    size = 32 * MiB
    rng = random.Random(31)
    with two_arrays(tmp_path, "--pool", "default=16M") as (stack, a, b):

        async def body() -> None:
            model = await new_source(a, make_data(31, size, 8 * MiB), 8 * MiB)
            await asyncio.to_thread(start_migration, b, a.uri(LUN), "--throttle", "1")
            r = await asyncio.to_thread(
                cli, "migration", "cancel", "--api", b.api, "--token", TOKEN, LUN, "--json"
            )
            assert r.returncode == 0, r.stdout + r.stderr
            assert json.loads(r.stdout)["state"] == "cancelled"
            lun = await asyncio.to_thread(api(b).get_lun, LUN)
            assert lun["state"] == "remote", lun
            # Another LUN fills B's pool.
            await asyncio.to_thread(api(b).create_lun, "filler", 16 * MiB)
            # Fill it one write at a time: concurrent writes near a full pool are
            # refused early (the pool counts the writes in flight), not late.
            async with await NbdClient.connect(b.uri("filler")) as c:
                with suppress(RequestError):
                    for off in range(0, 16 * MiB, 256 * 1024):
                        await c.write(off, os.urandom(256 * 1024))
            pool = (await asyncio.to_thread(api(b).array_info))["pools"][0]
            assert pool["free"] < MiB, pool
            load = Load(model, rng, interval=0.01, read_share=0.2)
            run1 = Running(load, b.uri(LUN))
            await asyncio.sleep(1.0)
            await run1.stop()
            print(f"\n[remote LUN, full pool] {pool}; {load.summary()}")
            model.check(await read_all(a.uri(LUN), size), "A after writes through B's remote LUN")
            assert load.acked > 0 and not load.write_errors, (
                f"writes to a remote LUN were refused: {load.summary()}"
            )

        run(body(), 50)


@pytest.mark.timeout(60)
def test_concurrent_writes_never_overfill_a_pool(tmp_path: Path) -> None:
    """The copier writes 4 regions at a time into the target pool; hosts write in parallel too.
    However many writes race, the pool must never hold more than its capacity (I7): the full
    pool test above saw "pool 'default' is full (17825792 of 16777216 bytes used)".

    Up to 8 rounds: free 2 MiB (trim), then 16 pipelined 1 MiB writes into holes; a few KiB of
    file system metadata over the capacity are tolerated, a whole extra write is not.

    Regression (fixed): Pool.charge (emulator/array/pool.py) decides on ``used()`` -- st_blocks of the
    files, i.e. writes already completed -- and then resets the estimate to ``used + new``,
    forgetting the writes it has charged that are still in flight (FileBackend hands writes
    larger than its inline limit to a thread pool). With 2 MiB free, 3 concurrent 1 MiB writes
    into holes are often accepted and the pool ends 1 MiB over its capacity.
    """
    with array_daemon(tmp_path / "b", "B", "--pool", "default=16M") as b:

        async def body() -> None:
            await asyncio.to_thread(api(b).create_lun, LUN, 1 << 30)
            async with await NbdClient.connect(b.uri(LUN)) as c:
                await c.write(0, os.urandom(16 * MiB - 2 * MiB))
                await c.flush()
                for r in range(8):
                    if r:
                        await c.trim(2 * (r - 1) * MiB, 2 * MiB)
                        await c.flush()
                    pool = (await asyncio.to_thread(api(b).array_info))["pools"][0]
                    free = pool["capacity"] - pool["used"]
                    base = (64 + 32 * r) * MiB
                    results = await asyncio.gather(
                        *(c.write(base + 2 * i * MiB, os.urandom(MiB)) for i in range(16)),
                        return_exceptions=True,
                    )
                    await c.flush()
                    ok = sum(x is None for x in results)
                    errors = Counter(getattr(x, "error", repr(x)) for x in results if x is not None)
                    after = (await asyncio.to_thread(api(b).array_info))["pools"][0]
                    print(
                        f"\n[pool race] round {r}: free before {free >> 10} KiB; 16 concurrent 1 MiB "
                        f"writes: {ok} ok, errors {dict(errors)}; used after {after['used']}"
                    )
                    assert set(errors) <= {28}, errors
                    # A file system block or two of extent metadata may show in st_blocks.
                    assert after["used"] <= after["capacity"] + 64 * 1024, (
                        f"round {r}: the pool holds {after['used']} bytes, over its capacity of "
                        f"{after['capacity']}: {ok} concurrent 1 MiB writes were accepted with "
                        f"{free} bytes free"
                    )

        run(body(), 50)
