"""An array stopping with migrations and remote LUNs: what its log says, what
the source keeps, what is left running. Real daemons (tests.servers.array_daemon).

1. SIGTERM of a target with a migration in progress and a cancelled
   migration's remote LUN, host writes running: each LUN's last flush reaches
   the source while it is still connected (the source connections were closed
   first, and every stop logged "flush of LUN ... failed: remote LUN ... is
   closed"). The log says nothing; every acknowledged write is on the source
   (I1); the migration resumes after a restart.
2. DELETE of a migrating LUN, of a cancelled migration's LUN and of a remote
   LUN, cancel, then SIGTERM: the remote LUNs' closes end every task they
   started (the watchdog, the close of the connection), so none is destroyed
   pending when the event loop closes.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from emulator.nbd.client import NbdClient
from emulator.nbd.errors import NbdError
from tests.mirror.test_stuck_peers import MiB, migrate, read, sigterm_took, write
from tests.servers import ArrayDaemon, array_api, array_daemon

pytestmark = pytest.mark.slow

BS = 64 << 10
LUN = 16 * MiB


class Writer:
    """A host writing 64 KiB blocks of the first 8 MiB of a LUN, 8 at a time, until
    the array drops it; it keeps every write it tried, and which were acknowledged."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.tried: dict[int, list[bytes]] = {}  # offset: the data of each write, in order
        self.acked: dict[int, int] = {}  # offset: index in tried of the last acknowledged write
        self.error: BaseException | None = None
        self.running = threading.Event()
        self._t = threading.Thread(target=lambda: asyncio.run(asyncio.wait_for(self._go(), 60)))
        self._t.start()
        assert self.running.wait(10), "the host did not start writing"

    async def _go(self) -> None:
        async with await NbdClient.connect(self.uri) as c:
            n = 0
            try:
                while True:
                    offs = [((n + j) % 128) * BS for j in range(8)]
                    n += 8
                    datas = [os.urandom(BS) for _ in offs]
                    for off, d in zip(offs, datas, strict=True):
                        self.tried.setdefault(off, []).append(d)
                    res = await asyncio.gather(
                        *(c.write(o, d) for o, d in zip(offs, datas, strict=True)), return_exceptions=True
                    )
                    for off, r in zip(offs, res, strict=True):
                        if r is None:
                            self.acked[off] = len(self.tried[off]) - 1
                    if any(isinstance(r, BaseException) for r in res):
                        return
                    self.running.set()
            except NbdError as e:  # the array dropped us
                self.error = e

    def join(self) -> None:
        self._t.join(30)
        assert not self._t.is_alive()

    def check(self, d: ArrayDaemon, lun: str) -> None:
        """What ``lun`` on ``d`` holds: a block acknowledged, or one written after it."""
        assert self.acked, "no write was acknowledged"
        got = read(d.uri(lun), 8 * MiB)
        for off, i in self.acked.items():
            assert got[off : off + BS] in self.tried[off][i:], f"{lun}: block at {off} lost"


@pytest.mark.timeout(120)
def test_a_stop_flushes_migrating_and_remote_luns_before_closing_their_sources(tmp_path: Path) -> None:
    data = os.urandom(LUN)
    with array_daemon(tmp_path / "a", "A") as a:
        with array_daemon(tmp_path / "b", "B") as b:
            migrate(a, b, "m", data)  # 1 MB/s: still copying at the stop
            migrate(a, b, "r", data)
            array_api(b).call("POST", "/api/v1/migrations/r/cancel")
            writers = {lun: Writer(b.uri(lun)) for lun in ("m", "r")}
            time.sleep(0.5)
            took = sigterm_took(b)
            for w in writers.values():
                w.join()
            assert b.output().strip() == b.banner, f"a clean stop logged: {b.output()}"
            assert took < 5, f"SIGTERM took {took:.1f} s"
        for lun, w in writers.items():
            w.check(a, lun)  # I1: on the source
        with array_daemon(tmp_path / "b", "B") as b2:
            st = array_api(b2).call("GET", "/api/v1/migrations/m")
            assert st["state"] in ("copying", "converging"), st
            for lun, w in writers.items():
                w.check(b2, lun)


@pytest.mark.timeout(120)
def test_no_task_is_left_pending_after_deletes_and_cancels(tmp_path: Path) -> None:
    data = os.urandom(4 * MiB)
    leftovers = ("Task was destroyed", "Task exception was never retrieved", "Traceback")
    with array_daemon(tmp_path / "a", "A") as a:
        with array_daemon(tmp_path / "b", "B") as b:
            api = array_api(b, timeout=30)
            for lun in ("deleted", "cancelled", "cancelled-deleted"):
                migrate(a, b, lun, data)
            api.delete_lun("deleted", force=True)
            api.call("POST", "/api/v1/migrations/cancelled/cancel")
            api.call("POST", "/api/v1/migrations/cancelled-deleted/cancel")
            write(b.uri("cancelled-deleted"), b"\x01" * MiB)  # the remote LUN's watchdog runs
            api.delete_lun("cancelled-deleted", force=True)
            write(b.uri("cancelled"), b"\x02" * MiB)
            sigterm_took(b)
            out = b.output()
            assert not any(x in out for x in leftovers), out
        with array_daemon(tmp_path / "b", "B") as b:  # "cancelled" is a remote LUN from the start
            write(b.uri("cancelled"), b"\x03" * MiB)
            array_api(b, timeout=30).delete_lun("cancelled", force=True)
            sigterm_took(b)
            out = b.output()
            assert not any(x in out for x in leftovers), out
