"""The generic host-assisted copy: read the source LUN over NBD, write the target.

Used when no driver can migrate by itself (moved False). It walks the
source's allocation map, so holes cost nothing (the target is a new sparse
LUN), and keeps a few chunks in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from emulator.nbd.client import NbdClient
from emulator.nbd.protocol import STATE_ZERO

CHUNK = 4 << 20
WINDOW = 256 << 20
IN_FLIGHT = 4
#: seconds between progress reports within a window (each one is a volumes.db write)
REPORT_EVERY = 0.5


async def copy_volume(src_uri: str, dst_uri: str, progress: Callable[[int, int], None] | None = None) -> int:
    """Copy every allocated byte; returns data bytes copied. Raises on any error."""
    src = await NbdClient.connect(src_uri)
    try:
        dst = await NbdClient.connect(dst_uri)
        try:
            if dst.size < src.size:
                raise ValueError(
                    f"target {dst_uri} ({dst.size} bytes) is smaller than {src_uri} ({src.size})"
                )
            copied = 0
            done = 0
            skipped = 0  # holes: nothing to copy, done all the same
            reported = time.monotonic()
            sem = asyncio.Semaphore(IN_FLIGHT)

            async def chunk(off: int, n: int) -> None:
                nonlocal copied, reported
                async with sem:
                    data = await src.read(off, n)
                    await dst.write(off, data)
                    copied += n
                # within a window too: one window holds up to 256 MiB, a whole small volume
                if progress is not None and time.monotonic() - reported >= REPORT_EVERY:
                    reported = time.monotonic()
                    progress(skipped + copied, src.size)

            pos = 0
            while pos < src.size:
                end = min(src.size, pos + WINDOW)
                jobs = []
                while pos < end:
                    extents = await src.extents(pos, end - pos)
                    for e in extents:
                        n = min(e.length, end - pos)
                        if not e.flags & STATE_ZERO:
                            jobs += [chunk(o, min(CHUNK, pos + n - o)) for o in range(pos, pos + n, CHUNK)]
                        else:
                            skipped += n
                        pos += n
                        if pos >= end:
                            break
                await asyncio.gather(*jobs)
                done = pos
                if progress is not None:
                    progress(done, src.size)
            await dst.flush()
            return copied
        finally:
            await dst.close()
    finally:
        await src.close()
