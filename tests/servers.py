"""Start and always stop real NBD servers for tests: ours, nbdkit, qemu-nbd.

Every server binds 127.0.0.1 port 0 (ours prints the port it got) or a unix
socket in the test's tmp dir; each is a real process stopped at teardown.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from control.api_client import ArrayApi
from control.config import child_env

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
    cmd = [
        sys.executable,
        "-m",
        "control.cli",
        "serve-file",
        str(path),
        "--listen",
        "127.0.0.1:0",
        "--export",
        export,
        *args,
    ]
    err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"nbd://127\.0\.0\.1:(\d+)/", line)
        if not m:
            proc.kill()
            proc.wait(5)
            err.seek(0)
            raise RuntimeError(f"serve-file did not start: {line!r} {err.read()}")
        port = int(m.group(1))
        yield Server(proc, f"nbd://127.0.0.1:{port}/{export}", port=port, export=export)
    finally:
        stop(proc)
        err.close()


@contextmanager
def nbdkit(
    tmp: Path, plugin: str, *args: str, export: str = "", sock: str | Path | None = None
) -> Iterator[Server]:
    """nbdkit in the foreground on a unix socket (``sock``: a given path, so that a
    source restarted there has the same URI; the one a killed nbdkit left is removed)."""
    if not shutil.which("nbdkit"):
        raise RuntimeError("nbdkit is not installed (make install)")
    if sock is None:
        sock = tmp / f"nbdkit-{os.getpid()}-{time.monotonic_ns()}.sock"
    Path(sock).unlink(missing_ok=True)
    sock = str(sock)
    proc = subprocess.Popen(
        ["nbdkit", "-f", "-U", sock, plugin, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
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
    proc = subprocess.Popen([*cmd, str(image)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_unix(sock, proc)
        yield Server(proc, f"nbd+unix:///{export}?socket={sock}", export=export, socket=sock)
    finally:
        stop(proc)


@dataclass(frozen=True)
class MemoryExport:
    """One export of :func:`serve_exports`: a MemoryBackend of ``size`` bytes."""

    name: str
    size: int
    description: str = ""
    read_only: bool = False


_SERVE_EXPORTS = r"""
import asyncio, json, sys
from emulator.nbd.backend import MemoryBackend
from emulator.nbd.server import NbdServer, serve_forever_loop, stop_event

async def main(spec):
    server = NbdServer(default_export=spec["default"])
    for e in spec["exports"]:
        server.add_export(e["name"], MemoryBackend(e["size"]), e["description"],
                          read_only=e["read_only"])
    host, port = await server.listen_tcp("127.0.0.1", 0)
    stopped = stop_event()  # before the line that says it listens
    print(f"listening nbd://127.0.0.1:{port}/", flush=True)
    await stopped.wait()
    await server.close()

loop = serve_forever_loop()
try:
    loop.run_until_complete(main(json.loads(sys.argv[1])))
finally:
    loop.close()
"""


@contextmanager
def serve_exports(*exports: MemoryExport, default: str | None = None) -> Iterator[Server]:
    """Our NbdServer with several in-memory exports, as a subprocess on 127.0.0.1 port 0.

    ``uri`` is the base ``nbd://127.0.0.1:PORT/`` (the empty export name, which
    reaches ``default`` when given); name an export with ``server.uri + name``.
    """
    spec = {
        "default": default,
        "exports": [
            {"name": e.name, "size": e.size, "description": e.description, "read_only": e.read_only}
            for e in exports
        ],
    }
    cmd = [sys.executable, "-c", _SERVE_EXPORTS, json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"nbd://127\.0\.0\.1:(\d+)/", line)
        if not m:
            proc.kill()
            raise RuntimeError(
                f"serve_exports did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
            )
        port = int(m.group(1))
        yield Server(proc, f"nbd://127.0.0.1:{port}/", port=port, export=default or "")
    finally:
        stop(proc)


# --------------------------------------------------------------------------- arrays
ARRAY_BANNER = re.compile(
    r"^array (?P<name>\S+) \(model (?P<model>\S+), media (?P<media>\S+)\): "
    r"nbd nbd://(?P<nbd_host>\[[^\]]+\]|[^:\s]+):(?P<nbd_port>\d+) "
    r"api (?P<api>http://\S+) luns (?P<luns>\d+) data (?P<data>.+)$"
)


@dataclass
class ArrayDaemon:
    """A running `blockmig array serve` subprocess (see :func:`array_daemon`)."""

    proc: subprocess.Popen[bytes]
    name: str
    data_dir: Path
    model: str
    media: str
    nbd_host: str
    nbd_port: int
    api: str  # http://127.0.0.1:PORT
    token: str
    luns_at_start: int
    banner: str
    stdout_path: Path
    stderr_path: Path

    def uri(self, lun: str) -> str:
        """The NBD URI of a LUN (its export name is the LUN name)."""
        return f"nbd://{self.nbd_host}:{self.nbd_port}/{lun}"

    def output(self) -> str:
        """Everything the daemon wrote so far, stdout then stderr (for failure messages)."""
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def sigkill(self) -> None:
        """kill -9 the daemon and reap it: a crash, nothing flushed or closed by it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def sigterm(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; return the exit code (TimeoutExpired if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def array_api(d: ArrayDaemon, timeout: float | None = None) -> ArrayApi:
    """A client of ``d``'s management API with its token (``timeout=None``: ArrayApi's default)."""
    if timeout is None:
        return ArrayApi(d.api, d.token)
    return ArrayApi(d.api, d.token, timeout=timeout)


def start_array(
    data_dir: str | Path,
    name: str,
    *extra_args: str,
    token: str | None = "test-token",
    nofile: tuple[int, int] | None = None,
) -> ArrayDaemon:
    """Start `blockmig array serve` on 127.0.0.1 port 0 (NBD and API); return once it listens.

    The caller must stop it (``stop(d.proc)``); prefer :func:`array_daemon`.
    ``token=None`` passes no --token: the daemon then uses $BLOCKMIG_TOKEN or the
    token file it keeps in its data dir, which is read back into ``.token``.
    ``nofile``: the (soft, hard) open-files limit it starts with.
    Output goes to files next to the data dir (never a pipe that could fill up).
    """
    data_dir = Path(data_dir)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{data_dir.name}-{time.monotonic_ns()}"
    out_path = data_dir.parent / f"array-{tag}.out"
    err_path = data_dir.parent / f"array-{tag}.err"
    cmd = [
        sys.executable,
        "-m",
        "control.cli",
        "array",
        "serve",
        "--name",
        name,
        "--data-dir",
        str(data_dir),
        "--nbd-listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
    ]
    if token is not None:
        cmd += ["--token", token]
    cmd += list(extra_args)
    root = Path(__file__).resolve().parent.parent
    env = child_env()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        limit = None if nofile is None else partial(resource.setrlimit, resource.RLIMIT_NOFILE, nofile)
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=root, env=env, preexec_fn=limit
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        line = ""
        while True:
            text = out_path.read_text(errors="replace")
            if "\n" in text:
                line = text.split("\n", 1)[0]
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if proc.returncode is not None else "timed out"
                raise RuntimeError(
                    f"array {name} did not start ({why}): {' '.join(cmd)}\n"
                    f"stdout: {text}\nstderr: {err_path.read_text(errors='replace')}"
                )
            time.sleep(0.02)
        m = ARRAY_BANNER.match(line)
        if not m:
            raise RuntimeError(f"array {name}: unexpected first line {line!r}")
        if token is None:
            token = os.environ.get("BLOCKMIG_TOKEN") or (data_dir / "token").read_text().strip()
        return ArrayDaemon(
            proc=proc,
            name=m["name"],
            data_dir=Path(m["data"]),
            model=m["model"],
            media=m["media"],
            nbd_host=m["nbd_host"],
            nbd_port=int(m["nbd_port"]),
            api=m["api"],
            token=token,
            luns_at_start=int(m["luns"]),
            banner=line,
            stdout_path=out_path,
            stderr_path=err_path,
        )
    except BaseException:
        stop(proc)  # type: ignore[arg-type]
        raise


@contextmanager
def array_daemon(
    data_dir: str | Path,
    name: str,
    *extra_args: str,
    token: str | None = "test-token",
    nofile: tuple[int, int] | None = None,
) -> Iterator[ArrayDaemon]:
    """`blockmig array serve --name NAME --data-dir DIR ... --token TOKEN EXTRA...` as a subprocess.

    Yields an :class:`ArrayDaemon` (``.proc``, ``.nbd_host``, ``.nbd_port``, ``.api``,
    ``.token``, ``.uri(lun)``); stops it with SIGTERM (then SIGKILL) on the way out,
    unless the test already killed it. To test a restart, ``d.sigkill()`` (or
    ``d.sigterm()``) inside the block and open a new ``array_daemon`` on the same
    data dir.
    """
    d = start_array(data_dir, name, *extra_args, token=token, nofile=nofile)
    try:
        yield d
    except BaseException as e:
        # A failing test shows what the daemon said (and whether it was still running).
        state = "running" if d.proc.poll() is None else f"exited {d.proc.returncode}"
        e.add_note(f"array {name} ({state}) output:\n{d.output()[-4000:]}")
        raise
    finally:
        stop(d.proc)  # type: ignore[arg-type]
