"""Real arrays for control-layer tests: `blockmig up` / `down` in a tmp state dir, the CLI as
a subprocess, and volume data checked over NBD against a model of what was written.

Everything listens on 127.0.0.1 (the config pins it); every subprocess has a timeout;
``BlockmigEnv.down`` stops the arrays and any migration follower the tests started.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control.api_client import ApiError, ArrayApi
from control.config import Registry, pid_alive
from emulator.nbd.client import NbdClient

ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT = 60.0
BLOCK = 4096
MiB = 1 << 20
#: migration_status values while a migration runs
MIGRATING = ("starting", "migrating", "migrating_attachable")


@dataclass(frozen=True)
class ArraySpec:
    name: str
    model: str
    pools: tuple[str, ...] = ("default",)
    media: str = "none"
    capacity: str = "1G"

    def toml(self) -> str:
        pools = ", ".join(f'{p} = "{self.capacity}"' for p in self.pools)
        return (
            f'[[array]]\nname = "{self.name}"\nmodel = "{self.model}"\nmedia = "{self.media}"\n'
            f'nbd = "127.0.0.1:0"\napi = "127.0.0.1:0"\npools = {{ {pools} }}\n'
        )


def cli_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BLOCKMIG_FAIL_AT", None)  # only where a test asks for it
    env.pop("BLOCKMIG_STATE_DIR", None)  # always --state-dir
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


@dataclass
class BlockmigEnv:
    """One state dir, the arrays `blockmig up` started in it, and the CLI."""

    state_dir: Path
    specs: list[ArraySpec] = field(default_factory=list)

    # ------------------------------------------------------------------ arrays
    def up(self, specs: Iterable[ArraySpec]) -> None:
        self.specs = list(specs)
        cfg = self.state_dir.parent / f"{self.state_dir.name}.toml"
        cfg.write_text("\n".join(s.toml() for s in self.specs))
        r = self.run("up", "--config", str(cfg), timeout=120)
        assert r.returncode == 0, f"blockmig up failed:\n{r.stdout}\n{r.stderr}"

    def down(self) -> None:
        """Stop followers this state dir still runs, then the arrays (never raises)."""
        try:
            for pid in self._live_followers():
                os.kill(pid, signal.SIGKILL)
        except (OSError, sqlite3.Error):
            pass
        try:
            self.run("down", timeout=60)
        except subprocess.TimeoutExpired:
            pass

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
            if pid and pid != os.getpid() and pid_alive(pid) and self.is_follower(pid):
                pids.append(pid)
        return pids

    def is_follower(self, pid: int) -> bool:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"_follow" in cmd and str(self.state_dir).encode() in cmd

    def api(self, array: str) -> ArrayApi:
        return Registry(self.state_dir).get(array).client()

    def luns(self, array: str) -> set[str]:
        return {lun["name"] for lun in self.api(array).list_luns()}

    def array_migration(self, array: str, lun: str) -> dict[str, Any] | None:
        """The array's own record of a takeover/move of ``lun`` (None: it never ran one)."""
        try:
            st: dict[str, Any] = self.api(array).call("GET", f"/api/v1/migrations/{lun}")
            return st
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    # ------------------------------------------------------------------ CLI
    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "control.cli", *args, "--state-dir", str(self.state_dir)]

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.cmd(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=cli_env(env),
            stdin=subprocess.DEVNULL,
        )

    def popen(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.cmd(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=cli_env(env),
            stdin=subprocess.DEVNULL,
        )

    def ok(self, *args: str, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT) -> Any:
        """Run with --json; exit 0 expected; the parsed output."""
        r = self.run(*args, "--json", env=env, timeout=timeout)
        assert r.returncode == 0, f"blockmig {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        return json.loads(r.stdout)

    def refused(self, *args: str, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT) -> str:
        """Run with --json; exit 1 expected with an error message on stderr; the message."""
        r = self.run(*args, "--json", env=env, timeout=timeout)
        assert r.returncode == 1, (
            f"blockmig {' '.join(args)} should have failed (exit 1), exited {r.returncode}:\n"
            f"{r.stdout}\n{r.stderr}"
        )
        assert r.stderr.startswith("blockmig: "), f"no error message on stderr: {r.stderr!r}"
        msg = r.stderr.strip().removeprefix("blockmig: ")
        assert json.loads(r.stdout.strip().splitlines()[-1])["error"] == msg
        return msg

    def create(self, name: str, size: int, host: str) -> dict[str, Any]:
        v: dict[str, Any] = self.ok("create", "--size", str(size), "--host", host, "--name", name)
        assert v["status"] == "available", v
        return v

    def show(self, ref: str) -> dict[str, Any]:
        d: dict[str, Any] = self.ok("show", ref)
        return d

    def wait_migration(self, ref: str, timeout: float = 60.0, interval: float = 0.05) -> dict[str, Any]:
        """Wait until the migration is no longer running (polling volumes.db: cheap, and it
        restarts nothing), then return `show`'s view with the statuses seen under "_seen"."""
        deadline = time.monotonic() + timeout
        seen: list[str | None] = []
        while True:
            status, mig = self.db_row(ref)
            if not seen or seen[-1] != status:
                seen.append(status)
            if status not in MIGRATING:
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"migration of {ref} still {status} after {timeout:.0f} s: {mig} "
                    f"(array: {self._array_status(ref, mig)})"
                )
            time.sleep(interval)
        d = self.show(ref)
        d["_seen"] = seen
        return d

    def _array_status(self, ref: str, mig: dict[str, Any]) -> Any:
        try:
            vid = self.show(ref)["id"]
            return self.array_migration(host_array(mig.get("target", "")), f"volume-{vid}")
        except (AssertionError, ApiError, KeyError) as e:
            return repr(e)

    def db_row(self, ref: str) -> tuple[str | None, dict[str, Any]]:
        """(migration_status, migration bookkeeping with the follower pid), straight from
        volumes.db: unlike any CLI command, reading it never restarts a follower."""
        con = sqlite3.connect(self.state_dir / "volumes.db", timeout=10)
        try:
            row = con.execute(
                "SELECT migration_status, migration FROM volumes WHERE id=? OR name=?", (ref, ref)
            ).fetchone()
        finally:
            con.close()
        assert row is not None, f"no volume {ref} in volumes.db"
        return row[0], json.loads(row[1])

    def db_migration(self, ref: str) -> dict[str, Any]:
        return self.db_row(ref)[1]


def host_array(host: str) -> str:
    return host.partition("@")[0]


# ---------------------------------------------------------------------- data over NBD
def block(seed: int, offset: int) -> bytes:
    """4 KiB that say which volume (seed) and which offset they belong to."""
    return struct.pack("<QQ", seed, offset) * (BLOCK // 16)


@dataclass
class Image:
    """What a volume must hold: zeroes except the blocks written (offset -> bytes)."""

    size: int
    blocks: dict[int, bytes] = field(default_factory=dict)

    def expected(self) -> bytearray:
        buf = bytearray(self.size)
        for off, data in self.blocks.items():
            buf[off : off + len(data)] = data
        return buf


async def _write(uri: str, blocks: dict[int, bytes], in_flight: int = 32) -> None:
    async with await NbdClient.connect(uri) as c:
        sem = asyncio.Semaphore(in_flight)

        async def one(off: int, data: bytes) -> None:
            async with sem:
                await c.write(off, data)

        await asyncio.gather(*(one(o, d) for o, d in blocks.items()))
        await c.flush()


async def _read_all(uri: str) -> tuple[int, bytearray]:
    async with await NbdClient.connect(uri) as c:
        step = 4 * MiB
        buf = bytearray(c.size)
        view = memoryview(buf)
        await asyncio.gather(
            *(c.read_into(o, view[o : o + step]) for o in range(0, c.size, step))
        )
        return c.size, buf


def write_blocks(uri: str, blocks: dict[int, bytes], timeout: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(_write(uri, blocks), timeout))


def fill(uri: str, size: int, seed: int, stride: int = 64 * 1024) -> Image:
    """Write one tagged block every ``stride`` bytes (many small extents: a copy of them is slow
    enough on a `fixed:MS` media array to be watched); return the model."""
    img = Image(size, {o: block(seed, o) for o in range(0, size, stride)})
    write_blocks(uri, img.blocks)
    return img


def read_all(uri: str, timeout: float = 60.0) -> tuple[int, bytearray]:
    return asyncio.run(asyncio.wait_for(_read_all(uri), timeout))


def assert_content(
    uri: str, img: Image, ignore: tuple[int, int] | None = None, uncertain: Iterable[int] = ()
) -> None:
    """The export at ``uri`` holds exactly ``img``, else name what differs. Not compared: the
    byte range ``ignore`` (another writer owns it) and the 4K blocks at ``uncertain`` offsets
    (a write that failed may or may not have landed)."""
    size, got = read_all(uri)
    assert size == img.size, f"{uri}: size {size}, expected {img.size}"
    want = img.expected()
    if ignore is not None:
        got[ignore[0] : ignore[1]] = want[ignore[0] : ignore[1]]
    for o in uncertain:
        got[o : o + BLOCK] = want[o : o + BLOCK]
    if got == want:
        return
    bad = [o for o in range(0, size, BLOCK) if got[o : o + BLOCK] != want[o : o + BLOCK]]
    first = bad[0]
    raise AssertionError(
        f"{uri}: {len(bad)} of {size // BLOCK} 4K blocks differ from what was written; first at "
        f"{first}: got {bytes(got[first : first + 16]).hex()} expected "
        f"{bytes(want[first : first + 16]).hex()} (offsets {bad[:8]})"
    )


def qemu_io(uri: str, *commands: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return subprocess.run([*args, uri], capture_output=True, text=True, timeout=timeout)
