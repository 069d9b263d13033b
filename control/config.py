"""Which arrays the control layer manages, and `blockmig up` / `down`.

A TOML config names the arrays::

    [[array]]
    name = "A"
    model = "unified"          # unified, takeover-sync, pooled, plain
    media = "none"             # none, ssd, hdd, fixed:MS
    nbd = "127.0.0.1:0"        # port 0: any free port
    api = "127.0.0.1:0"
    pools = { default = "20G" }
    # migration_throttle = 100           (MB/s of migrations onto it that name no rate,
    #                                     e.g. `blockmig migrate`; default 0 = unlimited)
    # data_dir = "/var/lib/blockmig/A"   (default: STATE_DIR/arrays/NAME)
    # token = "..."                      (default: generated in the data dir)

Without a config, `blockmig up` starts two arrays, A and B, of the unified
model. What was started is recorded in STATE_DIR/arrays.json, which later
commands read to find the arrays' APIs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emulator.units import parse_rate

from .api_client import ArrayApi

STATE_ENV = "BLOCKMIG_STATE_DIR"
START_TIMEOUT = 30.0
#: where ``control`` and ``emulator`` are importable from (the repository, or site-packages)
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def python_module_command(module: str, *args: str) -> list[str]:
    """``python -P -m MODULE ARGS`` with this interpreter, for the processes blockmig starts.

    ``-m`` alone puts the current directory first on ``sys.path``: run from a directory
    that holds a ``control`` or ``emulator`` package (or a ``json.py``), the child would
    import that instead of blockmig. ``-P`` (Python 3.11) leaves it out; :func:`child_env`
    says where blockmig is.
    """
    return [sys.executable, "-P", "-m", module, *args]


def child_env() -> dict[str, str]:
    """This environment, with :data:`PACKAGE_ROOT` first on ``PYTHONPATH`` (and no empty
    entry, which would put the current directory back on ``sys.path``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return env


def default_state_dir() -> Path:
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "blockmig"


@dataclass
class ArrayConfig:
    name: str
    model: str = "unified"
    media: str = "none"
    nbd: str = "127.0.0.1:0"
    api: str = "127.0.0.1:0"
    pools: dict[str, str] = field(default_factory=dict)
    migration_throttle: float = 0.0  # MB/s, 0 = unlimited
    data_dir: str = ""
    token: str = ""


@dataclass
class ArrayRecord:
    """A running array as `blockmig up` recorded it."""

    name: str
    model: str
    api: str  # http://HOST:PORT
    nbd: str  # nbd://HOST:PORT
    token: str
    data_dir: str
    pid: int

    def client(self) -> ArrayApi:
        return ArrayApi(self.api, self.token)

    def alive(self) -> bool:
        return pid_alive(self.pid)


def pid_alive(pid: int) -> bool:
    """True while the process runs (a zombie waiting to be reaped does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def load_config(path: Path | None) -> list[ArrayConfig]:
    if path is None:
        return [ArrayConfig("A"), ArrayConfig("B")]
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    arrays = raw.get("array")
    if not isinstance(arrays, list) or not arrays:
        raise ValueError(f"{path}: needs at least one [[array]] table")
    out = []
    known = {f.name for f in ArrayConfig.__dataclass_fields__.values()}
    for a in arrays:
        unknown = set(a) - known
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} in [[array]]")
        if "name" not in a:
            raise ValueError(f"{path}: an [[array]] has no name")
        rate = a.get("migration_throttle", 0)
        try:
            parse_rate(rate)
        except ValueError:
            raise ValueError(
                f"{path}: migration_throttle of array {a['name']!r} must be MB/s >= 0 (0 = unlimited), "
                f"not {rate!r}"
            ) from None
        out.append(ArrayConfig(**a))
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: array names must be unique")
    return out


class Registry:
    """STATE_DIR/arrays.json: the arrays this state dir knows."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "arrays.json"

    def load(self) -> dict[str, ArrayRecord]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return {n: ArrayRecord(**r) for n, r in raw.items()}

    def save(self, records: dict[str, ArrayRecord]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({n: asdict(r) for n, r in records.items()}, indent=2))
        tmp.replace(self.path)

    def get(self, name: str) -> ArrayRecord:
        records = self.load()
        if name not in records:
            known = ", ".join(sorted(records)) or "none: run `blockmig up` first"
            raise KeyError(f"unknown array {name!r} in {self.state_dir} (arrays: {known})")
        return records[name]


def start_array(cfg: ArrayConfig, state_dir: Path) -> ArrayRecord:
    """Start one array in the background and wait until it serves."""
    data_dir = Path(cfg.data_dir or state_dir / "arrays" / cfg.name)
    data_dir.mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runtime = data_dir / "runtime.json"
    runtime.unlink(missing_ok=True)
    cmd = python_module_command(
        "control.cli",
        "array",
        "serve",
        "--name",
        cfg.name,
        "--data-dir",
        str(data_dir),
        "--nbd-listen",
        cfg.nbd,
        "--api-listen",
        cfg.api,
        "--model",
        cfg.model,
        "--media",
        cfg.media,
    )
    for pool, cap in cfg.pools.items():
        cmd += ["--pool", f"{pool}={cap}"]
    if cfg.migration_throttle:
        cmd += ["--migration-throttle", f"{float(cfg.migration_throttle):g}"]
    if cfg.token:
        cmd += ["--token", cfg.token]
    env = child_env()
    log = open(logs / f"{cfg.name}.log", "ab")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
    )
    log.close()
    deadline = time.monotonic() + START_TIMEOUT
    while not runtime.exists():
        if proc.poll() is not None:
            tail = (logs / f"{cfg.name}.log").read_text()[-2000:]
            raise RuntimeError(f"array {cfg.name} failed to start:\n{tail}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"array {cfg.name} did not start within {START_TIMEOUT:.0f} s")
        time.sleep(0.05)
    info: dict[str, Any] = json.loads(runtime.read_text())
    token = cfg.token or (data_dir / "token").read_text().strip()
    return ArrayRecord(cfg.name, cfg.model, info["api"], info["nbd"], token, str(data_dir), proc.pid)


def up(state_dir: Path, config: Path | None) -> dict[str, ArrayRecord]:
    reg = Registry(state_dir)
    records = reg.load()
    for cfg in load_config(config):
        rec = records.get(cfg.name)
        if rec is not None and rec.alive():
            continue
        records[cfg.name] = start_array(cfg, state_dir)
        reg.save(records)
    return records


def down(state_dir: Path, timeout: float = 15.0) -> list[str]:
    reg = Registry(state_dir)
    records = reg.load()
    stopped = []
    for rec in records.values():
        if rec.alive():
            os.kill(rec.pid, signal.SIGTERM)
            stopped.append(rec.name)
    deadline = time.monotonic() + timeout
    for rec in records.values():
        while rec.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if rec.alive():
            os.kill(rec.pid, signal.SIGKILL)
    reg.path.unlink(missing_ok=True)
    return stopped
