"""Directory entries that survive a power cut.

POSIX makes a new, removed or renamed name durable only once its directory is
fsync'ed: an fsync of a file does not, and neither does one of a directory
below it. Whatever a restart relies on finding (or not finding) needs that.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # a file system that cannot sync a directory (as SQLite does)
            raise
    finally:
        os.close(fd)


def make_dir(path: Path) -> None:
    """``mkdir -p path`` whose new directories are durable. The parent of ``path``
    is fsync'ed even if ``path`` exists: a run killed between its mkdir and that
    fsync left a directory whose name a power cut may still lose."""
    if not path.parent.is_dir():
        make_dir(path.parent)
    path.mkdir(exist_ok=True)
    fsync_dir(path.parent)


def unlink(path: Path) -> None:
    """Remove ``path`` (if there) for good: a power cut does not bring it back."""
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)
