"""`blockmig array serve`: run one array in the foreground.

One event loop (uvloop) serves the array's LUNs over NBD and its management
API over HTTP. SIGTERM/SIGINT stop it cleanly (:func:`stop_array`): the API and NBD
listeners close, in-flight requests finish, every LUN is flushed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import sqlite3
import sys
from pathlib import Path

from aiohttp import web

from emulator import durable
from emulator.array.array import Array
from emulator.array.errors import ArrayError
from emulator.array.models import get_model, parse_media
from emulator.array.names import check_name, check_size
from emulator.array.open_files import raise_limit
from emulator.mirror.manager import MigrationManager
from emulator.mirror.migration import MigrationConfig
from emulator.nbd.server import NbdServer, serve_forever_loop, stop_event
from emulator.units import parse_hostport, parse_size

from .api import ApiContext, make_app

log = logging.getLogger("blockmig.daemon")
TOKEN_ENV = "BLOCKMIG_TOKEN"

#: seconds a stopping array waits, all told, on peers that do not answer (hosts' requests
#: in flight, the LUNs' last flushes through to their sources, the sources' connections)
STOP_GRACE = 5.0
#: seconds each step after the first still gets once the grace is spent (by a stuck host,
#: say): a source that answers does so in milliseconds
STOP_STEP_MIN = 1.0


def given_token(arg: str | None) -> str | None:
    """The token of ``--token`` or ``$BLOCKMIG_TOKEN`` (None: neither) as clients can send
    it: an HTTP header value loses its surrounding whitespace and cannot carry control
    characters, so with such a token (``--token "abc "``) the array started, and then
    refused every request, its own CLI's with the same token too. Whitespace around it
    goes (as from DATA_DIR/token); a token that is blank or holds control characters is
    a ValueError, which does not show it (a secret, and `blockmig up` prints the error)."""
    token = arg or os.environ.get(TOKEN_ENV)
    if not token:
        return None
    if not token.strip() or any(ord(c) < 32 or ord(c) == 127 for c in token.strip()):
        raise ValueError(
            f"the API token (--token or ${TOKEN_ENV}) cannot be sent in an HTTP header: "
            "use printable characters (e.g. letters, digits, '-', '_', '.')"
        )
    return token.strip()


def load_token(data_dir: Path, given: str | None) -> str:
    """``given`` (:func:`given_token`), else DATA_DIR/token, made the first time."""
    if given:
        return given
    path = data_dir / "token"
    try:
        token = path.read_text().strip()
        if token:
            return token
        path.unlink()  # empty: a crash cut its writing short (an empty token lets anyone in)
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        # Durable (data, then name) before clients read it: else a power cut could
        # leave the file empty, or gone, and the restarted array with another token.
        f.flush()
        os.fsync(f.fileno())
    durable.fsync_dir(data_dir)
    return token


def _url_host(host: str) -> str:
    """``host`` as a URL names it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def _parse_pools(specs: list[str]) -> dict[str, int]:
    pools = {}
    for spec in specs:
        name, sep, cap = spec.partition("=")
        if not sep:
            raise ValueError(f"--pool {spec!r}: use NAME=CAPACITY, e.g. gold=10G")
        pools[check_name("pool", name)] = check_size(parse_size(cap), f"capacity of pool {name!r}")
    return pools


async def serve(args: argparse.Namespace) -> int:
    nbd_host, nbd_port = parse_hostport(args.nbd_listen)
    api_host, api_port = parse_hostport(args.api_listen)
    model = get_model(args.model).with_media(parse_media(args.media))
    # checked before the data dir and its token are made: a refused start leaves nothing
    check_name("array", args.name)
    pools = _parse_pools(args.pool)
    given = given_token(args.token)
    data_dir: Path = args.data_dir.resolve()
    durable.make_dir(data_dir)  # the token goes there first
    token = load_token(data_dir, given)

    raise_limit()  # a file per LUN: 1024 would not hold a real array's LUNs
    server = NbdServer()
    array = Array(data_dir, args.name, model, server, pools)
    array.open()
    defaults = MigrationConfig(retry_window=args.source_retry_window, throttle=args.migration_throttle * 1e6)
    manager = MigrationManager(array, defaults)
    array.delete_hooks.append(manager.forget_lun)
    runner: web.AppRunner | None = None
    try:
        await manager.open()
        nbd_host, nbd_port = await server.listen_tcp(nbd_host, nbd_port)
        ctx = ApiContext(array, nbd_host, nbd_port, token, manager)
        runner = web.AppRunner(make_app(ctx), access_log=log if args.verbose else None)
        await runner.setup()
        site = web.TCPSite(runner, api_host, api_port)
        await site.start()
        api_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        runtime = {
            "name": array.name,
            "model": model.name,
            "pid": os.getpid(),
            # an IPv6 host in brackets, as in any URL (ArrayApi's http:// would not parse otherwise)
            "nbd": f"nbd://{_url_host(nbd_host)}:{nbd_port}",
            "api": f"http://{_url_host(api_host)}:{api_port}",
            "data_dir": str(data_dir),
        }
        stopped = stop_event()  # before runtime.json and the line that say it serves
        tmp = data_dir / "runtime.json.tmp"
        tmp.write_text(json.dumps(runtime))
        tmp.replace(data_dir / "runtime.json")
        print(
            f"array {array.name} (model {model.name}, media {model.media.name}): "
            f"nbd {runtime['nbd']} api {runtime['api']} luns {len(array.luns)} data {data_dir}",
            flush=True,
        )
        await stopped.wait()
        log.info("array %s: stopping", array.name)
    finally:
        manager.end_long_polls()
        if runner is not None:
            await runner.cleanup()
        await stop_array(server, manager, array)
        (data_dir / "runtime.json").unlink(missing_ok=True)
    return 0


async def stop_array(
    server: NbdServer, manager: MigrationManager, array: Array, grace: float = STOP_GRACE
) -> None:
    """Stop serving and close, in this order: the NBD server (hosts' requests in
    flight finish, their replies go out); the last flush of every LUN, while the
    migrations' sources are still connected (a migrating or remote LUN flushes
    through to its source: closed first, every such flush failed with "remote LUN
    ... is closed"); the migrations and remote LUNs (their source connections);
    the LUNs. What waits on a peer shares one ``grace`` rather than taking 5 s
    each in turn (a stopped source: 15 s, when `blockmig down` kills -9 at 15).
    Nothing acknowledged is lost by giving up on a source: a write to a migrating
    or remote LUN was acknowledged only once the source had it (I1)."""
    loop = asyncio.get_running_loop()
    stop_by = loop.time() + grace

    def left() -> float:
        return max(stop_by - loop.time(), STOP_STEP_MIN)

    await server.close(timeout=grace)
    await array.flush_luns(remote_timeout=left())
    await manager.close(timeout=left())
    await array.close(flush=False)


def main(args: argparse.Namespace) -> int:
    """`blockmig array serve`; its arguments are in control/cli.py, which loads this module
    only when the command runs."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"array {args.name}: %(name)s: %(message)s",
    )
    loop = serve_forever_loop()
    try:
        return loop.run_until_complete(serve(args))
    except (ArrayError, OSError, ValueError) as e:
        print(f"blockmig array serve: {e}", file=sys.stderr)
        return 1
    except sqlite3.Error as e:  # at start: array.db damaged (or not writable); named, never touched
        print(
            f"blockmig array serve: the array's database {args.data_dir.resolve() / 'array.db'} cannot be "
            f"used: {e}; it is left as it is (restore it from a backup; the LUNs' data is in the pools "
            "directory)",
            file=sys.stderr,
        )
        return 1
    finally:
        loop.close()
