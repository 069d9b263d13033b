"""What a restarted target advertises for a source it serves (migrating or remote LUNs).

After kill -9 the target resumes its migrations without waiting for their
sources (one may be down), and hosts may connect at once: they must negotiate
what the source offers (its minimum block size, read-only, no FUA...), not a
Backend's defaults, or a host sends what the source refuses. The capabilities
are recorded with the migration when the source is first connected and
again whenever a reconnection finds them changed. Real processes: nbdkit's
file plugin (its data survives its restarts on the same socket), target
arrays killed with SIGKILL, hosts are our client, qemu-io and nbdcopy.
"""

from __future__ import annotations

import asyncio
import filecmp
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from emulator.nbd import protocol as p
from emulator.nbd.client import NbdClient
from emulator.nbd.errors import RequestError
from tests.servers import ArrayDaemon, Server, array_api, array_daemon, nbdkit

KiB, MiB = 1 << 10, 1 << 20
SIZE = 16 * MiB
#: nbdkit's file plugin offering no FUA and refusing what is not 4 KiB-aligned
ALIGNED_NO_FUA = (
    "--filter=fua",
    "--filter=blocksize-policy",
    "file",
    "blocksize-minimum=4096",
    "blocksize-error-policy=error",
)
FLAGS = {
    "read-only": p.FLAG_READ_ONLY,
    "fua": p.FLAG_SEND_FUA,
    "trim": p.FLAG_SEND_TRIM,
    "zero": p.FLAG_SEND_WRITE_ZEROES,
    "flush": p.FLAG_SEND_FLUSH,
    "cache": p.FLAG_SEND_CACHE,
}

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nbdkit", "qemu-io", "nbdcopy")),
    reason="nbdkit, qemu-io and nbdcopy are needed (make install)",
)


def image(tmp: Path) -> str:
    """Two sparse source images, ``mig`` and ``rem`` (64 KiB of data at every MiB), in a
    directory whose files nbdkit's file plugin serves by name (its ``dir=`` argument,
    returned): one array takes a source over for one LUN only."""
    d = tmp / "images"
    d.mkdir(exist_ok=True)
    for name in ("mig", "rem"):
        with open(d / name, "wb") as f:
            f.truncate(SIZE)
            for off in range(0, SIZE, MiB):
                f.seek(off)
                f.write(bytes([off // MiB + 1]) * 64 * KiB)
    return f"dir={d}"


def export(sock: Path, lun: str = "mig") -> str:
    """The URI of LUN ``lun``'s source image."""
    return f"nbd+unix:///{lun}?socket={sock}"


@contextmanager
def source(tmp: Path, sock: Path, *args: str) -> Iterator[Server]:
    """nbdkit on ``sock`` (the same URI across restarts), let go on if a test stopped it."""
    with nbdkit(tmp, *args, sock=sock) as s:
        try:
            yield s
        finally:
            s.proc.send_signal(signal.SIGCONT)


def negotiated(uri: str) -> tuple[int, set[str]]:
    """(minimum block size, export flags) a host connecting to ``uri`` negotiates."""

    async def go() -> tuple[int, set[str]]:
        async with await NbdClient.connect(uri, timeout=10) as c:
            return c.block_size.minimum, {n for n, f in FLAGS.items() if c.can(f)}

    return asyncio.run(asyncio.wait_for(go(), 20))


def take_over(b: ArrayDaemon, sock: Path) -> None:
    """LUN ``mig`` migrates from its image (paused: its host I/O goes to the source), ``rem``
    serves its own as a remote LUN (a cancelled migration)."""
    api = array_api(b)
    for lun, action in (("mig", "pause"), ("rem", "cancel")):
        api.call("POST", "/api/v1/migrations", {"lun": lun, "source": export(sock, lun), "throttle": 1})
        api.call("POST", f"/api/v1/migrations/{lun}/{action}")


def qemu_io(uri: str, *cmds: str, read_only: bool = False) -> None:
    args = ["-r"] * read_only + [a for c in cmds for a in ("-c", c)]
    r = subprocess.run(["qemu-io", "-f", "raw", *args, uri], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "failed" not in r.stdout + r.stderr, r.stdout + r.stderr


def complete_and_compare(b: ArrayDaemon, src: str, tmp: Path) -> None:
    """Resume ``mig`` to its end: it must hold the source's bytes."""
    api = array_api(b)
    api.call("POST", "/api/v1/migrations/mig/resume")
    st = api.wait_migration("mig", 60)
    assert st["state"] == "completed", st
    want, got = tmp / "want", tmp / "got"
    for uri, path in ((src, want), (b.uri("mig"), got)):
        subprocess.run(["nbdcopy", uri, str(path)], check=True, timeout=60, capture_output=True)
    assert filecmp.cmp(want, got, shallow=False), "the migrated LUN differs from its source"


def recorded(b: ArrayDaemon) -> dict[str, str | None]:
    """The capabilities each migration record holds (None: none, or no such column)."""
    db = sqlite3.connect(b.data_dir / "array.db")
    try:
        if "caps" not in {r[1] for r in db.execute("PRAGMA table_info(migrations)")}:
            return {lun: None for (lun,) in db.execute("SELECT lun FROM migrations")}
        return dict(db.execute("SELECT lun, caps FROM migrations"))
    finally:
        db.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("at_restart", ["up", "stopped", "gone"])
def test_a_restarted_target_advertises_what_its_source_offers(tmp_path: Path, at_restart: str) -> None:
    """Regression (was a bug): a restarted target built its sources unconnected and copied
    their defaults (minimum block 1, FUA) into the LUNs, and kept them once the source
    answered: a host saw FUA the source refuses, and qemu-io's 1-byte write got EINVAL.
    They come from the record now, whether the source is up, stopped or not running."""
    img, sock = image(tmp_path), tmp_path / "src.sock"
    with source(tmp_path, sock, *ALIGNED_NO_FUA, img) as src:
        want = negotiated(export(sock))
        assert want == (4096, {"trim", "zero", "flush", "cache"}), want
        with array_daemon(tmp_path / "B", "B") as b:
            take_over(b, sock)
            assert negotiated(b.uri("mig")) == negotiated(b.uri("rem")) == want
            b.sigkill()
        if at_restart == "stopped":
            src.proc.send_signal(signal.SIGSTOP)
        elif at_restart == "gone":
            src.proc.kill()
            src.proc.wait(10)
        with array_daemon(tmp_path / "B", "B") as b:
            for lun in ("mig", "rem"):
                assert negotiated(b.uri(lun)) == want, (lun, at_restart)
            if at_restart == "stopped":
                src.proc.send_signal(signal.SIGCONT)
            with ExitStack() as stack:
                if at_restart == "gone":
                    src = stack.enter_context(source(tmp_path, sock, *ALIGNED_NO_FUA, img))
                for lun, off in (("mig", 5 * MiB + 1), ("rem", 9 * MiB + 1)):
                    qemu_io(
                        b.uri(lun), f"write -P 0xab {off} 1", f"read -P 0xab {off} 1", f"read {off - 2} 513"
                    )
                    assert negotiated(b.uri(lun)) == want, lun  # the source connected: the same
                complete_and_compare(b, export(sock), tmp_path)
        data = (tmp_path / "want").read_bytes()
        assert data[5 * MiB : 5 * MiB + 2] == b"\x06\xab"
        assert (tmp_path / "images" / "rem").read_bytes()[9 * MiB + 1] == 0xAB  # rem's source has it


@pytest.mark.timeout(120)
def test_a_read_only_source_stays_read_only_through_a_restart(tmp_path: Path) -> None:
    """Regression (was a bug): restarted while its read-only source was stopped, the target
    advertised the LUNs writable (and TRIM, WRITE_ZEROES, FUA): a host's writes failed with
    EPERM from the source. Hosts see a read-only export now, the copy completes."""
    img, sock = image(tmp_path), tmp_path / "src.sock"
    with source(tmp_path, sock, "-r", "file", img) as src:
        want = negotiated(export(sock))
        assert want == (1, {"read-only", "flush", "cache"}), want
        with array_daemon(tmp_path / "B", "B") as b:
            take_over(b, sock)
            b.sigkill()
        src.proc.send_signal(signal.SIGSTOP)
        with array_daemon(tmp_path / "B", "B") as b:
            for lun in ("mig", "rem"):
                assert negotiated(b.uri(lun)) == want, lun
            src.proc.send_signal(signal.SIGCONT)
            qemu_io(b.uri("rem"), "read -P 0x0a 9M 64K", read_only=True)
            complete_and_compare(b, export(sock), tmp_path)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("change", ["read-only", "no-fua-4k"])
def test_a_source_back_with_less_than_it_offered(tmp_path: Path, change: str) -> None:
    """The source came back from a restart offering less (read-only; no FUA and 4 KiB
    blocks) while the target was down. Hosts that connect before it answers negotiate
    what it offered; once it answers, later hosts negotiate what it offers now, and so
    does a host after another restart of the target (the record follows). The hosts
    connected before keep their flags, safely: a FUA write becomes a write and a flush
    (a FUA flag to a source that does not offer it is EINVAL), what the source refuses
    fails with its error (EPERM, EINVAL), the array keeps serving. Regression: the new
    flags reached neither new hosts nor the record."""
    img, sock = image(tmp_path), tmp_path / "src.sock"
    later = ("-r", "file") if change == "read-only" else ALIGNED_NO_FUA
    with source(tmp_path, sock, "file", img) as src:
        before = negotiated(export(sock))
        assert before == (1, {"fua", "trim", "zero", "flush", "cache"}), before
        with array_daemon(tmp_path / "B", "B") as b:
            take_over(b, sock)
            b.sigkill()
    with source(tmp_path, sock, *later, img) as src, array_daemon(tmp_path / "B", "B") as b:
        now = negotiated(export(sock))
        assert now != before

        async def hosts_connected_before() -> None:
            for lun, off in (("mig", 5 * MiB), ("rem", 9 * MiB)):
                async with await NbdClient.connect(b.uri(lun), timeout=10) as h:
                    assert h.can(p.FLAG_SEND_FUA) and not h.read_only  # what the record says
                    if change == "read-only":
                        with pytest.raises(RequestError) as e:
                            await h.write(off, b"\xcd" * 4096, fua=True)
                        assert e.value.error == p.EPERM, e.value
                    else:
                        await h.write(off, b"\xcd" * 4096, fua=True)
                        with pytest.raises(RequestError) as e:
                            await h.write(off + 4096 + 1, b"\xcd")
                        assert e.value.error == p.EINVAL, e.value
                    assert await h.read(off + 64 * KiB - 4096, 4096) == bytes([off // MiB + 1]) * 4096

        asyncio.run(asyncio.wait_for(hosts_connected_before(), 60))
        for lun in ("mig", "rem"):
            assert negotiated(b.uri(lun)) == now, lun
        assert "the source of LUN" in b.output() and "changed" in b.output()
        b.sigkill()
        src.proc.send_signal(signal.SIGSTOP)
        with array_daemon(tmp_path / "B", "B") as b2:
            for lun in ("mig", "rem"):
                assert negotiated(b2.uri(lun)) == now, lun
            src.proc.send_signal(signal.SIGCONT)
            complete_and_compare(b2, export(sock), tmp_path)
            data = (tmp_path / "want").read_bytes()
            written = b"\xcd" * 4096 if change != "read-only" else b"\x06" * 4096
            assert data[5 * MiB : 5 * MiB + 4096] == written and data[5 * MiB + 4097] == 6


@pytest.mark.timeout(120)
def test_a_record_without_capabilities_learns_them_from_the_source(tmp_path: Path) -> None:
    """A data dir from before capabilities were recorded: its LUNs offer a Backend's
    defaults until the source answers (nothing better is known), then what the source
    offers, to every host that connects from then on, and the record has them."""
    img, sock = image(tmp_path), tmp_path / "src.sock"
    with source(tmp_path, sock, *ALIGNED_NO_FUA, img):
        want = negotiated(export(sock))
        with array_daemon(tmp_path / "B", "B") as b:
            take_over(b, sock)
            b.sigkill()
        db = sqlite3.connect(b.data_dir / "array.db")
        try:
            if any(recorded(b).values()):
                db.execute("ALTER TABLE migrations DROP COLUMN caps")
        finally:
            db.close()
        with array_daemon(tmp_path / "B", "B") as b:
            assert recorded(b) == {"mig": None, "rem": None}
            for lun in ("mig", "rem"):
                assert negotiated(b.uri(lun))[0] == 1, lun  # unknown yet: the defaults
                qemu_io(b.uri(lun), "write -P 0xab 8M 4K")  # goes to the source: connects it
                assert negotiated(b.uri(lun)) == want, lun
            assert all(recorded(b).values()), recorded(b)
            complete_and_compare(b, export(sock), tmp_path)
