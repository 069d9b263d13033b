"""Wrong input to `blockmig` gets a clear error, never a traceback: what a user walking
through the README tried (a URL that is no array API, a size that is no size, a number of
seconds that is none, `| head`), and what the CLI prints of a migration that ended.

Each command runs in-process through ``control.cli.main`` where no array is needed, and
in a child process where what matters is what the user sees on a pipe.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from control import config
from control.cli import main
from control.config import ArrayConfig, load_config
from control.migration_commands import format_status
from control.volumes import VolumesDB
from tests.servers import serve_file

from .blockmig_env import ArraySpec, BlockmigEnv


@contextlib.contextmanager
def blockmig_process(*args: str) -> Iterator[subprocess.Popen[str]]:
    """``blockmig args`` in a process of its own (text pipes), killed if still there."""
    p = subprocess.Popen(
        [sys.executable, "-m", "control.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=config.child_env(),
    )
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``main(argv)``: its exit code (argparse's too) and what it wrote to stderr."""
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = int(e.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.fixture
def not_http(tmp_path: Path) -> Iterator[str]:
    """http://127.0.0.1:PORT of a real NBD server (`blockmig serve-file`): the address a
    user takes for the API when they copy an array's NBD one."""
    with serve_file(tmp_path / "f.img", "--size", "1M") as srv:
        yield f"http://127.0.0.1:{srv.port}"


@pytest.mark.parametrize(
    "url", ["notaurl", "127.0.0.1:8701", "ftp://127.0.0.1:8701", "http://127.0.0.1:abc", "http://[::1:8701"]
)
def test_an_api_url_that_is_no_http_url_is_refused(capsys: pytest.CaptureFixture[str], url: str) -> None:
    rc, err = run(capsys, "lun", "list", "--api", url, "--token", "t")
    assert rc == 1
    assert f"not an array API URL: {url!r} (try http://127.0.0.1:8701)" in err


def test_an_api_url_of_something_that_speaks_no_http_is_named(
    capsys: pytest.CaptureFixture[str], not_http: str
) -> None:
    rc, err = run(capsys, "array", "info", "--api", not_http, "--token", "t")
    assert rc == 1
    assert f"{not_http} does not answer HTTP" in err and "not its NBD one" in err


@pytest.mark.parametrize(
    "argv",
    [
        ("lun", "show", "--api", "http://127.0.0.1:1", "--token", "t", "\udcff"),
        ("migration", "status", "--api", "http://127.0.0.1:1", "--token", "t", "x\udcff"),
        ("show", "\udcff"),
    ],
)
def test_a_name_with_bytes_that_are_not_utf8_is_refused_in_a_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: tuple[str, ...]
) -> None:
    """A byte of the command line that is not UTF-8 (`$'\\xff'`; Python keeps it as a
    surrogate) in a name: before, a UnicodeEncodeError traceback (the API client's URL) or
    "blockmig: utf-8" (the volumes database's)."""
    state = () if argv[0] in ("lun", "migration") else ("--state-dir", str(tmp_path))
    rc, err = run(capsys, *argv, *state)
    assert rc == 1
    assert "is not valid UTF-8 (names and URIs must be)" in err, err


@pytest.fixture
def web_page() -> Iterator[str]:
    """http://127.0.0.1:PORT of a web server that answers every request 200 with a page (a
    web UI, a proxy's login page): the address a user takes for an array's API."""

    class Page(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            page = b"<html>log in</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        do_GET = do_POST = do_DELETE = do_PATCH = answer

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)


@pytest.mark.parametrize(
    "argv", [("lun", "list"), ("lun", "show", "x"), ("lun", "delete", "x"), ("migration", "status", "x")]
)
def test_an_api_url_of_a_web_page_is_named_not_a_traceback(
    capsys: pytest.CaptureFixture[str], web_page: str, argv: tuple[str, ...]
) -> None:
    """Before: a TypeError or AttributeError traceback (the page taken for the JSON of an
    answer), and `lun delete` said "deleted LUN x"."""
    rc, err = run(capsys, *argv, "--api", web_page, "--token", "t")
    assert rc == 1
    assert "answered text/html, not the JSON of an array" in err, err
    assert f"is {web_page} the array's API address?" in err


def test_a_region_size_that_is_no_size_is_refused_before_any_call(capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = run(
        capsys,
        "migration",
        "start",
        "--api",
        "http://127.0.0.1:1",
        "--source",
        "nbd://127.0.0.1:1/x",
        "--lun",
        "x",
        "--region-size",
        "abc",
    )
    assert rc == 2
    assert "argument --region-size: not a size: 'abc'" in err


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (("--size", "abc"), "argument --size: not a size: 'abc'"),
        (("--fio-seconds", "-1"), "argument --fio-seconds: seconds > 0, not '-1'"),
        (("--fio-seconds", "0"), "argument --fio-seconds: seconds > 0, not '0'"),
        (("--tail-seconds", "nan"), "argument --tail-seconds: seconds >= 0, not 'nan'"),
    ],
)
def test_demo_refuses_bad_arguments_before_it_starts_anything(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], msg: str
) -> None:
    rc, err = run(capsys, "demo", *args)
    assert rc == 2 and msg in err


@pytest.mark.parametrize(
    "argv",
    [
        ("lun", "create", "--api", "http://127.0.0.1:1", "x", "--size", "1X"),
        ("lun", "grow", "--api", "http://127.0.0.1:1", "x", "--size", "1X"),
        ("create", "--host", "A", "--size", "1X"),
        ("serve-file", "IMG", "--size", "1X"),
    ],
)
def test_a_size_that_is_no_size_is_a_usage_error_before_anything_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: tuple[str, ...]
) -> None:
    """Before: exit 1 after the fact (the array's 400, or parse_size in the command);
    serve-file had already parsed its --listen address. Now argparse's exit 2, like every
    other bad argument, and no file made."""
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "state"))
    img = tmp_path / "f.img"
    rc, err = run(capsys, *(str(img) if a == "IMG" else a for a in argv))
    assert rc == 2 and "argument --size: not a size: '1X'" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["-1", "nan", "soon"])
def test_array_serve_refuses_a_source_retry_window_that_is_no_number_of_seconds(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bad: str
) -> None:
    argv = ["array", "serve", "--name", "A", "--data-dir", str(tmp_path), "--source-retry-window", bad]
    rc, err = run(capsys, *argv)
    assert rc == 2 and f"argument --source-retry-window: seconds >= 0, not '{bad}'" in err
    assert list(tmp_path.iterdir()) == []  # nothing started


def test_array_serve_with_a_damaged_database_says_which_and_leaves_it(tmp_path: Path) -> None:
    """Before: a sqlite3.DatabaseError traceback ("file is not a database"), which `blockmig
    up` showed as the array's start failure."""
    db = tmp_path / "array.db"
    damaged = b"this is no SQLite database, a disk or a copy cut it short\n" * 100
    db.write_bytes(damaged)
    p = subprocess.run(
        [sys.executable, "-m", "control.cli", "array", "serve", "--name", "A", "--data-dir", str(tmp_path)]
        + ["--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--token", "t"],
        capture_output=True,
        text=True,
        timeout=60,
        env=config.child_env(),
    )
    assert p.returncode == 1
    assert p.stderr == (
        f"blockmig array serve: the array's database {db} cannot be used: file is not a database; "
        "it is left as it is (restore it from a backup; the LUNs' data is in the pools directory)\n"
    )
    assert db.read_bytes() == damaged


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path: Path) -> None:
    """`blockmig list | head -1`: the pipe's reader is gone before blockmig writes."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run(
            [sys.executable, "-m", "control.cli", "list", "--state-dir", str(tmp_path)],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=config.child_env(),
        )
    finally:
        os.close(w)
    assert p.returncode == 1
    assert p.stderr == ""


def test_ctrl_c_gets_a_line_and_exit_130_not_a_traceback() -> None:
    """Ctrl-C of a command that waits on an array (`migration wait`, `migrate --wait`).
    Before: a KeyboardInterrupt traceback. The array here is a socket that takes the
    request and never answers, as a long poll of a migration that goes on does."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        api = f"http://127.0.0.1:{srv.getsockname()[1]}"
        with blockmig_process("migration", "wait", "v1", "--token", "t", "--api", api) as p:
            srv.settimeout(30)
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(30)
                got = b""
                while b"\r\n\r\n" not in got:  # the whole request: blockmig waits for the answer
                    got += conn.recv(4096)
                p.send_signal(signal.SIGINT)
                _, err = p.communicate(timeout=30)
    assert (p.returncode, err) == (130, "blockmig: interrupted\n")


@pytest.mark.parametrize("state", ["cancelled", "failed"])
def test_the_status_of_a_migration_that_dropped_its_copy_is_not_100_percent_clean(state: str) -> None:
    st = {
        "lun": "m",
        "source": "nbd://127.0.0.1:1/m",
        "state": state,
        "mode": "background",
        "total_bytes": 32 << 20,
        "dirty_bytes": 0,  # as the array reports an ended migration
        "clean_bytes": 0,
        "copied_bytes": 8 << 20,
        "copy_rate": 0,
        "dirty_rate": 0,
        "eta_seconds": None,
        "passes": 0,
    }
    text = format_status(st)
    assert "100.0% clean" not in text
    assert "progress:     none kept of 32M: the LUN serves its source directly" in text


def test_a_config_that_is_no_toml_is_named(tmp_path: Path) -> None:
    p = tmp_path / "arrays.toml"
    p.write_text('[[array]\nname = "A"\n')
    with pytest.raises(ValueError, match=rf"^{p}: not valid TOML: "):
        load_config(p)


def test_an_unknown_model_in_a_config_is_refused_with_its_array_named(tmp_path: Path) -> None:
    p = tmp_path / "arrays.toml"
    p.write_text('[[array]]\nname = "A"\nmodel = "nosuch"\n')
    with pytest.raises(ValueError, match=r"model of array 'A' must be one of plain, pooled, .*not 'nosuch'"):
        load_config(p)


def test_an_array_that_fails_to_start_shows_its_own_log_not_an_earlier_one(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "A.log").write_text("blockmig array serve: an error of an earlier run\n")
    with pytest.raises(RuntimeError) as e:
        config.start_array(ArrayConfig("A", media="floppy"), tmp_path)
    assert "unknown media 'floppy'" in str(e.value)
    assert "earlier run" not in str(e.value)


def test_serve_file_names_the_unix_socket_it_cannot_listen_on(tmp_path: Path) -> None:
    sock = tmp_path / "no-such-dir" / "s.sock"
    p = subprocess.run(
        [sys.executable, "-m", "control.cli", "serve-file", str(tmp_path / "f.img"), "--size", "1M"]
        + ["--listen", "127.0.0.1:0", "--unix", str(sock)],
        capture_output=True,
        text=True,
        timeout=60,
        env=config.child_env(),
    )
    assert p.returncode == 1
    assert f"cannot listen on {sock}: No such file or directory" in p.stderr
    # the file it made for nothing goes (a rerun with another --size was refused)
    assert not (tmp_path / "f.img").exists()


def _nbd_size_via_unix(sock: Path) -> int:
    """The size the NBD server on unix socket ``sock`` advertises (the handshake, in nbdinfo)."""
    p = subprocess.run(
        ["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"], capture_output=True, text=True, timeout=20
    )
    assert p.returncode == 0, p.stderr
    return int(p.stdout)


def test_serve_file_leaves_a_running_servers_unix_socket_alone(tmp_path: Path) -> None:
    """Regression (was a bug): asyncio removes a socket file before it binds, so a second
    serve-file on the --unix of a running one took its socket over (new clients reached the
    second file) and removed it when it stopped: the first was unreachable there for good.
    It is refused (exit 1, "Address already in use"), and the first's socket stays; a stale
    socket, which no server listens on, is still taken over."""
    if not shutil.which("nbdinfo"):
        pytest.skip("nbdinfo is not installed")
    sock = tmp_path / "s.sock"
    with serve_file(tmp_path / "first.img", "--size", "1M", "--unix", str(sock)):
        _nbd_size_via_unix(sock)  # listening
        p = subprocess.run(
            [sys.executable, "-m", "control.cli", "serve-file", str(tmp_path / "second.img"), "--size", "2M"]
            + ["--listen", "127.0.0.1:0", "--unix", str(sock)],
            capture_output=True,
            text=True,
            timeout=20,  # before: it served until stopped
            env=config.child_env(),
        )
        assert p.returncode == 1
        assert f"cannot listen on {sock}: Address already in use (a server listens there)" in p.stderr
        assert p.stderr.count("\n") == 1, p.stderr
        assert _nbd_size_via_unix(sock) == 1 << 20  # still the first one's
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listened on, closed: what a killed server leaves
    with serve_file(tmp_path / "third.img", "--size", "3M", "--unix", str(stale)):
        assert _nbd_size_via_unix(stale) == 3 << 20


def test_serve_file_refuses_a_description_no_nbd_client_takes(tmp_path: Path) -> None:
    """An export's description is a string of at most 4096 bytes (proto.md, NBD_INFO_DESCRIPTION
    and NBD_REP_SERVER): libnbd drops the handshake of a longer one ("invalid state: DEAD"),
    so nbdinfo, nbdcopy and qemu could not connect. Before, serve-file served it."""
    img = str(tmp_path / "f.img")
    p = subprocess.run(
        [sys.executable, "-m", "control.cli", "serve-file", img, "--size", "1M", "--listen", "127.0.0.1:0"]
        + ["--description", "d" * 4097],
        capture_output=True,
        text=True,
        timeout=20,  # before: it served until stopped
        env=config.child_env(),
    )
    assert p.returncode == 1
    assert p.stderr == "blockmig serve-file: export description is longer than 4096 bytes\n"
    assert not os.path.exists(img)  # it made the file, and never served it


def test_serve_file_that_cannot_start_keeps_a_file_it_did_not_make(tmp_path: Path) -> None:
    """Only a file serve-file made itself goes when it cannot start: one that was there stays."""
    img = tmp_path / "f.img"
    img.write_bytes(b"keep" * 256)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "control.cli",
            "serve-file",
            str(img),
            "--size",
            "1K",
            "--listen",
            "127.0.0.1:0",
        ]
        + ["--export", "e" * 4097],
        capture_output=True,
        text=True,
        timeout=20,
        env=config.child_env(),
    )
    assert p.returncode == 1 and "export name is longer than 4096 bytes" in p.stderr, p.stderr
    assert img.read_bytes() == b"keep" * 256


def test_serve_file_stopped_as_soon_as_it_says_it_serves_stops_gracefully(tmp_path: Path) -> None:
    """SIGTERM sent as soon as the "serving" line appears (a script, a supervisor, `blockmig
    down` once runtime.json is there): the handlers came after that line, and about half of
    such stops were death by SIGTERM (exit -15) with the last flush skipped."""
    img = tmp_path / "f.img"
    for _ in range(5):
        with blockmig_process("serve-file", str(img), "--size", "1M", "--listen", "127.0.0.1:0") as p:
            assert p.stdout is not None
            assert p.stdout.readline().startswith(f"serving {img}")
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=30)
        assert (p.returncode, err) == (0, "")


def test_serve_file_whose_last_flush_fails_says_so_in_a_line() -> None:
    """The flush at stop failing (here: /dev/null, which has no fsync; on a real file EIO
    or ENOSPC) was a BackendError traceback."""
    with blockmig_process("serve-file", "/dev/null", "--listen", "127.0.0.1:0") as p:
        assert p.stdout is not None
        assert p.stdout.readline().startswith("serving /dev/null")
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    assert p.returncode == 1
    assert err == "blockmig serve-file: /dev/null: flush: Invalid argument\n"


# ---------------------------------------------------------------------- names and seconds
API = ("--api", "http://127.0.0.1:1", "--token", "t")  # never reached: refused before


@pytest.mark.parametrize(
    "argv",
    [
        ("lun", "show", ""),
        ("lun", "grow", "", "--size", "2M"),
        ("lun", "delete", ""),
        ("lun", "fence", ""),
        ("lun", "unfence", ""),
        ("lun", "create", "", "--size", "1M"),
        ("migration", "status", ""),
        ("migration", "wait", ""),
        ("migration", "pause", ""),
        ("migration", "cancel", ""),
        ("migration", "set", "", "--throttle", "1"),
        ("migration", "start", "--source", "nbd://127.0.0.1:1/x", "--lun", ""),
    ],
)
def test_an_empty_lun_name_is_refused(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]) -> None:
    """Before: `lun show ''` asked the array for /api/v1/luns/ and said "Not Found"."""
    rc, err = run(capsys, *argv, *API)
    assert rc == 2 and "a LUN name, not an empty one" in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ("lun", "create", "x", "--size", "1M", "--pool", ""),
        ("migration", "start", "--source", "nbd://127.0.0.1:1/x", "--lun", "x", "--pool", ""),
    ],
)
def test_an_empty_pool_name_is_refused(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]) -> None:
    """Before: `--pool ''` quietly meant the default pool."""
    rc, err = run(capsys, *argv, *API)
    assert rc == 2 and "argument --pool: a pool name, not an empty one" in err, err


def test_attach_refuses_an_empty_host_name(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Before: `--host-name ''` quietly recorded this machine's name."""
    rc, err = run(capsys, "attach", "v1", "--host-name", "", "--state-dir", str(tmp_path))
    assert rc == 2 and "argument --host-name: a host name, not an empty one" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [("down", "--state-dir", ""), ("up", "--config", "", "--state-dir", "F")])
def test_an_empty_state_dir_or_config_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: tuple[str, ...]
) -> None:
    """Before: `--state-dir "$DIR"` with DIR unset meant the default state dir (`down` stopped
    its arrays), `--config ''` the default config."""
    monkeypatch.setenv(config.STATE_ENV, str(tmp_path / "default"))
    (tmp_path / "F").write_text("")  # a state dir no command could use: nothing starts
    rc, err = run(capsys, *[str(tmp_path / a) if a == "F" else a for a in argv])
    assert rc == 2 and "a path, not an empty one" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["F"]


@pytest.mark.parametrize("bad", ["nan", "inf", "-1", "soon"])
def test_migration_wait_refuses_a_timeout_that_is_no_number_of_seconds(
    capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    """Before: nan waited for ever (no deadline is ever passed), -1 gave up at once."""
    rc, err = run(capsys, "migration", "wait", "m", "--timeout", bad, *API)
    assert rc == 2 and f"argument --timeout: seconds >= 0, not '{bad}'" in err, err


# ---------------------------------------------------------------------- volumes: refused up front
@pytest.fixture(scope="module")
def arrays(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockmigEnv]:
    with BlockmigEnv(tmp_path_factory.mktemp("arrays") / "state") as env:
        env.up(
            [
                ArraySpec("A", pools=("default", "gold")),
                ArraySpec("B"),
                ArraySpec("X", "takeover-sync", pools=("default", "gold")),
            ]
        )
        yield env


def _volumes(env: BlockmigEnv) -> list[str]:
    return [v["name"] for v in env.ok("list")]


@pytest.mark.parametrize(
    ("size", "host", "msg"),
    [
        ("0", "A", "size of volume bad 0 is invalid: it must be a positive multiple of 512 bytes"),
        ("1000", "A", "size of volume bad 1000 is invalid"),
        ("2P", "A", "size of volume bad 2251799813685248 is invalid"),
        ("1M", "A#nope", "host 'A#nope': array A has no pool 'nope' (pools: default, gold)"),
        ("1M", "A#bad pool", "host 'A#bad pool': invalid pool name 'bad pool'"),
        ("1M", "A@foo#gold", "host 'A@foo#gold': array A's backend is its model, 'unified', not 'foo'"),
        ("1M", "A@#gold", "host 'A@#gold': array A's backend is its model, 'unified', not ''"),
    ],
)
def test_create_refuses_bad_input_before_recording_a_volume(
    arrays: BlockmigEnv, size: str, host: str, msg: str
) -> None:
    """Before: the volume was recorded first, the array refused its LUN, and the volume
    stayed in the list, status error (and `A@foo` quietly meant A@unified)."""
    got = arrays.refused("create", "--size", size, "--host", host, "--name", "bad")
    assert got.startswith(msg), got
    assert "bad" not in _volumes(arrays)


@pytest.mark.parametrize("name", ["two\nlines", "tab\there", "bell\a", "x" * 256])
def test_create_refuses_a_volume_name_that_is_no_single_line(arrays: BlockmigEnv, name: str) -> None:
    """Before: any name was recorded, and a newline in one garbled `list`'s table."""
    got = arrays.refused("create", "--size", "1M", "--host", "A", "--name", name)
    assert got.startswith(f"invalid volume name {name!r}: use 1-255 printable characters"), got
    assert name not in _volumes(arrays)


def test_a_volume_name_is_free_text_up_to_255_characters(arrays: BlockmigEnv) -> None:
    name = "Ölberg 'db' #1 / " + "x" * 238
    assert len(name) == 255
    v = arrays.create(name, 1 << 20, "A")
    assert arrays.show(v["id"])["name"] == name
    arrays.ok("delete", v["id"])


def test_a_host_naming_the_arrays_model_as_backend_is_taken(arrays: BlockmigEnv) -> None:
    v = arrays.create("named", 1 << 20, "A@unified#gold")
    assert v["host"] == "A@unified#gold"
    arrays.ok("delete", v["id"])


@pytest.mark.parametrize(
    ("host", "msg"),
    [
        ("B@foo", "host 'B@foo': array B's backend is its model, 'unified', not 'foo' (use B#default or"),
        ("B#nope", "host 'B#nope': array B has no pool 'nope' (pools: default)"),
        ("A#nope", "host 'A#nope': array A has no pool 'nope' (pools: default, gold)"),
    ],
)
def test_migrate_refuses_a_bad_host_before_it_starts(arrays: BlockmigEnv, host: str, msg: str) -> None:
    """Before: `B@foo` migrated to B@unified, and an unknown pool failed step 1 or 2 and
    left the volume's migration in error."""
    v = arrays.create(f"m-{host.replace('@', '-').replace('#', '-')}", 1 << 20, "A")
    try:
        got = arrays.refused("migrate", v["id"], host, "--wait")
        assert got.startswith(
            f"volume {v['name']} ({v['id']}) stays on A@unified#default, unchanged: {msg}"
        ), got
        d = arrays.show(v["id"])
        assert (d["host"], d["migration_status"], d["status"]) == ("A@unified#default", None, "available"), d
    finally:
        arrays.ok("delete", v["id"])


@pytest.mark.parametrize(
    ("host", "to", "flags", "msg"),
    [
        (
            "X",
            "X#gold",
            (),
            "array X (model takeover-sync) cannot move volumes between its own pools, and a host "
            "copy needs another array",
        ),
        (
            "A",
            "A#gold",
            ("--force-host-copy",),
            "a host copy (--force-host-copy) needs another array than A (without it, array A "
            "moves the volume between its own pools)",
        ),
    ],
)
def test_a_move_between_pools_of_one_array_that_it_cannot_make_is_refused_up_front(
    arrays: BlockmigEnv, host: str, to: str, flags: tuple[str, ...], msg: str
) -> None:
    """Before: the migration was claimed, then failed at step 2, leaving migration_status
    error; and --force-host-copy within a unified array said that array "(model unified)
    cannot move volumes between its own pools", which it can."""
    v = arrays.create(f"same-array-{host}", 1 << 20, host)
    try:
        got = arrays.refused("migrate", v["id"], to, *flags)
        assert got == f"volume {v['name']} ({v['id']}) stays on {v['host']}, unchanged: {msg}", got
        d = arrays.show(v["id"])
        assert (d["host"], d["migration_status"], d["status"]) == (v["host"], None, "available"), d
    finally:
        arrays.ok("delete", v["id"])


def test_migrate_json_with_progress_keeps_stdout_json(arrays: BlockmigEnv) -> None:
    """`migrate --wait --json --progress` (a CI job that parses the result and logs the bar).
    Before: the bar was drawn on stdout in front of the JSON, which no longer parsed."""
    v = arrays.create("json-progress", 4 << 20, "A")
    try:
        r = arrays.run("migrate", v["id"], "B", "--wait", "--json", "--progress")
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["migration_status"] == "success", r.stdout
        assert "MiB" in r.stderr, r.stderr  # the bar went to stderr
    finally:
        arrays.ok("delete", v["id"])


def test_migrate_of_a_volume_in_error_says_why(arrays: BlockmigEnv) -> None:
    """A volume whose create or delete failed (status error) cannot migrate. Before:
    "volume ID: status is 'error', expected ('available', 'in-use')"."""
    v = arrays.create("broken", 1 << 20, "A")
    db = VolumesDB(arrays.state_dir / "volumes.db")
    try:
        db.update(v["id"], status="error")  # as a delete that failed on the array leaves it
    finally:
        db.close()
    msg = arrays.refused("migrate", "broken", "B")
    assert msg == (
        f"volume broken ({v['id']}) is error: only an available or in-use volume migrates; its create "
        "or delete failed: delete it (`blockmig delete`)"
    ), msg
    assert arrays.show("broken")["migration_status"] is None
    arrays.ok("delete", "broken")


@pytest.mark.parametrize("status", ["error", "deleting", "creating"])
def test_detach_leaves_a_volume_that_is_not_in_use_as_it_is(arrays: BlockmigEnv, status: str) -> None:
    """Before: `blockmig detach` set any volume it left without attachments "available": a
    volume whose delete failed (error) became attachable and migratable again, and one a
    delete was removing ("deleting", which keeps attach out) could be attached meanwhile."""
    v = arrays.create(f"not-in-use-{status}", 1 << 20, "A")
    db = VolumesDB(arrays.state_dir / "volumes.db")
    try:
        db.update(v["id"], status=status)
    finally:
        db.close()
    try:
        assert arrays.ok("detach", v["id"])["status"] == status
        assert arrays.show(v["id"])["status"] == status
    finally:
        arrays.ok("delete", v["id"])
