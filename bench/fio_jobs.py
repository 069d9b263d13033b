"""fio profiles of the suite, one fio run, and what its JSON and per-I/O log say.

Every run uses fio's ``nbd`` engine (libnbd, one connection, ``iodepth``
requests in flight) and writes a per-I/O completion-latency log with Unix
epoch timestamps (``--write_lat_log --log_avg_msec=0 --log_unix_epoch=1``),
so one run gives its totals, its latency percentiles over read and write
together, and a timeline on the same clock as the migration status polls.
fio leaves the ramp out of its log and its totals.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Wrap, no_wrap

PERCENTILES = (50.0, 99.0, 99.9)


@dataclass(frozen=True, slots=True)
class FioProfile:
    key: str
    title: str
    rw: str
    bs: str
    iodepth: int
    rwmixread: int = 100  # percent of reads, for the mixed rw modes

    def opts(self) -> list[str]:
        o = [f"--rw={self.rw}", f"--bs={self.bs}", f"--iodepth={self.iodepth}"]
        if self.rw in ("randrw", "rw", "readwrite"):
            o.append(f"--rwmixread={self.rwmixread}")
        return o

    def rate_opt(self, iops: float) -> str:
        """``rate_iops`` for ``iops`` in total: fio caps each direction on its own."""
        reads = max(1, round(iops * self.rwmixread / 100))
        writes = max(1, round(iops * (100 - self.rwmixread) / 100))
        return f"--rate_iops={reads},{writes}"


PROFILES: dict[str, FioProfile] = {
    p.key: p
    for p in (
        FioProfile("oltp", "OLTP 8k random 70/30 QD16", "randrw", "8k", 16, 70),
        FioProfile("readheavy", "read-heavy 4k random 90/10 QD16", "randrw", "4k", 16, 90),
        FioProfile("seq", "sequential read 1M QD4", "read", "1M", 4),
    )
}


@dataclass
class FioRun:
    """One fio run: totals, latency over reads and writes, and its per-I/O log."""

    label: str
    t0: float  # wall clock (time.time()) when fio was started
    t1: float  # ... and when it exited
    iops: float
    read_iops: float
    write_iops: float
    mbps: float  # 10**6 bytes per second, reads + writes
    lat_us: dict[str, float]  # "p50", "p99", "p99.9", "mean" (completion latency, us)
    rate_iops: float | None = None
    # per-I/O completion: epoch milliseconds and latency in microseconds (not in the JSON)
    log_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    log_us: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64), repr=False)

    def summary(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "iops": round(self.iops, 1),
            "read_iops": round(self.read_iops, 1),
            "write_iops": round(self.write_iops, 1),
            "mbps": round(self.mbps, 1),
            "lat_us": {k: round(v, 1) for k, v in self.lat_us.items()},
            "t0": round(self.t0, 3),
            "t1": round(self.t1, 3),
        }
        if self.rate_iops is not None:
            d["rate_iops"] = round(self.rate_iops)
        return d


def read_lat_log(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """fio's per-I/O log: ``time_ms, value_ns, ddir, bs, offset[, prio]`` per line."""
    if not path.exists() or path.stat().st_size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    a = np.loadtxt(path, delimiter=",", usecols=(0, 1), dtype=np.int64, ndmin=2)
    return a[:, 0], a[:, 1] / 1e3


def percentiles(lat_us: np.ndarray) -> dict[str, float]:
    if lat_us.size == 0:
        return {}
    ps = np.percentile(lat_us, PERCENTILES)
    d = {f"p{p:g}": float(v) for p, v in zip(PERCENTILES, ps, strict=True)}
    d["mean"] = float(lat_us.mean())
    return d


def _json_lat(job: dict[str, Any]) -> dict[str, float]:
    """Percentiles from fio's JSON when there is no log: the worse direction's."""
    d: dict[str, float] = {}
    for ddir in ("read", "write"):
        pct = job[ddir].get("clat_ns", {}).get("percentile", {})
        for p in PERCENTILES:
            v = pct.get(f"{p:.6f}")
            if v:
                d[f"p{p:g}"] = max(d.get(f"p{p:g}", 0.0), v / 1e3)
    return d


def run_fio(
    uri: str,
    profile: FioProfile,
    runtime: float,
    ramp: float,
    work: Path,
    label: str,
    rate_iops: float | None = None,
    size: int | None = None,
    wrap: Wrap = no_wrap,
) -> FioRun:
    """Run ``profile`` time-based against ``uri``; raises with fio's message if it fails."""
    out = work / f"{label}.json"
    prefix = work / label
    for old in work.glob(f"{label}_*.log"):
        old.unlink()
    cmd = ["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", *profile.opts()]
    cmd += [
        "--time_based",
        f"--runtime={int(runtime * 1000)}ms",
        f"--ramp_time={int(ramp * 1000)}ms",
        f"--write_lat_log={prefix}",
        "--log_avg_msec=0",
        "--log_unix_epoch=1",
        "--disable_slat=1",
        "--disable_lat=1",
        "--output-format=json",
        f"--output={out}",
    ]
    if size is not None:
        cmd.append(f"--size={size}")
    if rate_iops is not None:
        cmd.append(profile.rate_opt(rate_iops))
    t0 = time.time()
    p = subprocess.run(
        wrap(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=runtime + ramp + 60
    )
    t1 = time.time()
    if p.returncode != 0:
        raise RuntimeError(f"fio {profile.key} ({label}) on {uri} failed: {p.stderr.decode().strip()}")
    job: dict[str, Any] = json.loads(out.read_text())["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio {profile.key} ({label}) on {uri}: error {job['error']}")
    ms, us = read_lat_log(Path(f"{prefix}_clat.1.log"))
    r, w = job["read"], job["write"]
    return FioRun(
        label=label,
        t0=t0,
        t1=t1,
        iops=float(r["iops"] + w["iops"]),
        read_iops=float(r["iops"]),
        write_iops=float(w["iops"]),
        mbps=float(r["bw_bytes"] + w["bw_bytes"]) / 1e6,
        lat_us=percentiles(us) or _json_lat(job),
        rate_iops=rate_iops,
        log_ms=ms,
        log_us=us,
    )


def bins(run: FioRun, bin_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin middle epoch s, IOPS, p99 us) of a run's log in ``bin_s`` windows; NaN p99 where empty."""
    if run.log_ms.size == 0:
        z = np.zeros(0)
        return z, z, z
    t = run.log_ms / 1e3
    start = float(t.min())
    idx = ((t - start) // bin_s).astype(np.int64)
    n = int(idx.max()) + 1
    counts = np.bincount(idx, minlength=n)
    p99 = np.full(n, np.nan)
    order = np.argsort(idx, kind="stable")
    edges = np.searchsorted(idx[order], np.arange(n + 1))
    lat = run.log_us[order]
    for i in range(n):
        if edges[i + 1] > edges[i]:
            p99[i] = np.percentile(lat[edges[i] : edges[i + 1]], 99)
    # the last window is usually partial: drop it rather than show a false dip
    keep = n - 1 if n > 1 else n
    return start + (np.arange(keep) + 0.5) * bin_s, counts[:keep] / bin_s, p99[:keep]
