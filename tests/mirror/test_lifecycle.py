"""`blockmig migration start|status|list|set|pause|resume|cancel|wait` as a user drives them,
in every state: the exit code the help gives, a clear message, and with --json one
parseable object on stdout whatever the outcome. Real array daemons and NBD
(tests.servers.array_daemon), the CLI as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from control.config import child_env
from tests.mirror.test_faults import (
    LUN,
    TOKEN,
    MiB,
    cli,
    make_data,
    new_source,
    restart,
    run,
    start_migration,
    two_arrays,
)
from tests.servers import ArrayDaemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SIZE = 8 * MiB  # at 1 MB/s: 8 s to copy, long enough to be driven


def mig(b: ArrayDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    """`blockmig migration ARGS --api B --token T`."""
    return cli("migration", *args, "--api", b.api, "--token", TOKEN)


def one_object(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one JSON object --json printed on stdout (nothing else there)."""
    try:
        obj = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(
            f"stdout is not one JSON object (exit {r.returncode}): {r.stdout!r} {r.stderr!r}"
        ) from None
    assert isinstance(obj, dict), obj
    return obj


def test_wait_that_times_out_prints_the_last_status_with_json(tmp_path: Path) -> None:
    """Before: `migration wait --json --timeout S` printed nothing on stdout when S passed
    (exit 2, a line on stderr), so a script reading its JSON found none."""
    with two_arrays(tmp_path) as (_, a, b):

        async def body() -> None:
            await new_source(a, make_data(61, SIZE))
            await asyncio.to_thread(start_migration, b, a.uri(LUN), "--throttle", "1")
            r = await asyncio.to_thread(mig, b, "wait", LUN, "--timeout", "0.5", "--json")
            assert r.returncode == 2, (r.stdout, r.stderr)
            st = one_object(r)
            assert st["lun"] == LUN and st["state"] in ("copying", "converging"), st
            assert r.stderr == f"blockmig: migration of {LUN} still {st['state']} after 0.5 s\n", r.stderr
            r = await asyncio.to_thread(mig, b, "cancel", LUN, "--json")
            assert r.returncode == 0 and one_object(r)["state"] == "cancelled", (r.stdout, r.stderr)
            r = await asyncio.to_thread(mig, b, "wait", LUN, "--json")
            assert r.returncode == 1 and one_object(r)["state"] == "cancelled", (r.stdout, r.stderr)
            assert r.stderr == f"blockmig: migration of {LUN} cancelled\n", r.stderr  # no ": " and nothing

        run(body(), 100)


def test_wait_rides_out_a_restart_of_the_target(tmp_path: Path) -> None:
    """B dies (kill -9) while `migration wait` follows its migration, and comes back on the
    same API port a second later: it resumes the copy by itself (I4). Before: the wait
    ended at once with exit 1 ("failed or cancelled", per its help) and "cannot reach the
    array API", though the migration went on to complete."""
    with two_arrays(tmp_path) as (stack, a, b):

        async def body() -> None:
            await new_source(a, make_data(62, SIZE))
            await asyncio.to_thread(start_migration, b, a.uri(LUN), "--throttle", "4")  # 2 s
            cmd = [sys.executable, "-m", "control.cli", "migration", "wait", LUN, "--json"]
            cmd += ["--api", b.api, "--token", TOKEN]
            p = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
            )
            try:
                await asyncio.sleep(0.5)  # its first long poll is in
                assert p.poll() is None, p.communicate()
                b.sigkill()
                await asyncio.sleep(1.0)
                port = b.api.rsplit(":", 1)[1]
                b2 = await restart(stack, b.data_dir, "B", "--api-listen", f"127.0.0.1:{port}")
                assert b2.api == b.api
                out, err = await asyncio.to_thread(p.communicate, timeout=60)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            assert p.returncode == 0, (out, err)
            assert json.loads(out)["state"] == "completed", out

        run(body(), 100)


def test_wait_whose_timeout_ends_while_the_target_is_down_is_a_timeout(tmp_path: Path) -> None:
    """--timeout passes while B, killed, does not answer (within the window a restart gets):
    exit 2 with the last status, as for any timeout. Before: exit 1, "cannot reach the
    array API", which the help gives for a migration that failed or was cancelled."""
    with two_arrays(tmp_path) as (_, a, b):

        async def body() -> None:
            await new_source(a, make_data(63, SIZE))
            await asyncio.to_thread(start_migration, b, a.uri(LUN), "--throttle", "1")
            cmd = [sys.executable, "-m", "control.cli", "migration", "wait", LUN, "--json"]
            cmd += ["--api", b.api, "--token", TOKEN, "--timeout", "2"]
            p = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
            )
            try:
                await asyncio.sleep(0.5)  # its first long poll is in
                b.sigkill()
                out, err = await asyncio.to_thread(p.communicate, timeout=30)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            assert p.returncode == 2, (out, err)
            assert json.loads(out)["state"] in ("copying", "converging"), out
            assert "still" in err and "after 2 s" in err, err

        run(body(), 100)


def test_wait_on_an_array_that_never_answered_fails_at_once(tmp_path: Path) -> None:
    """A wrong --api (nothing listens there) is no restart to wait out: exit 1 at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        api = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        t0 = time.monotonic()
        r = cli("migration", "wait", LUN, "--api", api, "--token", TOKEN, "--json")
    assert r.returncode == 1 and "cannot reach the array API" in r.stderr, (r.stdout, r.stderr)
    assert one_object(r)["error"]["code"] == "unreachable"
    assert time.monotonic() - t0 < 10
