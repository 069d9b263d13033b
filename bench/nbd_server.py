"""Benchmark our NBD server against ``nbdkit file`` with fio.

Method: one backing file is filled with random data (so reads return real
bytes, not holes) and served in turn by our server (``blockmig serve-file
--listen 127.0.0.1:0``) and by ``nbdkit -f -i 127.0.0.1 file FILE``, both
over TCP on 127.0.0.1 so the transport is the same. fio's ``nbd`` engine
(libnbd, one connection, ``iodepth`` requests in flight) runs the same
time-based job against each, after a one-second ramp. Each round starts
both servers fresh, runs every job on both, alternating which server goes
first, and stops them; the table shows the median of the rounds per server.

Caveats: fio and the server share the machine's cores (2 on the reference
box) and nothing is pinned, so the numbers measure the server *and* its
fight with the client for CPU. The file sits in the page cache, so this is
the server's overhead, not the disk's. Writes go to the same file both
servers read; the ratio ours/nbdkit (IOPS) is the figure of merit.

The last line printed is one JSON object: a ratio per job plus the raw
numbers under ``"raw"``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from bench.common import (
    dir_arg,
    emit_json,
    free_port,
    mib_size_arg,
    missing_tools,
    names_arg,
    out_file_arg,
    stop,
)
from emulator.units import count_arg, parse_size, seconds_arg

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 20.0
RAMP_S = 1.0


@dataclass(frozen=True, slots=True)
class Job:
    key: str
    rw: str
    bs: str
    iodepth: int


JOBS = (
    Job("4k_randread_qd32", "randread", "4k", 32),
    Job("4k_randwrite_qd32", "randwrite", "4k", 32),
    Job("1m_seqread_qd8", "read", "1M", 8),
    Job("1m_seqwrite_qd8", "write", "1M", 8),
)
SERVERS = ("ours", "nbdkit")


@dataclass(frozen=True, slots=True)
class Result:
    iops: float
    mbps: float  # 10**6 bytes per second
    p99_us: float  # completion latency


# ---------------------------------------------------------------- servers
@contextmanager
def serve_ours(path: Path) -> Iterator[str]:
    cmd = [sys.executable, "-m", "control.cli", "serve-file", str(path), "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode(errors="replace")
        m = re.search(r"nbd://127\.0\.0\.1:(\d+)/", line)
        if not m:
            raise RuntimeError(f"serve-file did not start (exit {proc.poll()}): {line!r}")
        yield f"nbd://127.0.0.1:{m.group(1)}/"
    finally:
        stop(proc)


@contextmanager
def serve_nbdkit(path: Path, workdir: Path) -> Iterator[str]:
    port = free_port()
    pidfile = workdir / f"nbdkit-{port}.pid"
    cmd = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "-P", str(pidfile), "file", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not pidfile.exists():  # nbdkit writes it once it listens
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit did not start (exit {proc.poll()})")
            time.sleep(0.01)
        yield f"nbd://127.0.0.1:{port}/"
    finally:
        stop(proc)


# ---------------------------------------------------------------- fio
def run_fio(uri: str, job: Job, runtime: float, out: Path) -> Result:
    cmd = [
        "fio",
        f"--name={job.key}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        "--time_based",
        f"--runtime={int(runtime * 1000)}ms",
        f"--ramp_time={int(RAMP_S * 1000)}ms",
        "--output-format=json",
        f"--output={out}",
    ]
    proc = subprocess.run(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=runtime + RAMP_S + 60
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fio {job.key} on {uri} failed: {proc.stderr.decode().strip()}")
    fio_job = json.loads(out.read_text())["jobs"][0]
    if fio_job["error"]:
        raise RuntimeError(f"fio {job.key} on {uri}: error {fio_job['error']}")
    side = fio_job["write" if "write" in job.rw else "read"]
    p99 = side["clat_ns"].get("percentile", {}).get("99.000000", 0)
    return Result(side["iops"], side["bw_bytes"] / 1e6, p99 / 1000)


# ---------------------------------------------------------------- main
def make_backing_file(path: Path, size: int) -> None:
    chunk = 8 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())  # start from a clean page cache, not a writeback storm


def _median(results: list[Result]) -> Result:
    return Result(*(statistics.median(getattr(r, f) for r in results) for f in ("iops", "mbps", "p99_us")))


def _print_table(job: Job, med: dict[str, Result], rounds: int) -> float:
    ratio = med["ours"].iops / med["nbdkit"].iops if med["nbdkit"].iops else 0.0
    print(f"\n{job.key}: rw={job.rw} bs={job.bs} iodepth={job.iodepth}, median of {rounds}")
    print(f"  {'server':<8} {'IOPS':>10} {'MB/s':>9} {'p99 us':>9}")
    for name in SERVERS:
        r = med[name]
        print(f"  {name:<8} {r.iops:>10.0f} {r.mbps:>9.1f} {r.p99_us:>9.0f}")
    print(f"  ratio ours/nbdkit (IOPS): {ratio:.3f}")
    return ratio


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds the ExitStacks: servers get stopped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.nbd_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="small file, short runs (< 60 s)")
    ap.add_argument(
        "--size", type=mib_size_arg, help="backing file size, whole MiB (default 1G, 256M with --quick)"
    )
    ap.add_argument(
        "--runtime", type=seconds_arg(positive=True), help="seconds per fio run (default 10, 1.5 quick)"
    )
    ap.add_argument("--rounds", type=count_arg, help="rounds per server (default 3, 2 quick)")
    ap.add_argument(
        "--jobs",
        type=names_arg([j.key for j in JOBS]),
        help=f"comma-separated job keys: {','.join(j.key for j in JOBS)} (default: all)",
    )
    ap.add_argument("--dir", type=dir_arg, help="where to create the backing file (default: $TMPDIR)")
    ap.add_argument("--json-out", metavar="FILE", type=out_file_arg, help="also write the JSON result here")
    args = ap.parse_args(argv)
    size = args.size or parse_size("256M" if args.quick else "1G")
    runtime = args.runtime or (1.5 if args.quick else 10.0)
    rounds = args.rounds or (2 if args.quick else 3)
    keys = args.jobs or [j.key for j in JOBS]
    jobs = [j for j in JOBS if j.key in keys]
    if missing_tools("fio", "nbdkit"):
        return 1
    signal.signal(signal.SIGTERM, _sigterm)

    results: dict[str, dict[str, list[Result]]] = {j.key: {s: [] for s in SERVERS} for j in jobs}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="blockmig-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        backing = work / "disk.img"
        make_backing_file(backing, size)
        print(
            f"backing file {backing}: {size} bytes of random data; "
            f"{rounds} rounds x {len(jobs)} jobs x {runtime:g} s (+{RAMP_S:g} s ramp); "
            f"{os.cpu_count()} CPUs shared by fio and the server; "
            f"load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        for rnd in range(rounds):
            order = SERVERS if rnd % 2 == 0 else SERVERS[::-1]
            with ExitStack() as stack:
                uris = {
                    "ours": stack.enter_context(serve_ours(backing)),
                    "nbdkit": stack.enter_context(serve_nbdkit(backing, work)),
                }
                for job in jobs:
                    for name in order:
                        r = run_fio(uris[name], job, runtime, work / "fio.json")
                        results[job.key][name].append(r)
                        print(
                            f"round {rnd + 1} {job.key:<18} {name:<6} {r.iops:>9.0f} IOPS "
                            f"{r.mbps:>8.1f} MB/s p99 {r.p99_us:>7.0f} us",
                            flush=True,
                        )

    ratios: dict[str, float] = {}
    raw: dict[str, dict[str, object]] = {}
    for job in jobs:
        med = {s: _median(results[job.key][s]) for s in SERVERS}
        ratios[job.key] = round(_print_table(job, med, rounds), 3)
        raw[job.key] = {
            s: {"median": asdict(med[s]), "runs": [asdict(r) for r in results[job.key][s]]} for s in SERVERS
        }
    load = os.getloadavg()[0]
    print(
        f"\ntotal {time.monotonic() - t0:.1f} s; load average {load:.2f} (fio + server "
        f"alone make about 2: more means other work competed and the numbers are noisy)"
    )
    doc = {**ratios, "raw": raw}
    emit_json(doc, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
