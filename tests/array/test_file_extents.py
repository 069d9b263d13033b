"""FileBackend.extents when the file changes between its two seeks."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from emulator.array.file_backend import FileBackend
from emulator.nbd.protocol import STATE_HOLE, STATE_ZERO, Extent

MIB = 1 << 20
HZ = STATE_HOLE | STATE_ZERO
_lseek = os.lseek


def _racing_lseek(times: int | None) -> object:
    """os.lseek where SEEK_HOLE answers the offset asked (a hole punched there just
    after SEEK_DATA found data) the first ``times`` times (None: always)."""
    left = [times]

    def lseek(fd: int, pos: int, how: int) -> int:
        if how == os.SEEK_HOLE and (left[0] is None or left[0] > 0):
            if left[0] is not None:
                left[0] -= 1
            return pos
        return _lseek(fd, pos, how)

    return lseek


@pytest.mark.parametrize("times", [1, 2, None], ids=["once", "twice", "always"])
def test_a_hole_punched_between_the_seeks_gives_no_extent_of_length_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, times: int | None
) -> None:
    """It gave Extent(0, 0), which the NBD server sent as the one descriptor of a
    REQ_ONE BLOCK_STATUS answer: invalid, and clients drop the connection on it."""
    be = FileBackend(tmp_path / "disk.img", create_size=MIB)

    async def main() -> tuple[list[Extent], Extent]:
        await be.write(0, b"x" * 65536)
        monkeypatch.setattr(os, "lseek", _racing_lseek(times))
        got = await be.extents(0, MIB)
        monkeypatch.setattr(os, "lseek", _racing_lseek(times))
        return got, await be.first_extent(0, MIB)

    try:
        extents, first = asyncio.run(asyncio.wait_for(main(), 10))
    finally:
        be.close()
    assert all(e.length > 0 for e in extents) and first.length > 0
    assert sum(e.length for e in extents) == MIB
    if times is None:  # it keeps racing: the range is reported as data, always safe
        assert extents == [Extent(MIB, 0)]
    else:
        assert extents == [Extent(65536, 0), Extent(MIB - 65536, HZ)]
