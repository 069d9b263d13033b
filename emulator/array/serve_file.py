"""`blockmig serve-file`: export one plain or sparse file, like `nbdkit file`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from emulator.nbd.server import NbdServer, format_listen, serve_forever_loop
from emulator.units import parse_hostport, parse_size

from .file_backend import FileBackend


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    sp.add_argument("--description", default="", help="export description shown by nbdinfo")
    sp.add_argument("--read-only", action="store_true", help="refuse writes (EPERM)")
    sp.add_argument("--size", metavar="SIZE", help="create PATH as a sparse file of SIZE (e.g. 1G)")
    sp.set_defaults(func=main)


async def _serve(args: argparse.Namespace) -> int:
    host, port = parse_hostport(args.listen)
    size = parse_size(args.size) if args.size else None
    backend = FileBackend(args.path, read_only=args.read_only, create_size=size)
    server = NbdServer(default_export=args.export)
    server.add_export(args.export, backend, args.description, read_only=args.read_only)
    try:
        host, port = await server.listen_tcp(host, port)
        if args.unix:
            await server.listen_unix(args.unix)
        print(
            f"serving {args.path} ({backend.size} bytes) at {format_listen(host, port)}/{args.export}",
            flush=True,
        )
        if args.unix:
            print(f"serving at nbd+unix:///{args.export}?socket={args.unix}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.close()
        if not args.read_only:
            await backend.flush()
    finally:
        backend.close()
        if args.unix:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.unix)
    return 0


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    loop = serve_forever_loop()
    try:
        return loop.run_until_complete(_serve(args))
    except (OSError, ValueError) as e:
        print(f"blockmig serve-file: {e}", file=sys.stderr)
        return 1
    finally:
        loop.close()
