"""The array's management API: JSON over HTTP, bearer token on every route.

Every error is a JSON body ``{"error": {"code": ..., "message": ...}}`` with
the matching status; nothing a client sends can produce a 5xx except a bug,
which is logged and answered with a JSON 500.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from emulator.array.array import Array, check_name, fence_export
from emulator.array.errors import ArrayError, Conflict, InvalidInput, TooLarge
from emulator.array.stats import exposition
from emulator.mirror.manager import MigrationManager
from emulator.units import parse_size

from .openapi import MAX_BODY, MAX_WAIT_S, SPEC

log = logging.getLogger("blockmig.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class ApiContext:
    """What the handlers need: the array, where its NBD server listens, the token."""

    def __init__(
        self,
        array: Array,
        nbd_host: str,
        nbd_port: int,
        token: str,
        migrations: MigrationManager | None = None,
    ) -> None:
        self.array = array
        self.migrations = migrations or MigrationManager(array)
        self.nbd_host = nbd_host
        self.nbd_port = nbd_port
        self.token = token

    def uri(self, export: str) -> str:
        host = f"[{self.nbd_host}]" if ":" in self.nbd_host else self.nbd_host
        return f"nbd://{host}:{self.nbd_port}/{export}"


CTX = web.AppKey("ctx", ApiContext)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ArrayError as e:
        return error_response(e.status, e.code, e.message)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(e.status, "http_error")
        msg = e.text if e.text and not e.text.startswith(str(e.status)) else e.reason
        resp = error_response(e.status, code, f"{request.method} {request.path}: {msg}")
        if "Allow" in e.headers:  # RFC 9110: a 405 names the methods allowed
            resp.headers["Allow"] = e.headers["Allow"]
        return resp
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error; see the array's log")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[CTX].token
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    # surrogateescape: bytes of the header that are not UTF-8 (a Latin-1 client) are kept
    # as surrogates, which a strict encode refused with a 500, without any token
    theirs = given.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(theirs, token.encode()):
        resp = error_response(
            401,
            "unauthorized",
            "missing or wrong bearer token: send 'Authorization: Bearer TOKEN' "
            "(the token is in the array's data dir, file 'token', unless set with --token)",
        )
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp
    return await handler(request)


async def _json_body(request: web.Request, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise TooLarge(f"request body is larger than {MAX_BODY} bytes")
    # read(n) returns what has come so far, not the whole body: a body that arrives in
    # pieces (TCP segments, HTTP chunks) is read to its end, up to one byte past the limit
    raw = b""
    while len(raw) <= MAX_BODY:
        piece = await request.content.read(MAX_BODY + 1 - len(raw))
        if not piece:
            break
        raw += piece
    if len(raw) > MAX_BODY:
        raise TooLarge(f"request body is larger than {MAX_BODY} bytes")
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise InvalidInput(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    try:
        # JSON may escape half a UTF-16 pair ("\udcff"): kept in a str, it fails whatever
        # encodes it later (an NBD export name, SQLite) with a 500
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InvalidInput("request body has a string that is not valid Unicode (a lone surrogate)") from None
    unknown = set(body) - allowed
    if unknown:
        raise InvalidInput(
            f"unknown field(s): {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}"
        )
    missing = required - set(body)
    if missing:
        raise InvalidInput(f"missing field(s): {', '.join(sorted(missing))}")
    return body


def _size(value: Any) -> int:
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as e:
            raise InvalidInput(str(e)) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"size must be bytes (an integer) or a string like '1G', not {value!r}")
    return value


def _lun_json(ctx: ApiContext, name: str) -> dict[str, Any]:
    lun = ctx.array.get_lun(check_name("LUN", name))
    info = ctx.array.lun_info(lun)
    info["uri"] = ctx.uri(lun.name)
    return info


async def get_array(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    info = ctx.array.info()
    info["nbd"] = {"host": ctx.nbd_host, "port": ctx.nbd_port}
    return web.json_response(info)


async def list_luns(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    return web.json_response([_lun_json(ctx, n) for n in sorted(ctx.array.luns)])


async def create_lun(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    body = await _json_body(request, {"name", "size", "pool"}, {"name", "size"})
    lun = ctx.array.create_lun(body["name"], _size(body["size"]), body.get("pool"))
    return web.json_response(_lun_json(ctx, lun.name), status=201)


async def get_lun(request: web.Request) -> web.Response:
    return web.json_response(_lun_json(request.app[CTX], request.match_info["name"]))


async def delete_lun(request: web.Request) -> web.Response:
    force_arg = request.query.get("force", "false").lower()
    if force_arg not in ("true", "false", "1", "0"):
        raise InvalidInput(f"force must be true or false, not {force_arg!r}")
    await request.app[CTX].array.delete_lun(request.match_info["name"], force=force_arg in ("true", "1"))
    return web.Response(status=204)


async def grow_lun(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    body = await _json_body(request, {"size"}, {"size"})
    lun = ctx.array.grow_lun(request.match_info["name"], _size(body["size"]))
    return web.json_response(_lun_json(ctx, lun.name))


async def lun_connection(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    lun = ctx.array.get_lun(check_name("LUN", request.match_info["name"]))
    return web.json_response(
        {
            "host": ctx.nbd_host,
            "port": ctx.nbd_port,
            "export": lun.name,
            "uri": ctx.uri(lun.name),
            "nbd_client": f"nbd-client {ctx.nbd_host} {ctx.nbd_port} /dev/nbd0 -N {lun.name}",
        }
    )


async def fence_lun(request: web.Request) -> web.Response:
    """Fence the LUN for a takeover; the answer names the holder's alias export."""
    ctx = request.app[CTX]
    body = await _json_body(request, {"holder"}, set()) if request.body_exists else {}
    holder = body.get("holder", "")
    if not isinstance(holder, str) or len(holder) > 256:
        raise InvalidInput(f"holder must be a string of at most 256 characters, not {holder!r}")
    fence, new = await ctx.array.fence_lun(request.match_info["name"], holder)
    alias = fence_export(fence.lun, fence.token)
    return web.json_response(
        {
            "lun": fence.lun,
            "holder": fence.holder,
            "since": fence.since,
            "export": alias,
            "uri": ctx.uri(alias),
        },
        status=201 if new else 200,
    )


async def unfence_lun(request: web.Request) -> web.Response:
    await request.app[CTX].array.unfence_lun(request.match_info["name"])
    return web.Response(status=204)


async def lun_stats(request: web.Request) -> web.Response:
    lun = request.app[CTX].array.get_lun(check_name("LUN", request.match_info["name"]))
    return web.json_response({"name": lun.name, "ops": lun.backend.stats.as_dict()})


async def start_migration(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    body = await _json_body(
        request, {"lun", "source", "pool", "mode", "throttle", "region_size"}, {"lun", "source"}
    )
    rs = body.get("region_size")
    m = await ctx.migrations.start(
        body["lun"],
        body["source"],
        body.get("pool"),
        body.get("mode"),
        body.get("throttle"),
        _size(rs) if rs is not None else None,
    )
    return web.json_response(m.status(), status=201)


async def move_lun(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    body = await _json_body(request, {"pool"}, {"pool"})
    m = await ctx.migrations.move(request.match_info["name"], body["pool"])
    return web.json_response(m.status(), status=202)


async def list_migrations(request: web.Request) -> web.Response:
    return web.json_response(request.app[CTX].migrations.list())


async def get_migration(request: web.Request) -> web.Response:
    mgr, name = request.app[CTX].migrations, request.match_info["name"]
    wait_arg = request.query.get("wait")
    if wait_arg is None:
        return web.json_response(mgr.status(name))
    try:
        wait = float(wait_arg)
    except ValueError:
        wait = math.nan
    if not 0 <= wait <= MAX_WAIT_S:  # NaN fails too
        raise InvalidInput(f"wait must be seconds from 0 to {MAX_WAIT_S}, not {wait_arg!r}")
    return web.json_response(await mgr.wait_status(name, wait))


async def update_migration(request: web.Request) -> web.Response:
    """Change a running migration's throttle, mode and/or source URI (only the source of one
    that ended with its LUN serving the source directly): applied at once, persisted."""
    mgr = request.app[CTX].migrations
    body = await _json_body(request, {"throttle", "mode", "source"}, set())
    return web.json_response(await mgr.update(request.match_info["name"], body))


async def migration_action(request: web.Request) -> web.Response:
    mgr = request.app[CTX].migrations
    m = mgr.get(request.match_info["name"])
    action = request.match_info["action"]
    try:
        if action == "pause":
            m.pause()
        elif action == "resume":
            m.resume()
        elif action == "cancel":
            await m.cancel()
        else:
            raise web.HTTPNotFound(text=f"no action {action!r}: use pause, resume or cancel")
    except ValueError as e:
        raise Conflict(str(e)) from None
    return web.json_response(m.status())


async def metrics(request: web.Request) -> web.Response:
    array = request.app[CTX].array
    luns = [(n, lun.backend.stats) for n, lun in array.luns.items()]  # LUNs come and go meanwhile
    body = await exposition(array.name, luns)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(SPEC)


def make_app(ctx: ApiContext) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, auth_middleware], client_max_size=MAX_BODY)
    app[CTX] = ctx
    app.router.add_get("/api/v1/array", get_array)
    app.router.add_get("/api/v1/luns", list_luns)
    app.router.add_post("/api/v1/luns", create_lun)
    app.router.add_get("/api/v1/luns/{name}", get_lun)
    app.router.add_delete("/api/v1/luns/{name}", delete_lun)
    app.router.add_post("/api/v1/luns/{name}/grow", grow_lun)
    app.router.add_get("/api/v1/luns/{name}/connection", lun_connection)
    app.router.add_get("/api/v1/luns/{name}/stats", lun_stats)
    app.router.add_post("/api/v1/luns/{name}/fence", fence_lun)
    app.router.add_delete("/api/v1/luns/{name}/fence", unfence_lun)
    app.router.add_post("/api/v1/luns/{name}/move", move_lun)
    app.router.add_post("/api/v1/migrations", start_migration)
    app.router.add_get("/api/v1/migrations", list_migrations)
    app.router.add_get("/api/v1/migrations/{name}", get_migration)
    app.router.add_patch("/api/v1/migrations/{name}", update_migration)
    app.router.add_post("/api/v1/migrations/{name}/{action}", migration_action)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app
