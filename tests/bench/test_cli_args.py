"""The benchmarks' command lines refuse bad arguments up front, as argparse does (a usage
line, exit 2), before they fill a file or start an array: no traceback, no run of
something else than what was asked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: a suite run that ends soon if its arguments are taken (later ones override these)
TINY_SUITE = ["--quick", "--profile", "loopback", "--media", "none", "--jobs", "oltp", "--peers", ""]
TINY_SUITE += ["--size", "16M", "--runtime", "0.5"]
TINY_MIGRATION = ["--quick", "--only", "cutover", "--cutover-runs", "1"]
TINY_ACTIVE = ["--size", "16", "--seconds", "1", "--hosts", "1", "--qd", "1"]
TINY_NBD = ["--size", "16M", "--runtime", "0.5", "--rounds", "1", "--jobs", "4k_randread_qd32"]


@pytest.mark.parametrize(
    ("module", "args", "says"),
    [
        ("bench.nbd_server", ["--size", "1X"], "not a size"),
        ("bench.nbd_server", ["--size", "1M", "--rounds", "-1"], "--rounds"),
        ("bench.nbd_server", ["--size", "1M", "--jobs", "4k_randread_qd32,nope"], "--jobs"),
        ("bench.migration", ["--size", "1X"], "not a size"),
        ("bench.migration", ["--quick", "--only", "copy,nope"], "--only"),
        ("bench.suite", ["--quick", "--size", "1X"], "not a size"),
        ("bench.suite", ["--quick", "--profile", "loopback", "--media", "floppy"], "floppy"),
        ("bench.suite", ["--quick", "--workdir", "/nonexistent/blockmig"], "not a directory"),
        ("bench.migration", ["--quick", "--workdir", "/nonexistent/blockmig"], "not a directory"),
        ("bench.nbd_server", ["--quick", "--dir", "/nonexistent/blockmig"], "not a directory"),
        ("bench.file_io", ["--size", "1X"], "not a size"),
        # a typo in a list of names: exit 2 like the others, not 1 with a bare message
        ("bench.suite", ["--quick", "--jobs", "oltp,nope"], "--jobs"),
        ("bench.suite", ["--quick", "--profile", "fc,nope"], "--profile"),
        ("bench.suite", ["--quick", "--jobs", ""], "--jobs"),
        ("bench.nbd_server", ["--quick", "--jobs", ""], "--jobs"),
        ("bench.migration", ["--quick", "--only", ""], "--only"),
        # ... nor after a whole run (--peers was checked by nobody: a KeyError at the peers),
        # nor a second run of a fabric or media over the first one's directories and data
        ("bench.suite", [*TINY_SUITE, "--peers", "oltpp"], "--peers"),
        ("bench.suite", [*TINY_SUITE, "--profile", "loopback,loopback"], "twice"),
        ("bench.suite", [*TINY_SUITE, "--media", "none,none"], "twice"),
        # a size of 0 was the default size; one the arrays or fio refuse failed mid-run
        ("bench.suite", [*TINY_SUITE, "--size", "0"], "--size"),
        ("bench.suite", [*TINY_SUITE, "--size", "1000"], "--size"),
        ("bench.migration", ["--quick", "--only", "copy", "--size", "1000"], "--size"),
        ("bench.nbd_server", [*TINY_NBD, "--size", "100K"], "--size"),
        # where nothing can be made (root may write anywhere else, even where modes forbid)
        ("bench.suite", ["--quick", "--workdir", "/proc"], "--workdir"),
        ("bench.migration", ["--quick", "--workdir", "/proc"], "--workdir"),
        ("bench.nbd_server", ["--quick", "--dir", "/proc"], "--dir"),
        ("bench.suite", ["--quick", "--out", "/proc/version"], "--out"),
        ("bench.suite", ["--quick", "--out", "/proc/blockmig"], "--out"),
        # ... and not at the end of the run, losing its JSON
        ("bench.migration", [*TINY_MIGRATION, "--json-out", "/nonexistent/r.json"], "--json-out"),
        ("bench.nbd_server", [*TINY_NBD, "--json-out", "/nonexistent/r.json"], "--json-out"),
        # counts and times that are none: tracebacks (KeyError, ApiError) after the arrays started
        ("bench.active_load", [*TINY_ACTIVE, "--hosts", "0"], "--hosts"),
        ("bench.active_load", [*TINY_ACTIVE, "--qd", "-1"], "--qd"),
        ("bench.active_load", [*TINY_ACTIVE, "--size", "0"], "--size"),
        ("bench.active_load", [*TINY_ACTIVE, "--seconds", "0"], "--seconds"),
        ("bench.active_load", [*TINY_ACTIVE, "--json", "/nonexistent/r.json"], "--json"),
        # no round trips to summarize: an IndexError in the prober, a traceback in `show`
        ("bench.fabric", ["show", "--profile", "loopback", "--count", "0"], "--count"),
        ("bench.fabric", ["ping", "--connect", "127.0.0.1:9", "--count", "-1"], "--count"),
    ],
)
def test_a_bad_argument_is_a_usage_error(tmp_path: Path, module: str, args: list[str], says: str) -> None:
    cmd = [sys.executable, "-m", module, *args, *_work_in(module, tmp_path, args)]
    p = run_bounded(cmd, 60, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert p.returncode == 2, f"exit {p.returncode}: {p.stdout[-2000:]} {p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr
    assert "usage:" in p.stderr and says in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == [], "it started work before refusing its arguments"


def run_bounded(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``cmd``'s exit and output; past ``timeout`` it gets SIGTERM, on which every benchmark
    stops what it started (a SIGKILL, subprocess.run's, would leave its arrays running)."""
    p = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        pytest.fail(f"{cmd} still ran after {timeout} s: {out[-2000:]} {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _work_in(module: str, tmp_path: Path, args: list[str]) -> list[str]:
    """What keeps a run that should have been refused inside ``tmp_path``."""
    if module == "bench.suite" and "--out" not in args:
        out = ["--out", str(tmp_path / "out")]
    else:
        out = []
    if (
        "--workdir" in args
        or "--dir" in args
        or module in ("bench.file_io", "bench.active_load", "bench.fabric")
    ):
        return out
    if module == "bench.nbd_server":
        return ["--dir", str(tmp_path)]
    return ["--workdir", str(tmp_path), *out]


def test_file_io_takes_the_size_its_usage_line_shows(tmp_path: Path) -> None:
    """`python -m bench.file_io [--quick] [--size 256M]`: a size with a unit is one."""
    p = subprocess.Popen(
        [sys.executable, "-m", "bench.file_io", "--quick", "--size", "4M"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert p.returncode == 0, err[-2000:]
    assert out.splitlines()[-1].startswith('{"inline_max"'), out[-2000:]


@pytest.mark.parametrize(
    ("module", "args", "installed", "missing"),
    [
        ("bench.migration", ["--quick", "--only", "cutover"], [], "fio"),
        ("bench.migration", ["--quick", "--only", "copy"], ["fio"], "nbdcopy"),
        ("bench.suite", TINY_SUITE, [], "fio"),
        # the peers' tools: missing, the suite ran its phases and then failed at the peers
        ("bench.suite", [*TINY_SUITE, "--peers", "oltp"], ["fio"], "nbdcopy"),
        (
            "bench.suite",
            [*TINY_SUITE, "--peers", "oltp"],
            ["fio", "nbdcopy", "nbdkit", "qemu-nbd"],
            "qemu-img",
        ),
        ("bench.active_load", TINY_ACTIVE, [], "fio"),
        ("bench.nbd_server", TINY_NBD, ["fio"], "nbdkit"),
    ],
)
def test_a_missing_tool_stops_it_before_it_starts(
    tmp_path: Path, module: str, args: list[str], installed: list[str], missing: str
) -> None:
    """Not a FileNotFoundError traceback once the arrays run (or after a whole suite)."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    for tool in installed:
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"needs {tool}")
        (bin_dir / tool).symlink_to(found)
    cmd = [sys.executable, "-m", module, *args, *_work_in(module, work, args)]
    p = run_bounded(cmd, 60, env={**os.environ, "TMPDIR": str(work), "PATH": str(bin_dir)})
    assert p.returncode == 1, f"exit {p.returncode}: {p.stdout[-2000:]} {p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr
    assert f"{missing} is not installed" in p.stderr, p.stderr
    assert list(work.iterdir()) == [], "it started work before it looked for its tools"
