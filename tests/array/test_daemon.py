"""`blockmig array serve` as a real subprocess, driven by the CLI and real NBD peers.

Every array is a daemon started by :func:`tests.servers.array_daemon` on
127.0.0.1 port 0 (NBD and API) with its data dir in tmp_path. LUNs are made
with `python -m control.cli lun ...` (or the stdlib API client where the CLI
is not what is tested), then used by nbdinfo, qemu-img, qemu-io, nbdcopy,
fio's nbd engine and libnbd (python3-libnbd under /usr/bin/python3, to hold a
connection open). What a peer sees is checked against the LUN's file itself
where that is the truth (its holes, through SEEK_DATA/SEEK_HOLE).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from control.api_client import ApiError, ArrayApi
from tests.files import sparse_runs
from tests.servers import ArrayDaemon, array_api, array_daemon, start_array, stop
from tests.tools import libnbd_host, need, run

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token"
MiB = 1 << 20
ZERO_BIT = 2  # nbdinfo --map type bits: 1 = hole, 2 = zero


# --------------------------------------------------------------------------- helpers
def cli_env(env_token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BLOCKMIG_TOKEN"}
    env["PYTHONPATH"] = str(ROOT)
    if env_token is not None:
        env["BLOCKMIG_TOKEN"] = env_token
    return env


def cli(
    *args: str, token: str | None = TOKEN, env_token: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`python -m control.cli ARGS [--token TOKEN]` with BLOCKMIG_TOKEN only if ``env_token``."""
    cmd = [sys.executable, "-m", "control.cli", *args]
    if token is not None:
        cmd += ["--token", token]
    return run(cmd, check=check, cwd=ROOT, env=cli_env(env_token))


def cli_json(*args: str, **kw: Any) -> Any:
    p = cli(*args, "--json", **kw)
    return json.loads(p.stdout)


def cli_error(*args: str, **kw: Any) -> str:
    """Run a CLI call that must fail: exit 1, one clear line on stderr, no traceback."""
    p = cli(*args, check=False, **kw)
    assert p.returncode == 1, f"{args}: exit {p.returncode}, stdout {p.stdout!r} stderr {p.stderr!r}"
    assert p.stderr.startswith("blockmig: "), p.stderr
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    return p.stderr


api = partial(array_api, timeout=15)


def qemu_io(uri: str, *cmds: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """qemu-io on an NBD URI; it runs every -c in order, flushes at exit, exits 1 if any failed."""
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return run([*args, uri], check=check)


def nbd_map(uri: str) -> list[tuple[int, int, int]]:
    """nbdinfo --map: (offset, length, type) runs, type 0 = data, 3 = hole,zero."""
    out = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    return [(e["offset"], e["length"], e["type"]) for e in out]


def file_map(path: Path) -> list[tuple[int, int, int]]:
    """The file's real holes (SEEK_DATA/SEEK_HOLE) in nbdinfo --map's terms (0 data, 3 hole)."""
    return [(off, n, 0 if is_data else 3) for off, n, is_data in sparse_runs(path)]


def type_at(runs: list[tuple[int, int, int]], offset: int, length: int) -> set[int]:
    """The map types that cover [offset, offset+length)."""
    return {t for off, n, t in runs if off < offset + length and offset < off + n}


def lun_file(d: ArrayDaemon, pool: str, lun: str) -> Path:
    return d.data_dir / "pools" / pool / f"{lun}.img"


def random_file(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def pool_info(d: ArrayDaemon, name: str) -> dict[str, Any]:
    pools: dict[str, dict[str, Any]] = {p["name"]: p for p in api(d).array_info()["pools"]}
    return pools[name]


_HOLD = r"""
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", h.get_size(), flush=True)
sys.stdin.readline()
try:
    h.pread(512, 0)
    print("read-ok", flush=True)
except nbd.Error as e:
    print("read-failed", e, flush=True)
"""


class Held:
    """A libnbd client holding a connection to one export open (see :func:`hold`)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def read_after(self) -> str:
        """Ask the holder to read 512 bytes now; 'read-ok' or 'read-failed ...'."""
        assert self.proc.stdin is not None
        out, err = self.proc.communicate("\n", timeout=20)
        return (out.strip().splitlines() or [f"no output; stderr {err!r}"])[-1]


@contextmanager
def hold(uri: str) -> Iterator[Held]:
    proc = libnbd_host(_HOLD, uri, ready="connected", stdin=True)
    try:
        yield Held(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def wait_until(pred: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


LUN_FIELDS = {"name", "size", "allocated", "pool", "export", "state", "connected_hosts", "uri"}


# --------------------------------------------------------------------------- start, stop, token
def test_serve_prints_the_free_ports_it_got_and_sigterm_stops_it(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "arr-a", "--model", "pooled") as d:
        assert d.name == "arr-a" and d.model == "pooled" and d.media == "none"
        assert d.nbd_host == "127.0.0.1" and d.nbd_port > 0
        m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", d.api)
        assert m and int(m.group(1)) > 0 and int(m.group(1)) != d.nbd_port
        assert d.luns_at_start == 0 and d.data_dir == (tmp_path / "a").resolve()
        runtime = json.loads((d.data_dir / "runtime.json").read_text())
        assert runtime["pid"] == d.proc.pid
        assert runtime["nbd"] == f"nbd://127.0.0.1:{d.nbd_port}" and runtime["api"] == d.api
        # both ports really listen
        with socket.create_connection((d.nbd_host, d.nbd_port), timeout=5) as s:
            assert s.recv(8) == b"NBDMAGIC"
        assert api(d).array_info()["name"] == "arr-a"
        t0 = time.monotonic()
        assert d.sigterm(timeout=10) == 0
        assert time.monotonic() - t0 < 5
        assert not (d.data_dir / "runtime.json").exists()
        assert "Traceback" not in d.output()


def test_the_api_token_is_enforced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with array_daemon(tmp_path / "a", "arr-a") as d:
        url = d.api + "/api/v1/luns"
        for header in (None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer "):
            req = urllib.request.Request(url)
            if header is not None:
                req.add_header("Authorization", header)
            with pytest.raises(urllib.error.HTTPError) as ei:
                urllib.request.urlopen(req, timeout=10)
            assert ei.value.code == 401, header
            assert ei.value.headers.get("WWW-Authenticate") == "Bearer"
            assert json.loads(ei.value.read())["error"]["code"] == "unauthorized"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and json.loads(resp.read()) == []
        with pytest.raises(ApiError) as ea:
            ArrayApi(d.api, "nope", timeout=10).create_lun("x", "1M")
        assert ea.value.status == 401
        assert api(d).list_luns() == []  # the refused create made nothing
    # No --token and no $BLOCKMIG_TOKEN: a token is generated into DATA_DIR/token (0600), kept on restart.
    monkeypatch.delenv("BLOCKMIG_TOKEN", raising=False)
    with array_daemon(tmp_path / "b", "arr-b", token=None) as d:
        tok_file = d.data_dir / "token"
        assert tok_file.stat().st_mode & 0o777 == 0o600
        assert len(d.token) >= 20 and d.token != TOKEN
        api(d).create_lun("l1", "1M")
        first = d.token
    with array_daemon(tmp_path / "b", "arr-b", token=None) as d:
        assert d.token == first
        assert [x["name"] for x in api(d).list_luns()] == ["l1"]
        with pytest.raises(ApiError) as ea:
            ArrayApi(d.api, TOKEN, timeout=10).list_luns()
        assert ea.value.status == 401


def test_a_token_with_whitespace_around_it_is_the_token_clients_send(tmp_path: Path) -> None:
    """Regression (was a bug): an HTTP header value loses its surrounding whitespace, so
    with `--token "abc "` (a config value or an env var with a stray blank) the array
    started and refused every request with 401, its own CLI's with that same token too."""
    with array_daemon(tmp_path / "a", "arr-a", token="s3cret ") as d:
        assert ArrayApi(d.api, "s3cret ", timeout=10).list_luns() == []
        assert ArrayApi(d.api, "s3cret", timeout=10).list_luns() == []
        with pytest.raises(ApiError) as ea:
            ArrayApi(d.api, "s3cre", timeout=10).list_luns()
        assert ea.value.status == 401


def test_an_empty_token_file_gets_a_new_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A token file a crash left empty (older versions never fsync'ed it) is no empty
    token: with one, 'Authorization: Bearer ' let anyone in."""
    from emulator.daemon.main import load_token

    monkeypatch.delenv("BLOCKMIG_TOKEN", raising=False)
    (tmp_path / "token").write_text("\n")
    token = load_token(tmp_path, None)
    assert len(token) >= 20 and (tmp_path / "token").read_text() == token + "\n"
    assert load_token(tmp_path, None) == token


# --------------------------------------------------------------------------- LUNs through the CLI
def test_lun_lifecycle_through_the_cli(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "arr-a", "--pool", "default=1G", "--pool", "gold=256M") as d:
        a = ["--api", d.api]
        # create: token by --token, then by $BLOCKMIG_TOKEN only
        l1 = cli_json("lun", "create", *a, "l1", "--size", "64M")
        assert LUN_FIELDS <= set(l1)
        assert (l1["name"], l1["size"], l1["allocated"], l1["pool"]) == ("l1", 64 * MiB, 0, "default")
        assert (l1["export"], l1["state"], l1["connected_hosts"]) == ("l1", "ready", [])
        assert l1["uri"] == d.uri("l1")
        p = cli("lun", "create", *a, "l2", "--size", "32M", "--pool", "gold", token=None, env_token=TOKEN)
        assert "l2" in p.stdout and "gold" in p.stdout and "32M" in p.stdout
        # list: a table with both, and JSON
        text = cli("lun", "list", *a, token=None, env_token=TOKEN).stdout
        lines = text.splitlines()
        assert lines[0].split() == ["NAME", "SIZE", "ALLOCATED", "POOL", "STATE", "HOSTS", "URI"]
        rows = {ln.split()[0]: ln.split() for ln in lines[2:]}
        assert rows["l1"][1:5] == ["64M", "0B", "default", "ready"] and rows["l1"][6] == d.uri("l1")
        assert rows["l2"][1:5] == ["32M", "0B", "gold", "ready"]
        listed = cli_json("lun", "list", *a)
        assert [x["name"] for x in listed] == ["l1", "l2"]
        # show
        shown = cli_json("lun", "show", *a, "l2")
        assert LUN_FIELDS <= set(shown)
        assert (shown["size"], shown["pool"], shown["export"], shown["uri"]) == (
            32 * MiB,
            "gold",
            "l2",
            d.uri("l2"),
        )
        human = cli("lun", "show", *a, "l1").stdout
        assert re.search(r"^name:\s+l1$", human, re.M)
        assert re.search(r"^size:\s+67108864 \(64M\)$", human, re.M)
        assert re.search(r"^connected_hosts:\s+-$", human, re.M)
        # allocated follows real writes
        qemu_io(d.uri("l1"), "write -P 0x5a 1M 3M")
        assert cli_json("lun", "show", *a, "l1")["allocated"] == 3 * MiB
        # grow
        grown = cli_json("lun", "grow", *a, "l1", "--size", "128M")
        assert grown["size"] == 128 * MiB
        assert cli_json("lun", "show", *a, "l1")["size"] == 128 * MiB
        # delete
        assert "deleted LUN l2" in cli("lun", "delete", *a, "l2").stdout
        assert [x["name"] for x in cli_json("lun", "list", *a)] == ["l1"]
        assert not lun_file(d, "gold", "l2").exists()
        assert "does not exist" in cli_error("lun", "show", *a, "l2")
        # array info shows the pools and the LUN count per pool
        info = cli_json("array", "info", *a)
        pools = {p["name"]: p for p in info["pools"]}
        assert pools["default"]["luns"] == 1 and pools["gold"]["luns"] == 0
        assert pools["default"]["used"] == 3 * MiB
        assert cli("lun", "delete", *a, "l1").returncode == 0
        assert "no LUNs" in cli("lun", "list", *a).stdout


def test_cli_errors_exit_1_with_a_clear_message(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "arr-a") as d:
        a = ["--api", d.api]
        cli("lun", "create", *a, "l1", "--size", "16M")
        assert re.search(r"LUN 'nope' does not exist on array 'arr-a'", cli_error("lun", "show", *a, "nope"))
        assert "does not exist" in cli_error("lun", "delete", *a, "nope")
        assert "does not exist" in cli_error("lun", "grow", *a, "nope", "--size", "1G")
        assert "invalid LUN name '../x'" in cli_error("lun", "create", *a, "../x", "--size", "16M")
        assert "invalid LUN name '.x'" in cli_error("lun", "create", *a, ".x", "--size", "16M")
        assert "invalid LUN name" in cli_error("lun", "create", *a, "x" * 65, "--size", "16M")
        assert "LUN 'l1' already exists" in cli_error("lun", "create", *a, "l1", "--size", "16M")
        assert "multiple of 512" in cli_error("lun", "create", *a, "l2", "--size", "1000")
        assert "multiple of 512" in cli_error("lun", "create", *a, "l2", "--size", "0")
        assert "pool 'nope' does not exist" in cli_error(
            "lun", "create", *a, "l2", "--size", "1M", "--pool", "nope"
        )
        assert "shrinking" in cli_error("lun", "grow", *a, "l1", "--size", "8M")
        assert "bearer token" in cli_error("lun", "list", *a, token="wrong-token")
        assert "bearer token" in cli_error("lun", "list", *a, token=None)  # none at all
        assert "bearer token" in cli_error("lun", "list", *a, token=None, env_token="wrong-token")
        # --json: the error as JSON on stdout too
        p = cli("lun", "show", *a, "nope", "--json", check=False)
        assert p.returncode == 1
        err = json.loads(p.stdout)["error"]
        assert (err["status"], err["code"]) == (404, "not_found")
        # nothing of that changed the array
        assert [(x["name"], x["size"]) for x in api(d).list_luns()] == [("l1", 16 * MiB)]
        dead = d.api
    # the array is gone: a clear "cannot reach"
    assert "cannot reach the array API" in cli_error("lun", "list", "--api", dead)


# --------------------------------------------------------------------------- real NBD peers
def test_nbdinfo_qemu_img_and_fio_verify_on_luns(tmp_path: Path) -> None:
    need("nbdinfo", "qemu-img", "fio")
    with array_daemon(tmp_path / "a", "arr-a") as d:
        cli("lun", "create", "--api", d.api, "img", "--size", "64M")
        cli("lun", "create", "--api", d.api, "fio", "--size", "64M")
        info = json.loads(run(["nbdinfo", "--json", "--no-content", d.uri("img")]).stdout)
        (exp,) = info["exports"]
        assert (exp["export-name"], exp["export-size"]) == ("img", 64 * MiB)
        assert exp["can_trim"] and exp["can_zero"] and exp["can_flush"] and not exp["is_read_only"]
        # qemu-img: random data into the LUN, then compare (the rest of the LUN must read as zeroes)
        src = random_file(tmp_path / "src.img", 8 * MiB, seed=1)
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), d.uri("img")])
        cmp = ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), d.uri("img")]
        assert "identical" in run(cmp).stdout
        # the compare can fail: change one byte of the source
        with open(src, "r+b") as f:
            f.seek(5 * MiB + 7)
            b = f.read(1)
            f.seek(5 * MiB + 7)
            f.write(bytes([b[0] ^ 0xFF]))
        assert run(cmp, check=False).returncode == 1
        # fio: random writes at iodepth 16 with crc32c verify
        out = tmp_path / "fio.json"
        p = run(
            [
                "fio",
                "--name=v",
                "--ioengine=nbd",
                f"--uri={d.uri('fio')}",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=32M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--output-format=json",
                f"--output={out}",
            ],
            check=False,
            cwd=tmp_path,
        )
        text = out.read_text()
        job = json.loads(text[text.index("{") :])["jobs"][0]
        assert (p.returncode, job["error"]) == (0, 0), p.stderr[-2000:]
        assert job["write"]["io_bytes"] == 32 * MiB
        assert job["read"]["io_bytes"] == 32 * MiB  # the verify pass read everything back
        stats = api(d).stats("fio")["ops"]
        assert stats["write"]["bytes"] >= 32 * MiB and stats["write"]["errors"] == 0
        assert stats["read"]["errors"] == 0
        assert api(d).get_lun("fio")["allocated"] >= 32 * MiB


def test_trim_write_zeroes_and_block_status_show_the_files_real_holes(tmp_path: Path) -> None:
    need("nbdinfo", "qemu-io")
    with array_daemon(tmp_path / "a", "arr-a") as d:
        cli("lun", "create", "--api", d.api, "l1", "--size", "16M")
        uri, path = d.uri("l1"), lun_file(d, "default", "l1")
        qemu_io(uri, "write -P 0xab 0 8M")
        assert api(d).get_lun("l1")["allocated"] == 8 * MiB
        assert nbd_map(uri) == [(0, 8 * MiB, 0), (8 * MiB, 8 * MiB, 3)] == file_map(path)

        # TRIM punches a hole: map and allocated follow
        qemu_io(uri, "discard 1M 2M")
        m = nbd_map(uri)
        assert type_at(m, 1 * MiB, 2 * MiB) == {3}
        assert type_at(m, 0, 1 * MiB) == {0} and type_at(m, 3 * MiB, 5 * MiB) == {0}
        assert api(d).get_lun("l1")["allocated"] == 6 * MiB
        assert m == file_map(path)

        # WRITE_ZEROES with may-trim (qemu-io write -z -u): a hole as well
        qemu_io(uri, "write -z -u 4M 1M")
        m = nbd_map(uri)
        assert type_at(m, 4 * MiB, 1 * MiB) == {3}
        assert api(d).get_lun("l1")["allocated"] <= 5 * MiB + 64 * 1024
        assert m == file_map(path)

        # WRITE_ZEROES without may-trim (NO_HOLE): fallocate ZERO_RANGE; reads zero, map says zero
        qemu_io(uri, "write -z 6M 1M")
        m = nbd_map(uri)
        assert all(t & ZERO_BIT for t in type_at(m, 6 * MiB, 1 * MiB)), m
        assert m == file_map(path)

        # the bytes agree with the map, and the untouched data is intact
        qemu_io(
            uri,
            "read -P 0xab 0 1M",
            "read -P 0 1M 2M",
            "read -P 0xab 3M 1M",
            "read -P 0 4M 1M",
            "read -P 0xab 5M 1M",
            "read -P 0 6M 1M",
            "read -P 0xab 7M 1M",
            "read -P 0 8M 8M",
        )
        # TRIM of the whole LUN gives everything back
        qemu_io(uri, "discard 0 16M")
        assert nbd_map(uri) == [(0, 16 * MiB, 3)]
        assert api(d).get_lun("l1")["allocated"] < 64 * 1024
        stats = api(d).stats("l1")["ops"]
        assert stats["trim"]["count"] >= 2 and stats["zero"]["count"] >= 2
        assert stats["extents"]["count"] >= 1


# --------------------------------------------------------------------------- restarts
def test_sigkill_restart_keeps_every_lun_and_flushed_byte(tmp_path: Path) -> None:
    need("qemu-io", "qemu-img", "nbdinfo")
    data = tmp_path / "a"
    src = random_file(tmp_path / "src.img", 6 * MiB, seed=2)
    with array_daemon(data, "arr-a", "--pool", "default=1G", "--pool", "gold=256M") as d:
        az = api(d)
        az.create_lun("pat", "64M")
        az.create_lun("rnd", "16M", "gold")
        az.create_lun("empty", "8M")
        az.create_lun("grown", "8M", "gold")
        qemu_io(d.uri("pat"), "write -P 0x11 0 1M", "write -P 0x22 17M 3M", "write -P 0x33 63M 1M", "flush")
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), d.uri("rnd")])
        az.grow_lun("grown", "24M")
        qemu_io(d.uri("grown"), "write -P 0x44 20M 1M", "flush")
        before = {x["name"]: x for x in az.list_luns()}
        d.sigkill()
        assert d.proc.returncode == -signal.SIGKILL
        assert (d.data_dir / "runtime.json").exists()  # stale: nobody cleaned up
    with array_daemon(data, "arr-a") as d:  # no --pool: the pools come from the metadata
        assert d.luns_at_start == 4
        after = {x["name"]: x for x in api(d).list_luns()}
        assert sorted(after) == ["empty", "grown", "pat", "rnd"]
        for name, x in before.items():
            y = after[name]
            for k in ("size", "pool", "state", "export", "created", "allocated"):
                assert y[k] == x[k], (name, k, x[k], y[k])
            assert y["uri"] == d.uri(name) and y["connected_hosts"] == []
        assert after["grown"]["size"] == 24 * MiB
        runtime = json.loads((d.data_dir / "runtime.json").read_text())
        assert runtime["pid"] == d.proc.pid  # the stale file was replaced
        qemu_io(
            d.uri("pat"),
            "read -P 0x11 0 1M",
            "read -P 0 1M 16M",
            "read -P 0x22 17M 3M",
            "read -P 0 20M 43M",
            "read -P 0x33 63M 1M",
        )
        assert (
            "identical"
            in run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), d.uri("rnd")]).stdout
        )
        qemu_io(d.uri("empty"), "read -P 0 0 8M")
        qemu_io(d.uri("grown"), "read -P 0 0 20M", "read -P 0x44 20M 1M", "read -P 0 21M 3M")
        assert int(run(["nbdinfo", "--size", d.uri("grown")]).stdout) == 24 * MiB
        # the restarted array is fully usable: write, create, delete
        qemu_io(d.uri("empty"), "write -P 0x55 0 1M")
        api(d).create_lun("new", "1M")
        api(d).delete_lun("rnd")
        d.sigkill()
    with array_daemon(data, "arr-a") as d:
        assert sorted(x["name"] for x in api(d).list_luns()) == ["empty", "grown", "new", "pat"]
        qemu_io(d.uri("empty"), "read -P 0x55 0 1M")
        assert not lun_file(d, "gold", "rnd").exists()
    # the data dir belongs to arr-a: another name is refused, and changes nothing
    with pytest.raises(RuntimeError, match="belongs to array 'arr-a'"):
        start_array(data, "arr-b")
    with array_daemon(data, "arr-a") as d:
        assert d.luns_at_start == 4


def test_sigterm_with_a_connected_host_exits_0_and_restart_finds_everything(tmp_path: Path) -> None:
    need("qemu-io")
    data = tmp_path / "a"
    with array_daemon(data, "arr-a") as d:
        api(d).create_lun("l1", "16M")
        qemu_io(d.uri("l1"), "write -P 0x66 4M 4M")
        with hold(d.uri("l1")) as h:
            wait_until(lambda: len(api(d).get_lun("l1")["connected_hosts"]) == 1, what="the held host")
            t0 = time.monotonic()
            assert d.sigterm(timeout=10) == 0
            assert time.monotonic() - t0 < 5, "SIGTERM took too long with an idle client connected"
            assert h.read_after().startswith("read-failed")  # the server closed the connection
        assert not (d.data_dir / "runtime.json").exists()
        assert "Traceback" not in d.output()
    with array_daemon(data, "arr-a") as d:
        assert d.luns_at_start == 1
        lun = api(d).get_lun("l1")
        assert (lun["size"], lun["allocated"], lun["connected_hosts"]) == (16 * MiB, 4 * MiB, [])
        qemu_io(d.uri("l1"), "read -P 0 0 4M", "read -P 0x66 4M 4M", "read -P 0 8M 8M")


def test_grow_keeps_data_and_survives_restart(tmp_path: Path) -> None:
    need("qemu-io", "nbdinfo")
    data = tmp_path / "a"
    with array_daemon(data, "arr-a") as d:
        cli("lun", "create", "--api", d.api, "l1", "--size", "16M")
        qemu_io(d.uri("l1"), "write -P 0x77 15M 1M")
        grown = cli_json("lun", "grow", "--api", d.api, "l1", "--size", "48M")
        assert grown["size"] == 48 * MiB and grown["allocated"] == 1 * MiB
        assert int(run(["nbdinfo", "--size", d.uri("l1")]).stdout) == 48 * MiB
        qemu_io(d.uri("l1"), "read -P 0x77 15M 1M", "read -P 0 16M 32M", "write -P 0x78 47M 1M")
        # growing to the same size is a no-op; shrinking is refused and changes nothing
        assert cli_json("lun", "grow", "--api", d.api, "l1", "--size", "48M")["size"] == 48 * MiB
        assert "shrinking" in cli_error("lun", "grow", "--api", d.api, "l1", "--size", "32M")
        assert api(d).get_lun("l1")["size"] == 48 * MiB
        assert d.sigterm() == 0
    with array_daemon(data, "arr-a") as d:
        assert api(d).get_lun("l1")["size"] == 48 * MiB
        assert int(run(["nbdinfo", "--size", d.uri("l1")]).stdout) == 48 * MiB
        qemu_io(
            d.uri("l1"), "read -P 0 0 15M", "read -P 0x77 15M 1M", "read -P 0 16M 31M", "read -P 0x78 47M 1M"
        )


# --------------------------------------------------------------------------- delete with a host
def test_delete_is_refused_while_a_host_is_connected_unless_forced(tmp_path: Path) -> None:
    need("qemu-io", "nbdinfo")
    data = tmp_path / "a"
    with array_daemon(data, "arr-a") as d:
        a = ["--api", d.api]
        cli("lun", "create", *a, "l1", "--size", "16M")
        cli("lun", "create", *a, "l2", "--size", "16M")
        qemu_io(d.uri("l1"), "write -P 0x99 0 1M")
        with hold(d.uri("l1")) as h:
            wait_until(lambda: len(api(d).get_lun("l1")["connected_hosts"]) == 1, what="the held host")
            shown = cli_json("lun", "show", *a, "l1")
            (host,) = shown["connected_hosts"]
            assert "127.0.0.1" in host
            assert "127.0.0.1" in cli("lun", "show", *a, "l1").stdout
            assert api(d).get_lun("l2")["connected_hosts"] == []
            # refused, by the CLI and by the API
            msg = cli_error("lun", "delete", *a, "l1")
            assert "connected host" in msg and "force" in msg
            with pytest.raises(ApiError) as ea:
                api(d).delete_lun("l1")
            assert (ea.value.status, ea.value.code) == (409, "conflict")
            assert lun_file(d, "default", "l1").exists()
            qemu_io(d.uri("l1"), "read -P 0x99 0 1M")  # still served, data intact
            # a host that disconnected does not count: l2 deletes without force
            run(["nbdinfo", "--size", d.uri("l2")])
            wait_until(lambda: api(d).get_lun("l2")["connected_hosts"] == [], what="nbdinfo to go")
            cli("lun", "delete", *a, "l2")
            # forced: deleted, and the held connection is dropped
            assert "deleted LUN l1" in cli("lun", "delete", *a, "l1", "--force").stdout
            assert h.read_after().startswith("read-failed")
        assert api(d).list_luns() == []
        assert not lun_file(d, "default", "l1").exists()
        p = run(["nbdinfo", "--size", d.uri("l1")], check=False)
        assert p.returncode != 0  # the export is gone
        # a new LUN of the same name starts empty
        cli("lun", "create", *a, "l1", "--size", "8M")
        qemu_io(d.uri("l1"), "read -P 0 0 8M")
        cli("lun", "delete", *a, "l1")
        d.sigkill()
    with array_daemon(data, "arr-a") as d:
        assert d.luns_at_start == 0 and api(d).list_luns() == []
        assert list((d.data_dir / "pools" / "default").iterdir()) == []


# --------------------------------------------------------------------------- full pool
def test_enospc_on_a_full_pool_keeps_the_lun_consistent(tmp_path: Path) -> None:
    need("qemu-io", "nbdinfo")
    with array_daemon(tmp_path / "a", "arr-a", "--pool", "small=8M", "--pool", "big=256M") as d:
        az = api(d)
        az.create_lun("s1", "64M", "small")  # thin: bigger than its pool
        az.create_lun("s2", "16M", "small")
        az.create_lun("b1", "64M", "big")
        qemu_io(d.uri("s1"), "write -P 0x11 0 6M")
        # 6M + 4M > 8M: refused with ENOSPC, and nothing of it lands
        p = qemu_io(d.uri("s1"), "write -P 0x22 6M 4M", check=False)
        assert p.returncode != 0 and "No space left on device" in p.stdout + p.stderr, p
        assert az.get_lun("s1")["allocated"] == 6 * MiB
        qemu_io(d.uri("s1"), "read -P 0x11 0 6M", "read -P 0 6M 58M")
        # the other LUN of the pool is refused too past the capacity, fits below it
        p = qemu_io(d.uri("s2"), "write -P 0x33 0 3M", check=False)
        assert p.returncode != 0 and "No space left on device" in p.stdout + p.stderr
        qemu_io(d.uri("s2"), "write -P 0x33 0 2M")  # exactly full now
        pool = pool_info(d, "small")
        assert pool["used"] == 8 * MiB and pool["free"] == 0
        # full: any allocating write fails, WRITE_ZEROES without may-trim as well ...
        for cmd in ("write -P 0x44 32M 4k", "write -z 40M 64k"):
            p = qemu_io(d.uri("s1"), cmd, check=False)
            assert p.returncode != 0 and "No space left on device" in p.stdout + p.stderr, cmd
        # ... while overwriting allocated blocks still works
        qemu_io(d.uri("s1"), "write -P 0x55 0 1M", "write -P 0x56 5M 1M")
        qemu_io(d.uri("s2"), "write -P 0x57 1M 1M")
        # other pools keep working
        qemu_io(d.uri("b1"), "write -P 0x66 0 16M", "read -P 0x66 0 16M")
        assert d.proc.poll() is None
        assert az.stats("s1")["ops"]["write"]["errors"] >= 2
        assert pool_info(d, "small")["used"] <= 8 * MiB
        # TRIM frees space; then writes fit again
        qemu_io(d.uri("s1"), "discard 1M 3M")
        assert pool_info(d, "small")["used"] == 5 * MiB
        qemu_io(d.uri("s2"), "write -P 0x77 8M 3M")
        p = qemu_io(d.uri("s2"), "write -P 0x78 12M 1M", check=False)  # full again
        assert "No space left on device" in p.stdout + p.stderr
        # the final contents are exactly what was acknowledged
        qemu_io(
            d.uri("s1"),
            "read -P 0x55 0 1M",
            "read -P 0 1M 3M",
            "read -P 0x11 4M 1M",
            "read -P 0x56 5M 1M",
            "read -P 0 6M 58M",
        )
        qemu_io(
            d.uri("s2"),
            "read -P 0x33 0 1M",
            "read -P 0x57 1M 1M",
            "read -P 0 2M 6M",
            "read -P 0x77 8M 3M",
            "read -P 0 11M 5M",
        )
        assert int(run(["nbdinfo", "--size", d.uri("s1")]).stdout) == 64 * MiB


def test_a_full_pool_stays_enforced_after_a_restart(tmp_path: Path) -> None:
    """The pool's capacity must hold for writes right after a restart, too.

    Nothing here asks the API for pool usage before writing: that would
    recount the pool and hide a restart that starts from an empty estimate.
    """
    need("qemu-io")
    data = tmp_path / "a"
    with array_daemon(data, "arr-a", "--pool", "small=8M") as d:
        api(d).create_lun("s1", "64M", "small")
        qemu_io(d.uri("s1"), "write -P 0x11 0 6M")
        d.sigkill()
    with array_daemon(data, "arr-a") as d:
        p = qemu_io(d.uri("s1"), "write -P 0x22 6M 4M", check=False)
        used = pool_info(d, "small")["used"]
        assert p.returncode != 0 and "No space left on device" in p.stdout + p.stderr, (
            f"a 4M write into a 8M pool already holding 6M was accepted after a restart; "
            f"the pool now holds {used} bytes"
        )
        assert used <= 8 * MiB
        qemu_io(d.uri("s1"), "read -P 0x11 0 6M", "read -P 0 6M 4M")


@contextmanager
def small_file_system(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (skips the test where mounting is not allowed)."""
    where.mkdir()
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_pool_larger_than_its_file_system_leaves_room_to_delete_a_lun(tmp_path: Path) -> None:
    """Regression (was a bug): a thin pool may be larger than the file system under it.
    Hosts' writes then filled the file system to its last byte, and array.db had no room
    left: no LUN could be deleted to free space (507, before that a 500), and the array
    did not start again. Writes get ENOSPC while the array still has room for its
    metadata; a delete then frees the space, and the LUNs left work."""
    need("qemu-io")
    with small_file_system(tmp_path / "fs", "48M") as mnt:
        with array_daemon(mnt / "a", "arr-a", "--pool", "big=1G") as d:
            az = api(d)
            az.create_lun("hog", "64M")
            az.create_lun("other", "8M")
            qemu_io(d.uri("other"), "write -P 0x11 0 1M")
            # 1M at a time, up to the last MiB the array gives them
            p = qemu_io(d.uri("hog"), *(f"write -P 0x22 {i}M 1M" for i in range(48)), check=False)
            assert p.returncode != 0 and "No space left on device" in p.stdout + p.stderr, p
            st = os.statvfs(mnt)
            assert st.f_bavail * st.f_frsize >= 8 * MiB, "the hosts' writes filled the file system"
            qemu_io(d.uri("other"), "read -P 0x11 0 1M", "write -P 0x12 0 1M")  # an overwrite still fits
            assert pool_info(d, "big")["free"] < MiB  # what writes may still take, not the pool's 1G
            az.delete_lun("hog")
            az.create_lun("new", "8M")
            qemu_io(d.uri("new"), "write -P 0x33 0 4M")
            assert d.sigterm() == 0
        with array_daemon(mnt / "a", "arr-a") as d:
            assert sorted(lun["name"] for lun in api(d).list_luns()) == ["new", "other"]
            qemu_io(d.uri("other"), "read -P 0x12 0 1M")
            qemu_io(d.uri("new"), "read -P 0x33 0 4M")


def test_a_full_pool_accepts_overwrites_of_allocated_blocks_of_a_fragmented_lun(tmp_path: Path) -> None:
    """Fill a 1M pool with 4K writes every 8K (256 extents), then overwrite one of them.

    An overwrite of allocated blocks allocates nothing and must succeed even
    when the pool is full; the pool must not count more than its capacity.
    """
    need("qemu-io")
    with array_daemon(tmp_path / "a", "arr-a", "--pool", "small=1M") as d:
        api(d).create_lun("s1", "64M", "small")
        cmds = [f"write -P 0x5a {i * 8192} 4k" for i in range(300)]
        p = qemu_io(d.uri("s1"), *cmds, "flush", check=False)
        wrote = p.stdout.count("wrote 4096/4096")
        assert p.returncode != 0 and "No space left on device" in p.stdout + p.stderr
        assert 200 <= wrote <= 256, wrote  # about 1M of 4K blocks fit
        p = qemu_io(d.uri("s1"), "write -P 0x5b 0 4k", f"write -P 0x5c {(wrote - 1) * 8192} 4k", check=False)
        pool = pool_info(d, "small")
        assert p.returncode == 0, (
            f"overwriting allocated blocks on a full pool failed: {p.stdout.strip()!r}; "
            f"pool used {pool['used']} of capacity {pool['capacity']}, "
            f"data written {wrote * 4096}"
        )
        assert pool["used"] <= pool["capacity"]
        qemu_io(d.uri("s1"), "read -P 0x5b 0 4k", "read -P 0 4k 4k", "read -P 0x5a 8k 4k")


# --------------------------------------------------------------------------- several arrays
def test_two_arrays_side_by_side_copy_a_lun_with_nbdcopy(tmp_path: Path) -> None:
    need("nbdcopy", "qemu-img", "qemu-io")
    src = random_file(tmp_path / "src.img", 8 * MiB, seed=3)
    with (
        array_daemon(tmp_path / "a", "arr-a", "--model", "unified") as a,
        array_daemon(tmp_path / "b", "arr-b", "--model", "plain") as b,
    ):
        assert len({a.nbd_port, b.nbd_port, a.api, b.api}) == 4
        # the same LUN name on both arrays: two independent LUNs
        cli("lun", "create", "--api", a.api, "vol", "--size", "32M")
        cli("lun", "create", "--api", b.api, "vol", "--size", "32M")
        qemu_io(b.uri("vol"), "write -P 0xee 30M 1M")  # stale bytes the copy must zero
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), a.uri("vol")])
        qemu_io(b.uri("vol"), "read -P 0 0 8M")  # untouched by the write to arr-a
        run(["nbdcopy", a.uri("vol"), b.uri("vol")])
        assert (
            "identical"
            in run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a.uri("vol"), b.uri("vol")]).stdout
        )
        assert (
            "identical"
            in run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), b.uri("vol")]).stdout
        )
        # the holes were not filled in on the copy
        assert api(b).get_lun("vol")["allocated"] < 12 * MiB
        for d, model in ((a, "unified"), (b, "plain")):
            info = cli_json("array", "info", "--api", d.api)
            assert (info["name"], info["model"]) == (d.name, model)
            assert info["nbd"] == {"host": "127.0.0.1", "port": d.nbd_port}
            text = cli("array", "info", "--api", d.api).stdout
            assert re.search(rf"^array:\s+{d.name}$", text, re.M)
            assert re.search(rf"^model:\s+{model} \(", text, re.M)
        # deleting on one array leaves the other alone
        cli("lun", "delete", "--api", a.api, "vol")
        assert [x["name"] for x in api(b).list_luns()] == ["vol"]
        assert (
            "identical"
            in run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), b.uri("vol")]).stdout
        )


def test_a_second_daemon_on_a_data_dir_in_use_is_refused(tmp_path: Path) -> None:
    """Two processes serving the same LUN files would each keep their own pool
    accounting and LUN table (a delete on one leaves the other serving a removed
    file): the data dir must be locked while an array runs."""
    need("qemu-io")
    with array_daemon(tmp_path / "a", "arr-a") as d:
        api(d).create_lun("l1", "8M")
        second: ArrayDaemon | None = None
        try:
            second = start_array(tmp_path / "a", "arr-a")
        except RuntimeError as e:
            assert "exited with 1" in str(e)
        finally:
            if second is not None:
                stop(second.proc)  # type: ignore[arg-type]
        assert second is None, "a second `array serve` started on a data dir that a running array holds"
        qemu_io(d.uri("l1"), "write -P 0x12 0 1M", "read -P 0x12 0 1M")


@pytest.mark.parametrize(
    ("model", "caps"),
    [
        ("unified", {"remote_takeover": True, "async_migration": True, "pool_migration": True}),
        ("pooled", {"remote_takeover": False, "async_migration": False, "pool_migration": True}),
        ("plain", {"remote_takeover": False, "async_migration": False, "pool_migration": False}),
        ("takeover-sync", {"remote_takeover": True, "async_migration": False, "pool_migration": False}),
    ],
)
def test_models_report_their_capabilities(tmp_path: Path, model: str, caps: dict[str, bool]) -> None:
    with array_daemon(tmp_path / "a", f"arr-{model}", "--model", model) as d:
        assert d.model == model and f"(model {model}, " in d.banner
        info = cli_json("array", "info", "--api", d.api)
        assert (info["name"], info["model"], info["capabilities"]) == (f"arr-{model}", model, caps)
        text = cli("array", "info", "--api", d.api).stdout
        line = re.search(r"^capabilities:\s+(.*)$", text, re.M)
        assert line is not None
        want = ", ".join(k for k, v in caps.items() if v) or "generic host copy only"
        assert line.group(1) == want


def test_a_bad_command_line_exits_1_and_starts_nothing(tmp_path: Path) -> None:
    for args, msg in (
        (("--pool", "small"), "NAME=CAPACITY"),
        (("--pool", "small=12Q"), "not a size"),
        (("--media", "floppy"), "unknown media"),
        (("--pool", "small=0"), "capacity of pool 'small' 0 is invalid"),
        (("--pool", "a b=1G"), "invalid pool name 'a b'"),
        (("--name", "a b"), "invalid array name 'a b'"),
        (("--token", "line\nbreak"), r"\(--token or \$BLOCKMIG_TOKEN\) cannot be sent in an HTTP header"),
        (("--token", "  "), "cannot be sent in an HTTP header"),
    ):
        with pytest.raises(RuntimeError, match=rf"(?s)exited with 1\).*blockmig array serve: .*{msg}"):
            d = start_array(tmp_path / "a", "arr-a", *args)
            stop(d.proc)  # type: ignore[arg-type]
        # before: a bad pool or name was refused once the data dir and its token were made
        assert not (tmp_path / "a").exists(), args
