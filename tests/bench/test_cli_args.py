"""The benchmarks' command lines refuse bad arguments up front, as argparse does (a usage
line, exit 2), before they fill a file or start an array: no traceback, no run of
something else than what was asked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
    ],
)
def test_a_bad_argument_is_a_usage_error(tmp_path: Path, module: str, args: list[str], says: str) -> None:
    cmd = [sys.executable, "-m", module, *args, *_work_in(module, tmp_path, args)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, f"exit {p.returncode}: {p.stdout[-2000:]} {p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr
    assert "usage:" in p.stderr and says in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == [], "it started work before refusing its arguments"


def _work_in(module: str, tmp_path: Path, args: list[str]) -> list[str]:
    """What keeps a run that should have been refused inside ``tmp_path``."""
    if "--workdir" in args or "--dir" in args or module == "bench.file_io":
        return []
    if module == "bench.nbd_server":
        return ["--dir", str(tmp_path)]
    return [
        "--workdir",
        str(tmp_path),
        *(["--out", str(tmp_path / "out")] if module == "bench.suite" else []),
    ]


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
