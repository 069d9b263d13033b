"""`blockmig` starts fast: `--help` and the commands that only talk to arrays' APIs or
read the volumes DB never import the array daemon, the NBD server, the migration engine
or the demo (aiohttp, numpy, uvloop, rich, an event loop); those load when their command
runs (control/cli.py).

Each check runs in a fresh interpreter (``python -P -c``) and reads its ``sys.modules``:
what was imported, not how long it took.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.cli import build_parser
from control.config import child_env

#: what a command that does not serve, copy or demo must not load (a package and its modules)
HEAVY = (
    "aiohttp",
    "numpy",
    "uvloop",
    "rich",
    "asyncio",
    "emulator.daemon",
    "emulator.mirror",
    "emulator.nbd.server",
    "emulator.nbd.client",
    "emulator.array.array",
    "control.demo",
    "control.hostcopy",
    "bench",
)

#: run in the child: every command line of argv (a JSON list of lists) through
#: control.cli.main, then print each one's exit code and the HEAVY modules loaded
CHILD = """
import contextlib, io, json, sys
from control.cli import main
runs, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rcs, outs = [], []
for argv in runs:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    rcs.append(rc)
    outs.append(out.getvalue())
loaded = sorted(m for m in sys.modules for h in heavy if m == h or m.startswith(h + "."))
print(json.dumps({"rcs": rcs, "outs": outs, "loaded": loaded}))
"""


def run_cli(tmp_path: Path, runs: list[list[str]]) -> dict[str, list[object]]:
    p = subprocess.run(
        [sys.executable, "-P", "-c", CHILD, json.dumps(runs), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    result: dict[str, list[object]] = json.loads(p.stdout)
    return result


def all_commands() -> list[list[str]]:
    """Every command and subcommand path of the parser, `[]` for `blockmig` itself."""

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> Iterator[list[str]]:
        yield path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, [*path, name])

    return list(walk(build_parser(), []))


@pytest.fixture
def closed_api() -> Iterator[str]:
    """The URL of a port bound but not listening: a connection to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_help_of_every_command_loads_nothing_heavy(tmp_path: Path) -> None:
    commands = all_commands()
    assert ["array", "serve"] in commands and ["demo"] in commands and ["serve-file"] in commands
    r = run_cli(tmp_path, [[*c, "--help"] for c in commands])
    assert r["rcs"] == [0] * len(commands)
    assert all("usage: blockmig" in str(out) for out in r["outs"])
    assert r["loaded"] == []


def test_volume_and_api_commands_load_nothing_heavy(tmp_path: Path, closed_api: str) -> None:
    state = str(tmp_path / "state")
    runs = [
        ["list", "--state-dir", state],
        ["show", "v1", "--state-dir", state],
        ["delete", "v1", "--state-dir", state],
        ["array", "info", "--api", closed_api, "--token", "t"],
        ["lun", "list", "--api", closed_api, "--token", "t"],
        ["migration", "list", "--api", closed_api, "--token", "t"],
    ]
    r = run_cli(tmp_path, runs)
    assert r["rcs"] == [0, 1, 1, 1, 1, 1], r["outs"]
    assert "no volumes" in str(r["outs"][0])
    assert all("cannot reach the array API" in str(out) for out in r["outs"][3:]), r["outs"]
    assert r["loaded"] == []


def test_a_command_loads_its_code_when_it_runs(tmp_path: Path) -> None:
    r = run_cli(tmp_path, [["serve-file", str(tmp_path / "missing.img")]])
    assert r["rcs"] == [1]
    assert "blockmig serve-file:" in str(r["outs"][0])  # emulator.array.serve_file's own message
    assert "emulator.nbd.server" in r["loaded"]
