"""A benchmark stopped by SIGTERM (a CI timeout, `kill`) mid-run leaves nothing behind:
no array, fio or server process, no temporary directory or file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (a tmp_path: only the test's own)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = (
                Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
        if text in cmdline and int(entry) != os.getpid():
            pids.append(int(entry))
    return pids


def wait_for(cond: Callable[[], object], p: subprocess.Popen[bytes], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := cond():
            return v
        if p.poll() is not None:
            pytest.fail(f"it ended (exit {p.returncode}) before {what}")
        time.sleep(0.1)
    pytest.fail(f"no {what} after {timeout} s")


def terminate(p: subprocess.Popen[bytes], timeout: float = 60) -> int:
    p.send_signal(signal.SIGTERM)
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)
        pytest.fail(f"it did not end within {timeout} s of SIGTERM")


def kill_left(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio (its nbd engine)")
def test_active_load_stops_fio_and_its_arrays_on_sigterm(tmp_path: Path) -> None:
    """It had no SIGTERM handler: the arrays and the fio load ran on, orphaned, and the
    temporary directory with the arrays' data stayed."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "bench.active_load", "--hosts", "1", "--qd", "4", "--size", "16"]
    p = subprocess.Popen(
        [*cmd, "--seconds", "60"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    try:
        # the load runs (fio's --name=load, with its output in our tmp_path)
        wait_for(
            lambda: [q for q in pids_mentioning(str(tmp_path)) if b"--name=load" in _cmdline(q)],
            p,
            120,
            "fio load",
        )
        assert len(pids_mentioning(str(tmp_path))) >= 3  # two arrays and fio
        assert terminate(p) == 128 + signal.SIGTERM
        time.sleep(0.5)
        left = pids_mentioning(str(tmp_path))
        assert left == [], f"left running: {[_cmdline(q)[:200] for q in left]}"
        assert list(tmp_path.iterdir()) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        kill_left(pids_mentioning(str(tmp_path)))


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


@pytest.mark.timeout(120)
def test_file_io_deletes_its_file_on_sigterm() -> None:
    """Its test file (in /var/tmp, 256 MiB by default) stayed after a SIGTERM."""
    p = subprocess.Popen(
        [sys.executable, "-m", "bench.file_io", "--size", "8M"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:

        def its_file() -> str | None:
            try:
                fds = os.listdir(f"/proc/{p.pid}/fd")
            except OSError:
                return None
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{p.pid}/fd/{fd}")
                except OSError:
                    continue
                if os.path.basename(target).startswith("blockmig-fileio-"):
                    return target
            return None

        path = wait_for(its_file, p, 60, "test file")
        assert isinstance(path, str) and os.path.exists(path)
        time.sleep(0.5)  # into the measurements
        exit_code = terminate(p)
        left = os.path.exists(path)
        if left:
            os.unlink(path)  # ours: its name was one of the process's open files
        assert not left, f"{path} left behind"
        assert exit_code == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_stop_kills_what_it_stops_when_interrupted_meanwhile() -> None:
    """A second Ctrl-C (or SIGTERM) while stop() gave an array its 10 s to exit left that
    array running, orphaned (bench.migration's, bench.nbd_server's, the relay)."""
    from bench.common import stop

    p = subprocess.Popen(["sh", "-c", "trap '' TERM; echo trapped; exec sleep 60"], stdout=subprocess.PIPE)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"trapped\n"
        signal.setitimer(signal.ITIMER_REAL, 0.5)  # within stop()'s 10 s
        with pytest.raises(KeyboardInterrupt):
            stop(p)
        assert p.wait(5) == -signal.SIGKILL
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if p.poll() is None:
            p.kill()
            p.wait(10)
