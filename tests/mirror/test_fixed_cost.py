"""What a migration costs besides its bytes: how soon a client learns of its
end, the allocation-map reads of its copier, its first checkpoint.

1. GET /api/v1/migrations/{name}?wait=S is a long poll: it answers when the
   migration ends, not at the client's next poll; after S seconds with the
   status as it is; at once when the array stops (SIGTERM does not wait the
   poll out). `blockmig migration wait` uses it. Real daemons, real NBD.
2. The copier reads each window's allocation map once, shared by its workers,
   and reads the next windows ahead (without evicting the map the workers
   still copy from); a map read ahead is not trusted for a region written
   after it was read (I3); holes the target does not hold are
   cleaned in bulk with the map. In process, injected backends.
   An array stopping does not wait out the retry window of a remote LUN
   whose source is gone (a cancelled migration's): its last flush is given
   up within 5 s.
3. A copy shorter than the checkpoint interval flushes the target at the end
   of its pass and at cutover only, not also at its first region.
4. The copier starts the writeback of each region it wrote (a hint, so the
   flush at its checkpoint finds little left); a LUN file, also under a
   media model, has nothing dirty left in the range after the hint
   (cachestat(2), Linux 6.5+).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import random
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from control.api_client import ApiError
from emulator.array.file_backend import FileBackend
from emulator.array.media import MediaBackend
from emulator.array.models import MEDIA
from emulator.mirror.copier import EXTENT_WINDOW, MAP_SPAN, Copier, Throttle, _clip
from emulator.mirror.migration import MigrationConfig
from emulator.mirror.regions import CLEAN, RegionMap
from emulator.nbd.backend import Backend, MemoryBackend
from emulator.nbd.client import NbdClient
from emulator.nbd.protocol import STATE_ZERO, Extent
from tests.backends import FixedMap, local_migration
from tests.servers import ArrayDaemon, array_api, array_daemon

MiB = 1 << 20
PAGE = 4096
TOKEN = "test-token"


api = partial(array_api, timeout=20)


def long_poll(d: ArrayDaemon, lun: str, wait: float | str) -> tuple[float, dict[str, Any]]:
    t0 = time.monotonic()
    st: dict[str, Any] = api(d).call("GET", f"/api/v1/migrations/{lun}", query={"wait": str(wait)})
    return time.monotonic() - t0, st


def paused_migration(a: ArrayDaemon, b: ArrayDaemon, lun: str) -> None:
    """A migration on B of 8 MiB of data on A, throttled to 1 MB/s and paused at once."""

    async def fill() -> None:
        async with await NbdClient.connect(a.uri(lun)) as c:
            await c.write(0, b"\x5a" * (8 * MiB))
            await c.flush()

    api(a).create_lun(lun, 8 * MiB)
    asyncio.run(fill())
    api(b).call("POST", "/api/v1/migrations", {"lun": lun, "source": a.uri(lun), "throttle": 1})
    api(b).call("POST", f"/api/v1/migrations/{lun}/pause")


@pytest.mark.timeout(90)
def test_long_poll_answers_at_the_end_not_at_the_next_poll(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "A") as a, array_daemon(tmp_path / "b", "B") as b:
        paused_migration(a, b, "vol")
        took, st = long_poll(b, "vol", 0.3)  # nothing ends: the answer comes after the wait
        assert st["state"] == "paused" and took >= 0.25, (took, st)
        for bad in ("-1", "61", "nan", "inf", "soon", ""):
            with pytest.raises(ApiError) as e:
                long_poll(b, "vol", bad)
            assert e.value.status == 400 and "wait" in e.value.message, e.value.message
        with pytest.raises(ApiError) as e:
            long_poll(b, "nosuch", 1)
        assert e.value.status == 404

        result: list[tuple[float, dict[str, Any]]] = []
        poller = threading.Thread(target=lambda: result.append(long_poll(b, "vol", 50)))
        poller.start()
        time.sleep(0.2)  # the poll waits on the server
        api(b).call("POST", "/api/v1/migrations/vol/cancel")
        poller.join(20)
        assert result, "the long poll did not answer when the migration was cancelled"
        took, st = result[0]
        assert st["state"] == "cancelled" and took < 20, (took, st)

        # An unthrottled migration: the answer is "completed", long before the wait is over
        # (of A's LUN again, once the cancelled one no longer serves it).
        api(b).delete_lun("vol", force=True)
        api(b).call("POST", "/api/v1/migrations", {"lun": "vol2", "source": a.uri("vol")})
        took, st = long_poll(b, "vol2", 50)
        assert st["state"] == "completed" and took < 20, (took, st)
        took, st = long_poll(b, "vol2", 50)  # already over: at once
        assert st["state"] == "completed" and took < 5, (took, st)


@pytest.mark.timeout(90)
def test_migration_wait_long_polls_and_exits_by_the_outcome(tmp_path: Path) -> None:
    """`blockmig migration wait`: exit 2 at --timeout while the migration runs,
    1 once it was cancelled, 0 once it completed (each as soon as it ends)."""

    def wait(b: ArrayDaemon, lun: str, *more: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "control.cli", "migration", "wait", "--api", b.api, "--token", TOKEN]
        return subprocess.run([*cmd, lun, *more], capture_output=True, text=True, timeout=60)

    with array_daemon(tmp_path / "a", "A") as a, array_daemon(tmp_path / "b", "B") as b:
        paused_migration(a, b, "vol")
        p = wait(b, "vol", "--timeout", "0.5")
        assert p.returncode == 2 and "still paused after 0.5 s" in p.stderr, (p.returncode, p.stderr)
        later = threading.Timer(0.5, lambda: api(b).call("POST", "/api/v1/migrations/vol/cancel"))
        later.start()
        p = wait(b, "vol", "--json")
        later.join()
        assert p.returncode == 1 and "cancelled" in p.stderr, (p.returncode, p.stderr)
        assert json.loads(p.stdout)["state"] == "cancelled"
        api(b).delete_lun("vol", force=True)  # it serves A's LUN, which vol2 takes over
        api(b).call("POST", "/api/v1/migrations", {"lun": "vol2", "source": a.uri("vol")})
        p = wait(b, "vol2", "--timeout", "30")
        assert p.returncode == 0, (p.returncode, p.stderr)


@pytest.mark.timeout(90)
def test_sigterm_answers_long_polls_and_does_not_wait_them_out(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "A") as a, array_daemon(tmp_path / "b", "B") as b:
        paused_migration(a, b, "vol")
        result: list[Any] = []

        def poll() -> None:
            try:
                result.append(long_poll(b, "vol", 50))
            except ApiError as e:  # the array went away before answering
                result.append(e)

        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        assert b.sigterm(timeout=20) == 0
        assert time.monotonic() - t0 < 10, "the array waited for the long poll before stopping"
        poller.join(10)
        assert result and not isinstance(result[0], ApiError), result
        took, st = result[0]
        assert st["state"] == "paused" and took < 20, (took, st)


@pytest.mark.timeout(90)
def test_sigterm_does_not_wait_out_the_retry_window_of_a_source_that_is_gone(tmp_path: Path) -> None:
    """A cancelled migration leaves its LUN served from the source. With the source
    killed, the stopping array's last flush of that LUN would retry for the whole
    retry window (30 s); the array gives it up after 5 s and exits cleanly."""
    with array_daemon(tmp_path / "a", "A") as a, array_daemon(tmp_path / "b", "B") as b:
        paused_migration(a, b, "vol")
        st = api(b).call("POST", "/api/v1/migrations/vol/cancel")
        assert st["state"] == "cancelled", st

        async def through_b() -> bytes:
            async with await NbdClient.connect(b.uri("vol")) as c:
                await c.write(0, b"\xa5" * PAGE)
                return bytes(await c.read(0, 2 * PAGE))

        assert asyncio.run(through_b()) == b"\xa5" * PAGE + b"\x5a" * PAGE  # from the source
        a.sigkill()
        t0 = time.monotonic()
        assert b.sigterm(timeout=40) == 0, b.output()
        took = time.monotonic() - t0
        assert took < 15, f"the array took {took:.1f} s to stop: {b.output()}"
        assert "flush of LUN vol did not finish in" in b.output(), b.output()


# ------------------------------------------------------------------ in process
class MapSource(MemoryBackend):
    """Counts allocation-map reads; each takes a round trip (one loop turn or more).
    ``answer`` caps how far one reply goes (a server may answer less than asked)."""

    def __init__(self, size: int, answer: int = 1 << 62) -> None:
        super().__init__(size)
        self.answer = answer
        self.map_reads: list[tuple[int, int]] = []

    async def extents(self, offset: int, length: int) -> list[Extent]:
        self.map_reads.append((offset, length))
        await asyncio.sleep(0.001)
        return await super().extents(offset, min(length, self.answer))


async def copy_all(src: Backend, target: Backend, workers: int = 4) -> Copier:
    """Copy every region of ``src`` onto a fresh target (all holes) with
    ``workers`` taking regions in LUN order, as a pass does; all end clean."""
    regions = RegionMap(src.size, MiB)
    regions.target_data[:] = False  # a fresh target: holes cost nothing
    copier = Copier(src, target, regions, Throttle())
    todo = list(range(regions.count))

    async def worker() -> None:
        while todo:
            await copier.copy_region(todo.pop(0))

    await asyncio.gather(*(worker() for _ in range(workers)))
    assert (regions.state == CLEAN).all()
    return copier


def test_one_map_read_per_window_shared_by_the_workers_and_read_ahead() -> None:
    async def main() -> None:
        size = 4 * EXTENT_WINDOW
        src = MapSource(size, answer=EXTENT_WINDOW)  # each reply covers one window
        data = [3 * EXTENT_WINDOW // MiB + 5, 7]  # regions holding data; the rest are holes
        for r in data:
            await src.write(r * MiB, bytes([r]) * MiB)
        target = MemoryBackend(size)
        copier = await copy_all(src, target)
        starts = sorted(off for off, _ in src.map_reads)
        assert starts == [w * EXTENT_WINDOW for w in range(4)], src.map_reads
        for r in data:
            assert await target.read(r * MiB, MiB) == bytes([r]) * MiB
        assert copier.copied_bytes == len(data) * MiB

    asyncio.run(main())


def test_one_map_read_serves_every_window_its_answer_covers() -> None:
    """A map read asks MAP_SPAN windows ahead: the windows a source's answer
    covers whole cost no round trip of their own; past the span, the next read."""

    async def main() -> None:
        size = (MAP_SPAN + 2) * EXTENT_WINDOW
        src = MapSource(size)
        data = [7, MAP_SPAN * EXTENT_WINDOW // MiB + 3]
        for r in data:
            await src.write(r * MiB, bytes([r % 251]) * MiB)
        target = MemoryBackend(size)
        copier = await copy_all(src, target)
        assert [off for off, _ in src.map_reads] == [0, MAP_SPAN * EXTENT_WINDOW], src.map_reads
        assert src.map_reads[0][1] == MAP_SPAN * EXTENT_WINDOW
        for r in data:
            assert await target.read(r * MiB, MiB) == bytes([r % 251]) * MiB
        assert copier.copied_bytes == len(data) * MiB

    asyncio.run(main())


class SlowReads(MapSource):
    """Data takes longer to read than a map: the maps read ahead arrive while
    the workers still copy from the first window."""

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await asyncio.sleep(0.005)
        await super().read_into(offset, buf)


def test_a_map_read_ahead_does_not_evict_the_map_still_copied_from() -> None:
    async def main() -> None:
        size = 3 * EXTENT_WINDOW
        src = SlowReads(size, answer=EXTENT_WINDOW)
        data = [*range(0, 16, 2), 2 * EXTENT_WINDOW // MiB + 1]
        for r in data:
            await src.write(r * MiB, bytes([r + 1]) * MiB)
        target = MemoryBackend(size)
        await copy_all(src, target)
        assert sorted(off for off, _ in src.map_reads) == [w * EXTENT_WINDOW for w in range(3)], src.map_reads
        assert await target.read(0, size) == await src.read(0, size)

    asyncio.run(main())


@pytest.mark.parametrize("answer", [EXTENT_WINDOW, 1 << 62], ids=["read-ahead", "with-window-0"])
def test_a_window_map_read_before_a_write_is_not_trusted_for_its_region(answer: int) -> None:
    """Window 1's map is in hand before region r of it is written: read ahead
    (a source answering one window a reply) or with window 0's answer (one
    answering all it was asked). Region r must be copied from a map read anew."""

    async def main() -> None:
        size = 2 * EXTENT_WINDOW
        src = MapSource(size, answer=answer)
        regions = RegionMap(size, MiB)
        regions.target_data[:] = False
        target = MemoryBackend(size)
        copier = Copier(src, target, regions, Throttle())
        assert await copier.copy_region(0)
        await asyncio.sleep(0.01)
        reads = len(src.map_reads)
        assert reads == (2 if answer == EXTENT_WINDOW else 1), src.map_reads
        # A host write to region r of window 1, after its map was read (as MigratingBackend does it):
        r = EXTENT_WINDOW // MiB + 3
        regions.begin_write(r, r + 1, 0.0)
        regions.mark_dirty(r, r + 1)
        await src.write(r * MiB, b"\x77" * MiB)
        regions.end_write(r, r + 1)
        assert await copier.copy_region(r)
        assert await target.read(r * MiB, MiB) == b"\x77" * MiB, "copied as a hole from a stale map"
        assert len(src.map_reads) == reads + 1, src.map_reads

    asyncio.run(main())


class Zeroes(MemoryBackend):
    """Counts the zeroing requests it gets."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.zero_calls = 0

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        self.zero_calls += 1
        await super().write_zeroes(offset, length, may_trim, fast, fua)


@pytest.mark.parametrize("held_data", [False, True])
def test_a_region_of_data_and_holes_zeroes_only_where_the_target_held_data(held_data: bool) -> None:
    """A region of 4 KiB data and hole runs (as nbdkit's sparse-random answers):
    on a fresh target its holes are holes already, so nothing is zeroed; where
    the target held data (an earlier copy, an active-mode write) every hole
    run is zeroed, and the region reads as the source either way."""

    async def main() -> None:
        size = MiB
        src = MemoryBackend(size)
        rng = random.Random(5)
        for off in range(0, size, 3 * PAGE):  # data, hole, hole, data, ...
            await src.write(off, rng.randbytes(PAGE))
        target = Zeroes(size)
        regions = RegionMap(size, MiB)
        regions.target_data[:] = held_data
        if held_data:
            await target.write(0, b"\xee" * size)
        copier = Copier(src, target, regions, Throttle())
        assert await copier.copy_region(0)
        assert await target.read(0, size) == await src.read(0, size)
        hole_runs = [e.length for e in await src.extents(0, size) if e.flags & STATE_ZERO]
        assert copier.zeroed_bytes == (sum(hole_runs) if held_data else 0)
        assert target.zero_calls == (len(hole_runs) if held_data else 0)

    asyncio.run(main())


def test_holes_are_cleaned_in_bulk_when_their_map_is_read() -> None:
    """Regions all zero on the source, on a target that holds nothing there, turn
    clean with the map read: no copy_region each. Not a region with data, one the
    target may hold data in, one written since the map was read, one in flight."""

    async def main() -> None:
        size = EXTENT_WINDOW
        src = MapSource(size)
        await src.write(5 * MiB, b"\x05" * MiB)
        regions = RegionMap(size, MiB)
        regions.target_data[:] = False
        regions.target_data[9] = True  # e.g. an earlier write reached the target there
        regions.begin_write(11, 12, 0.0)  # in flight while the map is read
        copier = Copier(src, MemoryBackend(size), regions, Throttle())
        read = asyncio.ensure_future(copier._runs(0))
        while not src.map_reads:  # the map read has begun
            await asyncio.sleep(0)
        regions.begin_write(13, 14, 0.0)  # written after it began
        regions.end_write(13, 14)
        await read
        regions.end_write(11, 12)
        dirty = sorted(int(r) for r in (regions.state != CLEAN).nonzero()[0])
        assert dirty == [5, 9, 11, 13]
        assert copier.regions_copied == regions.count - 4
        assert len(src.map_reads) == 1

    asyncio.run(main())


def test_a_short_copy_flushes_at_the_end_of_its_pass_and_at_cutover_only(tmp_path: Path) -> None:
    async def main() -> None:
        size = 8 * MiB
        src = MemoryBackend(size)
        for off in range(0, size, MiB):
            await src.write(off, bytes([off // MiB + 1]) * MiB)
        target = MemoryBackend(size)  # counts its flushes
        now = [1000.0]  # injected time: never a whole checkpoint interval after the start
        m = local_migration(src, target, tmp_path, MigrationConfig(region_size=MiB), clock=lambda: now[0])
        await m.start()
        assert await m.wait(10) == "completed"
        # the checkpoint after the pass, the settle before cutover; none at the first region
        assert target.flushes == 2, target.flushes
        assert await target.read(0, size) == await src.read(0, size)

    asyncio.run(main())


# ====================================================================== writeback
class Writebacks(MemoryBackend):
    """Records each writeback hint and whether the range already held its data."""

    def __init__(self, size: int, src: Backend) -> None:
        super().__init__(size)
        self.src = src
        self.hints: list[tuple[int, int, bool]] = []

    async def start_writeback(self, offset: int, length: int) -> None:
        written = await self.read(offset, length) == await self.src.read(offset, length)
        self.hints.append((offset, length, written))


def test_the_copier_starts_writeback_of_each_region_it_wrote() -> None:
    async def main() -> None:
        size = 6 * MiB
        src = MemoryBackend(size)
        for r in (1, 2, 4):
            await src.write(r * MiB, bytes([r]) * MiB)
        for off in (5 * MiB + 8 * PAGE, 5 * MiB + 20 * PAGE, 5 * MiB + 30 * PAGE):  # three runs
            await src.write(off, b"\x05" * PAGE)
        target = Writebacks(size, src)
        await copy_all(src, target)
        # one hint a region, over the data it wrote (from its first run to the end of its last)
        want = [(r * MiB, MiB, True) for r in (1, 2, 4)] + [(5 * MiB + 8 * PAGE, 23 * PAGE, True)]
        assert sorted(target.hints) == want, target.hints
        assert await target.read(0, size) == await src.read(0, size)

    asyncio.run(main())


class CountsReads(MemoryBackend):
    """Records the most reads it had in flight at once."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.now = self.most = 0

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        self.now += 1
        self.most = max(self.most, self.now)
        await asyncio.sleep(0.001)
        self.now -= 1
        return await super().read(offset, length)


def test_the_data_runs_of_a_fragmented_region_are_read_at_once() -> None:
    async def main() -> None:
        size = MiB
        src = CountsReads(size)
        for off in range(0, size, 4 * PAGE):  # 64 runs of data between holes
            await src.write(off, os.urandom(PAGE))
        target = MemoryBackend(size)
        await copy_all(src, target, workers=1)
        assert src.most == 64, src.most
        assert await target.read(0, size) == await MemoryBackend.read(src, 0, size)

    asyncio.run(main())


@settings(max_examples=300, deadline=None)
@given(
    hst.lists(hst.tuples(hst.integers(1, 50), hst.booleans()), min_size=1, max_size=40),
    hst.integers(0, 2000),
    hst.integers(1, 600),
)
def test_clip_finds_the_runs_of_a_range_as_a_scan_would(
    spans: list[tuple[int, bool]], lo: int, n: int
) -> None:
    runs, pos = [], 7
    for ln, z in spans:
        runs.append((pos, ln, z))
        pos += ln
    hi = lo + n
    scan = [(max(o, lo), min(o + ln, hi) - max(o, lo), z) for o, ln, z in runs]
    scan = [x for x in scan if x[1] > 0]
    assert _clip(runs, [o for o, _, _ in runs], lo, hi) == scan


class _CacheStat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


_NR_CACHESTAT = 451  # x86_64 and the generic table alike


def dirty_pages(fd: int, offset: int, length: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    st, rng = _CacheStat(), _CacheStatRange(offset, length)
    if libc.syscall(_NR_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        e = ctypes.get_errno()
        if e in (errno.ENOSYS, errno.EPERM):  # an older kernel, a seccomp filter
            pytest.skip(f"no cachestat(2): {os.strerror(e)}")
        raise OSError(e, os.strerror(e))
    return int(st.dirty)


@pytest.mark.parametrize("media", ["none", "ssd"])
def test_start_writeback_leaves_nothing_dirty_in_the_range(tmp_path: Path, media: str) -> None:
    async def main() -> None:
        fb = FileBackend(str(tmp_path / "lun.img"), create_size=8 * MiB)
        be: Backend = fb if media == "none" else MediaBackend(fb, MEDIA[media])
        try:
            for off in range(0, 8 * MiB, MiB):
                await be.write(off, os.urandom(MiB))
            before = dirty_pages(fb.fd, 0, 8 * MiB)
            if before == 0:
                pytest.skip("this filesystem keeps no dirty pages (tmpfs?)")
            await be.start_writeback(2 * MiB, 4 * MiB)  # more than inline_max: in a thread
            await be.start_writeback(7 * MiB, MiB)  # inline
            assert dirty_pages(fb.fd, 2 * MiB, 4 * MiB) == 0
            assert dirty_pages(fb.fd, 7 * MiB, MiB) == 0
            assert dirty_pages(fb.fd, 0, 2 * MiB) > 0  # only the ranges asked for
            await be.flush()
            assert dirty_pages(fb.fd, 0, 8 * MiB) == 0
        finally:
            be.close()

    asyncio.run(main())


@pytest.mark.timeout(30)  # the old copier asked again forever, never yielding to the loop
def test_a_map_answer_that_moves_nowhere_is_copied_as_data_not_asked_forever() -> None:
    async def main() -> None:
        size = 4 * MiB
        src = FixedMap(size, [Extent(0, 0)])  # every map read: one descriptor of length 0, at once
        await src.write(MiB + 5, b"\x42" * 9000)
        target = MemoryBackend(size)
        await asyncio.wait_for(copy_all(src, target), 10)
        assert await target.read(0, size) == await MemoryBackend.read(src, 0, size)

    asyncio.run(main())
