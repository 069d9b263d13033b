"""`blockmig serve-file`: export one plain or sparse file, like `nbdkit file`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from emulator.nbd.errors import BackendError
from emulator.nbd.server import NbdServer, format_listen, serve_forever_loop, stop_event
from emulator.units import parse_hostport

from .file_backend import FileBackend


async def _serve(args: argparse.Namespace) -> int:
    host, port = parse_hostport(args.listen)
    size = args.size
    # A file this run makes goes again if it never served it (a bad --export or
    # --description, an address in use): left, a rerun with another --size was
    # refused ("exists with size ..."), for a file nobody had asked to keep.
    creates = size is not None and not os.path.exists(args.path)
    backend = FileBackend(args.path, read_only=args.read_only, create_size=size)
    served = listening_unix = False
    try:
        server = NbdServer(default_export=args.export)
        server.add_export(args.export, backend, args.description, read_only=args.read_only)
        host, port = await server.listen_tcp(host, port)
        if args.unix:
            try:
                await server.listen_unix(args.unix)
                listening_unix = True
            except OSError as e:  # its own message names no path
                raise OSError(e.errno, f"cannot listen on {args.unix}: {e.strerror}") from None
        stopped = stop_event()  # before the line that says it serves
        served = True
        print(
            f"serving {args.path} ({backend.size} bytes) at {format_listen(host, port)}/{args.export}",
            flush=True,
        )
        if args.unix:
            print(f"serving at nbd+unix:///{args.export}?socket={args.unix}", flush=True)
        await stopped.wait()
        await server.close()
        if not args.read_only:
            await backend.flush()
    finally:
        backend.close()
        if creates and not served:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.path)
        if listening_unix:  # never another server's socket, one it could not take over
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.unix)
    return 0


def main(args: argparse.Namespace) -> int:
    """`blockmig serve-file`; its arguments are in control/cli.py, which loads this module
    only when the command runs."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    loop = serve_forever_loop()
    try:
        return loop.run_until_complete(_serve(args))
    except (OSError, ValueError, BackendError) as e:  # BackendError: the last flush failed
        print(f"blockmig serve-file: {e}", file=sys.stderr)
        return 1
    finally:
        loop.close()
