"""A small synchronous client of an array's management API (stdlib only).

The control layer reaches arrays only through this API, never through their
files or internals.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

TOKEN_ENV = "BLOCKMIG_TOKEN"
#: the states in which a migration has ended
FINAL = ("completed", "failed", "cancelled")
#: one long poll of a migration's status waits at most this long
LONG_POLL_S = 10.0
#: an array that answered once and then does not (its API closed: it restarts, `blockmig up`
#: after a kill -9, and resumes its migrations by itself) is asked again this long by those
#: who follow a migration, before they give up
UNREACHABLE_WINDOW_S = 15.0

T = TypeVar("T")


class ApiError(Exception):
    """The array answered with an error (or could not be reached: status 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _http_url(url: str) -> bool:
    """Is ``url`` an http(s)://HOST[:PORT] URL (which urllib would take, or fail on with a
    traceback rather than a reason)?"""
    try:
        # urlsplit raises ValueError on an unclosed IPv6 bracket ("http://[::1:8701"),
        # .port on a port that is no number, or too big
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


class ArrayApi:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None) -> Any:
        if not _http_url(self.url):
            raise ApiError(0, "bad_url", f"not an array API URL: {self.url!r} (try http://127.0.0.1:8701)")
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)["error"]
                raise ApiError(e.code, err.get("code", "error"), err.get("message", str(e))) from None
            except (ValueError, KeyError, TypeError):
                raise ApiError(e.code, "http_error", f"{method} {url}: HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ApiError(0, "unreachable", f"cannot reach the array API at {self.url}: {reason}") from None
        except http.client.HTTPException as e:  # something listens there, but speaks no HTTP
            raise ApiError(
                0,
                "not_http",
                f"{self.url} does not answer HTTP ({type(e).__name__}): is it the array's API address, "
                "not its NBD one?",
            ) from None
        if not raw:
            return None
        if "json" in ctype:
            try:
                return json.loads(raw)
            except ValueError:
                pass
        elif path == "/metrics":  # the one answer in text
            return raw.decode()
        # a 2xx that is no JSON (a web page, a proxy's login page): not an array's API,
        # whose answers callers would index as JSON (a TypeError traceback)
        raise ApiError(
            0,
            "not_json",
            f"{method} {url} answered {ctype or 'no content type'}, not the JSON of an array: is "
            f"{self.url} the array's API address?",
        )

    # ---- calls
    def array_info(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", "/api/v1/array")
        return result

    def list_luns(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("GET", "/api/v1/luns")
        return result

    def create_lun(self, name: str, size: int | str, pool: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "size": size}
        if pool:
            body["pool"] = pool
        result: dict[str, Any] = self.call("POST", "/api/v1/luns", body)
        return result

    def get_lun(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"/api/v1/luns/{urllib.parse.quote(name, safe='')}")
        return result

    def grow_lun(self, name: str, size: int | str) -> dict[str, Any]:
        q = urllib.parse.quote(name, safe="")
        result: dict[str, Any] = self.call("POST", f"/api/v1/luns/{q}/grow", {"size": size})
        return result

    def delete_lun(self, name: str, force: bool = False) -> None:
        q = urllib.parse.quote(name, safe="")
        self.call("DELETE", f"/api/v1/luns/{q}", query={"force": "true" if force else "false"})

    def fence_lun(self, name: str, holder: str = "") -> dict[str, Any]:
        """Fence LUN ``name`` for a takeover; the answer's ``uri`` is the holder's alias."""
        q = urllib.parse.quote(name, safe="")
        result: dict[str, Any] = self.call("POST", f"/api/v1/luns/{q}/fence", {"holder": holder})
        return result

    def unfence_lun(self, name: str) -> None:
        q = urllib.parse.quote(name, safe="")
        self.call("DELETE", f"/api/v1/luns/{q}/fence")

    def connection(self, name: str) -> dict[str, Any]:
        q = urllib.parse.quote(name, safe="")
        result: dict[str, Any] = self.call("GET", f"/api/v1/luns/{q}/connection")
        return result

    def stats(self, name: str) -> dict[str, Any]:
        q = urllib.parse.quote(name, safe="")
        result: dict[str, Any] = self.call("GET", f"/api/v1/luns/{q}/stats")
        return result

    def metrics(self) -> str:
        result: str = self.call("GET", "/metrics")
        return result

    def migration(self, name: str, wait: float | None = None) -> dict[str, Any]:
        """A migration's status; with ``wait``, a long poll: the answer comes once the
        migration has ended, or after ``wait`` seconds."""
        query = None if wait is None else {"wait": f"{max(0.0, wait):.3f}"}
        q = urllib.parse.quote(name, safe="")
        result: dict[str, Any] = self.call("GET", f"/api/v1/migrations/{q}", query=query)
        return result

    def migration_if_any(self, name: str) -> dict[str, Any] | None:
        """:meth:`migration`, or None where the LUN has none (404: none began, or it is gone)."""
        try:
            return self.migration(name)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def update_migration(
        self, name: str, throttle: float | None = None, mode: str | None = None, source: str | None = None
    ) -> dict[str, Any]:
        """Change a running migration: its throttle in MB/s (0 = unlimited), at once and
        kept across restarts, ``mode="active"``, and/or ``source``, the URI its source LUN
        is served at now (409 if it serves another LUN, 400 if unreachable; the one change an
        ended migration whose LUN serves its source directly takes); its status after."""
        body: dict[str, Any] = {}
        if throttle is not None:
            body["throttle"] = throttle
        if mode is not None:
            body["mode"] = mode
        if source is not None:
            body["source"] = source
        q = urllib.parse.quote(name, safe="")
        result: dict[str, Any] = self.call("PATCH", f"/api/v1/migrations/{q}", body)
        return result

    def wait_migration(
        self, name: str, timeout: float | None = None, unreachable_window: float = UNREACHABLE_WINDOW_S
    ) -> dict[str, Any]:
        """Long-poll a migration until it has ended (``state`` in FINAL) or ``timeout``
        seconds have passed (never: None); its last status either way.

        Once the array has answered, an API that stops answering (it restarts) is asked
        again for up to ``unreachable_window`` seconds (:func:`through_outage`): a restart
        ended the wait with an error (`migration wait`: exit 1, "failed or cancelled") while
        the migration, resumed a moment later, went on. One that never answered (a wrong
        --api) fails at once, and a ``timeout`` that ends meanwhile returns the last status
        (a timeout, not an error)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # each poll well inside this client's own timeout
        longest = min(LONG_POLL_S, self.timeout / 2)
        last: dict[str, Any] | None = None  # the last status the array gave

        def poll() -> dict[str, Any]:
            if last is None:  # answered at once: a wrong address fails now, not a restart later
                return self.migration(name, wait=0.0)
            left = longest if deadline is None else min(longest, deadline - time.monotonic())
            return self.migration(name, wait=left)

        def answered() -> bool:
            return last is not None

        while True:
            try:
                st = through_outage(poll, unreachable_window, answered, deadline)
            except ApiError as e:
                if e.code == "unreachable" and deadline is not None and time.monotonic() >= deadline:
                    if last is not None:
                        return last  # the timeout came first: what it was last seen doing
                raise
            last = st
            if st["state"] in FINAL or (deadline is not None and time.monotonic() >= deadline):
                return st


def through_outage(
    call: Callable[[], T],
    window: float,
    expect_back: Callable[[], bool],
    until: float | None = None,
    interval: float = 0.2,
) -> T:
    """``call()``, a call to an array's API that may be made again (a read), made again while
    the array does not answer and ``expect_back()`` says it will be back (it answered before,
    and was not stopped on purpose: its API closed because it restarts, `blockmig up` after a
    kill -9): every ``interval`` seconds, for up to ``window`` seconds of the outage and not
    past the monotonic time ``until``; then its error, saying how long. An answer (404, 409
    ...) is no outage: raised at once."""
    since: float | None = None
    while True:
        try:
            return call()
        except ApiError as e:
            if e.code != "unreachable":
                raise
            now = time.monotonic()
            if since is None:
                since = now
            waited = now - since
            if waited >= window or (until is not None and now >= until) or not expect_back():
                more = f" (for {waited:.0f} s)" if waited >= 1 else ""
                raise ApiError(e.status, e.code, e.message + more) from None
            time.sleep(interval)
