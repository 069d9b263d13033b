"""The open-files limit (RLIMIT_NOFILE) of an array process.

Every LUN holds its file open, and so do its migration's progress log and source
connection, and every host connection is a socket (two with zero-copy reads). A
login shell's soft limit is often 1024: an array holding 1000 LUNs had no file
left to accept a host or answer its API on. So the daemon raises the soft limit
to the hard one at start, as servers do, and a new LUN is refused while fewer
than a reserve of files would be left for hosts and migrations.
"""

from __future__ import annotations

import logging
import os
import resource

from .errors import NoSpace

log = logging.getLogger(__name__)

#: the most files kept back for hosts, migrations and the API (an eighth of the limit, at least 64)
RESERVE_MAX = 1024


class OutOfFiles(NoSpace):
    """No room for another open file while leaving the reserve (507, as a full pool)."""

    code = "too_many_open_files"


def raise_limit() -> int:
    """Raise the soft limit to the hard one; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open files limit raised from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as e:  # a hard limit above the kernel's nr_open
            log.warning("open files limit stays %d: %s", soft, e)
    return soft


def reserve(limit: int) -> int:
    return max(64, min(RESERVE_MAX, limit // 8))


def in_use() -> int | None:
    """Open files of this process (None where /proc does not tell)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def check_room(what: str, array: str) -> None:
    """Refuse ``what`` (one more open file) when it would eat into the reserve."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    used = in_use()
    if limit == resource.RLIM_INFINITY or used is None:
        return
    keep = reserve(limit)
    if used + 1 + keep > limit:
        raise OutOfFiles(
            f"cannot open {what}: array {array} has {used} files open of its limit of {limit} "
            f"(RLIMIT_NOFILE), and keeps {keep} for hosts, migrations and its API; delete "
            f"LUNs, or raise the hard limit (ulimit -Hn, LimitNOFILE=) and restart the array"
        )
