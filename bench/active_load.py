"""Active-mode convergence under a heavy random write load, with real arrays.

A LUN on array A is filled, array B takes it over in active mode (paused), fio's
``nbd`` engine starts HOSTS connections at queue depth QD of 4k random writes on
B's LUN, the migration is resumed, and its dirty bytes are sampled every 0.5 s.
Prints regions made clean per second, host write IOPS while it converged, and
the time to complete (if it did within ``--seconds``).

    python -m bench.active_load --hosts 64 --qd 128 --size 256 --seconds 60

Run it from another tree (e.g. the one before a change) with that tree first on
PYTHONPATH: ``bench.common`` starts the arrays from the tree it comes from.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from bench.common import ROOT, MiB, missing_tools, out_file_arg, serve_array, start, status, stop
from emulator.units import count_arg, seconds_arg


def fio_totals(path: Path) -> list[int]:
    """Writes done so far, from each --status-interval (1 s) report."""
    text = path.read_text() if path.exists() else ""
    dec, pos, out = json.JSONDecoder(), 0, []
    while True:
        i = text.find("{", pos)
        if i < 0:
            break
        try:
            doc, pos = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        out.append(int(doc["jobs"][0]["write"]["total_ios"]))
    return out


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds the with-blocks: fio and the arrays get stopped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.active_load", description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=count_arg, default=64, help="fio jobs, one connection each (default 64)")
    ap.add_argument("--qd", type=count_arg, default=128, help="queue depth of each (default 128)")
    ap.add_argument("--size", type=count_arg, default=256, help="LUN size in MiB (default 256)")
    ap.add_argument(
        "--seconds",
        type=seconds_arg(positive=True),
        default=60.0,
        help="give up on completion after this (default 60)",
    )
    ap.add_argument("--bs", default="4k", help="fio block size of the random writes (default 4k)")
    ap.add_argument("--json", type=out_file_arg, default=None, help="also write the JSON result here")
    ap.add_argument("--keep", default=None, help="work here (arrays' logs) and keep it")
    args = ap.parse_args(argv)
    if missing_tools("fio"):
        return 1
    signal.signal(signal.SIGTERM, _sigterm)
    size = args.size * MiB
    with tempfile.TemporaryDirectory(prefix="active-load-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        with serve_array(work, "A", "none") as a, serve_array(work, "B", "none") as b:
            a.api.create_lun("v", size)
            subprocess.run(
                [
                    "fio",
                    "--name=fill",
                    "--ioengine=nbd",
                    f"--uri={a.uri('v')}",
                    "--rw=write",
                    "--bs=1M",
                    "--iodepth=8",
                    f"--size={size}",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                timeout=300,
            )
            start(b, a.uri("v"), "v", mode="active")
            b.api.call("POST", "/api/v1/migrations/v/pause")
            fio_out = work / "load.json"
            load = subprocess.Popen(
                [
                    "fio",
                    "--name=load",
                    "--ioengine=nbd",
                    f"--uri={b.uri('v')}",
                    "--rw=randwrite",
                    f"--bs={args.bs}",
                    f"--iodepth={args.qd}",
                    f"--numjobs={args.hosts}",
                    "--thread",
                    "--group_reporting",
                    "--time_based",
                    f"--runtime={int(args.seconds) + 30}",
                    "--norandommap",
                    "--randrepeat=0",
                    "--output-format=json",
                    "--status-interval=1",
                    f"--output={fio_out}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            fio_start = time.monotonic()
            try:
                time.sleep(3.0)  # every host connected and writing
                b.api.call("POST", "/api/v1/migrations/v/resume")
                t0 = time.monotonic()
                samples: list[tuple[float, int, str]] = []
                st: dict[str, Any] = {}
                while True:  # one sample at least, however short --seconds
                    st = status(b, "v")
                    samples.append((time.monotonic() - t0, int(st["dirty_bytes"]), st["state"]))
                    if st["state"] in ("completed", "failed", "cancelled"):
                        break
                    if time.monotonic() - t0 >= args.seconds:
                        break
                    time.sleep(0.5)
            finally:
                stop(load, signal.SIGINT)
            region = int(st["region_size"])
            # until the first sample at 8 MiB dirty or less (the cutover threshold), or the end
            conv = next(((t, d) for t, d, _ in samples if d <= 8 * MiB), None)
            until, left = conv if conv is not None else samples[-1][:2]
            elapsed = samples[-1][0]
            cleaned = (samples[0][1] - left) / region
            # fio writes its 1 s reports out at its end: the k-th came ~k+1 s after its start
            totals = fio_totals(fio_out)
            k0 = round(t0 - fio_start) - 1
            k1 = min(len(totals) - 1, k0 + max(1, round(until)))  # while it converged
            ios = totals[k1] - totals[k0] if 0 <= k0 < k1 else 0
            span = k1 - k0
            doc = {
                "tree": str(ROOT),
                "hosts": args.hosts,
                "qd": args.qd,
                "size_mib": args.size,
                "state": st["state"],
                "regions": size // region,
                "regions_cleaned": round(cleaned),
                "seconds": round(elapsed, 2),
                "regions_per_s": round(cleaned / until, 2) if until else 0.0,
                "completed_s": round(elapsed, 2) if st["state"] == "completed" else None,
                "host_write_iops": round(ios / span) if span > 0 else None,
                # first sample at 8 MiB dirty or less (the cutover threshold), then its end
                "converged_s": round(conv[0], 2) if conv is not None else None,
                "timeline": [(round(t, 1), round(d / MiB), s[:4]) for t, d, s in samples][::2][:60],
            }
    print(json.dumps(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
