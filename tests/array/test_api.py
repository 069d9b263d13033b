"""The management API in-process: token on every route, JSON errors, a fuzzer.

An Array (sparse files in the test's tmp dir), its NbdServer and the aiohttp
app run on one event loop in a background thread, all bound to 127.0.0.1
port 0, and are stopped at the end of each test. The tests talk to them as a
real client does: HTTP with the stdlib's http.client, NBD with NbdClient.

The fuzzer is schemathesis driven by the API's own OpenAPI description
(emulator.daemon.openapi.SPEC): for every operation it sends schema-valid
and schema-violating requests (50 of each) with the right token and demands
no 5xx, a JSON error body on every 4xx, and a working array afterwards.
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import json
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from emulator.array.array import Array
from emulator.array.metadata import Metadata
from emulator.array.models import MODELS
from emulator.daemon.api import ApiContext, make_app
from emulator.daemon.main import stop_array
from emulator.daemon.openapi import SPEC
from emulator.mirror import manager, regions
from emulator.mirror.manager import MigrationManager
from emulator.nbd.client import NbdClient
from emulator.nbd.errors import RequestError
from emulator.nbd.server import NbdServer, serve_forever_loop
from tests.servers import nbdkit

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")
TOKEN = "s3cret-token_for.tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT = 5.0  # every HTTP request and loop call of the tests is bounded by this
KIB = 1024
MIB = 1 << 20
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


# =========================================================================== the array under test
@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> dict[str, str]:
        """The ``error`` object of a JSON error body; fails the test if the shape is wrong."""
        ctype = self.headers.get("Content-Type", "")
        assert ctype.startswith("application/json"), f"{self.status}: error is {ctype!r}: {self.body!r}"
        doc = self.json()
        assert isinstance(doc, dict) and set(doc) == {"error"}, doc
        err = doc["error"]
        assert isinstance(err, dict) and {"code", "message"} <= set(err), doc
        assert isinstance(err["code"], str) and err["code"], doc
        assert isinstance(err["message"], str) and err["message"], doc
        return err


class ApiThread:
    """Array + NbdServer + migrations + API app on their own event loop in a
    daemon thread, wired as `blockmig array serve` wires them."""

    def __init__(self, data_dir: Path, pools: dict[str, int], model: str = "unified") -> None:
        self.data_dir = data_dir
        self.pools = pools
        self.model = MODELS[model]
        self.loop = serve_forever_loop()
        self._thread = threading.Thread(target=self._run, name="array-api", daemon=True)
        self.server = NbdServer()
        self.array = Array(data_dir, "arr1", self.model, self.server, pools)
        self.runner: web.AppRunner | None = None
        self.nbd_port = 0
        self.api_port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.array.open()
        self.migrations = MigrationManager(self.array)
        self.array.delete_hooks.append(self.migrations.forget_lun)
        await self.migrations.open()
        host, self.nbd_port = await self.server.listen_tcp("127.0.0.1", 0)
        self.ctx = ApiContext(self.array, host, self.nbd_port, TOKEN, self.migrations)
        self.runner = web.AppRunner(make_app(self.ctx))
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.api_port = self.runner.addresses[0][1]

    def start(self) -> ApiThread:
        self._thread.start()
        self.call(self._start(), timeout=15)
        return self

    async def _stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if hasattr(self, "migrations"):
            await stop_array(self.server, self.migrations, self.array)
        else:
            await self.server.close()
            await self.array.close()

    def stop(self) -> None:
        try:
            if self._thread.is_alive():
                self.call(self._stop(), timeout=15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            assert not self._thread.is_alive(), "API thread did not stop"
            self.loop.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def nbd_uri(self, export: str) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}/{export}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict[str, Any] | list[Any] | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> Reply:
        hdrs = dict(AUTH) if auth else {}
        hdrs.update(headers or {})
        if isinstance(body, dict | list):
            body = json.dumps(body)
            hdrs.setdefault("Content-Type", "application/json")
        if isinstance(body, str):
            body = body.encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=TIMEOUT)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return Reply(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def create(self, name: str, size: int | str = MIB, pool: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "size": size}
        if pool is not None:
            body["pool"] = pool
        r = self.request("POST", "/api/v1/luns", body)
        assert r.status == 201, (r.status, r.body)
        doc: dict[str, Any] = r.json()
        return doc


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiThread]:
    t = ApiThread(tmp_path / "array", {"default": 64 * MIB, "small": 256 * KIB})
    t.start()
    try:
        yield t
    finally:
        t.stop()


async def nbd_roundtrip(uri: str, offset: int = 0, payload: bytes = b"") -> bytes:
    """Write ``payload`` at ``offset`` over NBD, flush, read it back."""
    payload = payload or os.urandom(64 * KIB)
    client = await NbdClient.connect(uri, timeout=TIMEOUT)
    try:
        await asyncio.wait_for(client.write(offset, payload), TIMEOUT)
        await asyncio.wait_for(client.flush(), TIMEOUT)
        return bytes(await asyncio.wait_for(client.read(offset, len(payload)), TIMEOUT))
    finally:
        await client.close()


# =========================================================================== helpers on the spec
def resolve(schema: Any) -> Any:
    while isinstance(schema, dict) and "$ref" in schema:
        node: Any = SPEC
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
}


def check_schema(value: Any, schema: Any, where: str = "$") -> None:
    """A small validator for the subset of JSON Schema SPEC uses for responses."""
    schema = resolve(schema)
    t = schema.get("type")
    if t is not None:
        ok = isinstance(value, TYPES[t]) and not (t in ("integer", "number") and isinstance(value, bool))
        assert ok, f"{where}: {value!r} is not {t}"
    if isinstance(value, dict):
        missing = set(schema.get("required", ())) - set(value)
        assert not missing, f"{where}: missing {sorted(missing)} in {value!r}"
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                check_schema(value[k], sub, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            check_schema(item, schema["items"], f"{where}[{i}]")


def operations() -> list[tuple[str, str]]:
    return [(path, m) for path, item in SPEC["paths"].items() for m in item if m in METHODS]


def served_routes(api: ApiThread) -> list[tuple[str, str]]:
    """(path template, method) of every route the running app serves, HEAD aside."""
    assert api.runner is not None
    out = []
    for route in api.runner.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD":
            out.append((str(path), route.method.lower()))
    return sorted(out)


# =========================================================================== (a) the token
WRONG_AUTH = {
    "no header": None,
    "empty header": "",
    "wrong token": "Bearer not-the-token",
    "token prefix": f"Bearer {TOKEN[:-1]}",
    "token plus junk": f"Bearer {TOKEN}x",
    "basic scheme": f"Basic {TOKEN}",
    "token without scheme": TOKEN,
    "scheme without token": "Bearer",
    "empty token": "Bearer ",
    # Latin-1 on the wire, no UTF-8: was a 500 (and a traceback logged) for anyone, no token needed
    "token not UTF-8": "Bearer t\xf6k",
}


@pytest.mark.parametrize("how", list(WRONG_AUTH))
def test_token_enforced_on_every_operation(api: ApiThread, how: str) -> None:
    api.create("lun0")
    header = WRONG_AUTH[how]
    ops = operations()
    assert len(ops) >= 9, ops  # the description covers the whole API
    # also every route the app serves (described or not), and ones that do not exist
    extra = [*served_routes(api), ("/api/v1/nope", "get"), ("/api/v1/luns", "put")]
    for path, method in [*ops, *extra]:
        url = path.replace("{name}", "lun0").replace("{action}", "cancel")
        body = {"name": "evil", "size": MIB} if method == "post" else None
        hdrs = {} if header is None else {"Authorization": header}
        r = api.request(method.upper(), url, body, headers=hdrs, auth=False)
        assert r.status == 401, f"{method.upper()} {url} with {how}: {r.status} {r.body!r}"
        assert r.headers.get("WWW-Authenticate", "").lower().startswith("bearer"), r.headers
        assert r.error()["code"] == "unauthorized"
        assert "Authorization: Bearer" in r.error()["message"]
    # nothing changed behind the refusals
    r = api.request("GET", "/api/v1/luns")
    assert [lun["name"] for lun in r.json()] == ["lun0"]
    assert api.array.get_lun("lun0").size == MIB


def test_token_enforced_on_head(api: ApiThread) -> None:
    for path, method in operations():
        if method == "get":
            url = path.replace("{name}", "x")
            assert api.request("HEAD", url, auth=False).status == 401, url
            assert api.request("HEAD", url).status != 401, url


# how to call an operation right: (path name, body); the LUN operations must succeed
RECIPES: dict[tuple[str, str], tuple[str, dict[str, Any] | None]] = {
    ("/api/v1/luns", "post"): ("", {"name": "made", "size": "1M", "pool": "small"}),
    ("/api/v1/luns/{name}/grow", "post"): ("keep", {"size": 4 * MIB}),
    ("/api/v1/luns/{name}", "delete"): ("made", None),
}
MUST_SUCCEED = {"/api/v1/array", "/api/v1/luns", "/api/v1/luns/{name}", "/metrics"}


def test_right_token_works_on_every_operation(api: ApiThread) -> None:
    """Every operation of the description, called with the token, gets past it
    and answers a status its description declares; the LUN ones succeed."""
    api.create("keep", 2 * MIB)
    succeeded = set()
    # the delete last: it removes the LUN the create made
    for path, method in sorted(operations(), key=lambda op: op[1] == "delete"):
        op = SPEC["paths"][path][method]
        name, body = RECIPES.get((path, method), ("keep", {} if method == "post" else None))
        url = path.replace("{name}", name).replace("{action}", "pause")
        r = api.request(method.upper(), url, body)
        assert r.status != 401, (method, url, r.body)
        assert str(r.status) in op["responses"], f"{method.upper()} {url}: undeclared {r.status} {r.body!r}"
        content = op["responses"][str(r.status)].get("content", {})
        if "application/json" in content:
            check_schema(r.json(), content["application/json"]["schema"], f"{method} {path}")
        elif "text/plain" in content:
            assert r.headers["Content-Type"].startswith("text/plain"), r.headers
        if r.status < 300:
            succeeded.add((path, method))
        if (path, method) in RECIPES or path in MUST_SUCCEED or path.endswith(("/connection", "/stats")):
            assert r.status < 300, f"{method.upper()} {url}: {r.status} {r.body!r}"
    assert set(RECIPES) <= succeeded
    # the effects are real
    assert api.array.get_lun("keep").size == 4 * MIB
    assert "made" not in api.array.luns
    # case of the scheme does not matter (RFC 7235), surrounding blanks neither
    for header in (f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer {TOKEN}  "):
        r = api.request("GET", "/api/v1/array", headers={"Authorization": header}, auth=False)
        assert r.status == 200, (header, r.body)
    r = api.request("GET", "/openapi.json")
    assert r.status == 200 and r.json() == json.loads(json.dumps(SPEC))


def test_every_route_is_described(api: ApiThread) -> None:
    """The app serves what the description lists (plus the description itself)."""
    described = set(operations()) | {("/openapi.json", "get")}
    served = set(served_routes(api))
    assert served - described == set(), "served but not in the OpenAPI description"
    assert described - served == set(), "described but not served"


# =========================================================================== (b) errors
def meta_of(api: ApiThread) -> Metadata:
    meta = api.array.meta
    assert meta is not None, "the array is not open"
    return meta


def expect_error(r: Reply, status: int, code: str | None = None, *words: str) -> dict[str, str]:
    assert r.status == status, f"want {status}, got {r.status}: {r.body!r}"
    err = r.error()
    if code is not None:
        assert err["code"] == code, err
    for w in words:
        assert w in err["message"], (w, err)
    return err


def create_raw(api: ApiThread, body: bytes | str, ctype: str = "application/json") -> Reply:
    return api.request("POST", "/api/v1/luns", body, headers={"Content-Type": ctype})


@pytest.mark.parametrize(
    "body, words",
    [
        (b"{", ["not valid JSON"]),
        (b'{"name": "a", "size": 512', ["not valid JSON"]),
        (b"{'name': 'a'}", ["not valid JSON"]),
        (b'{"name": "a", "size": 512}trailing', ["not valid JSON"]),
        (b"\xff\xfe{}", ["not valid JSON"]),  # not UTF-8
        (b"", ["JSON object"]),  # no body at all
        (b"null", ["JSON object"]),
        (b"[]", ["JSON object"]),
        (b'[{"name": "a", "size": 512}]', ["JSON object"]),
        (b'"lun"', ["JSON object"]),
        (b"42", ["JSON object"]),
        (b'{"name": "a", "size": 512, "color": "red"}', ["unknown field", "color"]),
        (b'{"name": "a", "size": 512, "Name": "b"}', ["unknown field", "Name"]),
        (b'{"name": "a"}', ["missing", "size"]),
        (b'{"size": 512}', ["missing", "name"]),
        (b"{}", ["missing"]),
        (b'{"name": "a", "size": 1e3}', ["size"]),
        (b'{"name": "a", "size": NaN}', ["size"]),
        (b'{"name": "a", "size": 1' + b"0" * 5000 + b"}", []),  # past int's digit limit
    ],
)
def test_create_bad_body(api: ApiThread, body: bytes, words: list[str]) -> None:
    expect_error(create_raw(api, body), 400, "invalid", *words)
    assert api.array.luns == {}


def test_create_body_too_large(api: ApiThread) -> None:
    body = json.dumps({"name": "a", "size": 512, "pad": "x" * (70 * KIB)})
    expect_error(create_raw(api, body), 413, "too_large", "larger than 65536 bytes")
    assert api.array.luns == {}


BODY_OPS = [
    (method.upper(), path)
    for path, item in SPEC["paths"].items()
    for method, op in item.items()
    if method in METHODS and "requestBody" in op
]


@pytest.mark.parametrize("method, path", BODY_OPS, ids=[f"{m} {p}" for m, p in BODY_OPS])
def test_every_body_past_the_limit_is_413(api: ApiThread, method: str, path: str) -> None:
    """Regression (was a bug): a body past the API's limit was a 400 'invalid'; HTTP
    has 413 Content Too Large for it (RFC 9110 section 15.5.14), as aiohttp answers
    for its own limit, and the OpenAPI description declares it on each operation
    that takes a body."""
    api.create("a", MIB)
    body = json.dumps({"pad": "x" * (70 * KIB)})
    r = api.request(method, path.replace("{name}", "a"), body, headers={"Content-Type": "application/json"})
    expect_error(r, 413, "too_large", "larger than 65536 bytes")
    op = SPEC["paths"][path][method.lower()]
    assert "413" in op["responses"], op["operationId"]
    assert set(api.array.luns) == {"a"} and api.array.get_lun("a").size == MIB


def test_create_body_too_large_chunked(api: ApiThread) -> None:
    """No Content-Length: the limit still holds while reading."""
    conn = http.client.HTTPConnection("127.0.0.1", api.api_port, timeout=TIMEOUT)
    try:
        chunks = iter([b'{"name": "a", "size": 512, "pad": "', b"x" * (70 * KIB), b'"}'])
        conn.request("POST", "/api/v1/luns", body=chunks, headers=AUTH, encode_chunked=True)
        resp = conn.getresponse()
        r = Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()
    expect_error(r, 413, "too_large", "larger than 65536 bytes")
    assert api.array.luns == {}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_create_body_in_pieces(api: ApiThread, chunked: bool) -> None:
    """Regression (was a bug): a valid body that reaches the server in more than one piece
    (TCP segments over a real network, HTTP chunks) was read only up to its first piece
    and refused as "not valid JSON"."""
    body = json.dumps({"name": "a", "size": 512}).encode()

    def pieces() -> Iterator[bytes]:
        yield body[:10]
        time.sleep(0.2)  # the server reads what came so far meanwhile
        yield body[10:]

    headers = dict(AUTH, **{"Content-Type": "application/json"})
    if not chunked:
        headers["Content-Length"] = str(len(body))
    conn = http.client.HTTPConnection("127.0.0.1", api.api_port, timeout=TIMEOUT)
    try:
        conn.request("POST", "/api/v1/luns", body=pieces(), headers=headers, encode_chunked=chunked)
        resp = conn.getresponse()
        r = Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()
    assert r.status == 201, (r.status, r.body)
    assert set(api.array.luns) == {"a"}


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/api/v1/migrations", {"lun": "mig", "source": "nbd://127.0.0.1:1/\udcff"}),
        ("POST", "/api/v1/migrations", {"lun": "mig", "source": "nbd://\ud800:1/x"}),
        ("POST", "/api/v1/luns/lun0/fence", {"holder": "\udcff"}),
    ],
)
def test_a_lone_surrogate_in_a_json_string_is_400(
    api: ApiThread, caplog: pytest.LogCaptureFixture, method: str, path: str, body: dict[str, Any]
) -> None:
    """Regression (was a bug): JSON lets a string escape half a UTF-16 pair ("\\udcff", as
    json.dumps writes a command line's undecodable byte); Python keeps it, and whatever
    encoded it as UTF-8 (an NBD export name, SQLite) raised: a 500 and a traceback."""
    api.create("lun0")
    raw = json.dumps(body)  # ASCII: the surrogate as its escape
    r = api.request(method, path, raw, headers={"Content-Type": "application/json"})
    expect_error(r, 400, "invalid", "not valid Unicode")
    assert "internal error" not in caplog.text
    assert set(api.array.luns) == {"lun0"} and "lun0" not in api.array.fences


def test_deeply_nested_json_is_400(api: ApiThread, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (was a bug): nesting deeper than Python's recursion limit makes json.loads raise
    RecursionError, which _json_body does not catch: the API answers 500."""
    for body in (b"[" * 20000, b'{"name": ' + b"[" * 20000 + b"]" * 20000 + b', "size": 512}'):
        with caplog.at_level(logging.ERROR, "blockmig.api"):
            r = create_raw(api, body)
        expect_error(r, 400, "invalid")
    assert api.array.luns == {}


BAD_NAMES = [
    "",
    ".",
    "..",
    "../etc",
    "../../etc/passwd",
    "a/b",
    "/abs",
    "-lead",
    "_lead",
    ".hidden",
    "x" * 65,
    "sp ace",
    "nul\x00",
    "tab\t",
    "uni\u00e9",
    "new\nline",
    "a\\b",
    "a%2Fb",
    "trailing\n",  # "$" in a regex matches before a last newline
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_create_bad_name(api: ApiThread, name: str) -> None:
    files_before = sorted(api.data_dir.parent.rglob("*"))
    expect_error(api.request("POST", "/api/v1/luns", {"name": name, "size": MIB}), 400, "invalid", "name")
    expect_error(
        api.request("POST", "/api/v1/luns", {"name": "ok", "size": MIB, "pool": name}), 400, "invalid"
    )
    assert api.array.luns == {}
    # no file was made, inside the data dir or out of it
    assert sorted(api.data_dir.parent.rglob("*")) == files_before


@pytest.mark.parametrize("value", [123, 1.5, True, None, ["a"], {"n": "a"}])
def test_create_name_not_a_string(api: ApiThread, value: Any) -> None:
    expect_error(api.request("POST", "/api/v1/luns", {"name": value, "size": MIB}), 400, "invalid")
    assert api.array.luns == {}


def test_create_name_longest(api: ApiThread) -> None:
    name = "a" + "b._-9" * 12 + "xyz"
    assert len(name) == 64
    assert api.create(name)["name"] == name


# path spellings of bad names; the raw path goes on the wire as written
BAD_PATH_NAMES = ["..%2Fetc", "..%2F..%2Fetc%2Fpasswd", "%2E%2E", ".hidden", "x" * 65, "a%20b", "-x"]


@pytest.mark.parametrize("raw", BAD_PATH_NAMES)
def test_bad_name_in_path(api: ApiThread, raw: str) -> None:
    api.create("lun0")
    # operations that change something validate the name first
    expect_error(api.request("POST", f"/api/v1/luns/{raw}/grow", {"size": 2 * MIB}), 400, "invalid", "name")
    expect_error(api.request("DELETE", f"/api/v1/luns/{raw}"), 400, "invalid", "name")
    # read-only views answer 400 or 404: either way a JSON error, never a file
    for sub in ("", "/connection", "/stats"):
        r = api.request("GET", f"/api/v1/luns/{raw}{sub}")
        assert r.status in (400, 404), (sub, r.status, r.body)
        r.error()
    assert list(api.array.luns) == ["lun0"]


def test_slash_in_path_name(api: ApiThread) -> None:
    api.create("a")
    for method, path in [
        ("GET", "/api/v1/luns/a/b"),
        ("DELETE", "/api/v1/luns/a/b"),
        ("GET", "/api/v1/luns/../array"),
        ("POST", "/api/v1/luns/a/b/grow"),
    ]:
        r = api.request(method, path, {"size": 2 * MIB} if method == "POST" else None)
        assert r.status in (400, 404), (method, path, r.status)
        r.error()
    assert api.array.get_lun("a").size == MIB


BAD_SIZES: list[Any] = [
    0,
    -512,
    -1,
    1,
    511,
    513,
    1000,
    1.5,
    512.0,
    True,
    False,
    None,
    [512],
    {"bytes": 512},
    "",
    "1X",
    "-1G",
    "1.1K",  # 1126.4 bytes
    "1 2",
    "0",
    "0K",
    "513",
    "0x200",
    "1e3",
    "G",
    "1GG",
    "2P",  # more than the largest LUN
    2**51,
    2**64,
    2**200,
]


@pytest.mark.parametrize("size", BAD_SIZES, ids=[repr(s)[:20] for s in BAD_SIZES])
def test_create_bad_size(api: ApiThread, size: Any) -> None:
    expect_error(api.request("POST", "/api/v1/luns", {"name": "a", "size": size}), 400, "invalid")
    assert api.array.luns == {}
    assert api.array.meta is not None and api.array.meta.luns() == []


@pytest.mark.parametrize("size", ["9" * 400, "1" + "0" * 309 + "P", "1" * 5000])
def test_create_absurd_size_string_is_400(api: ApiThread, size: str) -> None:
    """Regression (was a bug): a size string whose float value is infinite makes units.parse_size
    call int(inf) -> OverflowError, which _size does not catch: the API answers 500."""
    expect_error(api.request("POST", "/api/v1/luns", {"name": "a", "size": size}), 400, "invalid")
    assert api.array.luns == {}


@pytest.mark.parametrize(
    "size, want", [(512, 512), ("512", 512), ("1.5K", 1536), ("64K", 65536), ("1M", MIB)]
)
def test_create_good_sizes(api: ApiThread, size: Any, want: int) -> None:
    lun = api.create("a", size)
    assert lun["size"] == want
    assert api.array.get_lun("a").file.size == want


@pytest.mark.parametrize("size", [0, -512, 1000, "1X", True, False, "", None, 1.5, 512.0, 2**51])
def test_grow_bad_size(api: ApiThread, size: Any) -> None:
    api.create("a", MIB)
    expect_error(api.request("POST", "/api/v1/luns/a/grow", {"size": size}), 400, "invalid")
    assert api.array.get_lun("a").size == MIB


def test_grow_errors(api: ApiThread) -> None:
    api.create("a", MIB)
    expect_error(api.request("POST", "/api/v1/luns/a/grow", {"size": 512}), 400, "invalid", "shrink")
    expect_error(api.request("POST", "/api/v1/luns/a/grow", {}), 400, "invalid", "size")
    expect_error(api.request("POST", "/api/v1/luns/a/grow", {"size": MIB, "x": 1}), 400, "invalid", "x")
    expect_error(api.request("POST", "/api/v1/luns/a/grow", b"{"), 400, "invalid", "JSON")
    expect_error(api.request("POST", "/api/v1/luns/a/grow", b"[]"), 400, "invalid")
    expect_error(api.request("POST", "/api/v1/luns/nope/grow", {"size": MIB}), 404, "not_found", "nope")
    r = api.request("POST", "/api/v1/luns/a/grow", {"size": MIB})  # same size: a no-op
    assert r.status == 200 and r.json()["size"] == MIB
    assert api.array.get_lun("a").size == MIB


def _fs_holds_1pib(directory: Path) -> bool:
    """Whether the tmp filesystem allows a 1 PiB sparse file (ext4 does not)."""
    probe = directory / "probe.img"
    fd = os.open(probe, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 1 << 50)
        return True
    except OSError as e:
        assert e.errno in (errno.EFBIG, errno.EINVAL), e
        return False
    finally:
        os.close(fd)
        probe.unlink()


def test_size_beyond_filesystem_is_507(api: ApiThread, tmp_path: Path) -> None:
    """Thin LUNs never fail for the pool's capacity at create time; only a size
    the filesystem cannot hold (e.g. 1 PiB on ext4) does, with 507."""
    if _fs_holds_1pib(tmp_path):
        pytest.skip("the tmp filesystem holds a 1 PiB sparse file")
    big = 1 << 50
    expect_error(api.request("POST", "/api/v1/luns", {"name": "big", "size": big}), 507, "no_space", "big")
    assert "big" not in api.array.luns
    assert api.array.meta is not None and [r.name for r in api.array.meta.luns()] == []
    # the name is free again
    assert api.create("big", MIB)["size"] == MIB
    expect_error(api.request("POST", "/api/v1/luns/big/grow", {"size": big}), 507, "no_space", "big")
    assert api.array.get_lun("big").size == MIB
    assert api.array.get_lun("big").file.size == MIB
    assert [(r.name, r.size) for r in api.array.meta.luns()] == [("big", MIB)]


def test_failed_create_leaves_no_file(api: ApiThread, tmp_path: Path) -> None:
    """Regression (was a bug): when ftruncate fails after FileBackend created the file
    (O_CREAT|O_EXCL), the empty file stays in the pool directory."""
    if _fs_holds_1pib(tmp_path):
        pytest.skip("the tmp filesystem holds a 1 PiB sparse file")
    r = api.request("POST", "/api/v1/luns", {"name": "big", "size": 1 << 50})
    assert r.status == 507
    leftovers = sorted(p.name for p in (api.data_dir / "pools").rglob("*.img"))
    assert leftovers == []


@contextmanager
def file_in_place_of(d: Path) -> Iterator[None]:
    """A regular file where the directory ``d`` was (ENOTDIR below it); ``d`` back after."""
    aside = d.with_name(d.name + ".aside")
    d.rename(aside)
    d.write_bytes(b"not a directory")
    try:
        yield
    finally:
        d.unlink()
        aside.rename(d)


@contextmanager
def read_only(d: Path) -> Iterator[None]:
    """``d`` bind-mounted read-only over itself (EROFS below it); skips where this
    process may not mount."""

    def run(*args: str) -> bool:
        return (
            subprocess.run(["mount", *args, str(d), str(d)], capture_output=True, timeout=10).returncode == 0
        )

    if not run("--bind"):
        pytest.skip("cannot bind-mount here (needs root and CAP_SYS_ADMIN)")
    try:
        if not run("-o", "remount,bind,ro"):
            pytest.skip("cannot remount a bind mount read-only here")
        yield
    finally:
        subprocess.run(["umount", str(d)], capture_output=True, timeout=10, check=True)


@pytest.mark.parametrize(
    "broken, name",
    [(file_in_place_of, "ENOTDIR"), (read_only, "EROFS")],
    ids=["pool-dir-is-a-file", "pool-dir-read-only"],
)
def test_a_create_that_fails_for_another_reason_than_room_is_500_and_leaves_nothing(
    api: ApiThread, broken: Callable[[Path], AbstractContextManager[None]], name: str
) -> None:
    """Regression (was a bug): every OSError of the LUN file's create answered 507
    no_space ("Not a directory", "Read-only file system"): a client told to free room
    would free some and try again for nothing. A full file system (ENOSPC, EDQUOT, or
    EFBIG: a size it cannot hold) is still 507; any other error is the array's own
    storage failing, a 500 that names the errno without the array's paths. Nothing
    is left of the LUN, and the other LUNs, of its pool too, keep working."""
    api.create("before", MIB, pool="small")
    api.create("elsewhere", MIB)
    pool_dir = api.data_dir / "pools" / "small"
    with broken(pool_dir):
        r = api.request("POST", "/api/v1/luns", {"name": "x", "size": MIB, "pool": "small"})
        err = expect_error(r, 500, "error", "cannot create the file of LUN 'x'", f"({name})")
        assert str(api.data_dir) not in err["message"] and "x.img" not in err["message"]
        assert "x" not in api.array.luns and [row.name for row in meta_of(api).luns()] == [
            "before",
            "elsewhere",
        ]
        for lun in ("before", "elsewhere"):
            assert api.call(nbd_roundtrip(api.nbd_uri(lun))) != b""
    assert not (pool_dir / "x.img").exists()
    assert api.create("x", MIB, pool="small")["state"] == "ready"  # the name is free
    assert api.call(nbd_roundtrip(api.nbd_uri("x"))) != b""


def test_a_takeover_whose_lun_file_cannot_be_created_is_500_and_leaves_nothing(api: ApiThread) -> None:
    """A takeover creates its LUN as a create does: the same 500 (was 507 no_space),
    declared in the OpenAPI description, and no LUN nor migration is left."""
    api.create("src", MIB)
    with file_in_place_of(api.data_dir / "pools" / "small"):
        r = api.request(
            "POST", "/api/v1/migrations", {"lun": "t", "source": api.nbd_uri("src"), "pool": "small"}
        )
        expect_error(r, 500, "error", "cannot create the file of LUN 't'", "(ENOTDIR)")
    assert "500" in SPEC["paths"]["/api/v1/migrations"]["post"]["responses"]
    assert "t" not in api.array.luns and [row.name for row in meta_of(api).luns()] == ["src"]
    assert api.call(_rows(api.array)) == [] and api.request("GET", "/api/v1/migrations").json() == []
    assert api.call(nbd_roundtrip(api.nbd_uri("src"))) != b""


def test_a_grow_that_fails_for_another_reason_than_room_is_500(
    api: ApiThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grow's ftruncate, as the create: EIO was a 507 no_space too. Its size and
    its row stay as they were."""
    api.create("g", MIB)
    fd = api.array.get_lun("g").file.fd
    real = os.ftruncate

    def failing(f: int, size: int) -> None:
        if f == fd:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(f, size)

    monkeypatch.setattr(os, "ftruncate", failing)
    r = api.request("POST", "/api/v1/luns/g/grow", {"size": 2 * MIB})
    expect_error(r, 500, "error", "cannot grow LUN 'g'", "(EIO)")
    monkeypatch.undo()
    assert api.array.get_lun("g").size == MIB and api.array.get_lun("g").file.size == MIB
    assert [(row.name, row.size) for row in meta_of(api).luns()] == [("g", MIB)]
    assert api.request("POST", "/api/v1/luns/g/grow", {"size": 2 * MIB}).status == 200


def test_a_full_metadata_file_system_is_507_and_changes_nothing(api: ApiThread) -> None:
    """Regression (was a bug): when the file system under array.db is full (a thin pool
    larger than its file system, filled by hosts' writes), SQLite's "database or disk
    is full" answered every create with a 500 "internal error" and a traceback in the
    log. It is a 507 that says so, and nothing is left of the LUN. SQLite's
    max_page_count makes the same error, SQLITE_FULL, without filling a disk."""
    meta = meta_of(api)

    async def limit(pages: int | None) -> None:
        if pages is None:
            pages = meta.db.execute("PRAGMA page_count").fetchone()[0]
        meta.db.execute(f"PRAGMA max_page_count={pages}")

    api.create("before", MIB)
    api.call(limit(None))  # from now on, no page more
    r = None
    for i in range(500):  # rows fill the last page the database has
        r = api.request("POST", "/api/v1/luns", {"name": f"lun{i}", "size": MIB})
        if r.status != 201:
            break
    assert r is not None
    expect_error(r, 507, "no_space", "full", "array.db")
    refused = f"lun{i}"
    assert refused not in api.array.luns
    assert refused not in [row.name for row in meta.luns()]
    assert not list((api.data_dir / "pools").rglob(f"{refused}.img"))
    api.call(limit(1 << 30))  # room again: the same create works, and the array with it
    assert api.create(refused, MIB)["state"] == "ready"
    assert api.call(nbd_roundtrip(api.nbd_uri(refused))) != b""


def test_a_migration_that_fails_to_start_leaves_no_record(
    api: ApiThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A takeover whose start fails leaves neither its LUN nor its migration; a pool move
    whose start fails leaves the LUN ready where it was, without a migration either way."""
    from emulator.mirror.migration import Migration
    from emulator.nbd.errors import BackendError

    failure: list[Exception] = [BackendError(errno.EIO, "injected start failure")]

    async def broken_start(self: Migration, *args: Any, **kwargs: Any) -> None:
        raise failure[0]

    def rows() -> list[Any]:
        return api.call(_rows(api.array))

    api.create("src", MIB)
    api.create("mover", MIB)
    monkeypatch.setattr(Migration, "start", broken_start)

    r = api.request("POST", "/api/v1/migrations", {"lun": "taken", "source": api.nbd_uri("src")})
    expect_error(r, 400, None, "injected start failure")
    assert "taken" not in api.array.luns and "taken" not in [x.name for x in meta_of(api).luns()]
    assert rows() == []

    # A move's failure is the array's own (500, or 507 for a full file system), not the
    # client's (a takeover's is: 400), and it says what failed.
    for exc, status, code in [
        (BackendError(errno.EIO, "injected start failure"), 500, "error"),
        (OSError(errno.ENOSPC, "injected: no space left"), 507, "no_space"),
        # a quota, or a size the file system cannot hold, is no room either
        (OSError(errno.EDQUOT, "injected: quota"), 507, "no_space"),
        (BackendError(errno.EFBIG, "injected: too big"), 507, "no_space"),
        # the array's paths stay in its log
        (OSError(errno.EIO, "injected I/O error", "/srv/array/pools/small/mover.img"), 500, "error"),
    ]:
        failure[0] = exc
        r = api.request("POST", "/api/v1/luns/mover/move", {"pool": "small"})
        err = expect_error(r, status, code, "cannot move LUN 'mover' to pool 'small'", "injected")
        assert "/srv/array" not in err["message"], err
        lun = api.array.get_lun("mover")
        assert (lun.state, lun.pool) == ("ready", "default")
        assert [x.state for x in meta_of(api).luns() if x.name == "mover"] == ["ready"]
        assert rows() == []
        assert not (api.data_dir / "pools" / "small" / "mover.img").exists()


@pytest.mark.parametrize(
    "source, words",
    [
        ("nbd://127.0.0.1:99999/x", ["bad port"]),
        ("nbd://127.0.0.1:abc/x", ["bad port"]),
        ("nbd://127.0.0.1:0/x", ["bad port 0"]),  # was dialed as port 10809
        ("nbd://[::1/x", ["nbd://[::1/x", "IPv6"]),
        ("nbd:///x", ["needs a host"]),
        ("nbd+unix:///x", ["needs ?socket=PATH"]),
        # was taken, the user@ part ignored, and the password stored with the migration
        ("nbd://bob:hunter2@127.0.0.1:1/x", ["'nbd://***@127.0.0.1:1/x'", "TLS user name"]),
        ("nbd+unix://bob@/x?socket=/s", ["'nbd+unix://***@/x?socket=/s'", "TLS user name"]),
    ],
)
def test_migration_from_a_malformed_source_uri_is_400(api: ApiThread, source: str, words: list[str]) -> None:
    """Regression (was a bug): a source URI with the right scheme that does not parse
    (a port out of range, an unclosed IPv6 bracket, no host, no socket) was a 500."""
    r = api.request("POST", "/api/v1/migrations", {"lun": "mig", "source": source})
    expect_error(r, 400, "invalid", "source is not a valid NBD URI", *words)
    assert b"hunter2" not in r.body  # nor shown back
    assert "mig" not in api.array.luns
    assert api.call(_rows(api.array)) == []
    assert api.request("GET", "/api/v1/migrations").json() == []


def test_migration_from_a_source_of_a_size_no_lun_can_have_names_the_source(
    api: ApiThread, tmp_path: Path
) -> None:
    """A source (here nbdkit) of 1000 bytes: no LUN can have its size. Before, the 400
    said "size 1000 is invalid", a size the caller never gave."""
    with nbdkit(tmp_path, "memory", "size=1000") as src:
        r = api.request("POST", "/api/v1/migrations", {"lun": "mig", "source": src.uri})
    expect_error(r, 400, "invalid", f"size of source {src.uri} 1000 is invalid", "multiple of 512")
    assert "mig" not in api.array.luns
    assert api.call(_rows(api.array)) == []


def test_a_big_lun_migrates_in_bigger_regions_and_too_many_are_refused(
    api: ApiThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the region size was 1 MiB whatever the LUN's size, and any asked for was
    taken, so a 1 PiB source took 1G regions, ~20 GiB of region maps, and each status
    and the cutover pause scanned them. The limits are made small here (4 regions by
    default, 16 at most) to try them on an 8 MiB source."""
    monkeypatch.setattr(regions, "DEFAULT_MAX_REGIONS", 4)
    monkeypatch.setattr(manager, "MAX_REGIONS", 16)
    with nbdkit(tmp_path, "memory", "size=8M") as src:
        r = api.request("POST", "/api/v1/migrations", {"lun": "m1", "source": src.uri, "throttle": 1})
        assert r.status == 201 and r.json()["region_size"] == 2 * MIB, r.body
        # one LUN takes a source at a time: m1 lets go of it first (its copy of the empty
        # source may not have completed yet on a loaded machine; then m3 got 409)
        api.request("POST", "/api/v1/migrations/m1/cancel")  # 409 if it has completed
        r = api.request("DELETE", "/api/v1/luns/m1?force=true")
        assert r.status == 204, r.body
        r = api.request("POST", "/api/v1/migrations", {"lun": "m2", "source": src.uri, "region_size": 65536})
        expect_error(r, 400, "invalid", "region_size 64K cuts the source's 8M into 128 regions, more than 16")
        assert "use 512K or more" in r.error()["message"]
        assert "m2" not in api.array.luns
        r = api.request(
            "POST", "/api/v1/migrations", {"lun": "m3", "source": src.uri, "region_size": 512 << 10}
        )
        assert r.status == 201 and r.json()["region_size"] == 512 << 10, r.body
        api.request("POST", "/api/v1/migrations/m3/cancel")
        api.request("DELETE", "/api/v1/luns/m3?force=true")


async def _rows(array: Array) -> list[Any]:
    assert array.meta is not None
    return array.meta.db.execute("SELECT lun FROM migrations").fetchall()


def test_not_found(api: ApiThread) -> None:
    api.create("a")
    for method, path in [
        ("GET", "/api/v1/luns/nope"),
        ("DELETE", "/api/v1/luns/nope"),
        ("GET", "/api/v1/luns/nope/connection"),
        ("GET", "/api/v1/luns/nope/stats"),
        ("GET", "/api/v1/luns/A"),  # names are case-sensitive
    ]:
        expect_error(api.request(method, path), 404, "not_found", path.split("/")[4], "does not exist")
    err = expect_error(
        api.request("POST", "/api/v1/luns", {"name": "b", "size": MIB, "pool": "nope"}), 404, "not_found"
    )
    assert "nope" in err["message"] and "default" in err["message"] and "small" in err["message"]
    assert sorted(api.array.luns) == ["a"]
    for path in ("/", "/api", "/api/v1", "/api/v2/array", "/api/v1/lun", "/api/v1/luns/a/nope", "/metrics/x"):
        expect_error(api.request("GET", path), 404, "not_found", path)


def test_wrong_method(api: ApiThread) -> None:
    api.create("a")
    for method, path in [
        ("PUT", "/api/v1/luns"),
        ("DELETE", "/api/v1/luns"),
        ("PATCH", "/api/v1/luns/a"),
        ("PUT", "/api/v1/luns/a"),
        ("POST", "/api/v1/luns/a"),
        ("GET", "/api/v1/luns/a/grow"),
        ("DELETE", "/api/v1/array"),
        ("POST", "/api/v1/array"),
        ("POST", "/metrics"),
        ("DELETE", "/api/v1/luns/a/connection"),
    ]:
        r = api.request(method, path, {"size": 2 * MIB} if method in ("POST", "PUT", "PATCH") else None)
        expect_error(r, 405, "method_not_allowed", method, path)
    assert api.array.get_lun("a").size == MIB


def test_wrong_method_names_allowed_methods(api: ApiThread) -> None:
    """Regression (was a bug): RFC 9110 section 15.5.6: a 405 response MUST carry an Allow header.
    aiohttp's HTTPMethodNotAllowed has one, but errors_middleware replaces the
    exception with a fresh JSON response and drops its headers."""
    r = api.request("PUT", "/api/v1/luns")
    expect_error(r, 405, "method_not_allowed")
    allowed = {m.strip() for m in r.headers.get("Allow", "").split(",")}
    assert {"GET", "POST"} <= allowed, r.headers.items()


def test_duplicate_lun_is_409(api: ApiThread) -> None:
    api.create("a", MIB)
    for pool in (None, "small"):
        body: dict[str, Any] = {"name": "a", "size": 2 * MIB}
        if pool:
            body["pool"] = pool
        expect_error(api.request("POST", "/api/v1/luns", body), 409, "conflict", "'a'", "already exists")
    lun = api.array.get_lun("a")
    assert (lun.size, lun.pool) == (MIB, "default")


def test_delete_query_is_checked(api: ApiThread) -> None:
    api.create("a")
    for bad in ("yes", "2", "", "TRUEx"):
        expect_error(api.request("DELETE", f"/api/v1/luns/a?force={bad}"), 400, "invalid", "force")
    assert "a" in api.array.luns


def test_delete_while_connected_is_409(api: ApiThread) -> None:
    api.create("a", MIB)

    async def connect() -> NbdClient:
        c = await NbdClient.connect(api.nbd_uri("a"), timeout=TIMEOUT)
        await c.write(0, b"x" * 4096)
        return c

    client = api.call(connect())
    try:
        r = api.request("GET", "/api/v1/luns/a")
        assert len(r.json()["connected_hosts"]) == 1, r.json()
        err = expect_error(api.request("DELETE", "/api/v1/luns/a"), 409, "conflict", "connected", "force")
        assert "'a'" in err["message"]
        expect_error(api.request("DELETE", "/api/v1/luns/a?force=false"), 409, "conflict")
        assert "a" in api.array.luns
        path = api.array.get_lun("a").file.path
        assert os.path.exists(path)
        # the host's I/O still works after the refused delete
        assert api.call(client.read(0, 4096)) == b"x" * 4096
        r = api.request("DELETE", "/api/v1/luns/a?force=true")
        assert r.status == 204, r.body
        assert "a" not in api.array.luns and not os.path.exists(path)
        # the forced delete dropped the host
        with pytest.raises(Exception):  # noqa: B017 - DisconnectedError or RequestError
            api.call(client.read(0, 4096))
    finally:
        api.call(client.close())
    expect_error(api.request("GET", "/api/v1/luns/a"), 404, "not_found")


def test_pool_full_on_write_is_enospc(api: ApiThread) -> None:
    """The 256 KiB pool refuses writes past its capacity with NBD ENOSPC; the API still answers."""
    api.create("thin", 4 * MIB, pool="small")

    async def fill() -> list[int]:
        errors = []
        async with await NbdClient.connect(api.nbd_uri("thin"), timeout=TIMEOUT) as c:
            for i in range(8):
                try:
                    await c.write(i * 64 * KIB, b"\1" * (64 * KIB))
                except RequestError as e:
                    errors.append(e.error)
        return errors

    errors = api.call(fill(), timeout=20)
    assert errors and set(errors) == {errno.ENOSPC}, errors
    pool = next(p for p in api.request("GET", "/api/v1/array").json()["pools"] if p["name"] == "small")
    assert pool["used"] <= pool["capacity"], pool
    stats = api.request("GET", "/api/v1/luns/thin/stats").json()
    assert stats["ops"]["write"]["errors"] == len(errors)
    assert stats["ops"]["write"]["count"] == 8


def test_metrics_counts_nbd_writes(api: ApiThread) -> None:
    api.create("m1")
    api.create("m2")
    writes = 5

    async def io() -> None:
        async with await NbdClient.connect(api.nbd_uri("m1"), timeout=TIMEOUT) as c:
            for i in range(writes):
                await c.write(i * 4096, b"m" * 4096)

    api.call(io())
    r = api.request("GET", "/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    text = r.body.decode()
    assert re.search(
        rf'^blockmig_lun_ops_total\{{array="arr1",lun="m1",op="write"\}} {writes}\.0$', text, re.M
    )
    assert re.search(r'^blockmig_lun_ops_total\{array="arr1",lun="m2",op="write"\} 0\.0$', text, re.M)
    assert re.search(
        rf'^blockmig_lun_bytes_total\{{array="arr1",lun="m1",op="write"\}} {writes * 4096}\.0$', text, re.M
    )


# =========================================================================== (c) the fuzzer
def _fuzz_operations() -> list[Any]:
    """The description's operations as schemathesis sees them ([] without schemathesis:
    the fuzz tests are then reported as skipped, the rest of the module still runs)."""
    try:
        import schemathesis
    except ImportError:
        return []
    from schemathesis.core.result import Ok

    schema = schemathesis.openapi.from_dict(json.loads(json.dumps(SPEC)))
    ops = []
    for result in schema.get_all_operations():
        # the description must load whole: an operation schemathesis cannot read is a failure
        assert isinstance(result, Ok), result
        ops.append(result.ok())
    return ops


FUZZ_OPS = _fuzz_operations()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("op", FUZZ_OPS, ids=[op.label for op in FUZZ_OPS])
def test_fuzz(api: ApiThread, op: Any, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    """Schema-driven requests with the right token: no 5xx, JSON errors, array alive after."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    api.create("fuzz0", MIB)
    api.create("fuzz1", MIB, pool="small")
    r = api.request("POST", "/api/v1/migrations", {"lun": "mig0", "source": api.nbd_uri("fuzz0")})
    assert r.status == 201, r.body
    known = ["mig0"] if op.path.startswith("/api/v1/migrations/") else ["fuzz0", "fuzz1"]
    gen_mode = GenerationMode(mode)
    has_input = bool(op.path_parameters or op.query or op.body)
    if mode == "negative" and not has_input:
        pytest.skip("nothing to make invalid")
    statuses: dict[int, int] = {}
    # declared 5xx a client may cause: 507 (a size the filesystem cannot hold,
    # e.g. "803T" on ext4) and 501 (model lacks the feature); not_a_server_error
    # judges every other answer
    declared_5xx = {int(c) for c in op.definition.raw["responses"] if c.startswith("5")}
    sources = [api.nbd_uri("fuzz0"), api.nbd_uri("no-such-export")]

    def run_case(case: Any) -> None:
        # the right token always: schemathesis also makes up Authorization headers
        case.headers = {**(case.headers or {}), **AUTH}
        # a migration source never leaves this test: our own NBD server only;
        # two thirds of the sources are real (one LUN that exists, one that does not)
        src = case.body.get("source") if isinstance(case.body, dict) else None
        if isinstance(src, str) and (len(src) % 3 < 2 or src.startswith(("nbd:", "nbd+"))):
            case.body = {**case.body, "source": sources[len(src) % 2]}
        resp = case.call(base_url=api.base_url, timeout=TIMEOUT)
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        assert resp.status_code != 401, resp.text
        if resp.status_code in declared_5xx:
            code = json.loads(resp.content)["error"]["code"]
            assert code == {507: "no_space", 501: "unsupported"}[resp.status_code], resp.text
        else:
            case.validate_response(resp, checks=[not_a_server_error])
            assert resp.status_code < 500, resp.text
        if resp.status_code >= 400:
            doc = json.loads(resp.content)
            assert set(doc) == {"error"}, doc
            assert isinstance(doc["error"]["code"], str) and isinstance(doc["error"]["message"], str), doc

    fuzz_settings = settings(
        max_examples=50,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    # most path names are LUNs or migrations that exist, so the operations do real work
    strategies = [op.as_strategy(generation_mode=gen_mode)]
    if op.path_parameters and mode == "positive":
        for name in known:
            strategies.append(op.as_strategy(generation_mode=gen_mode, path_parameters={"name": name}))
        if op.path.endswith("/move"):  # a pool that exists, for a real move
            fixed = {"name": "fuzz0"}
            strategies.append(
                op.as_strategy(generation_mode=gen_mode, path_parameters=fixed, body={"pool": "small"})
            )

    with caplog.at_level(logging.ERROR, "blockmig.api"):
        given(case=st.one_of(strategies))(fuzz_settings(run_case))()
    internal = [r for r in caplog.records if r.name == "blockmig.api"]
    assert not internal, [r.getMessage() for r in internal]
    assert sum(statuses.values()) >= 10, statuses
    if mode == "positive" and op.method.upper() in ("GET", "DELETE") and op.path_parameters:
        # the fuzzer reached real LUNs, not only 404s
        assert any(200 <= s < 300 for s in statuses), statuses
    # the array still works: the API answers, and a new LUN takes NBD I/O
    assert api.request("GET", "/api/v1/array").status == 200
    name = "after-fuzz"
    while name in api.array.luns:
        name += "x"
    api.create(name, MIB)
    payload = os.urandom(64 * KIB)
    assert api.call(nbd_roundtrip(api.nbd_uri(name), 4096, payload)) == payload
    assert api.request("DELETE", f"/api/v1/luns/{name}").status == 204
