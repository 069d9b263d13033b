"""A running migration's throttle changed without restarting it: PATCH
/api/v1/migrations/{name} and `blockmig migration set`.

1. The new rate applies to copies already waiting on the old one (Throttle.set_rate):
   a migration whose workers each sleep a region's time at 0.1 MB/s (42 s for 4 MiB)
   completes within half that time once set to unlimited.
2. The throttle (and a mode set to active) is kept across a kill -9 and restart of the
   target: the status after the resume shows it.
3. Bad values and unknown fields are 400, an unknown migration 404, an ended one 409;
   nothing changes on a refusal.
4. The CLI sets it, and refuses what the API would.
Real daemons, real NBD, 127.0.0.1 port 0; no wall-clock thresholds but a region's time
at the old rate, which is the point: nothing waits it out.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from control.api_client import ApiError
from emulator.mirror.copier import Throttle
from emulator.nbd.client import NbdClient
from tests.servers import ArrayDaemon, array_api, array_daemon

MiB = 1 << 20
REGION = 4 * MiB
SLOW = 0.1  # MB/s: a region takes 42 s to come due, a 16 MiB LUN minutes
TOKEN = "test-token"

api = partial(array_api, timeout=20)


def fill(a: ArrayDaemon, lun: str, size: int = 4 * REGION) -> bytes:
    data = bytes(range(256)) * (size // 256)

    async def write() -> None:
        async with await NbdClient.connect(a.uri(lun)) as c:
            await c.write(0, data)
            await c.flush()

    api(a).create_lun(lun, size)
    asyncio.run(write())
    return data


def start_slow(a: ArrayDaemon, b: ArrayDaemon, lun: str) -> dict[str, Any]:
    """A migration on B of ``lun`` on A at SLOW MB/s, once its first region is copied: its
    other workers then sleep on the throttle (one region's time or more each)."""
    body = {"lun": lun, "source": a.uri(lun), "throttle": SLOW, "region_size": REGION}
    api(b).call("POST", "/api/v1/migrations", body)
    deadline = time.monotonic() + 20
    while True:
        st = api(b).migration(lun)
        if st["copied_bytes"] > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert st["state"] == "copying" and st["copied_bytes"] == REGION, st
    return st


async def read_all(uri: str, size: int) -> bytes:
    async with await NbdClient.connect(uri) as c:
        return bytes(await c.read(0, size))


def cli(b: ArrayDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "control.cli", "migration", "set", "--api", b.api, "--token", TOKEN]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)


def test_set_rate_wakes_a_copy_waiting_on_the_old_rate() -> None:
    async def run() -> None:
        t = Throttle(1e3)  # 1 KB/s: the second take of 1 MB waits 1000 s
        await t.take(1 << 20)
        waiter = asyncio.ensure_future(t.take(1 << 20))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        t.set_rate(0)
        await asyncio.wait_for(waiter, 10)
        # lowered again: the next copies wait at the new rate, not at none
        t.set_rate(1e3)
        await t.take(1 << 20)
        waiter = asyncio.ensure_future(t.take(1 << 20))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        t.set_rate(1e9)  # raised: the waiter books again at 1 GB/s
        await asyncio.wait_for(waiter, 10)

    asyncio.run(run())


@pytest.mark.timeout(120)
def test_unthrottling_a_slow_migration_completes_it_at_once(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "A") as a, array_daemon(tmp_path / "b", "B") as b:
        data = fill(a, "vol")
        start_slow(a, b, "vol")
        st = api(b).update_migration("vol", throttle=0)
        assert st["throttle"] == 0 and st["state"] not in ("completed", "failed", "cancelled"), st
        # Workers sleep a region's time (42 s) or more at the old rate: half of it is plenty.
        st = api(b).wait_migration("vol", timeout=REGION / (SLOW * 1e6) / 2)
        assert st["state"] == "completed", st
        assert asyncio.run(read_all(b.uri("vol"), len(data))) == data


@pytest.mark.timeout(120)
def test_the_new_throttle_and_mode_survive_a_kill_and_restart(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "A") as a:
        data = fill(a, "vol")
        with array_daemon(tmp_path / "b", "B") as b:
            st = start_slow(a, b, "vol")
            assert st["throttle"] == SLOW * 1e6 and st["mode"] == "background", st
            st = api(b).call("PATCH", "/api/v1/migrations/vol", {"throttle": "0.2"})  # text, as at start
            assert st["throttle"] == 0.2e6, st
            st = api(b).update_migration("vol", mode="active")
            assert st["mode"] == "active" and st["mode_reason"] == "requested", st
            b.sigkill()
        with array_daemon(tmp_path / "b", "B") as b:
            st = api(b).migration("vol")
            assert st["state"] == "copying" and st["throttle"] == 0.2e6, st
            assert st["mode"] == "active", st
            api(b).update_migration("vol", throttle=0)
            st = api(b).wait_migration("vol", timeout=60)
            assert st["state"] == "completed" and st["throttle"] == 0, st
            assert asyncio.run(read_all(b.uri("vol"), len(data))) == data


@pytest.mark.timeout(120)
def test_refusals(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "A") as a, array_daemon(tmp_path / "b", "B") as b:
        fill(a, "vol")
        start_slow(a, b, "vol")
        path = "/api/v1/migrations/vol"

        def refused(body: Any, status: int, *words: str, where: str = path) -> None:
            with pytest.raises(ApiError) as e:
                api(b).call("PATCH", where, body)
            assert e.value.status == status, (body, e.value.status, e.value.message)
            for w in words:
                assert w in e.value.message, (body, e.value.message)

        for bad in (-1, math.nan, math.inf, "fast", "-1", "", True, None, [1], {"mbps": 1}):
            refused({"throttle": bad}, 400, "throttle must be MB/s >= 0 (0 = unlimited), not")
        refused({"throttle": 1, "speed": 2}, 400, "unknown field(s): speed")
        refused({}, 400, "nothing to change")
        refused([], 400, "JSON object")
        for mode in ("background", "ACTIVE", 1, None):
            refused({"mode": mode}, 400, "mode can only be set to 'active'")
        # all is checked first: a good throttle with a bad mode changes nothing
        refused({"throttle": 5, "mode": "background"}, 400, "mode")
        st = api(b).migration("vol")
        assert st["throttle"] == SLOW * 1e6 and st["mode"] == "background", st
        refused({"throttle": 1}, 404, "no migration of LUN 'nosuch'", where="/api/v1/migrations/nosuch")

        api(b).call("POST", f"{path}/cancel")
        refused({"throttle": 1}, 409, "cancelled")
        # ended before a restart: still 409, not 404
        b.sigterm()
    with array_daemon(tmp_path / "b", "B") as b:
        with pytest.raises(ApiError) as e:
            api(b).update_migration("vol", throttle=1)
        assert e.value.status == 409 and "cancelled" in e.value.message, e.value.message


@pytest.mark.timeout(120)
def test_the_cli_sets_the_throttle(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "A") as a, array_daemon(tmp_path / "b", "B") as b:
        fill(a, "vol")
        start_slow(a, b, "vol")
        p = cli(b, "vol", "--throttle", "0.2")
        assert p.returncode == 0 and "throttle:     0.2 MB/s" in p.stdout, (p.stdout, p.stderr)
        assert api(b).migration("vol")["throttle"] == 0.2e6
        for args, why in (
            (["vol", "--throttle", "inf"], "--throttle: a rate in MB/s >= 0"),
            (["vol", "--mode", "background"], "invalid choice"),
            (["vol"], "give --throttle, --mode and/or --source"),
        ):
            p = cli(b, *args)
            assert p.returncode == 2 and why in p.stderr, (args, p.stderr)
        p = cli(b, "nosuch", "--throttle", "1")
        assert p.returncode == 1 and "no migration of LUN 'nosuch'" in p.stderr, p.stderr
        p = cli(b, "vol", "--throttle", "0", "--json")
        assert p.returncode == 0, p.stderr
        assert api(b).wait_migration("vol", timeout=60)["state"] == "completed"
        help_text = subprocess.run(
            [sys.executable, "-m", "control.cli", "migration", "set", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert "--throttle MBPS" in help_text and "0 = unlimited" in help_text, help_text
