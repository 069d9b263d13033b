"""A migration's cost in a big, mostly empty LUN: the work per region that is
a hole must be vector work, not a Python call per region (a 16 TiB LUN has
16M regions of 1 MiB; at 1-2 us a call that was seconds of CPU a TiB, most
of a sparse migration's time: 4 TiB with 100 MiB of data, 7.2 s -> 4.4 s).
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emulator.mirror.copier import EXTENT_WINDOW, MAP_SPAN, Copier
from emulator.mirror.migration import Migration, MigrationConfig
from emulator.mirror.regions import CLEAN
from emulator.nbd.backend import Backend, MemoryBackend
from emulator.nbd.protocol import STATE_HOLE, STATE_ZERO, Extent
from tests.backends import local_migration

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


class Thin(MemoryBackend):
    """A MemoryBackend whose allocation map jumps over holes (its own walks page by page)."""

    async def extents(self, offset: int, length: int) -> list[Extent]:
        pages = sorted(self._pages)
        page = offset // self.PAGE
        i = bisect_left(pages, page)
        if i < len(pages) and pages[i] == page:
            n = min(self.PAGE - offset % self.PAGE, length)
            return [Extent(n, 0)]
        nxt = pages[i] * self.PAGE if i < len(pages) else self.size
        return [Extent(min(nxt - offset, length), STATE_HOLE | STATE_ZERO)]


def test_a_pass_does_not_call_the_copier_for_each_hole_region(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass hands the copier only regions still DIRTY: the holes its map reads
    cleaned in bulk are skipped with the queue, not one copy_region call each."""
    calls = [0]
    copy_region = Copier.copy_region

    async def counted(self: Copier, r: int) -> bool:
        calls[0] += 1
        return await copy_region(self, r)

    monkeypatch.setattr(Copier, "copy_region", counted)

    async def main() -> None:
        size, region = 4 * GiB, 64 * KiB  # 65536 regions
        src = Thin(size)
        data = [5 * MiB, GiB + 4 * KiB, 3 * GiB + 7 * MiB, size - 4 * KiB]
        for off in data:
            await src.write(off, off.to_bytes(8, "little") * 512)
        target = MemoryBackend(size)
        m = local_migration(src, target, tmp_path, MigrationConfig(region_size=region))
        await m.start()
        assert await m.wait(30) == "completed"
        for off in data:
            assert await target.read(off, 4 * KiB) == off.to_bytes(8, "little") * 512
        assert await target.read(2 * GiB, 64 * KiB) == bytes(64 * KiB)
        # a call per data region and per map read (the first region of a window
        # whose map is not read yet); before: one for each of the 65536 regions
        assert calls[0] <= 4 * len(data) + size // (64 * MiB), calls[0]

    asyncio.run(main())


class Mapped(MemoryBackend):
    """A source that answers BLOCK_STATUS as a server does: every extent of the
    range asked (the first only for REQ_ONE); records each answer."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.answers: list[tuple[int, int, bool]] = []  # (length asked, extents, REQ_ONE)

    def _map(self, offset: int, length: int, one: bool) -> list[Extent]:
        pages, end = sorted(self._pages), offset + length
        out: list[Extent] = []
        pos, i = offset, bisect_left(pages, offset // self.PAGE)
        while pos < end and not (one and out):
            if i < len(pages) and pages[i] * self.PAGE <= pos:
                n, flags = min(self.PAGE - pos % self.PAGE, end - pos), 0
                i += 1
            else:
                nxt = pages[i] * self.PAGE if i < len(pages) else self.size
                n, flags = min(nxt, end) - pos, STATE_HOLE | STATE_ZERO
            if out and out[-1].flags == flags:
                out[-1] = Extent(out[-1].length + n, flags)
            else:
                out.append(Extent(n, flags))
            pos += n
        self.answers.append((length, len(out), one))
        return out

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return self._map(offset, length, False)

    async def first_extent(self, offset: int, length: int) -> Extent:
        return self._map(offset, length, True)[0]


def _migrate(tmp_path: Path, src: Backend, size: int) -> MemoryBackend:
    async def main() -> MemoryBackend:
        target = MemoryBackend(size)
        m = local_migration(src, target, tmp_path)
        await m.start()
        assert await m.wait(60) == "completed"
        return target

    return asyncio.run(main())


def test_a_huge_sparse_lun_takes_few_block_status_requests(tmp_path: Path) -> None:
    """Where the source's map is all holes, a map read asks ~4 GiB ahead (for one
    extent): 256 GiB with 4 chunks of data takes ~70 requests, not one a 512 MiB."""
    size = 256 * GiB
    src = Mapped(size)
    data = [5 * MiB, 70 * GiB + 4 * KiB, 200 * GiB + 3 * MiB, size - 4 * KiB]
    for off in data:
        asyncio.run(src.write(off, off.to_bytes(8, "little") * 512))
    target = _migrate(tmp_path, src, size)
    for off in data:
        assert asyncio.run(target.read(off, 4 * KiB)) == off.to_bytes(8, "little") * 512
    assert asyncio.run(target.read(100 * GiB, MiB)) == bytes(MiB)
    # before: size / 512 MiB = 512 requests
    assert len(src.answers) <= size // (2 * GiB), len(src.answers)


def test_a_fragmented_stretch_after_a_long_hole_gets_no_longer_answers(tmp_path: Path) -> None:
    """The wide ask over a sparse source is for one extent: where a fragmented
    stretch follows, no answer holds more extents than a 512 MiB ask brings
    (a 4 GiB ask would bring 2x here: 8192), and the stretch itself is asked
    512 MiB at a time; the long hole before it still takes few requests."""
    size, base = 72 * GiB, MAP_SPAN * EXTENT_WINDOW
    src = Mapped(size)
    frag = range(64 * GiB, 65 * GiB, 256 * KiB)  # 4 KiB of every 256 KiB
    for off in frag:
        asyncio.run(src.write(off, off.to_bytes(8, "little") * 512))
    target = _migrate(tmp_path, src, size)
    for off in frag[::97]:
        assert asyncio.run(target.read(off, 8 * KiB)) == off.to_bytes(8, "little") * 512 + bytes(4 * KiB)
    most = 2 * base // (256 * KiB)  # a 512 MiB ask: 2048 data and 2048 hole extents
    assert max(n for _, n, _ in src.answers) <= most, max(n for _, n, _ in src.answers)
    assert all(asked <= base for asked, n, one in src.answers if not one)
    # before: one request a 512 MiB (144)
    assert len(src.answers) <= 40, len(src.answers)


class ThinCounted(Thin):
    """Counts write_zeroes calls."""

    zeroes = 0

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        self.zeroes += 1
        await super().write_zeroes(offset, length, may_trim, fast, fua)


def test_a_resumed_migration_cleans_the_holes_of_its_local_copy_in_bulk(tmp_path: Path) -> None:
    """After a restart the regions not clean on disk are copied again; where the
    local copy holds nothing (its own allocation map) the source's holes cost no
    write_zeroes each, as on a fresh start. Where it holds data the source no
    longer has (a copy that raced a trim), the data is zeroed all the same."""

    async def main() -> None:
        size, region = GiB, 64 * KiB  # 16384 regions
        src = Thin(size)
        data = [5 * MiB, 300 * MiB + 4 * KiB, size - 4 * KiB]
        for off in data:
            await src.write(off, off.to_bytes(8, "little") * 512)
        target = ThinCounted(size)
        stale = 700 * MiB  # the local copy holds data here, the source a hole
        await target.write(stale, b"\xee" * 8 * KiB)

        def migration() -> Migration:
            return local_migration(src, target, tmp_path, MigrationConfig(region_size=region))

        first = migration()
        await first.start(paused=True)  # the progress file: nothing clean yet
        await first.shutdown()
        m = migration()
        await m.start(resume=True)
        assert m.recopied_regions == size // region
        assert await m.wait(30) == "completed"
        for off in data:
            assert await target.read(off, 4 * KiB) == off.to_bytes(8, "little") * 512
        assert await target.read(stale, 8 * KiB) == bytes(8 * KiB)
        # the stale region only; before: one for each of the 16384 hole regions
        assert target.zeroes <= 4, target.zeroes

    asyncio.run(main())


class Counted(np.ndarray):
    """An array that counts the elements its ufuncs (==, <=, &) read."""

    read = 0

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        Counted.read += sum(x.size for x in inputs if isinstance(x, Counted))
        args = [x.view(np.ndarray) if isinstance(x, Counted) else x for x in inputs]
        return getattr(ufunc, method)(*args, **kwargs)


def test_a_checkpoint_reads_the_wide_arrays_only_at_its_candidates(tmp_path: Path) -> None:
    """A checkpoint runs every second on the event loop: over the whole LUN it
    reads only the state and clean-bit maps, not the in-flight counts and write
    times (12 bytes a region) of every region."""

    async def main() -> None:
        size, region = GiB, 64 * KiB  # 16384 regions
        src = Thin(size)
        target = MemoryBackend(size)
        now = [1000.0]
        m = local_migration(src, target, tmp_path, MigrationConfig(region_size=region), clock=lambda: now[0])
        await m.start(paused=True)
        regions, progress = m.regions, m.progress
        assert regions is not None and progress is not None
        regions.state[100:110] = CLEAN  # copied since the last checkpoint
        regions.inflight = regions.inflight.view(Counted)
        regions.last_write = regions.last_write.view(Counted)
        Counted.read = 0
        now[0] += 10
        await m._checkpoint()
        assert progress.disk_clean[100:110].all() and progress.disk_clean.sum() == 10
        assert Counted.read <= 2 * 10, Counted.read  # before: 2 * 16384
        await m.cancel()

    asyncio.run(main())
