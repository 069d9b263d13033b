"""An array and its open-files limit (RLIMIT_NOFILE): a file per LUN.

Before: an array started from a shell with the usual soft limit of 1024 refused
its 1001st LUN ("Too many open files", 507) only once it held 1022 files, and
then had none left: a host could not connect, the API could not accept.
Now the daemon raises its soft limit to the hard one at start, a LUN that would
eat into a reserve kept for hosts, migrations and the API is refused with a
clear 507, and an array restarted with more LUNs than it may open says what
to raise. Real daemons; each test starts its array with a low limit.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from control.api_client import ApiError
from emulator.nbd.client import NbdClient
from tests.servers import ArrayDaemon, array_api, array_daemon, start_array

pytestmark = pytest.mark.slow

MiB = 1 << 20


def nofile_of(d: ArrayDaemon) -> tuple[int, int]:
    for line in Path(f"/proc/{d.proc.pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files limit")


def hosts_read(d: ArrayDaemon, luns: list[str]) -> list[bytes]:
    """A host connected to each LUN at once, each reading its first block."""

    async def go() -> list[bytes]:
        clients = [await NbdClient.connect(d.uri(lun)) for lun in luns]
        try:
            return [bytes(await c.read(0, 4096)) for c in clients]
        finally:
            for c in clients:
                await c.close()

    return asyncio.run(asyncio.wait_for(go(), 60))


def test_the_array_raises_its_soft_limit_to_the_hard_one(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "A", nofile=(256, 2048)) as a:
        assert nofile_of(a) == (2048, 2048)
        api = array_api(a)
        for i in range(400):  # 256 files would not have held them
            api.create_lun(f"l{i}", MiB)
        assert hosts_read(a, [f"l{i}" for i in range(0, 400, 20)]) == [bytes(4096)] * 20


def test_a_lun_past_the_limit_is_refused_and_hosts_keep_connecting(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "A", nofile=(300, 300)) as a:
        api = array_api(a)
        made: list[str] = []
        with pytest.raises(ApiError) as refused:
            for i in range(300):
                api.create_lun(f"l{i}", MiB)
                made.append(f"l{i}")
        e = refused.value
        assert (e.status, e.code) == (507, "too_many_open_files"), (e.status, e.code, e.message)
        assert "limit of 300" in e.message and "ulimit -Hn" in e.message
        assert 150 < len(made) < 300 - 32  # a reserve kept, not every file spent
        # the reserve: hosts connect (a socket each, and one more for zero-copy reads)
        assert hosts_read(a, made[:24]) == [bytes(4096)] * 24
        assert len(api.list_luns()) == len(made)
        api.delete_lun(made[-1])  # room again
        api.create_lun("again", MiB)
        # restarted with fewer files than its LUNs need: it says what to raise
        a.sigterm()
    with pytest.raises(RuntimeError, match="raise the open files limit"):
        start_array(tmp_path / "a", "A", nofile=(128, 128))
