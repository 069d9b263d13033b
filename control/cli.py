"""The `blockmig` command.

Users run it from scripts and CI loops, so building the parser stays cheap: it imports
only what defines the commands' arguments. The commands that run an NBD server, an
array or the demo (aiohttp, numpy, uvloop, the migration engine, rich) have their
arguments here, and their ``func`` is a small wrapper that imports that code when the
command runs. `--help`, the volume commands and the array API commands never load it
(tests/control/test_cli_imports.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from emulator.array.models import DEFAULT_MODEL, MODELS
from emulator.units import rate_arg, seconds_arg, size_arg

from . import array_commands, migration_commands, volume_commands
from .api_client import TOKEN_ENV


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockmig",
        description="Userspace block-device emulator with live migration between storage arrays over NBD.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_serve_file(sub)
    array = sub.add_parser("array", help="run an array, or show one")
    array_sub = array.add_subparsers(dest="array_command", metavar="ACTION", required=True)
    _add_array_serve(array_sub)
    array_commands.add_parsers(array_sub, sub)
    migration_commands.add_parsers(sub)
    volume_commands.add_parsers(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        rc: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`blockmig ... | head`): stop quietly, and point stdout at
        # /dev/null so that the flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        # Ctrl-C of a command that waits (`migrate --wait`, `migration wait`): a line, not a
        # traceback. A migration goes on: its array copies, and the next volume command
        # restarts the follower of one this process followed.
        print("blockmig: interrupted", file=sys.stderr)
        return 130
    return rc


# ---------------------------------------------------------------- commands loaded when they run
def _serve_file(args: argparse.Namespace) -> int:
    from emulator.array import serve_file

    return serve_file.main(args)


def _array_serve(args: argparse.Namespace) -> int:
    from emulator.daemon import main as daemon

    return daemon.main(args)


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.cmd_demo(args)


def _add_serve_file(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser(
        "serve-file",
        help="export a file (or block device) over NBD",
        description="Export PATH over NBD until SIGTERM/SIGINT. With --size, a missing "
        "PATH is created as a sparse file of that size.",
    )
    sp.add_argument("path", metavar="PATH")
    sp.add_argument(
        "--listen",
        default="127.0.0.1:10809",
        metavar="HOST:PORT",
        help="address to listen on (port 0 picks a free one; default %(default)s)",
    )
    sp.add_argument("--unix", metavar="SOCKET", help="also listen on this unix socket")
    sp.add_argument("--export", default="", metavar="NAME", help="export name (default: empty)")
    sp.add_argument("--description", default="", help="export description shown by nbdinfo (<= 4096 bytes)")
    sp.add_argument("--read-only", action="store_true", help="refuse writes (EPERM)")
    sp.add_argument(
        "--size", metavar="SIZE", type=size_arg, help="create PATH as a sparse file of SIZE (e.g. 1G)"
    )
    sp.set_defaults(func=_serve_file)


def _add_array_serve(array_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = array_sub.add_parser(
        "serve",
        help="run an array in the foreground",
        description="Run one emulated array: its LUNs as NBD exports (export name = LUN name) "
        "and a management API (JSON over HTTP, bearer token) on its own port.",
    )
    sp.add_argument("--name", required=True, help="array name")
    sp.add_argument("--data-dir", required=True, type=Path, help="where LUN files and metadata live")
    sp.add_argument(
        "--nbd-listen",
        default="127.0.0.1:10809",
        metavar="HOST:PORT",
        help="NBD address (port 0 picks a free one; default %(default)s)",
    )
    sp.add_argument(
        "--api-listen",
        default="127.0.0.1:8701",
        metavar="HOST:PORT",
        help="management API address (port 0 picks a free one; default %(default)s)",
    )
    sp.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=sorted(MODELS),
        help="array model: what it supports (default %(default)s)",
    )
    sp.add_argument(
        "--media",
        default="none",
        help="media latency model: none, ssd, hdd or fixed:MS (default %(default)s)",
    )
    sp.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="NAME=CAPACITY",
        help="a pool and its capacity, e.g. gold=10G (repeatable; default: one pool "
        "'default' as large as the free space of the data dir)",
    )
    sp.add_argument(
        "--token",
        help=f"API bearer token (default: ${TOKEN_ENV}, else generated into DATA_DIR/token at first start)",
    )
    sp.add_argument(
        "--source-retry-window",
        type=seconds_arg(positive=False),
        default=30.0,
        metavar="SECONDS",
        help="how long I/O that needs an unreachable migration source waits before "
        "failing with EIO (default %(default)s)",
    )
    sp.add_argument(
        "--migration-throttle",
        type=rate_arg,
        default=0.0,
        metavar="MBPS",
        help="copy rate of migrations onto this array that name none, e.g. those of `blockmig "
        "migrate` (MB/s; default %(default)s = unlimited)",
    )
    sp.add_argument("-v", "--verbose", action="store_true", help="log requests and connections")
    sp.set_defaults(func=_array_serve)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="the live-migration story end to end: two arrays, fio on a real block device, a migration",
        description="Start arrays A and B, make a volume with known data on A, attach it through "
        "nbdfuse + a loop device, run fio with verify on it, migrate it to B while fio runs, check "
        "the data (the known half's sha256 read from B, fio's verify) and compare IOPS before, "
        "during and after. Cleans up everything it started, also on failure or Ctrl-C.",
    )
    p.add_argument("--size", default="512M", type=size_arg, help="volume size (default %(default)s)")
    p.add_argument(
        "--fio-seconds",
        type=seconds_arg(positive=True),
        default=5.0,
        help="length of the fio run on A and of the read-through run on B (default %(default)s)",
    )
    p.add_argument(
        "--tail-seconds",
        type=seconds_arg(positive=False),
        default=2.0,
        help="fio keeps running this long on B after the migration succeeded (default %(default)s)",
    )
    p.add_argument("--media", default="ssd", help="media model of both arrays (default %(default)s)")
    p.add_argument("--keep", action="store_true", help="leave the arrays running and the work dir in place")
    p.add_argument(
        "--nbd-engine",
        action="store_true",
        help="fio talks NBD itself instead of using nbdfuse + a loop device (the fallback without them)",
    )
    p.add_argument("--work-dir", help="where state, logs and fio output go (default: a new temp dir)")
    p.set_defaults(func=_demo)


if __name__ == "__main__":
    sys.exit(main())
