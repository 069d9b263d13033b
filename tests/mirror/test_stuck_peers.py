"""Peers that stop without going away: what the array's stop and close paths do.

A SIGSTOPped peer keeps its TCP connection up and answers nothing: a host that
stops reading its replies (its socket fills up), a migration source that stops
answering requests. Real daemons (tests.servers.array_daemon), real hosts
(libnbd under /usr/bin/python3, our NbdClient), kill -STOP, never mocks.

1. DELETE ?force of a LUN whose host stopped reading answers within the grace
   of a few seconds (it waited forever for the host to take its last replies,
   and SIGTERM then waited out aiohttp's 2 x 60 s for that handler); the other
   LUNs keep working and SIGTERM exits 0 at once.
2. SIGTERM of a target whose source is stopped, with host writes to three
   migrating LUNs in flight: the migrations close all at once, so the stop
   takes the same ~7 s whatever their number (it took 5 s more per LUN: 20 s
   for three, past the 15 s after which `blockmig down` kills -9). With a
   migration and a cancelled migration's remote LUN on that source, the
   hosts' requests, the last flushes and the closes of the source connections
   share one grace (they waited 5 s each in turn: 15 s); what the hosts had
   acknowledged is on the source (I1).
3. Host writes that find the link to a stopped source backed up wait for it
   (I6) and land once it is back; none fails with "await wasn't used with
   future" (requests run eagerly awaited one shared drain future).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from emulator.nbd.client import NbdClient
from tests.servers import ArrayDaemon, array_api, array_daemon
from tests.tools import libnbd_host, need_libnbd

pytestmark = pytest.mark.slow

MiB = 1 << 20
BS = 64 << 10

_STUCK_HOST = r"""
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(int(sys.argv[2])):
    h.aio_pread(nbd.Buffer(1 << 20), (i % 8) << 20)
print("sent", h.aio_in_flight(), flush=True)
time.sleep(600)
"""


@contextmanager
def stuck_host(uri: str, reads: int = 64) -> Iterator[subprocess.Popen[str]]:
    """A libnbd host that sends ``reads`` reads of 1 MiB, never takes a reply and
    is then SIGSTOPped: the replies back up in its socket and in the server's."""
    proc = libnbd_host(_STUCK_HOST, uri, str(reads), ready="sent")
    try:
        time.sleep(0.5)  # the server reads the requests and answers into the full socket
        proc.send_signal(signal.SIGSTOP)
        yield proc
    finally:
        proc.kill()
        proc.send_signal(signal.SIGCONT)
        proc.wait(10)


@contextmanager
def stopped(d: ArrayDaemon) -> Iterator[None]:
    """``d`` SIGSTOPped for the block (and always continued, so its teardown can stop it)."""
    d.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        d.proc.send_signal(signal.SIGCONT)


def write(uri: str, data: bytes) -> None:
    async def go() -> None:
        async with await NbdClient.connect(uri) as c:
            await c.write(0, data)
            await c.flush()

    asyncio.run(asyncio.wait_for(go(), 30))


def read(uri: str, length: int) -> bytes:
    async def go() -> bytes:
        async with await NbdClient.connect(uri) as c:
            return bytes(await c.read(0, length))

    return asyncio.run(asyncio.wait_for(go(), 30))


def sigterm_took(d: ArrayDaemon, timeout: float = 60) -> float:
    t0 = time.monotonic()
    assert d.sigterm(timeout=timeout) == 0, d.output()
    return time.monotonic() - t0


def migrate(a: ArrayDaemon, b: ArrayDaemon, lun: str, data: bytes) -> None:
    """``lun`` with ``data`` on A, migrating to B at 1 MB/s (so most of it stays on A)."""
    array_api(a).create_lun(lun, len(data))
    write(a.uri(lun), data)
    array_api(b).call("POST", "/api/v1/migrations", {"lun": lun, "source": a.uri(lun), "throttle": 1})


# ------------------------------------------------------------------ 1. a host that stopped reading
@pytest.mark.timeout(120)
def test_a_forced_delete_drops_a_host_that_stopped_reading(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "A") as a:
        api = array_api(a, timeout=30)
        api.create_lun("vol", 8 * MiB)
        api.create_lun("other", MiB)
        write(a.uri("vol"), os.urandom(8 * MiB))  # data, so the replies are big (holes are not)
        with stuck_host(a.uri("vol")):
            t0 = time.monotonic()
            api.delete_lun("vol", force=True)
            took = time.monotonic() - t0
            assert took < 10, f"DELETE took {took:.1f} s"
            assert [x["name"] for x in api.list_luns()] == ["other"]
            write(a.uri("other"), b"\x77" * MiB)
            assert read(a.uri("other"), MiB) == b"\x77" * MiB
            took = sigterm_took(a)
        assert took < 5, f"SIGTERM took {took:.1f} s: {a.output()}"
        assert "does not read its replies" in a.output(), a.output()


# ------------------------------------------------------------------ 2. a stopped source
_WRITER = r"""
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(16):
    h.aio_pwrite(bytes([7]) * (1 << 20), (8 + i % 8) << 20)
print("sent", flush=True)
while h.aio_in_flight():
    h.poll(1)
time.sleep(600)
"""


def sigterm_with_writes_waiting(d: ArrayDaemon, uris: list[str]) -> float:
    """A libnbd host on each of ``uris`` whose writes of 8-16 MiB wait for a stopped
    source (I1), then SIGTERM of ``d``: the seconds its stop took."""
    hosts: list[subprocess.Popen[str]] = []
    try:
        for uri in uris:
            hosts.append(libnbd_host(_WRITER, uri, ready="sent"))
        time.sleep(1)
        return sigterm_took(d)
    finally:
        for h in hosts:
            h.kill()
            h.wait(10)


@pytest.mark.timeout(120)
def test_sigterm_with_writes_to_a_stopped_source_on_three_luns_takes_no_longer_than_on_one(
    tmp_path: Path,
) -> None:
    need_libnbd()
    luns = ["v0", "v1", "v2"]
    data = {n: os.urandom(16 * MiB) for n in luns}
    with array_daemon(tmp_path / "a", "A") as a, array_daemon(tmp_path / "b", "B") as b:
        for n in luns:
            migrate(a, b, n, data[n])
        with stopped(a):
            took = sigterm_with_writes_waiting(b, [b.uri(n) for n in luns])
        # 5 s for the hosts' requests, 1 s each for the flushes and the source connections
        # once that grace is spent: once, not per LUN
        assert took < 9, f"SIGTERM took {took:.1f} s with three LUNs: {b.output()}"
        with array_daemon(tmp_path / "b", "B") as b2:  # what the source had is still there
            for n in luns:
                assert read(b2.uri(n), 8 * MiB) == data[n][: 8 * MiB], n


@pytest.mark.timeout(120)
def test_sigterm_with_a_stopped_source_waits_on_it_once(tmp_path: Path) -> None:
    need_libnbd()
    data = os.urandom(16 * MiB)
    acked = os.urandom(MiB)

    async def unflushed(uri: str) -> None:
        async with await NbdClient.connect(uri) as c:
            await c.write(0, acked)  # acknowledged once the source has it; never flushed

    with array_daemon(tmp_path / "a", "A") as a:
        with array_daemon(tmp_path / "b", "B") as b:
            migrate(a, b, "m", data)
            migrate(a, b, "r", data)
            array_api(b).call("POST", "/api/v1/migrations/r/cancel")  # r: a remote LUN
            for n in ("m", "r"):
                asyncio.run(asyncio.wait_for(unflushed(b.uri(n)), 30))
            with stopped(a):
                took = sigterm_with_writes_waiting(b, [b.uri(n) for n in ("m", "r")])
            assert took < 9, f"SIGTERM took {took:.1f} s: {b.output()}"
        for n in ("m", "r"):
            assert read(a.uri(n), MiB) == acked, n  # I1: on the source, though never flushed
        with array_daemon(tmp_path / "b", "B") as b2:
            st = array_api(b2).call("GET", "/api/v1/migrations/m")
            assert st["state"] in ("copying", "converging"), st
            for n in ("m", "r"):
                assert read(b2.uri(n), 2 * MiB) == acked + data[MiB : 2 * MiB], n


@pytest.mark.timeout(120)
def test_writes_queued_behind_a_stopped_source_land_once_it_is_back(tmp_path: Path) -> None:
    data = os.urandom(32 * MiB)
    new = os.urandom(32 * MiB)
    with array_daemon(tmp_path / "a", "A") as a, array_daemon(tmp_path / "b", "B") as b:
        migrate(a, b, "vol", data)
        errors: list[BaseException] = []

        async def host(ready: threading.Event) -> None:
            async with await NbdClient.connect(b.uri("vol")) as c:
                # More than the 4 MiB the link to the source queues: the rest waits to drain;
                # small writes, so that B takes several in one receive pass.
                writes = [c.write(i * BS, new[i * BS : (i + 1) * BS]) for i in range(len(new) // BS)]
                ready.set()
                for r in await asyncio.gather(*writes, return_exceptions=True):
                    if isinstance(r, BaseException):
                        errors.append(r)
                await c.flush()

        ready = threading.Event()
        t = threading.Thread(target=lambda: asyncio.run(asyncio.wait_for(host(ready), 60)))
        with stopped(a):
            t.start()
            assert ready.wait(10)
            time.sleep(2)
        t.join(60)
        assert not t.is_alive()
        assert not errors, f"{len(errors)} of {len(new) // BS} writes failed, e.g. {errors[0]}"
        assert "await wasn't used" not in b.output(), b.output()
        assert read(b.uri("vol"), len(new)) == new
        assert read(a.uri("vol"), len(new)) == new  # I1: the source has every write
