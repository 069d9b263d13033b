"""crashfs itself: what a power cut keeps of names (tests/crashfs.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.crashfs import CrashMount

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse for crashfs")


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    fsync(path)


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.timeout(30)
def test_names_are_durable_only_once_their_directory_is_fsynced(tmp_path: Path) -> None:
    with CrashMount(tmp_path / "crashfs") as fs:
        m = fs.mount()
        (m / "kept").mkdir()
        (m / "lost").mkdir()
        fsync(m)
        (m / "kept" / "sub").mkdir()  # a new directory, synced into its parent
        write(m / "kept" / "sub" / "f", b"f")
        fsync(m / "kept" / "sub")
        fsync(m / "kept")
        write(m / "lost" / "h", b"h")  # the parent was fsync'ed before the file came
        write(m / "kept" / "old", b"old")
        write(m / "kept" / "gone", b"gone")
        fsync(m / "kept")
        (m / "kept" / "nosync").mkdir()  # its file is synced, the directory's name is not
        write(m / "kept" / "nosync" / "g", b"g")
        fsync(m / "kept" / "nosync")
        # not durable: an unlink, a rename over an existing file, an rmdir
        (m / "kept" / "gone").unlink()
        write(m / "kept" / "tmp", b"new")
        os.replace(m / "kept" / "tmp", m / "kept" / "old")
        (m / "lost").rename(m / "moved")
        before = tree(m)
        fs.power_cut()
        m = fs.mount()
        after = tree(m)
        assert after == {
            "kept": None,
            "kept/sub": None,
            "kept/sub/f": b"f",
            "kept/old": b"old",
            "kept/gone": b"gone",
            "lost": None,
        }, (before, after)
        # the same changes, now fsync'ed: durable
        (m / "kept" / "gone").unlink()
        write(m / "kept" / "tmp", b"new")
        os.replace(m / "kept" / "tmp", m / "kept" / "old")
        (m / "lost").rename(m / "moved")
        fsync(m / "kept")
        fsync(m)
        before = tree(m)
        fs.power_cut()
        assert tree(fs.mount()) == before
