"""The benchmark suite end to end on a tiny config: three phases, positive IOPS, a PNG."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.interop,
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio (its nbd engine)"),
]


def test_suite_tiny_run(tmp_path: Path) -> None:
    """On a fixed media model: ``--media fixed:MS`` passed its check, then the arrays
    refused their name ('Afixed:0.1') once the fabric was up: a traceback, no results."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.suite", "--quick", "--profile", "loopback", "--media", "fixed:0.1"]
    cmd += ["--jobs", "oltp", "--peers", "", "--size", "16M", "--runtime", "2", "--out", str(out)]
    cmd += ["--workdir", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    last = json.loads(p.stdout.strip().splitlines()[-1])  # the last line is one JSON object
    doc = json.loads(Path(last["json"]).read_text())
    profiles = doc["results"]["loopback"]["fixed:0.1"]["profiles"]
    assert set(profiles) == {"oltp"}
    for kind in ("saturated", "rate"):
        [ep] = profiles["oltp"][kind]  # one round
        assert set(ep["phases"]) == {"source", "migrating", "after"}
        for phase in ep["phases"].values():
            assert phase["iops"] > 0
            assert phase["t1"] > phase["t0"]
        assert ep["progress"], "the migration status was polled"
        assert ep["events"]["cutover"] is not None
    assert profiles["oltp"]["median"]["rate_iops"] > 0
    assert set(profiles["oltp"]["median"]["ratios_iops"]) == {"source", "migrating", "after"}
    assert last["summary"]["loopback/fixed:0.1"]["profiles"]["oltp"]["source_iops"] > 0

    [png] = last["pngs"]
    data = Path(png).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
