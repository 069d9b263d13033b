"""bench.migration: a tiny end-to-end run, and how it picks a region size."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bench.migration
from bench.migration import recommend
from emulator.nbd.client import NbdClient
from tests.servers import serve_file, stop

ROOT = Path(__file__).resolve().parents[2]


def size(under_load_ms: float, p99: float = 1.0, loss: float = 0.3, copy: float = 2000.0) -> dict[str, float]:
    return {
        "under_load_ms": under_load_ms,
        "copied_x": 1.1,
        "cutover_p99_ms": p99,
        "loss": loss,
        "copy_mbps": copy,
    }


def test_recommend_takes_the_size_soonest_done_under_writes_among_those_meeting_the_goals() -> None:
    # the fastest flat-out copy does not win: what hosts write to matters
    assert "size 1M " in recommend({"256K": size(100), "1M": size(85, copy=900), "4M": size(95, copy=2200)})
    # not one that misses the pause goal
    assert "size 4M " in recommend({"1M": size(85, p99=12.0), "4M": size(95)})
    # where one meets the loss goal, only those that do
    assert "size 256K " in recommend({"256K": size(100, loss=0.1), "1M": size(85)})
    # none meets the pause goal: still the soonest done
    assert "size 1M " in recommend({"1M": size(85, p99=12.0), "4M": size(95, p99=11.0)})


def test_the_write_load_is_the_rate_its_labels_say(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """fio's --rate=20m is 20 MiB/s (its kb_base is 1024): the labels said 20 MB/s."""
    started: list[list[str]] = []

    class FakeFio:
        def __init__(self, argv: list[str], **kw: object) -> None:
            started.append(argv)

        def poll(self) -> None:
            return None

    monkeypatch.setattr(subprocess, "Popen", FakeFio)
    monkeypatch.setattr(bench.migration, "stop", lambda proc, sig: None)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    with bench.migration.write_load("nbd://127.0.0.1:1/x", tmp_path / "load.log"):
        pass
    [argv] = started
    [rate] = [int(a.removeprefix("--rate=")) for a in argv if a.startswith("--rate=")]  # bytes/s, no suffix
    text = recommend({"1M": size(85)})
    said = float(text.split(" ms under ")[1].split(" MiB/s of 64k writes")[0])
    assert rate == said * (1 << 20), (rate, text)


@pytest.mark.slow
@pytest.mark.interop
@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio (its nbd engine)")
def test_a_tiny_cutover_run(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.migration", "--quick", "--only", "cutover", "--cutover-runs", "2"]
    cmd += ["--workdir", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(p.stdout.strip().splitlines()[-1])  # the last line is one JSON object
    co = doc["cutover"]
    assert co["runs"] == 2 and 0 < co["p50_ms"] <= co["max_ms"]
    assert co["under_load_ms"] > 0 and co["copied_x"] >= 1.0, co
    assert doc["goals"]["cutover_p99_le_10ms"] in (True, False)
    assert isinstance(doc["free_page_reporting"], bool)


def test_the_raw_relay_carries_nbd_both_ways(tmp_path: Path) -> None:
    """bench.relay in front of an NBD server: a client through it writes, reads back
    what it wrote, and sees the server's size; a bad command line exits 2."""
    for args in (["127.0.0.1"], ["127.0.0.1", "65536"], ["127.0.0.1", "0"]):
        bad = subprocess.run(
            [sys.executable, "-m", "bench.relay", *args], cwd=ROOT, capture_output=True, timeout=10
        )
        assert bad.returncode == 2 and b"usage" in bad.stderr, args
    with serve_file(tmp_path / "disk.img", "--size", "8M") as server:
        relay = subprocess.Popen(
            [sys.executable, "-m", "bench.relay", "127.0.0.1", str(server.port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert relay.stdout is not None
            port = int(relay.stdout.readline())

            async def roundtrip() -> None:
                c = await NbdClient.connect(f"nbd://127.0.0.1:{port}/")
                try:
                    assert c.size == 8 << 20
                    data = os.urandom(3 << 20)  # more than a socket buffer: backpressure both ways
                    await c.write(4096, data)
                    assert await c.read(4096, len(data)) == data
                finally:
                    await c.close()

            asyncio.run(roundtrip())
        finally:
            stop(relay)
