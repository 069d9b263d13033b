"""`blockmig migration start|status|list|set|pause|resume|cancel|wait` as a user drives them,
in every state: the exit code the help gives, a clear message, and with --json one
parseable object on stdout whatever the outcome. Real array daemons and NBD
(tests.servers.array_daemon), the CLI as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.mirror.test_faults import (
    LUN,
    TOKEN,
    MiB,
    cli,
    make_data,
    new_source,
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
