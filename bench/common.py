"""Pieces the benchmarks share: arrays as real processes, NBD peers, the migration API.

Every array is a real ``blockmig array serve`` process (NBD and API on port
0) driven through its management API, the client the CLI uses. A ``wrap``
function turns an argv into the argv that runs it where it belongs (e.g.
``ip netns exec A ...`` on an emulated fabric); the default runs it here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control.api_client import FINAL, ArrayApi
from emulator.units import size_arg

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"
MiB = 1 << 20
START_TIMEOUT = 20.0
RUNNING = ("copying", "converging")

Wrap = Callable[[list[str]], list[str]]


def dir_arg(text: str) -> str:
    """An existing directory we can create files in, for argparse: tempfile's own error is
    a traceback, after the benchmark has set up its fabric and its arrays."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"not a directory: {text!r}")
    _check_writable(text)
    return text


def out_file_arg(text: str) -> str:
    """A file the result can be written to (``--json-out``), checked before the run: not
    after it, when a missing directory would lose the JSON of a half-hour run."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    parent = os.path.dirname(text) or "."
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: no directory {parent!r}")
    _check_writable(parent)
    return text


def out_dir(path: Path) -> Path:
    """``path`` made if need be and checked to take files; ArgumentTypeError says why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot make directory {str(path)!r}: {e.strerror}") from None
    _check_writable(str(path))
    return path


def _check_writable(directory: str) -> None:
    # try it: os.access says yes to root for a read-only bind mount or /proc
    try:
        tempfile.TemporaryDirectory(dir=directory, prefix=".blockmig-probe-").cleanup()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot create files in {directory!r}: {e.strerror}") from None


def mib_size_arg(text: str) -> int:
    """A size of whole MiB (at least 1M), for argparse: the benchmarks write their volumes
    and files in 1 MiB blocks, and a LUN is whole sectors. 0 is no size (it used to mean
    the default), and a size the arrays or fio refuse failed mid-run with a traceback."""
    n: int = size_arg(text)
    if n <= 0 or n % MiB:
        raise argparse.ArgumentTypeError(f"a whole number of MiB, at least 1M (e.g. 64M), not {text!r}")
    return n


def names_arg(valid: Sequence[str], empty: bool = False) -> Callable[[str], list[str]]:
    """A comma-separated list of names from ``valid``, each at most once, for argparse
    (``empty``: '' is the empty list). A typo is a usage error before anything starts,
    not a traceback once the fabric and the arrays are up, nor a quiet run of fewer;
    a name twice would run its part twice and keep one result."""

    def parse(text: str) -> list[str]:
        names = text.split(",") if text else []
        if not names and not empty:
            raise argparse.ArgumentTypeError(f"name one or more of {','.join(valid)}")
        for n in names:
            if n not in valid:
                raise argparse.ArgumentTypeError(f"{n!r} is not one of {','.join(valid)}")
            if names.count(n) > 1:
                raise argparse.ArgumentTypeError(f"{n!r} is named twice")
        return names

    return parse


def missing_tools(*tools: str) -> bool:
    """Say which of ``tools`` (peers run by name) are not installed; True if any: the
    benchmark stops before it starts anything, not with a traceback midway, or at the
    end after its other phases ran for nothing."""
    missing = [t for t in dict.fromkeys(tools) if shutil.which(t) is None]
    for tool in missing:
        print(f"bench: {tool} is not installed (make install)", file=sys.stderr)
    return bool(missing)


def no_wrap(argv: list[str]) -> list[str]:
    return argv


@dataclass
class Array:
    name: str
    proc: subprocess.Popen[bytes]
    nbd: str  # nbd://HOST:PORT
    api: ArrayApi

    def uri(self, lun: str) -> str:
        return f"{self.nbd}/{lun}"


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """``sig``, then SIGKILL if it still runs 10 s later, or at once if we are interrupted
    meanwhile (a second Ctrl-C or SIGTERM): it must not outlive us."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        except BaseException:
            proc.kill()
            raise


@contextmanager
def serve_array(
    work: Path, name: str, media: str, host: str = "127.0.0.1", wrap: Wrap = no_wrap
) -> Iterator[Array]:
    """``blockmig array serve`` listening on ``host`` (port 0), stopped on exit."""
    data = work / name
    cmd = [sys.executable, "-m", "control.cli", "array", "serve", "--name", name, "--data-dir", str(data)]
    cmd += f"--nbd-listen {host}:0 --api-listen {host}:0 --token {TOKEN} --media {media}".split()
    with open(work / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(
            wrap(cmd), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        runtime = data / "runtime.json"  # written once both listeners are up
        while not runtime.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"array {name} did not start: {(work / f'{name}.log').read_text()}")
            time.sleep(0.02)
        rt = json.loads(runtime.read_text())
        yield Array(name, proc, rt["nbd"], ArrayApi(rt["api"], TOKEN))
    finally:
        stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def serve_peer(argv: list[str], pidfile: Path, log: Path, wrap: Wrap = no_wrap) -> Iterator[None]:
    """An NBD peer (nbdkit, qemu-nbd) in the foreground; ready once it wrote ``pidfile``."""
    pidfile.unlink(missing_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(wrap(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not pidfile.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start (exit {proc.poll()}): {log.read_text()}")
            time.sleep(0.01)
        yield
    finally:
        stop(proc)


def run(argv: list[str], what: str, timeout: float = 600, wrap: Wrap = no_wrap) -> None:
    p = subprocess.run(wrap(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed: {p.stderr.decode().strip()}")


# ---------------------------------------------------------------- migrations
def start(b: Array, src: str, lun: str, **opts: Any) -> None:
    b.api.call("POST", "/api/v1/migrations", {"lun": lun, "source": src, **opts})


def status(b: Array, lun: str) -> dict[str, Any]:
    return b.api.migration(lun)


def wait(b: Array, lun: str, timeout: float = 600) -> dict[str, Any]:
    """Long polls until the migration has completed (the answer comes when it ends, not at
    the next poll, so a copy's time has no polling interval in it); any other end raises."""
    st = b.api.wait_migration(lun, timeout)
    if st["state"] not in FINAL:
        raise RuntimeError(f"migration of {lun} on {b.name} still {st['state']} after {timeout} s")
    if st["state"] != "completed":
        raise RuntimeError(f"migration of {lun} on {b.name} {st['state']}: {st['last_error']}")
    return st


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def emit_json(doc: dict[str, Any], json_out: str | None) -> None:
    """The result: indented into ``json_out`` if given, and as the last line printed."""
    if json_out:
        Path(json_out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, separators=(",", ":")))
