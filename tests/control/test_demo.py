"""`blockmig demo` end to end, small: it passes, and it leaves nothing behind.

The demo runs as a subprocess with a 64 MiB volume and short fio runs. It uses nbdfuse + a
loop device where it can (root, /dev/fuse, /dev/loop-control), else fio's nbd engine.
Afterwards no loop device, mount or process may refer to its work dir, and the work dir
is gone; the same holds when it is interrupted half-way through the migration.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.interop]

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--size", "64M", "--fio-seconds", "2", "--tail-seconds", "1"]


def demo(work: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "control.cli", "demo", *SMALL, "--work-dir", str(work), *extra],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",  # each line as it is printed: the interrupt test waits for one
            "COLUMNS": "200",
            "BLOCKMIG_FAIL_AT": "",
        },
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def leftovers(work: Path) -> list[str]:
    """Loop devices, mounts and processes that still refer to ``work``."""
    found = []
    mark = str(work)
    r = subprocess.run(["losetup", "-l", "-J"], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        for dev in json.loads(r.stdout).get("loopdevices", []):
            if mark in (dev.get("back-file") or ""):
                found.append(f"loop device {dev['name']} on {dev['back-file']}")
    with open("/proc/self/mounts") as f:
        found += [f"mount {line.split()[1]}" for line in f if mark in line.split()[1]]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if mark.encode() in cmd and int(pid) != os.getpid():
            args = cmd.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"process {pid}: {args[:160]}")
    if work.exists():
        found.append(f"work dir {work}")
    return found


def test_demo_passes_and_cleans_up(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    p = demo(work)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert "PASS" in out and "migrating_attachable -> success" in out, out
    assert "sha256 matches" in out and "FAIL" not in out, out
    assert leftovers(work) == [], out


def test_demo_interrupted_cleans_up(tmp_path: Path) -> None:
    """Ctrl-C while the volume migrates: exit 130, and everything started is stopped."""
    work = tmp_path / "demo"
    p = demo(work, "--fio-seconds", "8")  # B's copier is held that long: time to interrupt
    deadline = time.monotonic() + 60
    assert p.stdout is not None
    seen = []
    for line in p.stdout:  # wait until fio runs on B
        seen.append(line)
        if "fio runs the same job" in line or time.monotonic() > deadline:
            break
    p.send_signal(signal.SIGINT)
    assert "fio runs the same job" in seen[-1], "".join(seen)
    out, _ = p.communicate(timeout=60)
    # 130; death by SIGINT (a shell reports it as 130 too) is also an honest answer to Ctrl-C
    assert p.returncode in (130, -signal.SIGINT), out
    assert "interrupted: stopped everything the demo started" in out, out
    assert leftovers(work) == [], out
