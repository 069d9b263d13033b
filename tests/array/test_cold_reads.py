"""Reads that miss the page cache leave the event loop free (FileBackend): a cold
read waits in a thread while other clients' cached reads answer at once; a copy's
bulk writes use O_DIRECT where the file system takes it; I/O in a thread ends
before a cancel of its caller returns."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from emulator.array import file_backend
from emulator.array.array import Array
from emulator.array.file_backend import FileBackend
from emulator.array.media import MediaBackend
from emulator.array.models import get_model, parse_media
from emulator.nbd.backend import Backend, MemoryBackend
from emulator.nbd.client import NbdClient
from emulator.nbd.errors import BackendError
from emulator.nbd.server import NbdServer
from tests.loop_turns import loop_turns_during
from tests.mirror.test_fixed_cost import copy_all
from tests.slowfs import SlowMount

T = TypeVar("T")
MIB = 1 << 20
DELAY = 0.5  # a slowfs read of a LUN file
PAGE = mmap.PAGESIZE

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse for slowfs")


def run(coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def evict(path: Path) -> None:
    """Drop the file's (clean) pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_pages(path: Path, offset: int, length: int) -> int:
    """How many of the range's pages the page cache holds (cachestat(2))."""
    fd = os.open(path, os.O_RDONLY)
    try:
        r, c = file_backend._CachestatRange(offset, length), file_backend._Cachestat()
        if file_backend._syscall(file_backend._CACHESTAT, fd, ctypes.byref(r), ctypes.byref(c), 0) != 0:
            pytest.skip("no cachestat(2) here")
        return int(c.nr_cache)
    finally:
        os.close(fd)


def skip_unless_direct_bypasses_the_cache(d: Path) -> None:
    """Skip where an O_DIRECT write leaves its pages cached (tmpfs) or is refused."""
    probe = d / "direct-probe"
    probe.write_bytes(bytes(PAGE))
    buf = mmap.mmap(-1, PAGE)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_DIRECT)
    except OSError:
        pytest.skip("no O_DIRECT here")
    try:
        evict(probe)
        os.pwritev(fd, [buf], 0)
    finally:
        os.close(fd)
        buf.close()
    if cached_pages(probe, 0, PAGE):
        pytest.skip("this file system caches O_DIRECT writes (tmpfs?)")
    probe.unlink()


# ------------------------------------------------------------- a FUSE data dir
async def _cold_and_hot(data_dir: Path, same_lun: bool, twice: bool) -> tuple[float, float]:
    """(when a cached read answered, when a cold read answered), from when the cold read
    was sent; ``twice``: a second client reads next to the cold read meanwhile (pages
    the first one is still reading: cachestat counts them, a read of them waits)."""
    server = NbdServer()
    array = Array(data_dir, "arr-cold", get_model("unified").with_media(parse_media("none")), server)
    array.open()
    try:
        _, port = await server.listen_tcp("127.0.0.1", 0)
        for name in ("vol1", "vol2"):
            array.create_lun(name, 4 * MIB)
        pattern = {n: os.urandom(4 * MIB) for n in ("vol1", "vol2")}
        for name, data in pattern.items():
            # Written beside the mount (the array never read it: no page is cached).
            backing = data_dir.parent.parent / "backing" / data_dir.name / "pools" / "default" / f"{name}.img"
            with open(backing, "r+b") as f:
                f.write(data)
            evict(array.lun_path("default", name))
        hot_lun = "vol1" if same_lun else "vol2"
        uri = f"nbd://127.0.0.1:{port}/"
        async with (
            await NbdClient.connect(uri + "vol1", timeout=5) as cold,
            await NbdClient.connect(uri + "vol1", timeout=5) as cold2,
            await NbdClient.connect(uri + hot_lun, timeout=5) as hot,
        ):
            assert await hot.read(0, 4096) == pattern[hot_lun][:4096]  # slow once: now cached
            t0 = time.monotonic()
            cold_read = asyncio.ensure_future(cold.read(3 * MIB, 4096))
            await asyncio.sleep(0.05)  # the cold read is under way
            if twice:
                cold_read2 = asyncio.ensure_future(cold2.read(3 * MIB + 8192, 4096))
                await asyncio.sleep(0.05)
            assert await hot.read(0, 4096) == pattern[hot_lun][:4096]
            t_hot = time.monotonic() - t0
            assert await cold_read == pattern["vol1"][3 * MIB : 3 * MIB + 4096]
            t_cold = time.monotonic() - t0
            if twice:
                assert await cold_read2 == pattern["vol1"][3 * MIB + 8192 : 3 * MIB + 12288]
        return t_hot, t_cold
    finally:
        await server.close()
        await array.close()


@needs_fuse
@pytest.mark.parametrize(
    ("same_lun", "twice"),
    [(True, False), (False, False), (True, True)],
    ids=["same-lun", "other-lun", "twice"],
)
def test_cold_read_does_not_hold_up_cached_reads(tmp_path: Path, same_lun: bool, twice: bool) -> None:
    """On a slow FUSE data dir, one client's read of a cold region takes DELAY;
    another client's read of a cached region (of the same LUN, or of another)
    answers before it, where it used to wait behind it on the blocked loop; also
    while a third client reads next to the cold read."""
    with SlowMount(tmp_path / "slowfs", DELAY) as mnt:
        t_hot, t_cold = run(_cold_and_hot(mnt / "arr", same_lun, twice))
    assert t_cold >= DELAY  # it did reach slowfs
    assert t_hot < t_cold - DELAY / 2, (t_hot, t_cold)


# ------------------------------------------------------------- tmpfs: cachestat
def _shm_dir(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs)")
    return shm


def test_tmpfs_reads_ask_cachestat(tmp_path: Path) -> None:
    """tmpfs refuses RWF_NOWAIT: the backend learns that once (for its own file) and
    asks cachestat(2) instead. A resident range is read inline and offered to
    sendfile; a range the file never held (a hole: no page) is read in a thread
    and not offered to sendfile; both read right."""
    path = _shm_dir(tmp_path) / f"blockmig-cold-{os.getpid()}-{time.monotonic_ns()}.img"
    data = os.urandom(MIB)
    try:
        with open(path, "wb") as f:
            f.truncate(4 * MIB)
            f.write(data)
        be = FileBackend(path)
        other = FileBackend(tmp_path / "disk.img", create_size=MIB)  # ext4-like: keeps RWF_NOWAIT
        threads: list[str] = []
        real = be._pread_into

        def spy(offset: int, buf: memoryview | bytearray) -> None:
            threads.append(threading.current_thread().name)
            real(offset, buf)

        be._pread_into = spy  # type: ignore[method-assign]

        async def main() -> None:
            assert await be.read(4096, 8192) == data[4096 : 4096 + 8192]
            assert not be._nowait and be._cachestat
            assert threads == [threading.current_thread().name]  # inline, after cachestat
            assert await other.read(0, 4096) == bytes(4096)
            assert other._nowait  # learnt per file, not for the process
            threads.clear()
            assert await be.read(2 * MIB, 4096) == bytes(4096)  # never touched: not cached
            assert threads and threads[-1] != threading.current_thread().name
            assert be.zero_copy_fd(256 * 1024, 0) == be.fd
            assert be.zero_copy_fd(256 * 1024, 2 * MIB) is None
            assert be.zero_copy_fd(256 * 1024) == be.fd  # may it ever: yes

        try:
            run(main())
        finally:
            be.close()
            other.close()
    finally:
        path.unlink(missing_ok=True)


def test_cold_page_cache_miss_reads_right(tmp_path: Path) -> None:
    """On a disk file system a read of evicted pages misses RWF_NOWAIT, goes the slow
    way (read-ahead, polls, maybe a thread) and returns the file's bytes, while the
    loop keeps turning; cached pages are read inline (no loop turn)."""
    path = tmp_path / "cold.img"
    data = os.urandom(4 * MIB)
    path.write_bytes(data)
    evict(path)
    if cached_pages(path, 0, 4 * MIB):
        pytest.skip("this file system keeps the pages (tmpfs?)")
    be = FileBackend(path)
    slow: list[int] = []
    real = be._read_slow

    async def spy(offset: int, buf: bytearray | memoryview) -> None:
        slow.append(offset)
        await real(offset, buf)

    be._read_slow = spy  # type: ignore[method-assign]

    async def main() -> None:
        # A RWF_NOWAIT read that misses starts the read-ahead itself and then looks
        # at the pages: when the disk answered first (a vCPU descheduled there) it
        # is served inline, rightly; evict and try again until the miss is seen.
        for _ in range(5):
            evict(path)
            slow.clear()
            got, _ = await loop_turns_during(be.read(MIB, 8192))
            assert got == data[MIB : MIB + 8192]
            if slow:
                break
        else:
            pytest.skip("the disk answered every missed read before the NOWAIT read looked")
        assert slow == [MIB]
        got, turns = await loop_turns_during(be.read(MIB, 4096))  # cached now
        assert got == data[MIB : MIB + 4096] and turns == 0 and slow == [MIB]
        buf = bytearray(4096)
        await be.read_into(3 * MIB, memoryview(buf))
        assert buf == data[3 * MIB : 3 * MIB + 4096]
        # a big read (cachestat, then os.pread when resident) misses the same way
        cold = not be._resident(2 * MIB, 256 * 1024)
        assert await be.read(2 * MIB, 256 * 1024) == data[2 * MIB : 2 * MIB + 256 * 1024]
        assert not cold or slow[-1] == 2 * MIB
        assert await be.read(2 * MIB, 256 * 1024) == data[2 * MIB : 2 * MIB + 256 * 1024]
        assert be._resident(2 * MIB, 256 * 1024)

    try:
        run(main())
    finally:
        be.close()


# ------------------------------------------------------------- O_DIRECT bulk writes
def test_bulk_write_bypasses_the_page_cache(tmp_path: Path) -> None:
    """write_bulk of whole pages uses O_DIRECT: the bytes are in the file and not in
    the page cache; an unaligned one is an ordinary write."""
    skip_unless_direct_bypasses_the_cache(tmp_path)
    path = tmp_path / "t.img"
    be = FileBackend(path, create_size=4 * MIB)
    data = os.urandom(MIB)

    async def main() -> None:
        await be.write_bulk(MIB, data)
        await be.write_bulk(3 * MIB + 512, data[:1024])  # not page-aligned: buffered
        await be.flush()

    try:
        run(main())
        assert be._direct is not None and be._direct >= 0
    finally:
        be.close()
    assert cached_pages(path, MIB, MIB) == 0
    with open(path, "rb") as f:
        got = f.read()
    assert got[MIB : 2 * MIB] == data and got[3 * MIB + 512 : 3 * MIB + 1536] == data[:1024]
    assert got[:MIB] == bytes(MIB)


@pytest.mark.parametrize("where", ["open", "write"])
def test_bulk_write_falls_back_without_o_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A file system without O_DIRECT (EINVAL at the open, or at the first write, as
    some do) gets buffered writes for good, and the bytes are right."""
    real_open, real_pwritev = os.open, os.pwritev
    refused: list[str] = []

    def no_direct_open(p: Any, flags: int, *a: Any) -> int:
        if flags & os.O_DIRECT:
            refused.append("open")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)

    def no_direct_pwritev(fd: int, bufs: Any, off: int, *a: Any) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append("write")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwritev(fd, bufs, off, *a)

    if where == "open":
        monkeypatch.setattr(os, "open", no_direct_open)
    else:
        monkeypatch.setattr(os, "pwritev", no_direct_pwritev)
    path = tmp_path / "t.img"
    fds = len(os.listdir("/proc/self/fd"))
    be = FileBackend(path, create_size=4 * MIB)
    a, b = os.urandom(MIB), os.urandom(MIB)

    async def main() -> None:
        await be.write_bulk(0, a)
        assert be._direct is None or be._direct_off
        await be.write_bulk(MIB, b)
        assert await be.read(0, MIB) == a and await be.read(MIB, MIB) == b

    try:
        run(main())
    finally:
        be.close()
    assert refused == [where]  # asked once, then buffered for good
    assert len(os.listdir("/proc/self/fd")) == fds  # the refused O_DIRECT fd closed too


# ------------------------------------------------------------- cancel waits for the thread
class _HeldWrites:
    """A FileBackend whose writes in a thread (larger than 4 KiB) wait, once begun,
    until ``release`` is set."""

    def __init__(self, path: Path) -> None:
        self.be = be = FileBackend(path, create_size=4 * MIB, inline_max=4096)
        self.started, self.release, self.finished = threading.Event(), threading.Event(), threading.Event()
        real = be._pwrite

        def held_pwrite(offset: int, data: Any, fua: bool) -> None:
            self.started.set()
            self.release.wait(10)
            real(offset, data, fua)
            self.finished.set()

        be._pwrite = held_pwrite  # type: ignore[method-assign]

    async def begin_write(self) -> asyncio.Future[None]:
        """A 1 MiB write of 0xaa, once its thread has begun it."""
        task = asyncio.ensure_future(self.be.write(0, b"\xaa" * MIB))
        while not self.started.is_set():
            await asyncio.sleep(0.005)
        return task

    def run(self, main: Coroutine[Any, Any, None]) -> None:
        try:
            run(main)
        finally:
            self.release.set()
            self.be.close()


def test_cancelled_thread_io_ends_before_the_cancel_returns(tmp_path: Path) -> None:
    """A write that runs in a thread (larger than inline_max) is cancelled while the
    thread writes: the cancelled coroutine ends only after the thread did, so a trim
    or a newer write that follows the cancel cannot be overtaken by it."""
    held = _HeldWrites(tmp_path / "t.img")
    be = held.be

    async def main() -> None:
        task = await held.begin_write()
        task.cancel()
        asyncio.get_running_loop().call_later(0.3, held.release.set)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert held.finished.is_set()  # it landed before the cancel returned...
        await be.trim(0, MIB)  # ...so what follows the cancel is last
        assert await be.read(0, 4096) == bytes(4096)

    held.run(main())


def _open_files_of(path: Path) -> list[int]:
    """This process's descriptors open on ``path``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                out.append(int(fd))
    return out


def test_a_close_during_thread_io_keeps_its_descriptors_until_it_ends(tmp_path: Path) -> None:
    """A forced delete closes a LUN's file while a thread still writes it (a request
    the server gave up on after its 5 s). Closed at once, the descriptor's number
    went to the next file the array opened (another LUN's), where that thread's next
    syscall would land; now it stays open until the thread is done. Every call
    after the close fails with EBADF, and none reopens the file (O_DIRECT)."""
    path = tmp_path / "a.img"
    held = _HeldWrites(path)
    be = held.be

    async def main() -> None:
        task = await held.begin_write()
        fd = be.fd
        be.close()
        other = os.open(tmp_path / "b.img", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)  # the next LUN
        try:
            assert other != fd, "the thread's descriptor went to the next file opened"
            assert _open_files_of(path) == [fd]
            held.release.set()
            with pytest.raises(BackendError) as e:
                await task
            assert e.value.errno == errno.EBADF
            assert os.fstat(other).st_size == 0
        finally:
            os.close(other)
        assert _open_files_of(path) == []  # the last thread I/O closed it
        for call in (be.read(0, 4096), be.write_bulk(0, bytes(PAGE)), be.flush(), be.write(0, bytes(8192))):
            with pytest.raises(BackendError) as e:
                await call
            assert e.value.errno == errno.EBADF
        assert _open_files_of(path) == []
        be.close()  # twice: nothing more to do

    held.run(main())


@pytest.mark.parametrize("media", ["none", "ssd"])
def test_the_copier_writes_around_the_page_cache(tmp_path: Path, media: str) -> None:
    """A migration's copy lands on the target's file with O_DIRECT (also through the
    media model): the bytes are the source's, and the page cache holds none of them."""
    path = tmp_path / "t.img"
    data = os.urandom(4 * MIB)

    async def main() -> None:
        src = MemoryBackend(8 * MIB)
        await src.write(MIB, data)
        fb = FileBackend(path, create_size=8 * MIB)
        target: Backend = fb if media == "none" else MediaBackend(fb, parse_media("ssd"))
        try:
            await copy_all(src, target)
            await target.flush()
        finally:
            target.close()

    skip_unless_direct_bypasses_the_cache(tmp_path)
    run(main())
    assert cached_pages(path, 0, 8 * MIB) == 0
    with open(path, "rb") as f:
        assert f.read() == bytes(MIB) + data + bytes(3 * MIB)


# ------------------------------------------------------------- a dropped host's queued reads
async def _flush_after_a_drop(data_dir: Path, reads: int) -> float:
    """Client 1 sends ``reads`` cold 2 MiB reads (each waits in a thread) and drops
    its connection; then client 2 flushes another LUN: how long that flush took."""
    server = NbdServer()
    array = Array(data_dir, "arr-drop", get_model("unified").with_media(parse_media("none")), server)
    array.open()
    try:
        _, port = await server.listen_tcp("127.0.0.1", 0)
        array.create_lun("vol1", reads * 2 * MIB)
        array.create_lun("vol2", MIB)
        evict(array.lun_path("default", "vol1"))
        uri = f"nbd://127.0.0.1:{port}/"
        async with await NbdClient.connect(uri + "vol2", timeout=5) as other:
            gone = await NbdClient.connect(uri + "vol1", timeout=5)
            pending = [asyncio.ensure_future(gone.read(i * 2 * MIB, 2 * MIB)) for i in range(reads)]
            await asyncio.sleep(0.3)  # every read is in a thread or queued for one
            gone.abort("the host went away")
            await asyncio.gather(*pending, return_exceptions=True)
            await other.write(0, b"x" * 4096)
            t0 = time.monotonic()
            await other.flush()
            return time.monotonic() - t0
    finally:
        await server.close()
        await array.close()


@needs_fuse
def test_a_dropped_hosts_queued_reads_do_not_hold_up_a_flush(tmp_path: Path) -> None:
    """A host drops its connection with many cold reads in flight: those a thread
    has begun end first (a cancel waits for them), but those still queued for the
    executor's few threads never run; another host's flush, queued behind them in
    the same executor, waited for every one of them (here ~4 s, not ~0.3)."""
    delay = 0.03
    with SlowMount(tmp_path / "slowfs", delay) as mnt:
        took = run(_flush_after_a_drop(mnt / "arr", 48), 60)
    print(f"flush after the drop: {took:.2f} s")
    assert took < 1.5, f"the flush waited {took:.2f} s for reads nobody will take"
