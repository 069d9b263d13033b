"""Start and always stop real NBD servers for tests: ours, nbdkit, qemu-nbd.

Every server binds 127.0.0.1 port 0 (ours prints the port it got) or a unix
socket in the test's tmp dir; each is a real process stopped at teardown.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 20.0


@dataclass
class Server:
    proc: subprocess.Popen[str]
    uri: str  # nbd://127.0.0.1:PORT/NAME or nbd+unix:///NAME?socket=PATH
    host: str = "127.0.0.1"
    port: int = 0
    export: str = ""
    socket: str = ""


def stop(proc: subprocess.Popen[str], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait_for_unix(path: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    raise TimeoutError(f"no server on {path}")


@contextmanager
def serve_file(path: str | Path, *args: str, export: str = "") -> Iterator[Server]:
    """`blockmig serve-file PATH --listen 127.0.0.1:0 ...` as a subprocess."""
    cmd = [sys.executable, "-m", "control.cli", "serve-file", str(path),
           "--listen", "127.0.0.1:0", "--export", export, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"nbd://127\.0\.0\.1:(\d+)/", line)
        if not m:
            proc.kill()
            raise RuntimeError(f"serve-file did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
        port = int(m.group(1))
        yield Server(proc, f"nbd://127.0.0.1:{port}/{export}", port=port, export=export)
    finally:
        stop(proc)


@contextmanager
def nbdkit(tmp: Path, plugin: str, *args: str, export: str = "") -> Iterator[Server]:
    """nbdkit in the foreground on a unix socket."""
    if not shutil.which("nbdkit"):
        raise RuntimeError("nbdkit is not installed (make install)")
    sock = str(tmp / f"nbdkit-{os.getpid()}-{time.monotonic_ns()}.sock")
    proc = subprocess.Popen(["nbdkit", "-f", "-U", sock, plugin, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_unix(sock, proc)
        yield Server(proc, f"nbd+unix:///{export}?socket={sock}", export=export, socket=sock)
    finally:
        stop(proc)


@contextmanager
def qemu_nbd(tmp: Path, image: str | Path, *args: str, export: str = "") -> Iterator[Server]:
    """qemu-nbd on a unix socket (persistent, raw format)."""
    sock = str(tmp / f"qemu-nbd-{os.getpid()}-{time.monotonic_ns()}.sock")
    cmd = ["qemu-nbd", "-k", sock, "-f", "raw", "--persistent", "--shared=8", *args]
    if export:
        cmd += ["-x", export]
    proc = subprocess.Popen([*cmd, str(image)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_unix(sock, proc)
        yield Server(proc, f"nbd+unix:///{export}?socket={sock}", export=export, socket=sock)
    finally:
        stop(proc)
