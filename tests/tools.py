"""Real command-line tools for tests: skip when one is missing, run one under a timeout."""

from __future__ import annotations

import selectors
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

TOOL_TIMEOUT = 60  # seconds; every tool run (an NBD peer, a CLI call) runs under it
LIBNBD_PYTHON = "/usr/bin/python3"  # python3-libnbd lives only there


def need(*tools: str) -> None:
    """Skip the test unless every one of ``tools`` is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (run `make install`)")


def need_libnbd() -> None:
    """Skip the test unless ``import nbd`` works under :data:`LIBNBD_PYTHON`."""
    r = subprocess.run([LIBNBD_PYTHON, "-c", "import nbd"], capture_output=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"python3-libnbd is not importable under {LIBNBD_PYTHON} (make install)")


def libnbd_host(script: str, *args: str, ready: str, stdin: bool = False) -> subprocess.Popen[str]:
    """``script`` under :data:`LIBNBD_PYTHON` (a libnbd host), once it printed a line
    starting with ``ready`` (within 20 s). The caller kills it."""
    need_libnbd()
    proc = subprocess.Popen(
        [LIBNBD_PYTHON, "-c", script, *args],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=20):
            raise TimeoutError(f"libnbd host {args} did not print {ready!r} in 20 s")
        line = proc.stdout.readline()
        assert line.startswith(ready), f"libnbd host: {line!r} {proc.stderr.read() if proc.stderr else ''}"
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    timeout: float = TOOL_TIMEOUT,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion under a timeout; on check, fail the test with its output."""
    p = subprocess.run(
        list(cmd), capture_output=True, text=True, errors="replace", timeout=timeout, cwd=cwd, env=env
    )
    if check and p.returncode != 0:
        pytest.fail(
            f"{shlex.join(cmd)} exited {p.returncode}\nstdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}"
        )
    return p


#: a libnbd host driven line by line on stdin: ``w OFF BYTE LEN`` (pwrite of LEN bytes of the
#: hex BYTE), ``r OFF LEN`` (pread), ``f`` (flush); each answers ``ok [HEX]`` or ``err ENAME
#: MESSAGE`` on one line. It prints ``connected SIZE READ_ONLY`` first.
LIBNBD_SHELL = r"""
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", h.get_size(), h.is_read_only(), flush=True)
for line in sys.stdin:
    op, *a = line.split()
    try:
        if op == "w":
            h.pwrite(bytes([int(a[1], 16)]) * int(a[2]), int(a[0]))
            print("ok", flush=True)
        elif op == "r":
            print("ok", h.pread(int(a[1]), int(a[0])).hex(), flush=True)
        elif op == "f":
            h.flush()
            print("ok", flush=True)
    except nbd.Error as e:
        print("err", e.errno, str(e).replace("\n", " "), flush=True)
"""


class LibnbdShell:
    """A libnbd host (:data:`LIBNBD_SHELL`) connected to ``uri``; ``close()`` ends it."""

    def __init__(self, uri: str) -> None:
        self.proc = libnbd_host(LIBNBD_SHELL, uri, ready="connected", stdin=True)
        self.sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)

    def ask(self, line: str, timeout: float = 20.0) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        if not self.sel.select(timeout=timeout):
            raise TimeoutError(f"libnbd host: no answer to {line!r} in {timeout} s")
        return self.proc.stdout.readline().split()

    def write(self, offset: int, byte: int, length: int) -> list[str]:
        """['ok'] or ['err', ERRNO, ...]."""
        return self.ask(f"w {offset} {byte:02x} {length}")

    def read(self, offset: int, length: int) -> bytes:
        r = self.ask(f"r {offset} {length}")
        assert r[0] == "ok", f"read at {offset} failed: {r}"
        return bytes.fromhex(r[1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.sel.close()

    def __enter__(self) -> LibnbdShell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
