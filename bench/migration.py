"""Benchmark live migration between two real arrays, against its yardsticks.

Method: every array is a real ``blockmig array serve`` process on 127.0.0.1
(NBD and API on port 0), driven through its management API (the client the
CLI uses); data is written and loaded with fio's ``nbd`` engine (libnbd) and
the baseline copy is ``nbdcopy``. One run measures:

1. copy: a fully written LUN of A migrated into B (time from the start
   request to the answer of a long poll that sees ``completed``) against
   ``nbdcopy A/LUN B/FRESH`` between the same exports; after one untimed
   warm-up copy, rounds alternate which goes first. Ratio ours/nbdcopy in
   MB/s (goal >= 1.0). nbdcopy does not flush; the migration does (its data
   is durable before a region counts as copied), so ``nbdcopy --flush`` runs
   in the same rounds too: ``ratio_flush``, the like-for-like yardstick where
   the disk's write speed, not the copy, decides (this VM's disk ran at
   0.4-1.5 GB/s in one hour, and copies with it).
2. sparse: a LUN of the same size with 10% written in scattered 1 MiB
   chunks; ratio sparse_time / full_time (goal <= 1.5 x the share, 0.15).
3. cutover: migrations of a written LUN while fio writes 20 MiB/s at
   random (64k, fio's rate=20m: 21 MB/s) into B's LUN. Each migration is paused right
   after its start, the load runs for a moment, then it resumes, so the
   load covers the whole copy. ``cutover_pause_ms`` from the status: p50,
   p99, max (goal p99 <= 10 ms) and the steps of the worst one.
4. read-through: fio OLTP mix (8k randrw 70/30, iodepth 16) on B's LUN
   while it migrates (throttled to 20 MB/s, so it stays in progress; it is
   cancelled after the run) against the same job on A's LUN with no
   migration, alternating, with ``--media ssd`` arrays and raw ones;
   loss = 1 - target/source IOPS (goal <= 15% under ssd). Each run also
   reports CPU microseconds per I/O of both arrays and of fio (from
   /proc/PID/stat and the waited-for children), the share of reads that
   went to the source, and whether the migration had gone active (the
   job's writes dirty regions about as fast as the copy cleans them), and
   an iodepth-1 run under ssd shows the hop's cost when the job is not
   CPU-bound. A third side in the same rounds (order rotating) runs the job
   through a raw TCP byte relay to the source (bench/relay.py, uvloop, no
   NBD parsing): ``relay_loss`` is what a userspace hop costs on this
   machine before a target array does anything of its own.
5. region-size sweep (256K, 1M, 4M): copy throughput (median of 6
   rounds, the order rotating: each size in each place twice); under the
   cutover phase's write load the time from the resume to completion and
   the bytes copied per LUN byte (a bigger region copies faster flat out,
   but each small write dirties more of it to copy again), and the pause;
   read-through IOPS (ssd); then a recommendation: the size that completes
   soonest under the writes among those meeting the pause (and loss) goals.

Caveats: fio, nbdcopy and both arrays share the machine's cores (2 on the
reference box), so every number is also a fight for CPU (the JSON records
the load average before and after); LUN files live in the page cache. On a
VM whose balloon reports free pages to the host (``free_page_reporting`` in
the JSON), page cache growing into memory freed a few seconds before writes
3-5x slower, so copy times are bimodal: copies run 7 rounds and sparse
copies 9 (3 each quick), and medians are reported. The last line printed is one
JSON object with every result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bench.common import (
    ROOT,
    Array,
    cpu_s,
    dir_arg,
    emit_json,
    mib_size_arg,
    missing_tools,
    names_arg,
    out_file_arg,
    serve_array,
    start,
    status,
    stop,
    wait,
)
from emulator.units import count_arg, parse_hostport, parse_size

MiB = 1 << 20
RAMP_S = 0.5
SWEEP = ("256K", "1M", "4M")
#: the cutover phase's write load, bytes/s: fio's "20m" it always was, which is MiB
#: (fio's kb_base is 1024), 21 MB/s, not the 20 MB/s its labels said
LOAD_RATE = 20 * MiB


# ---------------------------------------------------------------- fio, nbdcopy
def fio(uri: str, *opts: str, out: Path | None = None, timeout: float = 300) -> dict[str, Any]:
    cmd = ["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", *opts]
    if out is not None:
        cmd += ["--output-format=json", f"--output={out}"]
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"fio {' '.join(opts)} on {uri} failed: {p.stderr.decode().strip()}")
    if out is None:
        return {}
    job: dict[str, Any] = json.loads(out.read_text())["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio on {uri}: error {job['error']}")
    return job


def fill(uri: str, size: int, share: float = 1.0) -> None:
    """Write random-looking data: all of it, or ``share`` of it in distinct scattered 1 MiB chunks."""
    if share >= 1.0:
        fio(uri, *f"--rw=write --bs=1M --iodepth=8 --size={size} --end_fsync=1".split())
    else:
        n = max(1, round(size * share / MiB))
        fio(
            uri,
            *f"--rw=randwrite --bs=1M --iodepth=8 --size={size} --io_size={n * MiB} --end_fsync=1".split(),
        )


def oltp(uri: str, runtime: float, out: Path, qd: int = 16) -> float:
    """IOPS (read + write) of the 8k 70/30 random mix."""
    job = fio(
        uri,
        *f"--rw=randrw --rwmixread=70 --bs=8k --iodepth={qd} --time_based".split(),
        *f"--runtime={int(runtime * 1000)}ms --ramp_time={int(RAMP_S * 1000)}ms".split(),
        out=out,
        timeout=runtime + 60,
    )
    return float(job["read"]["iops"] + job["write"]["iops"])


@contextmanager
def write_load(uri: str, log: Path) -> Iterator[None]:
    """``LOAD_RATE`` of 64k random writes until the block ends."""
    opts = f"--rw=randwrite --bs=64k --iodepth=4 --rate={LOAD_RATE} --time_based --runtime=600".split()
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            ["fio", "--name=load", "--ioengine=nbd", f"--uri={uri}", *opts],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        time.sleep(0.3)  # connected and writing
        if proc.poll() is not None:
            raise RuntimeError(f"fio load on {uri} failed: {log.read_text()}")
        yield
    finally:
        stop(proc, signal.SIGINT)


def nbdcopy(src: str, dst: str, flush: bool = False) -> float:
    """Seconds ``nbdcopy`` takes; with ``flush``, until the destination has flushed
    (``--flush``: durable, as a migration's copy is when it completes)."""
    t0 = time.perf_counter()
    argv = ["nbdcopy", *(["--flush"] if flush else []), src, dst]
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"nbdcopy {src} {dst} failed: {p.stderr.decode().strip()}")
    return time.perf_counter() - t0


# ---------------------------------------------------------------- migrations
def rotated(items: tuple[str, ...], k: int) -> tuple[str, ...]:
    """``items`` starting at its k-th (modulo): round k of interleaved runs, so that
    each takes each place in turn."""
    k %= len(items)
    return items[k:] + items[:k]


def migrate(b: Array, src: str, lun: str, **opts: Any) -> tuple[float, dict[str, Any]]:
    """Seconds from the start request to completion, and the final status."""
    t0 = time.perf_counter()
    start(b, src, lun, **opts)
    st = wait(b, lun)
    return time.perf_counter() - t0, st


def cutover_once(b: Array, src: str, lun: str, log: Path, **opts: Any) -> dict[str, Any]:
    """One migration under the write load; its final status, with ``under_load_s``:
    seconds from the resume under the load to completion."""
    start(b, src, lun, **opts)
    b.api.call("POST", f"/api/v1/migrations/{lun}/pause")  # so the load covers the whole copy
    with write_load(b.uri(lun), log):
        t0 = time.perf_counter()
        b.api.call("POST", f"/api/v1/migrations/{lun}/resume")
        st = wait(b, lun)
        st["under_load_s"] = time.perf_counter() - t0
    b.api.delete_lun(lun, force=True)
    return st


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # fio, once it was waited for
    return r.ru_utime + r.ru_stime


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


# ---------------------------------------------------------------- phases
class Bench:
    def __init__(self, raw: tuple[Array, Array], ssd: tuple[Array, Array], work: Path, size: int) -> None:
        self.a, self.b = raw
        self.sa, self.sb = ssd
        self.work, self.size = work, size
        self.seq = 0

    def name(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}{self.seq}"

    def lun(self, a: Array, size: int, share: float = 1.0) -> str:
        name = self.name("src")
        a.api.create_lun(name, size)
        fill(a.uri(name), size, share)
        return name

    def migrate_once(self, src: str, **opts: Any) -> float:
        dst = self.name("m")
        t, _ = migrate(self.b, self.a.uri(src), dst, **opts)
        self.b.api.delete_lun(dst, force=True)
        return t

    def copy(self, src: str, rounds: int) -> dict[str, Any]:
        sides = ("ours", "nbdcopy", "nbdcopy_flush")
        runs: dict[str, list[float]] = {side: [] for side in sides}
        # Untimed: the first copy after start-up writes page cache into memory the VM
        # never touched, 3-5x slower (perf: copy_folio_from_iter_atomic); whichever
        # copy went first paid for it.
        warm = self.name("warm")
        self.b.api.create_lun(warm, self.size)
        nbdcopy(self.a.uri(src), self.b.uri(warm))
        self.b.api.delete_lun(warm, force=True)
        for rnd in range(rounds):
            for who in rotated(sides, rnd):
                if who == "ours":
                    t = self.migrate_once(src)
                else:
                    dst = self.name("nc")
                    self.b.api.create_lun(dst, self.size)
                    t = nbdcopy(self.a.uri(src), self.b.uri(dst), flush=who == "nbdcopy_flush")
                    self.b.api.delete_lun(dst, force=True)
                runs[who].append(t)
                print(f"copy round {rnd + 1} {who:<13} {self.size / 1e6 / t:7.1f} MB/s", flush=True)
        ours, theirs = statistics.median(runs["ours"]), statistics.median(runs["nbdcopy"])
        durable = statistics.median(runs["nbdcopy_flush"])
        return {
            "bytes": self.size,
            "ours_s": round(ours, 3),
            "nbdcopy_s": round(theirs, 3),
            "ours_mbps": round(self.size / 1e6 / ours, 1),
            "nbdcopy_mbps": round(self.size / 1e6 / theirs, 1),
            "ratio": round(theirs / ours, 3),
            "nbdcopy_flush_s": round(durable, 3),
            "ratio_flush": round(durable / ours, 3),
            "runs_s": runs,
        }

    def sparse(self, full_src: str, rounds: int) -> dict[str, Any]:
        """Sparse vs full copy time; an all-hole LUN of the same size gives the fixed cost."""
        src = self.lun(self.a, self.size, 0.1)
        share = self.a.api.get_lun(src)["allocated"] / self.size
        empty = self.name("empty")
        self.a.api.create_lun(empty, self.size)
        kinds = {"sparse": src, "full": full_src, "empty": empty}
        runs: dict[str, list[float]] = {k: [] for k in kinds}
        server: dict[str, list[float]] = {k: [] for k in kinds}  # the array's started -> finished
        for rnd in range(rounds):  # interleaved, rotating: all see the same machine, each in each place
            for kind in rotated(tuple(kinds), rnd):
                dst = self.name("m")
                t, st = migrate(self.b, self.a.uri(kinds[kind]), dst)
                self.b.api.delete_lun(dst, force=True)
                runs[kind].append(t)
                server[kind].append(st["finished"] - st["started"])
        med = {k: statistics.median(v) for k, v in runs.items()}
        smed = {k: statistics.median(v) for k, v in server.items()}
        ratio = med["sparse"] / med["full"]
        net = (med["sparse"] - med["empty"]) / (med["full"] - med["empty"])
        print(
            f"sparse {share:.1%} allocated: {med['sparse']:.3f} s against {med['full']:.3f} s full: "
            f"ratio {ratio:.3f}; an empty LUN takes {med['empty']:.3f} s, net of it {net:.3f}"
        )
        return {
            "allocated_share": round(share, 4),
            "sparse_s": round(med["sparse"], 3),
            "full_s": round(med["full"], 3),
            "empty_s": round(med["empty"], 3),
            "ratio": round(ratio, 3),
            "limit": round(1.5 * share, 3),
            "ratio_net_of_empty": round(net, 3),
            "ratio_server_side": round(smed["sparse"] / smed["full"], 3),
            "runs_s": runs,
        }

    def cutover(self, src: str, runs: int, **opts: Any) -> dict[str, Any]:
        sts = []
        for i in range(runs):
            st = cutover_once(self.b, self.a.uri(src), self.name("co"), self.work / "load.log", **opts)
            sts.append(st)
            print(
                f"cutover {i + 1} {opts or ''} {st['cutover_pause_ms']:6.2f} ms, {st['passes']} passes, "
                f"{st['mode']}: {st['cutover_steps']}",
                flush=True,
            )
        pauses = [float(s["cutover_pause_ms"]) for s in sts]
        worst = max(sts, key=lambda s: float(s["cutover_pause_ms"]))
        steps = list(worst["cutover_steps"])
        return {
            "runs": len(pauses),
            "p50_ms": round(pct(pauses, 0.5), 3),
            "p99_ms": round(pct(pauses, 0.99), 3),
            "max_ms": round(max(pauses), 3),
            "worst_steps": worst["cutover_steps"],
            "worst_mode": worst["mode"],
            "pauses_ms": pauses,
            "step_medians_ms": {
                k: statistics.median(st["cutover_steps"].get(k, 0.0) for st in sts) for k in steps
            },
            "modes": [st["mode"] for st in sts],
            "steps_ms": [st["cutover_steps"] for st in sts],
            # what the writes cost the copy: time to complete, bytes copied per LUN byte
            "under_load_ms": round(statistics.median(st["under_load_s"] for st in sts) * 1e3, 1),
            "copied_x": round(statistics.median(st["copied_bytes"] / st["total_bytes"] for st in sts), 3),
        }

    def _oltp(
        self,
        side: str,
        a: Array,
        b: Array,
        src: str,
        runtime: float,
        qd: int,
        opts: dict[str, Any],
        relay: Relay | None = None,
    ) -> dict[str, float]:
        """One fio run on the source directly, through the raw relay to it, or on a
        migrating target, with CPU per I/O."""
        out = self.work / "fio.json"
        lun = self.name("rt")
        uri = a.uri(src)
        if side == "target":
            start(b, a.uri(src), lun, throttle=20, **opts)
            uri = b.uri(lun)
        elif side == "relay":
            assert relay is not None
            uri = f"nbd://127.0.0.1:{relay.port}/{src}"
        pids = (a.proc.pid, b.proc.pid, relay.proc.pid if relay is not None else None)

        def cpu() -> tuple[float, ...]:
            return (*(cpu_s(pid) if pid else 0.0 for pid in pids), children_cpu_s())

        c0 = cpu()
        try:
            iops = oltp(uri, runtime, out, qd)
            c1 = cpu()
            if side == "target":
                st = status(b, lun)
                if st["state"] not in ("copying", "converging"):
                    raise RuntimeError(f"migration of {lun} was {st['state']} at the end of the fio run")
                b.api.call("POST", f"/api/v1/migrations/{lun}/cancel")
        finally:
            if side == "target":
                b.api.delete_lun(lun, force=True)
        ios = iops * (runtime + RAMP_S)  # CPU was counted over the ramp too
        us = [round((y - x) / ios * 1e6, 1) for x, y in zip(c0, c1, strict=True)]
        r = {"iops": iops, "cpu_us_per_io_source_array": us[0], "cpu_us_per_io_fio": us[3]}
        if side == "relay":
            r["cpu_us_per_io_relay"] = us[2]
        if side == "target":
            r["cpu_us_per_io_target_array"] = us[1]
            r["remote_read_share"] = round(
                st["remote_reads"] / max(1, st["remote_reads"] + st["local_reads"]), 3
            )
            # The job's writes dirty regions about as fast as the throttled copy cleans
            # them, so the migration goes active (writes to clean regions hit both sides).
            r["active_at_end"] = 1.0 if st["mode"] == "active" else 0.0
        return r

    def readthrough(
        self,
        a: Array,
        b: Array,
        src: str,
        rounds: int,
        runtime: float,
        qd: int = 16,
        floor: bool = True,
        **opts: Any,
    ) -> dict[str, Any]:
        """Target against source; with ``floor``, also the same job through a raw
        TCP relay to the source (bench/relay.py): what any hop costs here."""
        sides = ("source", "target", "relay") if floor else ("source", "target")
        runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        with raw_relay(a) if floor else nullcontext() as relay:
            for rnd in range(rounds):
                for side in rotated(sides, rnd):
                    r = self._oltp(side, a, b, src, runtime, qd, opts, relay)
                    runs[side].append(r)
                    cpus = ", ".join(f"{k[14:]} {v}" for k, v in r.items() if k.startswith("cpu"))
                    head = f"read-through {a.name} qd{qd} {opts or ''} {rnd + 1} {side:<6}"
                    print(f"{head} {r['iops']:7.0f} IOPS cpu us/IO: {cpus}", flush=True)
        med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
        s, t = med["source"]["iops"], med["target"]["iops"]
        doc = {
            "qd": qd,
            "source_iops": round(s),
            "target_iops": round(t),
            "loss": round(1 - t / s, 3),
            "median": med,
            "runs_iops": {k: [round(r["iops"]) for r in v] for k, v in runs.items()},
        }
        if floor:
            doc["relay_iops"] = round(med["relay"]["iops"])
            doc["relay_loss"] = round(1 - med["relay"]["iops"] / s, 3)
        return doc


@dataclass
class Relay:
    proc: subprocess.Popen[bytes]
    port: int


@contextmanager
def raw_relay(a: Array) -> Iterator[Relay]:
    """``python -m bench.relay`` in front of array ``a``'s NBD port."""
    host, port = parse_hostport(a.nbd.removeprefix("nbd://"))
    argv = [sys.executable, "-m", "bench.relay", host, str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout is not None
        listen = proc.stdout.readline().strip()
        if not listen.isdigit():
            raise RuntimeError(f"bench.relay did not start: {listen!r}")
        yield Relay(proc, int(listen))
    finally:
        stop(proc)


def recommend(sweep: dict[str, dict[str, Any]]) -> str:
    """Among the region sizes that meet the pause goal (and the loss goal, where any
    does), the one whose migration completes soonest under the random-write load:
    a bigger region copies faster flat out but each small write dirties more of it
    to copy again, and a migration that hosts write to is the one that matters."""
    ok = [rs for rs, r in sweep.items() if r["cutover_p99_ms"] <= 10]
    ok = [rs for rs in ok if sweep[rs]["loss"] <= 0.15] or ok or list(sweep)
    best = min(ok, key=lambda rs: sweep[rs]["under_load_ms"])
    r = sweep[best]
    return (
        f"recommendation: region size {best} (of {', '.join(ok)}: soonest done under writes): "
        f"{r['under_load_ms']} ms under {LOAD_RATE / MiB:g} MiB/s of 64k writes "
        f"({r['copied_x']}x the LUN copied), "
        f"flat-out copy {r['copy_mbps']} MB/s, cutover p99 {r['cutover_p99_ms']} ms, "
        f"read-through loss {r['loss']:.1%}"
    )


def goals(doc: dict[str, Any]) -> dict[str, bool]:
    g: dict[str, bool] = {}
    if "copy" in doc:
        g["copy_ratio_ge_1"] = doc["copy"]["ratio"] >= 1.0
    if "sparse" in doc:
        g["sparse_ratio_le_1.5x_share"] = doc["sparse"]["ratio"] <= doc["sparse"]["limit"]
    if "cutover" in doc:
        g["cutover_p99_le_10ms"] = doc["cutover"]["p99_ms"] <= 10.0
    if "readthrough" in doc:
        g["readthrough_loss_ssd_le_15pct"] = doc["readthrough"]["ssd"]["loss"] <= 0.15
    return g


def print_table(doc: dict[str, Any]) -> None:
    load = f"load average {doc['loadavg_before'][0]:.1f} -> {doc['loadavg_after'][0]:.1f}, {doc['cpus']} CPUs"
    print(f"\nresults ({'quick' if doc['quick'] else 'full'}, {doc['elapsed_s']} s, {load})")
    if doc["free_page_reporting"]:
        print("  (free page reporting is on: copies into fresh page cache are bimodal; medians shown)")
    if "copy" in doc:
        c = doc["copy"]
        print(
            f"  copy        ours {c['ours_mbps']} MB/s, nbdcopy {c['nbdcopy_mbps']} MB/s: "
            f"ratio {c['ratio']}; nbdcopy --flush (durable, as ours) {c['nbdcopy_flush_s']} s: "
            f"ratio {c['ratio_flush']}"
        )
    if "sparse" in doc:
        s = doc["sparse"]
        print(
            f"  sparse      {s['allocated_share']:.1%} allocated: {s['sparse_s']} s vs {s['full_s']} s full: "
            f"ratio {s['ratio']} (limit {s['limit']}); net of an empty LUN's {s['empty_s']} s: "
            f"{s['ratio_net_of_empty']}"
        )
    if "cutover" in doc:
        c = doc["cutover"]
        print(
            f"  cutover     p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms, max {c['max_ms']} ms "
            f"({c['runs']} runs); worst ({c['worst_mode']}): {c['worst_steps']}"
        )
    for key, r in doc.get("readthrough", {}).items():
        print(
            f"  read-thru   {key:<7} qd{r['qd']:<2} source {r['source_iops']} IOPS, "
            f"target {r['target_iops']} IOPS: loss {r['loss']:.1%} "
            f"({r['median']['target']['remote_read_share']:.0%} of reads remote)"
            + (f"; a raw TCP relay to the source: {r['relay_loss']:.1%}" if "relay_loss" in r else "")
        )
    for rs, r in doc.get("sweep", {}).items():
        if isinstance(r, dict):
            print(
                f"  sweep {rs:<5} copy {r['copy_mbps']} MB/s; under writes {r['under_load_ms']} ms, "
                f"{r['copied_x']}x copied; cutover p99 {r['cutover_p99_ms']} ms; "
                f"read-through loss {r['loss']:.1%}"
            )
    if "sweep" in doc:
        print(f"  {doc['sweep']['recommendation']}")
    for k, v in doc["goals"].items():
        print(f"  goal {k}: {'met' if v else 'MISSED'}")


def free_page_reporting() -> bool:
    """Does a virtio balloon report free pages to the host (feature bit 5)? Then the
    host takes memory the guest freed a few seconds ago back, and page cache that
    grows into it again writes 3-5x slower: copies on such a VM are bimodal."""
    for dev in Path("/sys/bus/virtio/devices").glob("*"):
        try:
            if (dev / "device").read_text().strip() == "0x0005":
                return (dev / "features").read_text()[5] == "1"
        except (OSError, IndexError):
            continue
    return False


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds the ExitStack: arrays get stopped


#: what --only may name
PHASES = ("copy", "sparse", "cutover", "readthrough", "sweep")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.migration",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="small LUNs, few rounds (< 2 min)")
    ap.add_argument("--size", type=mib_size_arg, help="LUN size of the copy phases, whole MiB (default 512M)")
    ap.add_argument(
        "--only", type=names_arg(PHASES), help=f"comma-separated phases: {','.join(PHASES)} (default: all)"
    )
    ap.add_argument(
        "--cutover-runs", type=count_arg, help="migrations in the cutover phase (default 10, 5 quick)"
    )
    ap.add_argument("--workdir", type=dir_arg, help="where to put array data (default: $TMPDIR)")
    ap.add_argument("--json-out", metavar="FILE", type=out_file_arg, help="also write the JSON result here")
    args = ap.parse_args(argv)
    q = args.quick
    # 512M quick too: a migration's fixed cost (API, connect, cutover, durable commits:
    # ~7 ms, an empty LUN's copy) is ~5% of a 256M copy, the sparse goal's whole slack
    # (1.5 x 10% against 10%), and ~2% of a 512M one; 0.3 s more a copy.
    size = args.size or parse_size("512M")
    phases = set(args.only or PHASES)
    rounds, runtime = (2, 2.0) if q else (3, 5.0)
    # Copies are cheap next to fio runs, and bimodal here (see free_page_reporting): more rounds.
    # The sparse phase's ratio sits near its limit, and its 51 MiB are hit hardest: 9 rounds.
    copy_rounds, sparse_rounds = (3, 3) if q else (7, 9)
    co_size, co_runs = (64 * MiB, 5) if q else (128 * MiB, 10)
    co_runs = args.cutover_runs or co_runs
    rt_size = 128 * MiB if q else 256 * MiB
    if missing_tools("fio", *(["nbdcopy"] if "copy" in phases else [])):
        return 1
    signal.signal(signal.SIGTERM, _sigterm)

    t0 = time.monotonic()
    doc: dict[str, Any] = {
        "quick": q,
        "size": size,
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "free_page_reporting": free_page_reporting(),
    }
    with tempfile.TemporaryDirectory(prefix="blockmig-mig-", dir=args.workdir) as tmp, ExitStack() as stack:
        work = Path(tmp)
        a, b, sa, sb = (
            stack.enter_context(serve_array(work, n, m))
            for n, m in (("A", "none"), ("B", "none"), ("SA", "ssd"), ("SB", "ssd"))
        )
        bench = Bench((a, b), (sa, sb), work, size)
        full = bench.lun(a, size) if phases & {"copy", "sparse", "sweep"} else ""
        if "copy" in phases:
            doc["copy"] = bench.copy(full, copy_rounds)
        if "sparse" in phases:
            doc["sparse"] = bench.sparse(full, sparse_rounds)
        co_src = bench.lun(a, co_size) if phases & {"cutover", "sweep"} else ""
        if "cutover" in phases:
            doc["cutover"] = bench.cutover(co_src, co_runs)
        if phases & {"readthrough", "sweep"}:
            rt_ssd, rt_raw = bench.lun(sa, rt_size), bench.lun(a, rt_size)
        if "readthrough" in phases:
            doc["readthrough"] = {
                "ssd": bench.readthrough(sa, sb, rt_ssd, rounds, runtime),
                "none": bench.readthrough(a, b, rt_raw, rounds, runtime),
                # not CPU-bound: what the hop costs in latency alone
                "ssd_qd1": bench.readthrough(sa, sb, rt_ssd, 1 if q else 2, runtime, qd=1),
            }
        if "sweep" in phases:
            sweep: dict[str, Any] = {}
            copies: dict[str, list[float]] = {rs: [] for rs in SWEEP}
            # Copies interleaved, the order rotating (reversing it kept 1M in the middle every round);
            # each size takes each place twice (once quick): with 3 rounds one slow copy in fresh
            # memory decided a median (1M: 1.23, 0.43, 0.26 s in one sweep).
            for rnd in range(len(SWEEP) * (1 if q else 2)):
                for rs in rotated(SWEEP, rnd):
                    copies[rs].append(bench.migrate_once(full, region_size=parse_size(rs)))
            for rs in SWEEP:
                rsb = parse_size(rs)
                t = statistics.median(copies[rs])
                co = bench.cutover(co_src, 2 if q else 4, region_size=rsb)
                rt = bench.readthrough(sa, sb, rt_ssd, 1 if q else 2, runtime, floor=False, region_size=rsb)
                sweep[rs] = {
                    "copy_mbps": round(size / 1e6 / t, 1),
                    "copy_runs_s": [round(x, 3) for x in copies[rs]],
                    "cutover_p99_ms": co["p99_ms"],
                    "cutover_max_ms": co["max_ms"],
                    "under_load_ms": co["under_load_ms"],
                    "copied_x": co["copied_x"],
                    "source_iops": rt["source_iops"],
                    "target_iops": rt["target_iops"],
                    "loss": rt["loss"],
                }
                print(f"sweep {rs}: {sweep[rs]}", flush=True)
            sweep["recommendation"] = recommend(sweep)
            doc["sweep"] = sweep
    doc["elapsed_s"] = round(time.monotonic() - t0, 1)
    doc["loadavg_after"] = os.getloadavg()
    doc["goals"] = goals(doc)
    print_table(doc)
    emit_json(doc, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
