"""Real arrays for your tests: a pytest plugin.

Installing blockmig registers this module as a pytest plugin (entry point ``pytest11``), so
any test can ask for the fixtures below; see docs/testing.md. ::

    def test_migrate(blockmig_arrays: BlockmigEnv) -> None:
        vol = blockmig_arrays.create_volume("data", size=16 * MiB, host="A")
        vol.write(0, b"x" * 4096)
        assert vol.migrate(to="B") == "success"
        assert vol.read(0, 4096) == b"x" * 4096

Fixtures (function scope; nothing starts until a test asks for one):

- ``blockmig_arrays``: a :class:`BlockmigEnv` whose arrays (A and B of the ``unified``
  model, or those of the test's ``@pytest.mark.blockmig_arrays(ArraySpec(...), ...)``) run
  in the test's ``tmp_path``.
- ``blockmig_factory``: ``start(*specs) -> BlockmigEnv``, for more than one set of arrays.

Both stop what they started at teardown, whether the test passed or not. For arrays shared
by a module, use the class itself (``down`` runs even if ``up`` fails half-way)::

    with BlockmigEnv(tmp_path_factory.mktemp("arrays")) as env:
        env.up([ArraySpec("A"), ArraySpec("B", media="ssd")])
        yield env

Everything runs as the ``blockmig`` command does in production: ``blockmig up`` starts the
arrays (each its own process), the volume commands run as subprocesses with ``--json``, and
data goes over NBD. Everything listens on 127.0.0.1 on ports the system picks; every
subprocess and every NBD request has a timeout. Importing this module starts nothing and
imports neither the emulator nor the control layer: the plugin loads into every pytest run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import pytest

if TYPE_CHECKING:
    from control.api_client import ArrayApi
    from emulator.nbd.client import NbdClient

__all__ = [
    "MIGRATING",
    "ArraySpec",
    "BlockmigEnv",
    "BlockmigError",
    "MiB",
    "NbdDevice",
    "Volume",
    "assert_same_data",
    "blockmig_arrays",
    "blockmig_factory",
]

KiB = 1 << 10
MiB = 1 << 20
#: where ``control`` and ``emulator`` are importable from (the repository, or site-packages)
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
#: seconds a CLI command may take (``up``, ``down`` and ``migrate --wait`` take their own)
CLI_TIMEOUT = 60.0
#: seconds one NBD operation of :class:`NbdDevice` may take
IO_TIMEOUT = 60.0
#: migration_status values while a migration runs (control.volumes.MIGRATING)
MIGRATING = ("starting", "migrating", "migrating_attachable")
T = TypeVar("T")


# ---------------------------------------------------------------------- arrays
@dataclass(frozen=True)
class ArraySpec:
    """One array to start: its name (a volume's host), model, pools and media.

    Models: ``unified`` (takeover, async migration, pool moves), ``takeover-sync``,
    ``pooled`` (pool moves only), ``plain`` (generic host copy only). Media: ``none``,
    ``ssd``, ``hdd``, ``fixed:MS`` (every I/O takes MS milliseconds; the copier has many
    I/Os in flight, so for a migration one can watch give the target a
    ``migration_throttle``). Each pool holds ``capacity`` (thin: only written bytes use disk).
    """

    name: str
    model: str = "unified"
    pools: tuple[str, ...] = ("default",)
    media: str = "none"
    capacity: str = "1G"
    #: MB/s of the migrations onto this array (`blockmig migrate` names no rate); 0 = unlimited
    migration_throttle: float = 0.0

    def toml(self) -> str:
        """The ``[[array]]`` table of a `blockmig up` config; it listens on 127.0.0.1 only."""
        pools = ", ".join(f"{json.dumps(p)} = {json.dumps(self.capacity)}" for p in self.pools)
        return (
            f"[[array]]\nname = {json.dumps(self.name)}\nmodel = {json.dumps(self.model)}\n"
            f'media = {json.dumps(self.media)}\nnbd = "127.0.0.1:0"\napi = "127.0.0.1:0"\n'
            f"pools = {{ {pools} }}\nmigration_throttle = {float(self.migration_throttle)!r}\n"
        )


#: a test's arrays when it names none: two of the model that migrates live
DEFAULT_ARRAYS = (ArraySpec("A"), ArraySpec("B"))


class BlockmigError(Exception):
    """A ``blockmig`` command failed; ``message`` is what it said (``blockmig: ...``)."""

    def __init__(self, args: Iterable[str], returncode: int, message: str, output: str = "") -> None:
        self.command = " ".join(args)
        self.returncode = returncode
        self.message = message
        self.output = output
        super().__init__(f"`blockmig {self.command}` failed (exit {returncode}): {message}")


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``blockmig`` subprocess: this one, without settings that would
    point it elsewhere (the state dir is always ``--state-dir``) or inject failures."""
    from control.config import child_env

    env = child_env()
    for name in ("BLOCKMIG_FAIL_AT", "BLOCKMIG_STATE_DIR", "BLOCKMIG_TOKEN"):
        env.pop(name, None)
    env.update(extra or {})
    return env


def host_array(host: str) -> str:
    """The array of a volume host ``ARRAY@BACKEND#POOL``."""
    return host.partition("@")[0].partition("#")[0]


def _message(r: subprocess.CompletedProcess[str]) -> str:
    """What a failed command said: its ``blockmig: ...`` line, else the error of the
    migration it printed (`migrate --wait` that ended in ``error``), else its output."""
    said = [ln for ln in r.stderr.splitlines() if ln.startswith("blockmig: ")]
    if said:
        return said[-1].removeprefix("blockmig: ")
    try:
        d = json.loads(r.stdout)
        return f"migration_status {d['migration_status']}: {d['migration']['error']}"
    except (ValueError, KeyError, TypeError):
        return (r.stderr.strip() or r.stdout.strip() or "no output")[-2000:]


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    from control.config import pid_alive

    return pid_alive(pid)


@dataclass
class BlockmigEnv:
    """One state dir, the arrays `blockmig up` started in it, and the ``blockmig`` CLI.

    ``up`` starts the arrays, ``down`` stops them and any migration follower still running
    (it never raises, so it belongs in a ``finally``); the instance is also a context
    manager that calls ``down`` on exit.
    """

    state_dir: Path
    specs: list[ArraySpec] = field(default_factory=list)

    # ------------------------------------------------------------------ arrays
    def up(self, specs: Iterable[ArraySpec] = DEFAULT_ARRAYS, timeout: float = 120.0) -> BlockmigEnv:
        """Start the arrays (`blockmig up --config`), each on free 127.0.0.1 ports."""
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if not self.specs or len(set(names)) != len(names):
            raise ValueError(f"blockmig arrays need distinct names, got {names}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.state_dir / "arrays.toml"
        cfg.write_text("\n".join(s.toml() for s in self.specs))
        self.ok("up", "--config", str(cfg), timeout=timeout)
        return self

    def down(self, timeout: float = 60.0) -> None:
        """Stop followers this state dir still runs, then the arrays (never raises)."""
        # best effort up to the last step: a teardown that raises would hide the test's error
        try:
            pids = list(self.array_pids().values())
        except Exception:
            pids = []
        try:
            for pid in self._live_followers():
                os.kill(pid, signal.SIGKILL)
        except Exception:
            pass
        try:
            self.run("down", timeout=timeout)
        except (OSError, subprocess.SubprocessError):
            pass
        for pid in pids:  # `down` failed or timed out: no array outlives its test
            if _alive(pid) and str(self.state_dir).encode() in b" ".join(_cmdline(pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def array_pids(self) -> dict[str, int]:
        """Array name -> pid of the arrays `up` started and `down` has not stopped yet."""
        path = self.state_dir / "arrays.json"
        if not path.exists():
            return {}
        return {name: int(rec["pid"]) for name, rec in json.loads(path.read_text()).items()}

    def _live_followers(self) -> list[int]:
        db = self.state_dir / "volumes.db"
        if not db.exists():
            return []
        con = sqlite3.connect(db, timeout=10)
        try:
            rows = con.execute("SELECT migration FROM volumes").fetchall()
        finally:
            con.close()
        pids = []
        for (raw,) in rows:
            pid = json.loads(raw).get("pid", 0)
            if pid and pid != os.getpid() and _alive(pid) and self.is_follower(pid):
                pids.append(pid)
        return pids

    def is_follower(self, pid: int) -> bool:
        """True if ``pid`` runs steps 4-5 of a migration (`blockmig _follow`) of this state dir."""
        cmd = _cmdline(pid)
        return b"_follow" in cmd and str(self.state_dir).encode() in cmd

    def api(self, array: str) -> ArrayApi:
        """A client of the management API of ``array``."""
        from control.config import Registry

        return Registry(self.state_dir).get(array).client()

    def luns(self, array: str) -> set[str]:
        """The names of the LUNs ``array`` holds."""
        return {lun["name"] for lun in self.api(array).list_luns()}

    def array_migration(self, array: str, lun: str) -> dict[str, Any] | None:
        """The array's own record of a takeover/move of ``lun`` (None: it never ran one)."""
        from control.api_client import ApiError

        try:
            return self.api(array).migration(lun)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    # ------------------------------------------------------------------ CLI
    def cmd(self, *args: str) -> list[str]:
        """The command line of ``blockmig ARGS`` on this state dir."""
        return [sys.executable, "-m", "control.cli", *args, "--state-dir", str(self.state_dir)]

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = CLI_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run ``blockmig ARGS`` (``env`` adds variables) and return what it did."""
        return subprocess.run(
            self.cmd(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=PACKAGE_ROOT,  # `python -m` imports from the cwd first: never a user's `control`
            env=cli_env(env),
            stdin=subprocess.DEVNULL,
        )

    def popen(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        """Start ``blockmig ARGS`` in the background (stdout and stderr piped): the caller
        waits with a timeout, e.g. ``communicate(timeout=60)``."""
        return subprocess.Popen(
            self.cmd(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=PACKAGE_ROOT,
            env=cli_env(env),
            stdin=subprocess.DEVNULL,
        )

    def ok(self, *args: str, env: Mapping[str, str] | None = None, timeout: float = CLI_TIMEOUT) -> Any:
        """Run ``blockmig ARGS --json`` and return its parsed output; raise
        :class:`BlockmigError` with the command's message unless it exited 0."""
        r = self.run(*args, "--json", env=env, timeout=timeout)
        if r.returncode != 0:
            raise BlockmigError(args, r.returncode, _message(r), r.stdout + r.stderr)
        return json.loads(r.stdout)

    # ------------------------------------------------------------------ volumes
    def create_volume(self, name: str, size: int, host: str | None = None) -> Volume:
        """Create a volume of ``size`` bytes on ``host`` (``ARRAY``, ``ARRAY#POOL``; default:
        the first array)."""
        host = host or (self.specs[0].name if self.specs else "A")
        d: dict[str, Any] = self.ok("create", "--size", str(size), "--host", host, "--name", name)
        return Volume(self, d)

    def volume(self, ref: str) -> Volume:
        """The volume with this id, id prefix or name."""
        return Volume(self, self.show(ref))

    def show(self, ref: str) -> dict[str, Any]:
        """`blockmig show`: the volume, and the progress of a migration that runs."""
        d: dict[str, Any] = self.ok("show", ref)
        return d

    def db_row(self, ref: str) -> tuple[str | None, dict[str, Any]]:
        """(migration_status, migration bookkeeping with the follower pid), straight from
        volumes.db: unlike any CLI command, reading it never restarts a follower, and it is
        cheap enough to poll."""
        con = sqlite3.connect(self.state_dir / "volumes.db", timeout=10)
        try:
            row = con.execute(
                "SELECT migration_status, migration FROM volumes WHERE id=? OR name=?", (ref, ref)
            ).fetchone()
        finally:
            con.close()
        if row is None:
            raise KeyError(f"no volume {ref!r} in {self.state_dir / 'volumes.db'}")
        return row[0], json.loads(row[1])

    def db_migration(self, ref: str) -> dict[str, Any]:
        """The migration bookkeeping of a volume (phase, source, target, follower pid ...)."""
        return self.db_row(ref)[1]

    def wait_migration(self, ref: str, timeout: float = 60.0, interval: float = 0.05) -> dict[str, Any]:
        """Wait until the migration of ``ref`` no longer runs (polling volumes.db), then
        return `show`'s view of it with the statuses seen meanwhile under ``"_seen"``.
        Raises TimeoutError naming the array's view if it still runs after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        seen: list[str | None] = []
        while True:
            status, mig = self.db_row(ref)
            if not seen or seen[-1] != status:
                seen.append(status)
            if status not in MIGRATING:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"migration of {ref} still {status} after {timeout:.0f} s: {mig} "
                    f"(array: {self._array_status(ref, mig)})"
                )
            time.sleep(interval)
        d = self.show(ref)
        d["_seen"] = seen
        return d

    def _array_status(self, ref: str, mig: dict[str, Any]) -> Any:
        from control.api_client import ApiError

        try:
            vid = self.show(ref)["id"]
            return self.array_migration(host_array(mig.get("target", "")), f"volume-{vid}")
        except (BlockmigError, ApiError, KeyError) as e:
            return repr(e)


# ---------------------------------------------------------------------- volumes
class Volume:
    """A volume of a :class:`BlockmigEnv`, as `blockmig show` last saw it.

    ``uri`` is where a host reaches it now: after a migration to another array started, it
    is the target's export (which serves the volume at once when the migration is async).
    """

    def __init__(self, env: BlockmigEnv, info: dict[str, Any]) -> None:
        self.env = env
        self.info = info
        self.id: str = info["id"]
        self.name: str = info["name"]
        self.size: int = info["size"]

    def __repr__(self) -> str:
        return f"<Volume {self.name} ({self.id}) on {self.info.get('host')}>"

    @property
    def uri(self) -> str:
        """The volume's NBD URI on the array that serves it (``nbd://127.0.0.1:PORT/LUN``)."""
        uri: str = (self.info.get("provider_location") or {}).get("uri", "")
        if not uri:
            raise LookupError(f"volume {self.name} ({self.id}) has no NBD URI: {self.info}")
        return uri

    @property
    def host(self) -> str:
        """``ARRAY@BACKEND#POOL``, as last seen."""
        host: str = self.info["host"]
        return host

    @property
    def migration_status(self) -> str | None:
        """The migration status now (read from volumes.db: cheap, fine to poll)."""
        return self.env.db_row(self.id)[0]

    def show(self) -> dict[str, Any]:
        """`blockmig show`: status, host, migration_status, attachments, migration progress."""
        self.info = self.env.show(self.id)
        return self.info

    def attach(self, host_name: str = "pytest") -> str:
        """Attach it (`blockmig attach`) and return its ``nbd://`` URI."""
        att = self.env.ok("attach", self.id, "--host-name", host_name)
        uri: str = att["data"]["uri"]
        self.show()
        return uri

    def detach(self) -> None:
        """Drop every attachment."""
        self.info = self.env.ok("detach", self.id)

    def delete(self) -> None:
        """Delete the volume (detach it first)."""
        self.env.ok("delete", self.id)

    def migrate(
        self, to: str, wait: bool = True, force_host_copy: bool = False, timeout: float = 120.0
    ) -> str:
        """Migrate it to ``to`` (``ARRAY``, ``ARRAY#POOL``) and return its migration_status:
        with ``wait``, the end of the migration (``success``); without, where it stands once
        the target took over (``migrating_attachable``: attach it on the target now; or
        ``migrating`` for a host copy, ``success`` for a pool move). A migration that fails or
        is refused raises :class:`BlockmigError` with the reason."""
        args = ["migrate", self.id, to]
        if wait:
            args.append("--wait")
        if force_host_copy:
            args.append("--force-host-copy")
        self.info = self.env.ok(*args, timeout=timeout)
        status: str = self.info["migration_status"]
        return status

    def wait(self, timeout: float = 60.0) -> str:
        """Wait for a migration that runs to end; its final migration_status."""
        self.info = self.env.wait_migration(self.id, timeout)
        status: str = self.info["migration_status"]
        return status

    def open(self, timeout: float = IO_TIMEOUT) -> NbdDevice:
        """An NBD connection to the volume where it is served now (close it, or use ``with``)."""
        return NbdDevice(self.uri, timeout)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` and flush (one NBD connection per call)."""
        with self.open() as dev:
            dev.write(offset, data)
            dev.flush()

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Read ``length`` bytes at ``offset`` (default: to the end of the volume)."""
        with self.open() as dev:
            return dev.read(offset, dev.size - offset if length is None else length)


# ---------------------------------------------------------------------- data over NBD
class NbdDevice:
    """A synchronous NBD connection for tests: :class:`emulator.nbd.client.NbdClient` in a
    private event loop. Every call has a timeout. Use it from one thread, outside a running
    event loop (async tests use ``NbdClient`` itself)."""

    def __init__(self, uri: str, timeout: float = IO_TIMEOUT) -> None:
        from emulator.nbd.client import NbdClient

        self.uri = uri
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        try:
            self.client: NbdClient = self._run(NbdClient.connect(uri, timeout=min(timeout, 10.0)))
        except BaseException:
            self._loop.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(asyncio.wait_for(coro, self.timeout))

    @property
    def size(self) -> int:
        return self.client.size

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self._run(self.client.read(offset, length)))

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._run(self.client.write(offset, data, fua=fua))

    def write_many(self, pieces: Mapping[int, bytes], in_flight: int = 32) -> None:
        """Write every ``offset -> data`` piece, up to ``in_flight`` at once, then flush."""

        async def write_all() -> None:
            sem = asyncio.Semaphore(in_flight)

            async def one(off: int, data: bytes) -> None:
                async with sem:
                    await self.client.write(off, data)

            await asyncio.gather(*(one(o, d) for o, d in pieces.items()))
            await self.client.flush()

        self._run(write_all())

    def flush(self) -> None:
        self._run(self.client.flush())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self.client.close())
        finally:
            self._loop.close()

    def __enter__(self) -> NbdDevice:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def assert_same_data(got: bytes | bytearray, want: bytes | bytearray, what: str = "data") -> None:
    """Raise AssertionError naming the 4 KiB blocks where ``got`` differs from ``want``
    (a plain ``==`` of two volumes prints little that helps)."""
    if len(got) != len(want):
        raise AssertionError(f"{what}: {len(got)} bytes, expected {len(want)}")
    if got == want:
        return
    blk = 4 * KiB
    bad = [o for o in range(0, len(want), blk) if got[o : o + blk] != want[o : o + blk]]
    first = bad[0]
    raise AssertionError(
        f"{what}: {len(bad)} of {-(-len(want) // blk)} 4K blocks differ from what was written; "
        f"first at {first}: got {bytes(got[first : first + 16]).hex()} expected "
        f"{bytes(want[first : first + 16]).hex()} (offsets {bad[:8]})"
    )


# ---------------------------------------------------------------------- the pytest plugin
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "blockmig_arrays(*specs): the arrays (blockmig.testing.ArraySpec) the blockmig_arrays "
        "fixture starts; default A and B, model unified",
    )


@pytest.fixture
def blockmig_factory(tmp_path: Path) -> Iterator[Callable[..., BlockmigEnv]]:
    """``start(*specs) -> BlockmigEnv``: start arrays (default A and B, model unified) in a
    new state dir under ``tmp_path``. Everything started is stopped at teardown."""
    envs: list[BlockmigEnv] = []

    def start(*specs: ArraySpec) -> BlockmigEnv:
        for s in specs:
            if not isinstance(s, ArraySpec):
                raise TypeError(f"blockmig arrays are blockmig.testing.ArraySpec, not {s!r}")
        env = BlockmigEnv(tmp_path / f"blockmig-{len(envs)}")
        envs.append(env)
        return env.up(specs or DEFAULT_ARRAYS)

    try:
        yield start
    finally:
        for env in reversed(envs):
            env.down()


@pytest.fixture
def blockmig_arrays(
    request: pytest.FixtureRequest, blockmig_factory: Callable[..., BlockmigEnv]
) -> BlockmigEnv:
    """Arrays A and B (model unified) running for this test, or those the test names with
    ``@pytest.mark.blockmig_arrays(ArraySpec("A", media="fixed:1"), ArraySpec("B"))``."""
    marker = request.node.get_closest_marker("blockmig_arrays")
    return blockmig_factory(*(marker.args if marker else ()))
