"""blockmig.testing, the pytest plugin users get: what it refuses, what it leaves behind.

The plugin loads into every pytest run from its entry point, so importing it must start and
import nothing heavy; a test that fails must still leave no array or follower running.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from blockmig.testing import BlockmigEnv, BlockmigError
from control.config import pid_alive


def test_importing_the_plugin_imports_neither_the_emulator_nor_the_control_layer() -> None:
    code = (
        "import sys, blockmig.testing; "
        "print([m for m in sys.modules if m.split('.')[0] in ('control', 'emulator', 'uvloop', 'aiohttp')])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"importing blockmig.testing imported {r.stdout.strip()}"


def test_migrate_to_an_unknown_array_is_refused_with_the_arrays_known(blockmig_arrays: BlockmigEnv) -> None:
    vol = blockmig_arrays.create_volume("stays", size=1 << 20)
    vol.write(0, b"kept" * 1024)

    with pytest.raises(BlockmigError) as e:
        vol.migrate(to="Z")

    assert "unknown array 'Z'" in e.value.message and "(arrays: A, B)" in e.value.message, e.value
    assert e.value.command.startswith(f"migrate {vol.id} Z")
    assert "unknown array 'Z'" in str(e.value)
    d = vol.show()  # nothing moved: still on A, readable and writable
    assert d["host"].startswith("A@") and d["migration_status"] is None, d
    assert vol.read(0, 4096) == b"kept" * 1024
    vol.write(4096, b"more" * 1024)
    assert vol.read(4096, 4096) == b"more" * 1024


def test_arrays_are_only_array_specs(blockmig_factory: Callable[..., BlockmigEnv]) -> None:
    with pytest.raises(TypeError, match="ArraySpec"):
        blockmig_factory("A")


INNER = """
    import json
    from pathlib import Path

    import pytest

    from blockmig.testing import ArraySpec


    @pytest.mark.blockmig_arrays(ArraySpec("X"), ArraySpec("Y", model="plain"))
    def test_fails_while_a_migration_runs(blockmig_arrays, blockmig_factory):
        more = blockmig_factory()  # A and B
        vol = blockmig_arrays.create_volume("v", size=16 << 20)
        vol.write(0, b"x" * (1 << 20))
        status = vol.migrate(to="Y", wait=False)  # to a plain array: a host copy, in a follower
        pids = {**blockmig_arrays.array_pids(), **more.array_pids()}
        pids["follower"] = blockmig_arrays.db_migration(vol.id)["pid"]
        Path("pids.json").write_text(json.dumps({"status": status, "pids": pids}))
        assert False, "this test fails on purpose"
"""


def test_teardown_stops_every_array_and_follower_even_when_the_test_fails(tmp_path: Path) -> None:
    """A user's test suite in its own dir: the plugin comes from the entry point alone."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_user.py").write_text(textwrap.dedent(INNER))

    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )

    assert "1 failed" in r.stdout and "this test fails on purpose" in r.stdout, r.stdout + r.stderr
    assert "error" not in r.stdout.splitlines()[-1], f"teardown failed:\n{r.stdout}"
    ran = json.loads((tmp_path / "pids.json").read_text())
    assert ran["status"] == "migrating", ran  # (the marker's models were the arrays' models)
    assert sorted(ran["pids"]) == ["A", "B", "X", "Y", "follower"], ran
    alive = {name: pid for name, pid in ran["pids"].items() if pid_alive(pid)}
    assert not alive, f"still running after the test's teardown: {alive}"
    assert not list((tmp_path / "t").glob("*/blockmig-*/arrays.json")), "`blockmig down` did not run"


def test_the_example_in_the_docs_is_the_example_test() -> None:
    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "testing.md").read_text()
    example = (root / "tests" / "examples" / "test_plugin_example.py").read_text()
    assert f"```python\n{example}```" in doc, "docs/testing.md must show test_plugin_example.py as it is"
