"""The `blockmig up` config: what it accepts and how it refuses the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from control.config import ArrayConfig, Registry, child_env, load_config, save_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "arrays.toml"
    p.write_text(text)
    return p


def test_migration_throttle_defaults_to_unlimited() -> None:
    assert ArrayConfig("A").migration_throttle == 0.0


@pytest.mark.parametrize("bad", ["-1", "fast", "nan", "1e308"])
def test_array_serve_refuses_a_bad_migration_throttle(tmp_path: Path, bad: str) -> None:
    cmd = [sys.executable, "-m", "control.cli", "array", "serve", "--name", "A", "--data-dir", str(tmp_path)]
    p = subprocess.run([*cmd, "--migration-throttle", bad], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--migration-throttle: a rate in MB/s >= 0" in p.stderr, p.stderr


def test_migration_throttle_from_toml(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[[array]]\nname = "A"\nmigration_throttle = 50\n'))
    assert cfg[0].migration_throttle == 50


@pytest.mark.parametrize("bad", ['"fast"', "-1", "true", "inf", "nan", "1e308"])
def test_a_bad_migration_throttle_is_refused_with_its_array_named(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match=r"migration_throttle of array 'A' must be MB/s >= 0"):
        load_config(write(tmp_path, f'[[array]]\nname = "A"\nmigration_throttle = {bad}\n'))


def test_unknown_keys_and_missing_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown key"):
        load_config(write(tmp_path, '[[array]]\nname = "A"\nspeed = 3\n'))
    with pytest.raises(ValueError, match="has no name"):
        load_config(write(tmp_path, '[[array]]\nmodel = "unified"\n'))


# A mistake anywhere in a config: before, load_config let these through (the array refused
# them once `up` had started the arrays before it) or raised a TypeError (a traceback).
SECOND = '[[array]]\nname = "A"\n\n[[array]]\nname = "B"\n'


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        (SECOND + 'media = "floppy"\n', "media of array 'B' must be none, ssd, hdd or fixed:MS"),
        (SECOND + 'nbd = "nohost"\n', "nbd of array 'B' must be HOST:PORT"),
        (SECOND + 'api = "127.0.0.1:99999"\n', "api of array 'B' must be HOST:PORT"),
        (SECOND + 'api = "[::1:0"\n', "api of array 'B' must be HOST:PORT"),  # was ::1 port 0
        (SECOND + "nbd = 10809\n", "nbd of array 'B' must be a string, not 10809"),
        (SECOND + "token = 3\n", "token of array 'B' must be a string, not 3"),
        (SECOND + 'token = "a b"\n', "token of array 'B' must be printable ASCII without spaces"),
        (SECOND + "data_dir = 3\n", "data_dir of array 'B' must be a string, not 3"),
        (SECOND + 'model = ["unified"]\n', "model of array 'B' must be a string"),
        (SECOND + 'pools = "gold"\n', "pools of array 'B' must be a table of pool = capacity"),
        (SECOND + 'pools = { gold = "lots" }\n', "pools of array 'B': not a size: 'lots'"),
        (SECOND + "pools = { gold = 1000 }\n", "pools of array 'B': capacity of pool 'gold' 1000 is invalid"),
        (SECOND + 'pools = { gold = "0" }\n', "pools of array 'B': capacity of pool 'gold' 0 is invalid"),
        (SECOND + 'pools = { "a b" = "1G" }\n', "pools of array 'B': invalid pool name 'a b'"),
        ('[[array]]\nname = "A"\n\n[[array]]\nname = "B b"\n', "[[array]] #2: invalid array name 'B b'"),
        ('[[array]]\nname = "A"\n\n[[array]]\nname = 2\n', "[[array]] #2: invalid array name 2"),
        (
            '[[array]]\nname = "A"\n\n[arrays]\nname = "B"\n',
            "unknown key(s) arrays (it takes [[array]] tables)",
        ),
        ("array = [1, 2]\n", "needs at least one [[array]] table"),
        (
            '[[array]]\nname = "A"\nnbd = "127.0.0.1:10809"\n\n[[array]]\nname = "B"\nnbd = ":10809"\n',
            "nbd of array 'B' is ':10809', as nbd of array 'A' is",
        ),
        (
            '[[array]]\nname = "A"\napi = "127.0.0.1:8701"\nnbd = "127.0.0.1:8701"\n',
            "api of array 'A' is '127.0.0.1:8701', as nbd of array 'A' is",
        ),
        (
            '[[array]]\nname = "A"\ndata_dir = "d"\n\n[[array]]\nname = "B"\ndata_dir = "./d"\n',
            "data_dir of array 'B' is './d', as data_dir of array 'A' is",
        ),
    ],
)
def test_a_bad_value_anywhere_is_refused_naming_file_array_and_key(
    tmp_path: Path, text: str, msg: str
) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ValueError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: ") and msg in str(e.value), str(e.value)


@pytest.mark.parametrize("data_dir", ["f", "f/sub"])
def test_a_data_dir_that_is_a_file_is_refused(tmp_path: Path, data_dir: str) -> None:
    (tmp_path / "f").write_text("")
    p = write(tmp_path, SECOND + f'data_dir = "{tmp_path / data_dir}"\n')
    with pytest.raises(ValueError) as e:
        load_config(p)
    want = f"data_dir of array 'B' is '{tmp_path / data_dir}', but {tmp_path / 'f'} is no directory"
    assert want in str(e.value), str(e.value)


def test_a_config_that_is_no_utf8_is_named(tmp_path: Path) -> None:
    p = tmp_path / "arrays.toml"
    p.write_bytes(b'[[array]]\nname = "\xff"\n')
    with pytest.raises(ValueError, match=rf"^{p}: not valid TOML: "):
        load_config(p)


def test_port_zero_and_default_data_dirs_may_repeat(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SECOND + 'nbd = "127.0.0.1:0"\npools = { gold = 1048576 }\n'))
    assert [c.name for c in cfg] == ["A", "B"] and cfg[1].pools == {"gold": "1048576"}


def _blockmig(
    state: Path, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control.cli", *args, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**child_env(), **(env or {})},
        cwd=cwd,
    )


def test_up_with_a_bad_second_array_starts_nothing(tmp_path: Path) -> None:
    """Before: array A started, then B's media was refused by B's own process (A kept running)."""
    cfg = write(tmp_path, SECOND + 'media = "floppy"\n')
    state = tmp_path / "state"
    try:
        p = _blockmig(state, "up", "--config", str(cfg))
        made = state.exists()
    finally:
        _blockmig(state, "down")  # (an array started by mistake)
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stderr.startswith(f"blockmig: {cfg}: media of array 'B' must be"), p.stderr
    assert "Traceback" not in p.stderr
    assert not made  # no array, no registry, no state dir


def test_up_without_config_starts_the_arrays_of_the_last_config(tmp_path: Path) -> None:
    """`up --config` then `down` then `up`: before, the second `up` started A and B (the
    default) and forgot the configured array X as "not in the config". Now it starts X again
    from STATE_DIR/config.toml, whose relative data_dir was made absolute (this `up` runs in
    another directory), and a bad config given later leaves that copy as it was."""
    state = tmp_path / "state"
    work = tmp_path / "work"
    work.mkdir()
    (work / "x.toml").write_text('[[array]]\nname = "X"\ndata_dir = "xdata"\npools = { gold = "64M" }\n')
    try:
        p = _blockmig(state, "up", "--config", "x.toml", cwd=work)
        assert p.returncode == 0, p.stderr
        saved = state / "config.toml"
        assert saved.stat().st_mode & 0o777 == 0o600
        assert load_config(saved) == [ArrayConfig("X", data_dir=str(work / "xdata"), pools={"gold": "64M"})]
        assert _blockmig(state, "down").returncode == 0
        before = saved.read_text()
        bad = write(tmp_path, '[[array]]\nname = "Y"\nmedia = "floppy"\n')
        assert _blockmig(state, "up", "--config", str(bad)).returncode == 1
        assert saved.read_text() == before

        p = _blockmig(state, "up", "--json")  # from another directory, no --config

        assert p.returncode == 0, p.stderr
        assert "not in the config" not in p.stderr, p.stderr
        recs = Registry(state).load()
        assert list(recs) == ["X"] and recs["X"].data_dir == str(work / "xdata"), recs
        assert [pool["name"] for pool in recs["X"].client().array_info()["pools"]] == ["gold"]
    finally:
        _blockmig(state, "down")


def test_the_registry_and_the_stopped_arrays_record_hold_tokens_mode_0600(tmp_path: Path) -> None:
    """arrays.json (and stopped.json after `down`) hold each array's API token, like the
    saved config (0600) and the data dir's token file (0600). Before: mode 0644, the token
    readable by every local user."""
    state = tmp_path / "state"
    cfg = write(tmp_path, '[[array]]\nname = "X"\n')
    try:
        assert _blockmig(state, "up", "--config", str(cfg)).returncode == 0
        token = Registry(state).load()["X"].token
        registry = state / "arrays.json"
        assert token in registry.read_text()
        assert registry.stat().st_mode & 0o777 == 0o600
    finally:
        assert _blockmig(state, "down").returncode == 0
    stopped = state / "stopped.json"
    assert token in stopped.read_text()
    assert stopped.stat().st_mode & 0o777 == 0o600


def test_up_in_a_shell_that_exported_blockmig_token_starts_arrays_it_can_use(tmp_path: Path) -> None:
    """The README has `export BLOCKMIG_TOKEN=$(cat DIR/token)` for the array commands; a
    `blockmig up` in that shell handed the variable to its arrays, which took it as their
    token and wrote no DIR/token: `up` failed reading that file ("No such file or
    directory"), the arrays it had started left running, in no registry. (A data dir with a
    token file: `up` recorded that token, and every command got 401.) An array `up` starts
    takes its config's token or its data dir's, never the shell's."""
    state = tmp_path / "state"
    cfg = write(tmp_path, '[[array]]\nname = "X"\n')
    try:
        p = _blockmig(state, "up", "--config", str(cfg), env={"BLOCKMIG_TOKEN": "from-the-shell"})
        assert p.returncode == 0, p.stderr
        rec = Registry(state).load()["X"]
        assert rec.token == (state / "arrays" / "X" / "token").read_text().strip() != "from-the-shell"
        assert rec.client().array_info()["name"] == "X"  # the recorded token is the array's
    finally:
        _blockmig(state, "down")
        for pid in _arrays_serving(state):  # what `up` left running before
            os.kill(pid, signal.SIGKILL)


def _arrays_serving(state: Path) -> list[int]:
    """Pids of `array serve` processes with a data dir under ``state``."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmd and any(str(state).encode() in a for a in cmd):
            pids.append(int(d.name))
    return pids


def test_a_configured_token_is_not_on_the_arrays_command_line(tmp_path: Path) -> None:
    """The config's token went to `array serve --token T`: every local user read it in
    /proc/PID/cmdline (`ps -ef`), though the config, the registry and the token file are
    kept 0600 for it. It goes in the array's environment (/proc/PID/environ: 0400)."""
    state = tmp_path / "state"
    cfg = write(tmp_path, '[[array]]\nname = "X"\ntoken = "s3cret-token"\n')
    try:
        p = _blockmig(state, "up", "--config", str(cfg))
        assert p.returncode == 0, p.stderr
        rec = Registry(state).load()["X"]
        assert b"s3cret-token" not in Path(f"/proc/{rec.pid}/cmdline").read_bytes()
        assert rec.token == "s3cret-token" and rec.client().array_info()["name"] == "X"
    finally:
        _blockmig(state, "down")


def test_the_saved_config_reads_back_as_it_was_given(tmp_path: Path) -> None:
    given = [
        ArrayConfig("A", "pooled", "fixed:0.5", "[::1]:0", "127.0.0.1:0", {"gold": "1G", "s-1": "4096"}, 2.5),
        ArrayConfig("B", data_dir='/tmp/with "quotes" \\ and ünïcode\x7f', token="t~!\"#'\\"),
    ]
    saved = tmp_path / "config.toml"
    save_config(saved, given, tmp_path / "a\nb.toml")
    assert load_config(saved) == given
