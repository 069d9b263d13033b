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

`blockmig up --config FILE` keeps the config as STATE_DIR/config.toml; without
``--config`` it starts the arrays of that copy, else two arrays, A and B, of the
unified model. What was started is recorded in STATE_DIR/arrays.json, which later
commands read to find the arrays' APIs; a record there means "started by `up`"
(an array killed since is restarted by the next `up`). `blockmig down` removes
it and keeps what the arrays were, their addresses first, in STATE_DIR/stopped.json,
so that the next `up` brings each back at the addresses it had (port 0 in the
config) and migration followers know the arrays were stopped on purpose. `up`
forgets the record of a stopped array its config no longer names, and says so.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from emulator.array.errors import InvalidInput
from emulator.array.models import MODELS, parse_media
from emulator.array.names import check_name, check_size
from emulator.units import parse_hostport, parse_rate, parse_size

from .api_client import TOKEN_ENV, ArrayApi

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

    def nbd_address(self) -> tuple[str, int]:
        """(host, port) of its NBD server now (``nbd`` as runtime.json gives it: an IPv6
        host may come without brackets)."""
        return url_address(self.nbd)

    def connection(self, export: str) -> dict[str, Any]:
        """How a host reaches ``export`` on this array now: the keys of the array's
        ``GET /api/v1/luns/NAME/connection`` (host, port, export, uri, nbd_client).

        The only place an address of a volume's LUN is made from: volumes.db records
        which array and which export, and a URI stored with them (an old record's, or
        what a host was given) is history once the array has moved (a restart on other
        ports, a new ``nbd`` in the config): this registry is what `blockmig up` last
        started it on."""
        host, port = self.nbd_address()
        named = f"[{host}]" if ":" in host else host
        return {
            "host": host,
            "port": port,
            "export": export,
            "uri": f"nbd://{named}:{port}/{export}",
            "nbd_client": f"nbd-client {host} {port} /dev/nbd0 -N {export}",
        }

    def alive(self) -> bool:
        """True while this array runs: its pid is alive AND is still this array (after a
        kill -9 or a reboot the pid may be another process's, never to be signalled)."""
        return pid_alive(self.pid) and is_array_process(self.pid, self.name, self.data_dir)


def pid_alive(pid: int) -> bool:
    """True while the process runs (a zombie waiting to be reaped does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot: /proc/PID/stat field 22), None
    if it does not run. With the pid it names one process: a pid alone may belong to
    another one by now (reused after that process died, or after a reboot)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")]
    except OSError:
        return []


def is_array_process(pid: int, name: str, data_dir: str) -> bool:
    """Does ``pid`` run `blockmig array serve --name NAME --data-dir DATA_DIR`?"""
    args = _cmdline(pid)
    if "serve" not in args:
        return False

    def value(opt: str) -> str | None:
        for i, a in enumerate(args[:-1]):
            if a == opt:
                return args[i + 1]
            if a.startswith(opt + "="):
                return a.split("=", 1)[1]
        return None

    given = value("--data-dir")
    if value("--name") != name or given is None:
        return False
    if given == data_dir:
        return True
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = "/"
    return os.path.realpath(os.path.join(cwd, given)) == os.path.realpath(data_dir)


def load_config(path: Path | None) -> list[ArrayConfig]:
    """The arrays of the config at ``path`` (None: A and B, unified), every key and value
    checked: `up` starts nothing from a config with a mistake anywhere in it (a bad value
    in a second array used to surface once the first ran, or as a traceback)."""
    if path is None:
        return [ArrayConfig("A"), ArrayConfig("B")]
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    unknown = set(raw) - {"array"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (it takes [[array]] tables)")
    arrays = raw.get("array")
    if not isinstance(arrays, list) or not arrays or not all(isinstance(a, dict) for a in arrays):
        raise ValueError(f"{path}: needs at least one [[array]] table")
    out = [_array_config(path, n, a) for n, a in enumerate(arrays, 1)]
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: array names must be unique")
    # what two arrays cannot share: the second would fail to start after the first ran
    taken: dict[object, str] = {}
    for a in out:
        for key in ("nbd", "api"):
            host, port = parse_hostport(getattr(a, key))
            if port:
                _claim(path, taken, (host, port), f"{key} of array {a.name!r}", getattr(a, key))
        if a.data_dir:
            _claim(path, taken, Path(a.data_dir).resolve(), f"data_dir of array {a.name!r}", a.data_dir)
    return out


def _claim(path: Path, taken: dict[object, str], what: object, owner: str, text: str) -> None:
    if what in taken:
        raise ValueError(f"{path}: {owner} is {text!r}, as {taken[what]} is: give each its own")
    taken[what] = owner


def _array_config(path: Path, n: int, a: dict[str, Any]) -> ArrayConfig:
    """One ``[[array]]`` table (the ``n``-th) as an ArrayConfig; ValueError naming the file,
    the array and the key for anything the array would refuse (or blockmig choke on)."""
    known = ArrayConfig.__dataclass_fields__
    unknown = set(a) - set(known)
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))} in [[array]] #{n} "
            f"(known: {', '.join(known)})"
        )
    if "name" not in a:
        raise ValueError(f"{path}: an [[array]] has no name")
    try:
        name = check_name("array", a["name"])
    except InvalidInput as e:
        raise ValueError(f"{path}: [[array]] #{n}: {e}") from None

    def bad(key: str, want: str) -> ValueError:
        return ValueError(f"{path}: {key} of array {name!r} must be {want}, not {a[key]!r}")

    for key in ("model", "media", "nbd", "api", "data_dir", "token"):
        if not isinstance(a.get(key, ""), str):
            raise bad(key, "a string")
    model = a.get("model", ArrayConfig.model)
    if model not in MODELS:
        raise ValueError(
            f"{path}: model of array {name!r} must be one of {', '.join(sorted(MODELS))}, not {model!r}"
        )
    if "media" in a:
        try:
            parse_media(a["media"])
        except ValueError:
            raise bad("media", "none, ssd, hdd or fixed:MS (e.g. fixed:0.5)") from None
    for key in ("nbd", "api"):
        if key in a:
            try:
                parse_hostport(a[key])
            except ValueError:
                raise bad(key, "HOST:PORT (e.g. 127.0.0.1:0, port 0 for any free one)") from None
    if "token" in a and not re.fullmatch(r"[!-~]*", a["token"]):
        # it goes into an HTTP header: a space or a line break would not get through
        raise ValueError(f"{path}: token of array {name!r} must be printable ASCII without spaces")
    if a.get("data_dir"):
        # a file there (or above) would fail the array's start, after those before it started
        d = Path(a["data_dir"]).absolute()
        there = next(q for q in (d, *d.parents) if q.exists())
        if not there.is_dir():
            raise ValueError(
                f"{path}: data_dir of array {name!r} is {a['data_dir']!r}, but {there} is no directory"
            )
    pools = a.get("pools", {})
    if not isinstance(pools, dict):
        raise bad("pools", 'a table of pool = capacity, e.g. { default = "20G" }')
    for pool, cap in pools.items():
        try:
            check_name("pool", pool)
            check_size(parse_size(cap) if isinstance(cap, str) else cap, f"capacity of pool {pool!r}")
        except (InvalidInput, ValueError) as e:
            raise ValueError(f"{path}: pools of array {name!r}: {e}") from None
    rate = a.get("migration_throttle", 0)
    try:
        parse_rate(rate)
    except ValueError:
        raise bad("migration_throttle", "MB/s >= 0 (0 = unlimited)") from None
    return ArrayConfig(**{**a, "pools": {str(p): str(c) for p, c in pools.items()}})


def saved_config(state_dir: Path) -> Path:
    """Where `blockmig up --config FILE` keeps the config for the `up`s without one."""
    return state_dir / "config.toml"


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once, mode 0600: the saved config and the
    registry's records hold the arrays' API tokens (so does the data dir's token file)."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)  # a .tmp a crash left behind keeps its mode through O_CREAT
        f.write(text)
    tmp.replace(path)


def save_config(path: Path, configs: list[ArrayConfig], source: Path) -> None:
    """Write ``configs`` (checked by :func:`load_config`) to ``path`` as TOML, a relative
    ``data_dir`` made absolute (a later `up` may run in another directory: it would start
    an empty array elsewhere). Mode 0600: it may hold tokens."""

    def text(v: str) -> str:  # a TOML basic string: JSON's escapes, but DEL, which TOML refuses raw
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")

    lines = [f"# the config `blockmig up --config` got ({text(str(source))}), for `up` without one"]
    for cfg in configs:
        d = asdict(replace(cfg, data_dir=str(Path(cfg.data_dir).resolve()) if cfg.data_dir else ""))
        lines.append("\n[[array]]")
        for key, value in d.items():
            if key == "pools":
                pools = ", ".join(f"{text(p)} = {text(c)}" for p, c in value.items())
                lines.append(f"pools = {{ {pools} }}" if pools else "pools = {}")
            elif isinstance(value, str):
                lines.append(f"{key} = {text(value)}")
            else:
                lines.append(f"{key} = {float(value)!r}")
    _write_private(path, "\n".join(lines) + "\n")


class RegistryError(ValueError):
    """STATE_DIR/arrays.json cannot be read."""


class Registry:
    """STATE_DIR/arrays.json: the arrays this state dir knows."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "arrays.json"

    def load(self) -> dict[str, ArrayRecord]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            raw = json.loads(text)
            return {n: ArrayRecord(**r) for n, r in raw.items()}
        except (ValueError, TypeError, AttributeError) as e:
            raise RegistryError(
                f"the array registry {self.path} is damaged ({e}); blockmig leaves it as it is. The "
                "arrays it recorded may still run: each data dir's runtime.json names its pid (default "
                f"{self.state_dir / 'arrays' / 'NAME' / 'runtime.json'}); move the registry away and run "
                "`blockmig up` again with the same config: it takes over the arrays still running"
            ) from None

    def save(self, records: dict[str, ArrayRecord]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _write_private(self.path, json.dumps({n: asdict(r) for n, r in records.items()}, indent=2))

    @property
    def stopped_path(self) -> Path:
        return self.state_dir / "stopped.json"

    def load_stopped(self) -> dict[str, ArrayRecord]:
        """The arrays `blockmig down` stopped and `up` has not started again: their records
        as they were (addresses, data dir). A hint only: missing or damaged, it is empty
        (the next `up` then picks ports as the config says)."""
        try:
            raw = json.loads(self.stopped_path.read_text())
            return {n: ArrayRecord(**r) for n, r in raw.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def save_stopped(self, records: dict[str, ArrayRecord]) -> None:
        if not records:
            self.stopped_path.unlink(missing_ok=True)
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _write_private(self.stopped_path, json.dumps({n: asdict(r) for n, r in records.items()}, indent=2))

    def get(self, name: str) -> ArrayRecord:
        records = self.load()
        if name not in records:
            if name in self.load_stopped():
                down = "was stopped by `blockmig down`; `blockmig up` starts it again"
                raise KeyError(f"array {name!r} {down}")
            known = ", ".join(sorted(records)) or "none: run `blockmig up` first"
            raise KeyError(f"unknown array {name!r} in {self.state_dir} (arrays: {known})")
        return records[name]


def start_array(cfg: ArrayConfig, state_dir: Path) -> ArrayRecord:
    """Start one array in the background and wait until it serves."""
    # absolute: the record must name it from any directory a later command runs in
    data_dir = Path(cfg.data_dir or state_dir / "arrays" / cfg.name).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runtime = data_dir / "runtime.json"
    running = _running_array(cfg, data_dir)
    if running is not None:
        return running  # it still runs (the registry lost it): take it over, never start a second
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
    env = child_env()
    # A $BLOCKMIG_TOKEN the shell exported (for `blockmig lun ...`, as the README shows) is
    # not this array's: taken as its token, it wrote no DATA_DIR/token for `up` to record.
    env.pop(TOKEN_ENV, None)
    if cfg.token:  # in the environment, which only we read: argv is every user's (`ps`)
        env[TOKEN_ENV] = cfg.token
    log = open(logs / f"{cfg.name}.log", "ab")
    logged = log.seek(0, os.SEEK_END)  # what earlier runs wrote: not this start's failure
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
    )
    log.close()
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while not runtime.exists():
            if proc.poll() is not None:
                with open(logs / f"{cfg.name}.log", "rb") as f:
                    f.seek(logged)
                    tail = f.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"array {cfg.name} failed to start:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"array {cfg.name} did not start within {START_TIMEOUT:.0f} s")
            time.sleep(0.05)
    except BaseException:
        # Timed out, or Ctrl-C: the array runs in a session of its own (the terminal's
        # SIGINT misses it) and no registry names it yet, so no `down` would stop it.
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    info: dict[str, Any] = json.loads(runtime.read_text())
    token = cfg.token or (data_dir / "token").read_text().strip()
    return ArrayRecord(cfg.name, cfg.model, info["api"], info["nbd"], token, str(data_dir), proc.pid)


def _running_array(cfg: ArrayConfig, data_dir: Path) -> ArrayRecord | None:
    """The array that serves ``data_dir`` now, as its runtime.json says, if it is ``cfg``'s."""
    try:
        info = json.loads((data_dir / "runtime.json").read_text())
        pid = int(info["pid"])
        if info.get("name") != cfg.name or not pid_alive(pid):
            return None
        if not is_array_process(pid, cfg.name, str(data_dir)):
            return None
        token = cfg.token or (data_dir / "token").read_text().strip()
        return ArrayRecord(cfg.name, str(info["model"]), info["api"], info["nbd"], token, str(data_dir), pid)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _port_free(host: str, port: int, wait: float = 2.0) -> bool:
    """Can the array bind ``port``? A process killed a moment ago may hold it a little
    longer than its pid (the kernel closes its sockets as it exits): wait for that."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the array binds
                s.bind((host, port))
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def _same_address(cfg: ArrayConfig, rec: ArrayRecord, state_dir: Path) -> ArrayConfig:
    """``cfg`` to restart the array ``rec`` recorded (it died: kill -9, a crash, a reboot)
    on the ports it had, where the config leaves them to the system (port 0) and they are
    still free: the volumes' locations and attachments, and the hosts, name those (with
    new ports every URI blockmig had given out would lead nowhere)."""
    if Path(cfg.data_dir or state_dir / "arrays" / cfg.name).resolve() != Path(rec.data_dir).resolve():
        return cfg
    out = {"nbd": cfg.nbd, "api": cfg.api}
    for key, url in (("nbd", rec.nbd), ("api", rec.api)):
        host, port = parse_hostport(out[key])
        try:
            old_host, old_port = url_address(url)
        except ValueError:
            continue
        if port == 0 and old_host == host and old_port and _port_free(host, old_port):
            out[key] = f"[{host}]:{old_port}" if ":" in host else f"{host}:{old_port}"
    return replace(cfg, nbd=out["nbd"], api=out["api"])


def url_address(url: str) -> tuple[str, int]:
    """(host, port) of ``nbd://HOST:PORT`` or ``http://HOST:PORT``, an IPv6 host with or
    without brackets: runtime.json wrote them without before (``nbd://::1:10809``), which
    urlsplit reads as host ``:`` (or refuses). ValueError if there is no host or port."""
    host, port = parse_hostport(url.split("://", 1)[-1].split("/", 1)[0], default_host="")
    if not host:
        raise ValueError(f"no HOST:PORT in {url!r}")
    return host, port


@contextmanager
def registry_lock(state_dir: Path) -> Iterator[None]:
    """One `up` or `down` of a state dir at a time: two at once each read the registry,
    started or stopped arrays by it, and the last to save it dropped what the other did
    (an array running that no registry named, which `down` then left running)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "arrays.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # dropped by the kernel with the process, also on kill -9
        yield
    finally:
        os.close(fd)


def up(state_dir: Path, config: Path | None) -> dict[str, ArrayRecord]:
    if config is not None:
        load_config(config)  # a mistake in it: refused before anything, the state dir too
    with registry_lock(state_dir):
        return _up(state_dir, config)


def _up(state_dir: Path, config: Path | None) -> dict[str, ArrayRecord]:
    reg = Registry(state_dir)
    records = reg.load()
    stopped = reg.load_stopped()
    saved = saved_config(state_dir)
    if config is None and saved.exists():
        config = saved  # the arrays the last `up --config` named, not A and B
    configs = load_config(config)
    if config is not None and not (saved.exists() and saved.samefile(config)):
        save_config(saved, configs, config.absolute())  # checked whole: a bad config replaces no good one
    # An array `down` stopped that the config no longer names is not started again: its
    # record would stay for good, and a migration involving it would wait for it with no
    # word why. Forgotten here, said so; its data dir stays (a config naming it again
    # starts it there, on the ports that config gives).
    names = {cfg.name for cfg in configs}
    gone = {n: r for n, r in stopped.items() if n not in names}
    if gone:
        for n, r in sorted(gone.items()):
            print(
                f"blockmig: array {n} (stopped by `blockmig down`) is not in the config: not started, "
                f"its addresses ({r.nbd}, {r.api}) forgotten; its data dir {r.data_dir} is kept, and "
                "migrations involving it wait until a config names it again (`blockmig show`)",
                file=sys.stderr,
            )
        stopped = {n: r for n, r in stopped.items() if n in names}
        reg.save_stopped(stopped)
    for cfg in configs:
        rec = records.get(cfg.name)
        if rec is not None and rec.alive():
            continue
        # died (kill -9, a reboot: still in the registry) or stopped by `down`: where it was
        was = rec or stopped.get(cfg.name)
        again = cfg if was is None else _same_address(cfg, was, state_dir)
        try:
            records[cfg.name] = start_array(again, state_dir)
        except RuntimeError:
            if again == cfg:
                raise
            # its old ports were taken between the check and the bind: any free ones
            records[cfg.name] = start_array(cfg, state_dir)
        reg.save(records)
        if stopped.pop(cfg.name, None) is not None:
            reg.save_stopped(stopped)
    return records


def down(state_dir: Path, timeout: float = 15.0) -> list[str]:
    with registry_lock(state_dir):
        return _down(state_dir, timeout)


def _down(state_dir: Path, timeout: float) -> list[str]:
    reg = Registry(state_dir)
    records = reg.load()
    # Before any signal: a migration follower that finds an array gone reads it here, as
    # stopped on purpose (it leaves the migration to the next `up`), and `up` brings the
    # arrays back at these addresses (a takeover's target dials its source's).
    if records:
        try:
            reg.save_stopped({**reg.load_stopped(), **records})
        except OSError as e:  # a hint: the arrays stop all the same
            print(f"blockmig: cannot keep the arrays' addresses in {reg.stopped_path}: {e}", file=sys.stderr)
    stopped = []
    for rec in records.values():
        if rec.alive():
            try:
                os.kill(rec.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue  # it ended meanwhile
            stopped.append(rec.name)
    deadline = time.monotonic() + timeout
    for rec in records.values():
        while rec.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if rec.alive():
            try:
                os.kill(rec.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    reg.path.unlink(missing_ok=True)
    return stopped
