"""blockmig installed as docs/testing.md says (`pip install /path/to/blockmig`, not `-e`) and
used outside the checkout: what the install holds, the CLI, the pytest plugin, the benchmarks.

The package is built from a copy of this tree and installed with ``pip install --no-deps
--target`` into the module's temporary dir; every command below imports blockmig from there
alone (never from the repository) and runs in a directory that is not the repository.
Building needs setuptools>=77: the current environment's when it has it (no network),
else pip fetches it into an isolated build env (from its cache or the index); the tests
skip only when that cannot be had.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 120.0
CMD_TIMEOUT = 60.0
#: what is not part of a source tree (left by builds, tools, runs)
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    ".cache",
    "results",
    "*.state",
)
NO_NETWORK = (
    "No matching distribution found",
    "Could not find a version that satisfies",
    "NewConnectionError",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Max retries exceeded",
)
#: a user's package named like blockmig's: `python -m` would import it from the cwd
SHADOW = 'raise SystemExit("imported the control package of the current directory")\n'


def _setuptools_builds_here() -> bool:
    try:
        major = int(metadata.version("setuptools").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 77


class Installed:
    """blockmig installed into ``site`` (a site-packages-like dir) and how pip built it."""

    def __init__(self, site: Path, build_log: str) -> None:
        self.site = site
        self.build_log = build_log

    def env(self, pythonpath: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKMIG_")}
        env.pop("PYTHONPATH", None)
        if pythonpath:
            env["PYTHONPATH"] = str(self.site)
        return env

    def python(self, args: Sequence[str], cwd: Path, timeout: float = CMD_TIMEOUT) -> str:
        """``python ARGS`` with blockmig importable from the install alone; its output."""
        r = subprocess.run(
            [sys.executable, *args],
            cwd=cwd,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, f"python {' '.join(args)} (exit {r.returncode}):\n{r.stdout}{r.stderr}"
        return r.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("install")
    src, site = tmp / "src", tmp / "site"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE, symlinks=True)
    cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-compile"]
    if _setuptools_builds_here():
        cmd += ["--no-build-isolation", "--no-index"]
    cmd += ["--target", str(site), str(src)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        r = subprocess.run(
            cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, env=env, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"`pip install` took more than {INSTALL_TIMEOUT:.0f} s (no network?)")
    log = r.stdout + r.stderr
    if r.returncode != 0 and any(s in log for s in NO_NETWORK):
        pytest.skip(f"setuptools>=77 is neither installed nor reachable:\n{log[-1500:]}")
    assert r.returncode == 0, f"`{' '.join(cmd)}` failed:\n{log[-4000:]}"
    return Installed(site, log)


def test_the_install_holds_the_packages_their_type_markers_and_entry_points_only(
    installed: Installed, tmp_path: Path
) -> None:
    site = installed.site
    (dist,) = site.glob("blockmig-*.dist-info")
    assert sorted(p.name for p in site.iterdir()) == sorted(
        ["bench", "bin", "blockmig", "control", "emulator", dist.name]
    ), "stray or missing top-level entries"
    for pkg in ("blockmig", "control", "emulator"):
        assert (site / pkg / "py.typed").is_file(), f"{pkg}/py.typed is not installed"
    record = metadata.Distribution.at(dist).files or []
    # the packages' files (not the metadata, the script, nor the .pyc pip compiled)
    shipped = [Path(f) for f in record if f.suffix != ".pyc" and f.parts[0] not in (dist.name, "bin", "..")]
    assert Path("control/py.typed") in shipped and Path("emulator/nbd/protocol.py") in shipped, shipped
    stray = [p for p in shipped if p.suffix not in (".py", ".typed")]
    assert not stray, f"not sources: {stray}"
    assert not [p for p in shipped if "tests" in p.parts or "results" in p.parts]
    eps = metadata.Distribution.at(dist).entry_points
    assert {(e.group, e.name, e.value) for e in eps} == {
        ("console_scripts", "blockmig", "control.cli:main"),
        ("pytest11", "blockmig", "blockmig.testing"),
    }
    out = installed.python(
        ["-c", "import control, emulator, blockmig.testing as t; print(t.__file__)"], tmp_path
    )
    assert out.strip() == str(site / "blockmig" / "testing.py"), "imported from elsewhere than the install"
    assert "demo" in installed.python([str(site / "bin" / "blockmig"), "--help"], tmp_path)
    for sub in ("up", "migrate", "demo", "array serve", "migration start", "serve-file"):
        installed.python([str(site / "bin" / "blockmig"), *sub.split(), "--help"], tmp_path)


def test_the_build_uses_no_deprecated_metadata(installed: Installed) -> None:
    """`license = { text = ... }` is deprecated by setuptools and no longer builds from
    2027-02-18 on: an SPDX string does."""
    lines = [ln for ln in installed.build_log.splitlines() if "deprecated" in ln.lower()]
    assert not lines, "\n".join(lines)


def _blockmig(installed: Installed, cwd: Path, *args: str, timeout: float = CMD_TIMEOUT) -> str:
    """``blockmig ARGS`` as its console script runs it: ``control.cli:main`` from the
    install, with the script's own dir (not the cwd) first on sys.path and no PYTHONPATH."""
    launcher = installed.site.parent / "launcher" / "blockmig"
    if not launcher.exists():
        launcher.parent.mkdir(exist_ok=True)
        launcher.write_text(
            f"import sys\nsys.path.insert(1, {str(installed.site)!r})\n"
            "from control.cli import main\nsys.exit(main())\n"
        )
    r = subprocess.run(
        [sys.executable, str(launcher), *args],
        cwd=cwd,
        env=installed.env(pythonpath=False),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, (
        f"blockmig {' '.join(args)} in {cwd} (exit {r.returncode}):\n{r.stdout}{r.stderr}"
    )
    return r.stdout


def test_blockmig_works_from_a_directory_that_holds_a_control_package(
    installed: Installed, tmp_path: Path
) -> None:
    """The arrays `up` starts and the follower `migrate` starts run blockmig's own code, not
    the cwd's (they run `python -m control.cli`, which put the cwd first on sys.path)."""
    state = str(tmp_path / "state")
    clean, user = tmp_path / "clean", tmp_path / "project"
    clean.mkdir()
    (user / "control").mkdir(parents=True)
    (user / "control" / "__init__.py").write_text(SHADOW)
    try:
        _blockmig(installed, clean, "up", "--state-dir", state, timeout=120)
        # the follower of this migration starts in the user's project
        vol = json.loads(
            _blockmig(
                installed, user, "create", "--size", "4M", "--host", "A", "--state-dir", state, "--json"
            )
        )
        _blockmig(installed, user, "migrate", vol["id"], "B", "--state-dir", state, "--json")
        deadline = time.monotonic() + 60
        while (
            d := json.loads(_blockmig(installed, clean, "show", vol["id"], "--state-dir", state, "--json"))
        )["migration_status"] != "success":
            assert time.monotonic() < deadline, f"the migration did not end: {d}"
            assert d["migration_status"] in ("starting", "migrating", "migrating_attachable"), d
            time.sleep(0.2)
        assert d["host"].startswith("B@"), d
        _blockmig(installed, clean, "down", "--state-dir", state, timeout=120)
        # the arrays start from the user's project
        _blockmig(installed, user, "up", "--state-dir", state, timeout=120)
    finally:
        _blockmig(installed, clean, "down", "--state-dir", state, timeout=120)
    logs = "".join(p.read_text() for p in (tmp_path / "state" / "logs").glob("*.log"))
    assert "imported the control package" not in logs


def test_the_plugin_example_runs_from_the_installed_package(installed: Installed, tmp_path: Path) -> None:
    """docs/testing.md's example in a user's dir: the plugin comes from the entry point."""
    shutil.copy(ROOT / "tests" / "examples" / "test_plugin_example.py", tmp_path)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    fixtures = installed.python(["-m", "pytest", "-p", "no:cacheprovider", "--fixtures"], tmp_path)
    assert "fixtures defined from blockmig.testing" in fixtures, fixtures
    assert "blockmig_arrays" in fixtures and "blockmig_factory" in fixtures
    out = installed.python(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t")],
        tmp_path,
        timeout=180,
    )
    assert "1 passed" in out, out


def test_the_bench_suite_writes_under_the_current_directory(installed: Installed, tmp_path: Path) -> None:
    """Without --out, results went next to the installed bench/suite.py (site-packages)."""
    out = installed.python(["-P", "-m", "bench.suite", "--help"], tmp_path)
    assert str(installed.site) not in out
    assert "default: bench/results, under the current directory" in " ".join(out.split()), out
