"""Real arrays for control-layer tests: blockmig.testing (the pytest plugin users get) plus
what only these tests need: the CLI's refusals checked to the letter, and volume data
checked over NBD against a model of what was written.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import struct
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from blockmig.testing import MIGRATING, ArraySpec, NbdDevice, assert_same_data, host_array
from blockmig.testing import BlockmigEnv as _BlockmigEnv
from control.config import pid_alive

__all__ = [
    "BLOCK",
    "MIGRATING",
    "ArraySpec",
    "BlockmigEnv",
    "Image",
    "MiB",
    "assert_content",
    "block",
    "fill",
    "host_array",
    "lun_of",
    "qemu_io",
    "read_all",
    "write_blocks",
]

BLOCK = 4096
MiB = 1 << 20


class BlockmigEnv(_BlockmigEnv):
    def refused(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> str:
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

    def set_migration(self, vid: str, status: str, mig: dict[str, Any], dead_follower: bool = False) -> None:
        """Write a volume's migration record as a crash leaves it; ``dead_follower``: run by a
        process that has exited (its pid in the record)."""
        if dead_follower:
            dead = subprocess.Popen(["true"])
            dead.wait()
            mig = {**mig, "pid": dead.pid}
        con = sqlite3.connect(self.state_dir / "volumes.db", timeout=10)
        try:
            with con:
                con.execute(
                    "UPDATE volumes SET migration_status=?, migration=? WHERE id=?",
                    (status, json.dumps(mig), vid),
                )
        finally:
            con.close()

    def create(self, name: str, size: int, host: str) -> dict[str, Any]:
        v = self.create_volume(name, size, host).info
        assert v["status"] == "available", v
        return v

    def kill_array(self, array: str) -> None:
        """kill -9 of ``array``'s daemon, returning once it is gone."""
        pid = self.array_pids()[array]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(pid):
            assert time.monotonic() < deadline, f"array {array} ({pid}) survived kill -9"
            time.sleep(0.02)

    def up_again(self) -> None:
        """`blockmig up` with the arrays' config: starts those not running."""
        self.ok("up", "--config", str(self.state_dir / "arrays.toml"))


def lun_of(v: dict[str, Any]) -> str:
    """The LUN of volume ``v`` on its array."""
    return f"volume-{v['id']}"


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


def write_blocks(uri: str, blocks: dict[int, bytes], timeout: float = 60.0) -> None:
    with NbdDevice(uri, timeout) as dev:
        dev.write_many(blocks)


def fill(uri: str, size: int, seed: int, stride: int = 64 * 1024) -> Image:
    """Write one tagged block every ``stride`` bytes (many small extents: a copy of them is slow
    enough on a `fixed:MS` media array to be watched); return the model."""
    img = Image(size, {o: block(seed, o) for o in range(0, size, stride)})
    write_blocks(uri, img.blocks)
    return img


def read_all(uri: str, timeout: float = 60.0) -> tuple[int, bytearray]:
    with NbdDevice(uri, timeout) as dev:
        return dev.size, bytearray(dev.read(0, dev.size))


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
    assert_same_data(got, want, uri)


def qemu_io(uri: str, *commands: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return subprocess.run([*args, uri], capture_output=True, text=True, timeout=timeout)
