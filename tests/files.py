"""What a file really holds, for tests that compare maps with the file system."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def sparse_image(path: Path, size: int) -> Path:
    """A new file of ``size`` bytes, all hole."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def sparse_runs(path: Path) -> list[tuple[int, int, bool]]:
    """(offset, length, is_data) runs of ``path``, from SEEK_DATA/SEEK_HOLE."""
    size = path.stat().st_size
    out: list[tuple[int, int, bool]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = size
            if data > pos:
                out.append((pos, data - pos, False))
                pos = data
            else:
                hole = min(os.lseek(fd, pos, os.SEEK_HOLE), size)
                out.append((pos, hole - pos, True))
                pos = hole
    finally:
        os.close(fd)
    return out


def data_bytes(path: Path) -> int:
    """Bytes of ``path`` that are data."""
    return sum(n for _, n, is_data in sparse_runs(path) if is_data)
