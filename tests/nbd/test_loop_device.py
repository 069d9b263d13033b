"""A real Linux block device on our NBD server: nbdfuse + loop + ext4.

The route of /work/shared/recipes/loop-attach.sh: `blockmig serve-file`
exports a sparse file, nbdfuse exposes the export as a FUSE file,
`losetup --direct-io=on` turns that into /dev/loopN (direct I/O, so reads
reach the server rather than the page cache of the FUSE file), then
mkfs.ext4, mount, files in, umount, mount again, files out. Teardown always
runs in the one order that works: umount, `losetup -d`, `fusermount3 -u`,
wait for nbdfuse to exit, and only then stop the server.
"""

from __future__ import annotations

import hashlib
import os
import random
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from control.demo import is_mounted
from tests.servers import serve_file

pytestmark = pytest.mark.interop

MiB = 1 << 20
CMD_TIMEOUT = 60  # seconds, for each tool run
EXT4_MAGIC_OFFSET = 1080  # superblock at 1024 + s_magic at 0x38
EXT4_MAGIC = b"\x53\xef"  # 0xEF53, little endian


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (losetup, mount)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this machine or container)"
    if not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is missing (no loop devices here)"
    if shutil.which("nbdfuse") is None:
        return "nbdfuse is not installed (apt package nbdfuse; run `make install`)"
    return None


def run(cmd: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(cmd), capture_output=True, text=True, errors="replace", timeout=CMD_TIMEOUT)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{shlex.join(cmd)} exited {p.returncode}: {p.stdout[-2000:]} {p.stderr[-2000:]}"
        )
    return p


def _retry(cmd: Sequence[str], attempts: int = 25, pause: float = 0.2) -> None:
    """Run a teardown step until it works (a device may stay busy for a moment)."""
    last: subprocess.CompletedProcess[str] | None = None
    for _ in range(attempts):
        last = run(cmd, check=False)
        if last.returncode == 0:
            return
        time.sleep(pause)
    assert last is not None
    raise AssertionError(f"{shlex.join(cmd)} kept failing: {last.stderr.strip()}")


@contextmanager
def nbdfuse_loop(uri: str, work: Path) -> Iterator[str]:
    """nbdfuse + `losetup --direct-io=on`: yields /dev/loopN; always torn down."""
    fusedir = work / "fuse"
    fusedir.mkdir()
    pidfile = work / "nbdfuse.pid"
    logpath = work / "nbdfuse.log"
    errors: list[str] = []
    with open(logpath, "wb") as log:
        proc = subprocess.Popen(
            ["nbdfuse", "-P", str(pidfile), str(fusedir), uri],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    loop = ""
    try:
        deadline = time.monotonic() + 15
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"nbdfuse did not come up (exit {proc.returncode}): {logpath.read_text()}"
                )
            time.sleep(0.02)
        loop = run(["losetup", "--show", "-f", "--direct-io=on", str(fusedir / "nbd")]).stdout.strip()
        assert loop.startswith("/dev/loop"), loop
        yield loop
    finally:
        # The order matters: the loop device holds the FUSE file open, and
        # nbdfuse exits by itself once its file system is unmounted.
        steps = []
        if loop:
            steps.append(["losetup", "-d", loop])
        if is_mounted(fusedir):
            steps.append(["fusermount3", "-u", str(fusedir)])
        for cmd in steps:
            try:
                _retry(cmd)
            except AssertionError as e:
                errors.append(str(e))
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            errors.append("nbdfuse did not exit after fusermount3 -u")
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    assert not errors, "teardown failed: " + "; ".join(errors)


@contextmanager
def mounted(dev: str, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    run(["mount", dev, str(mnt)])
    try:
        yield mnt
    finally:
        if is_mounted(mnt):
            _retry(["umount", str(mnt)])


def drop_caches() -> None:
    """Best effort: a container may not let us write /proc/sys (umount covers it)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def test_ext4_on_a_loop_device_over_our_nbd_export(tmp_path: Path) -> None:
    reason = _skip_reason()
    if reason:
        print(f"SKIP loop-device test: {reason}")
        pytest.skip(reason)
    for tool in ("losetup", "fusermount3", "mkfs.ext4", "mount", "umount", "blockdev", "e2fsck", "debugfs"):
        assert shutil.which(tool), f"{tool} is not installed (run `make install`)"

    size = 128 * MiB
    img = tmp_path / "lun.img"
    with open(img, "wb") as f:
        f.truncate(size)
    files = {  # name -> content; sizes unaligned on purpose
        "small.bin": random.randbytes(17),
        "one-mib.bin": random.randbytes(MiB),
        "dir/five.bin": random.randbytes(5 * MiB + 123),
        "dir/sub/eight.bin": random.randbytes(8 * MiB - 1),
    }
    want = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    pattern = random.randbytes(64 * 1024)
    mnt = tmp_path / "mnt"

    with serve_file(img) as srv, nbdfuse_loop(srv.uri, tmp_path) as dev:
        assert int(run(["blockdev", "--getsize64", dev]).stdout) == size

        # 1. Raw block I/O with O_DIRECT lands in the server's file at once.
        pat = tmp_path / "pattern.bin"
        pat.write_bytes(pattern)
        run(
            [
                "dd",
                f"if={pat}",
                f"of={dev}",
                "bs=4096",
                "seek=1000",
                "oflag=direct",
                "conv=fsync,notrunc",
                "status=none",
            ]
        )
        with open(img, "rb") as f:
            f.seek(1000 * 4096)
            assert f.read(len(pattern)) == pattern, "raw write did not reach the backing file"
        back = tmp_path / "pattern.back"
        run(
            [
                "dd",
                f"if={dev}",
                f"of={back}",
                "bs=4096",
                "skip=1000",
                "count=16",
                "iflag=direct",
                "status=none",
            ]
        )
        assert back.read_bytes() == pattern

        # 2. A file system: make, mount, fill, sync, unmount.
        run(["mkfs.ext4", "-q", "-F", dev])
        with mounted(dev, mnt):
            for name, data in files.items():
                p = mnt / name
                p.parent.mkdir(parents=True, exist_ok=True)
                with open(p, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            os.sync()
        drop_caches()

        # 3. Mount again: every byte comes back through NBD.
        with mounted(dev, mnt):
            got = {name: sha256_file(mnt / name) for name in files}
        assert got == want
        fsck = run(["e2fsck", "-fn", dev], check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # 4. Server side, everything detached and the server stopped: the backing
    #    file is a clean ext4 holding exactly those files.
    assert srv.proc.returncode == 0, "serve-file did not exit cleanly on SIGTERM"
    assert not is_mounted(tmp_path / "fuse")
    assert str(tmp_path / "fuse") not in run(["losetup", "-l"]).stdout
    with open(img, "rb") as f:
        f.seek(EXT4_MAGIC_OFFSET)
        assert f.read(2) == EXT4_MAGIC, "no ext4 superblock magic 0xEF53 in the backing file"
    fsck = run(["e2fsck", "-fn", str(img)], check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for name, digest in want.items():
        out = tmp_path / "extracted.bin"
        run(["debugfs", "-R", f"dump /{name} {out}", str(img)])
        assert sha256_file(out) == digest, f"{name} differs in the backing file"
