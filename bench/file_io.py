"""Inline file I/O against a thread pool, per request size: what FileBackend should do.

For each request size, reads (and writes) run on one event loop either
inline (os.pread / os.pwrite in the loop thread) or through the default
executor (a thread per call), at queue depth 16, with the page cache hot
and cold (POSIX_FADV_DONTNEED before each cold round). Printed per row:
throughput, mean latency, and the worst loop stall seen by a ticker task
that wakes every millisecond. Inline wins on throughput for page-cache
hits; the thread pool bounds the stall for big or cold I/O. FileBackend's
``inline_max`` is the size up to which inline is kept.

    python -m bench.file_io [--quick] [--size 256M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import tempfile
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvloop

from emulator.units import format_size, size_arg

SIZES = (4096, 65536, 262144, 1 << 20, 4 << 20)


async def _ticker(stop: asyncio.Event, stalls: list[float]) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        stalls.append(now - last - 0.001)
        last = now


async def _run(fd: int, file_size: int, bs: int, write: bool, inline: bool, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    buf = os.urandom(bs)
    rng = random.Random(bs)
    blocks = file_size // bs
    lat: list[float] = []
    ops = 0
    deadline = time.perf_counter() + seconds

    def op(off: int) -> None:
        if write:
            os.pwrite(fd, buf, off)
        else:
            os.pread(fd, bs, off)

    async def worker() -> None:
        nonlocal ops
        while time.perf_counter() < deadline:
            off = rng.randrange(blocks) * bs
            t = time.perf_counter()
            if inline:
                op(off)
                await asyncio.sleep(0)  # let others run, as a server would between requests
            else:
                await loop.run_in_executor(None, op, off)
            lat.append(time.perf_counter() - t)
            ops += 1

    stop = asyncio.Event()
    stalls: list[float] = []
    tick = asyncio.ensure_future(_ticker(stop, stalls))
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(16)))
    elapsed = time.perf_counter() - t0
    stop.set()
    await tick
    return {
        "mb_s": ops * bs / elapsed / 1e6,
        "mean_us": sum(lat) / max(1, len(lat)) * 1e6,
        "max_stall_ms": max(stalls, default=0.0) * 1e3,
    }


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds the with-block: the test file is deleted


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short rounds (about 20 s in all)")
    ap.add_argument(
        "--size", type=size_arg, default=256 << 20, help="test file size, e.g. 256M (default 256M)"
    )
    args = ap.parse_args(argv)
    if args.size < max(SIZES):  # each request size needs one whole block of the file
        ap.error(f"--size: at least {format_size(max(SIZES))}")
    signal.signal(signal.SIGTERM, _sigterm)
    seconds = 0.4 if args.quick else 1.5
    file_size = args.size
    results: list[dict[str, Any]] = []
    with tempfile.NamedTemporaryFile(dir="/var/tmp", prefix="blockmig-fileio-") as f:
        fd = f.fileno()
        chunk = os.urandom(1 << 20)
        for off in range(0, file_size, len(chunk)):
            os.pwrite(fd, chunk, off)
        os.fsync(fd)
        print(f"{'op':5} {'size':>6} {'cache':5} {'mode':6} {'MB/s':>8} {'mean us':>9} {'max stall ms':>13}")
        for write in (False, True):
            for bs in SIZES:
                for cache in ("hot", "cold") if not write else ("hot",):
                    for inline in (True, False):
                        prepare: Callable[[], None] = (
                            (lambda: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED))
                            if cache == "cold"
                            else (lambda: None)
                        )
                        prepare()
                        r = uvloop.run(_run(fd, file_size, bs, write, inline, seconds))
                        row = {
                            "op": "write" if write else "read",
                            "size": bs,
                            "cache": cache,
                            "mode": "inline" if inline else "thread",
                            **r,
                        }
                        results.append(row)
                        print(
                            f"{row['op']:5} {bs // 1024:>5}K {cache:5} {row['mode']:6} {r['mb_s']:8.0f} "
                            f"{r['mean_us']:9.0f} {r['max_stall_ms']:13.2f}"
                        )
    # Recommend the largest size where inline is not slower on hot reads and writes
    # and its worst stall stays under 5 ms.
    best = 0
    for bs in SIZES:
        rows = {(r["op"], r["cache"], r["mode"]): r for r in results if r["size"] == bs}
        ok = all(
            rows[(op, "hot", "inline")]["mb_s"] >= 0.9 * rows[(op, "hot", "thread")]["mb_s"]
            and rows[(op, "hot", "inline")]["max_stall_ms"] < 5
            for op in ("read", "write")
        )
        if ok:
            best = bs
    print(f"recommended inline_max: {best} bytes")
    print(json.dumps({"inline_max": best, "results": results}))


if __name__ == "__main__":
    main()
