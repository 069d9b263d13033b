"""Shared fixtures: real servers started in the test's tmp dir and always stopped."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYTHONPATH", str(ROOT))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 64 MiB sparse file."""
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(64 << 20)
    return p
