"""The `blockmig up` config: what it accepts and how it refuses the rest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from control.config import ArrayConfig, load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "arrays.toml"
    p.write_text(text)
    return p


def test_migration_throttle_defaults_to_unlimited() -> None:
    assert ArrayConfig("A").migration_throttle == 0.0


@pytest.mark.parametrize("bad", ["-1", "fast", "nan"])
def test_array_serve_refuses_a_bad_migration_throttle(tmp_path: Path, bad: str) -> None:
    cmd = [sys.executable, "-m", "control.cli", "array", "serve", "--name", "A", "--data-dir", str(tmp_path)]
    p = subprocess.run([*cmd, "--migration-throttle", bad], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--migration-throttle: a rate in MB/s >= 0" in p.stderr, p.stderr


def test_migration_throttle_from_toml(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[[array]]\nname = "A"\nmigration_throttle = 50\n'))
    assert cfg[0].migration_throttle == 50


@pytest.mark.parametrize("bad", ['"fast"', "-1", "true", "inf", "nan"])
def test_a_bad_migration_throttle_is_refused_with_its_array_named(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match=r"migration_throttle of array 'A' must be MB/s >= 0"):
        load_config(write(tmp_path, f'[[array]]\nname = "A"\nmigration_throttle = {bad}\n'))


def test_unknown_keys_and_missing_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown key"):
        load_config(write(tmp_path, '[[array]]\nname = "A"\nspeed = 3\n'))
    with pytest.raises(ValueError, match="has no name"):
        load_config(write(tmp_path, '[[array]]\nmodel = "unified"\n'))
