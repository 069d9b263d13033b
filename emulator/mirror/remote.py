"""RemoteBackend: a LUN of another array (any nbd:// URI) as a local Backend.

It keeps one pipelined NBD connection (many requests in flight) and
reconnects with exponential backoff when it breaks. While the source is
unreachable, each request that needs it waits up to ``retry_window``
seconds, then fails with EIO (I6). NBD errors the source returns (EIO,
ENOSPC, EPERM ...) pass through unchanged.

A connection must find the same LUN as the first one did: the same size and,
where the source names its LUN (our arrays put a LUN id in the export's
description), the same id. NBD names an export only by address and name, and
a LUN deleted and made again under that name, or another array started on the
source's address, would otherwise be read from as if it were the LUN taken
over. Such a source is refused like a size change: the connection is dropped
and the requests that needed it fail with EIO, as do those of the next
``backoff_max`` seconds without asking it again (a host's every request would
make a connection to it otherwise).

The source's array may come back at another address (restarted on other ports):
:meth:`RemoteBackend.probe` connects to the new URI and checks it serves the same
LUN, and :meth:`RemoteBackend.switch` makes it the source's address from then on;
requests waiting for a reconnection go on through that connection at once.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

from emulator.array.lun import lun_id_of
from emulator.nbd import protocol as p
from emulator.nbd.backend import CAPABILITIES, Backend, Done
from emulator.nbd.client import NbdClient
from emulator.nbd.errors import BackendError, DisconnectedError, NbdError, RequestError

log = logging.getLogger("blockmig.mirror.remote")
T = TypeVar("T")


class OtherLun(Exception):
    """An address given for the source serves another LUN (or another size)."""


class RemoteBackend(Backend):
    can_start_io = True
    remote = True

    def __init__(
        self,
        uri: str,
        retry_window: float = 30.0,
        connect_timeout: float = 5.0,
        backoff_min: float = 0.05,
        backoff_max: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        size: int = 0,
        capabilities: dict[str, Any] | None = None,
        identity: str = "",
    ) -> None:
        self.uri = uri
        self.retry_window = retry_window
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._clock = clock
        self._sleep = sleep
        self._client: NbdClient | None = None
        #: what the requests waiting for a reconnection wait on; ``_dialing`` resolves it, or
        #: :meth:`switch` does with a connection to the source's new address
        self._connecting: asyncio.Future[NbdClient] | None = None
        self._dialing: asyncio.Task[NbdClient] | None = None
        self._size = size  # known in advance when resuming: checked on every (re)connect
        #: the id of the LUN taken over (lun_id_of), checked on every (re)connect; "" until a
        #: connection finds one (a foreign server gives none: the size is all that is checked)
        self.identity = identity
        self._closed = False
        self.reconnects = 0
        self._tokens = itertools.count()
        self._started: dict[int, float] = {}  # requests in flight: when each began
        self._watchdog: asyncio.Future[None] | None = None
        self._retries: set[asyncio.Future[None]] = set()  # fast-path requests a broken link handed on
        self._closing: set[asyncio.Future[Any]] = set()  # closes of connections dropped or refused
        self._refused_until = float("-inf")  # a refused source is not asked again before
        self.last_error = ""
        self.connected = False
        #: the source's capabilities are known: from a connection, or recorded from one
        #: (a resume after a restart knows them before the source answers)
        self.known = False
        #: called after a (re)connection found capabilities other than those known, or
        #: learnt the source's identity
        self.on_capabilities: Callable[[RemoteBackend, dict[str, Any]], None] | None = None
        if capabilities:
            for cap in CAPABILITIES:
                if cap in capabilities:
                    setattr(self, cap, type(getattr(Backend, cap))(capabilities[cap]))
            self.known = True

    @property
    def link_up(self) -> bool:
        """Is a connection to the source open now? (``connected`` is what the last request
        or reconnection found: a source gone while none ran still says True there.)"""
        c = self._client
        return not self._closed and c is not None and not c.closed

    def capabilities(self) -> dict[str, Any]:
        """What the source offers, as the LUN advertises it (and as it is recorded)."""
        return {cap: getattr(self, cap) for cap in CAPABILITIES}

    async def connect(self) -> RemoteBackend:
        """First connection: fails at once if the source cannot be reached."""
        try:
            c = await NbdClient.connect(self.uri, timeout=self.connect_timeout)
        except NbdError as e:
            raise BackendError(errno.EIO, f"cannot take over {self.uri}: {e}") from None
        self._adopt(c)
        return self

    async def probe(self, uri: str) -> NbdClient:
        """A connection to ``uri`` that serves the LUN this one reaches (the same id, where
        the source names its LUN, and the same size), for :meth:`switch`. Raises
        :class:`OtherLun` if it serves another, BackendError (EIO) if it cannot be reached;
        nothing changes either way."""
        try:
            c = await NbdClient.connect(uri, timeout=self.connect_timeout)
        except (NbdError, OSError) as e:
            raise BackendError(errno.EIO, f"cannot reach {uri}: {e}") from None
        ident = lun_id_of(c.description)
        why = ""
        if self.identity and ident != self.identity:
            now = f"LUN id {ident}" if ident else "no LUN id"
            why = f"{uri} serves another LUN ({now}), not the one taken over (LUN id {self.identity})"
        elif self._size and c.size != self._size:
            why = f"{uri} is {c.size} bytes, the LUN taken over {self._size}"
        if why:
            await c.close()
            raise OtherLun(why)
        return c

    def switch(self, uri: str, c: NbdClient) -> None:
        """Reach the source at ``uri`` from now on, through ``c`` (from :meth:`probe`): its
        array came back at another address. Requests waiting for a reconnection go on
        through ``c`` at once, new ones and retries too; the old connection, if any, closes
        after the requests in flight on it (it serves the same LUN, or is broken)."""
        if self._closed:
            self._close_later(c)
            raise BackendError(errno.ESHUTDOWN, f"remote LUN {self.uri} is closed")
        old, self._client = self._client, None
        was, self.uri = self.uri, uri
        self._refused_until = float("-inf")
        self.last_error = ""
        self._adopt(c)  # checked by probe: the same LUN, so it is taken
        waiting, dialing = self._connecting, self._dialing
        self._connecting = self._dialing = None
        if waiting is not None and not waiting.done():
            waiting.set_result(c)
        if dialing is not None and not dialing.done():
            dialing.cancel()  # it dials the old address; its waiters have their connection
            self._closing.add(dialing)
            dialing.add_done_callback(self._closing.discard)
        if old is not None:
            self._close_later(old)
        log.info("source %s is now reached at %s", was, uri)

    def _adopt(self, c: NbdClient) -> None:
        ident = lun_id_of(c.description)
        if self.identity and ident != self.identity:
            now = f"LUN id {ident}" if ident else "no LUN id"
            self._refuse(
                c,
                f"{self.uri} is no longer the LUN taken over (LUN id {self.identity}): it answers "
                f"with {now} (the LUN deleted and made again, or another array on its address); "
                "I/O that needs the source fails until that LUN is back there",
            )
        if self._size and c.size != self._size:
            self._refuse(c, f"{self.uri} changed size from {self._size} to {c.size}")
        self._client = c
        self._size = c.size
        self.connected = True
        learnt = bool(ident) and not self.identity
        self.identity = ident or self.identity
        before, known = self.capabilities(), self.known
        self.read_only = c.read_only
        self.can_trim = c.can(p.FLAG_SEND_TRIM)
        self.can_zero = c.can(p.FLAG_SEND_WRITE_ZEROES)
        self.can_fast_zero = c.can(p.FLAG_SEND_FAST_ZERO)
        self.can_cache = c.can(p.FLAG_SEND_CACHE)
        self.can_flush = c.can(p.FLAG_SEND_FLUSH)
        self.can_fua = c.can(p.FLAG_SEND_FUA)
        self.can_multi_conn = c.can(p.FLAG_CAN_MULTI_CONN)
        self.rotational = c.can(p.FLAG_ROTATIONAL)
        self.can_extents = c.allocation_context is not None
        # Requests go on as they come: the source's alignment is the hosts' to keep
        # (the client ignores block sizes the spec does not allow: a minimum of 1 then).
        self.min_block = c.block_size.minimum
        self.known = True
        if (before != self.capabilities() or not known or learnt) and self.on_capabilities is not None:
            try:
                self.on_capabilities(self, before if known else {})
            except Exception:  # the connection serves all the same
                log.exception("%s: recording the source's capabilities failed", self.uri)

    def _refuse(self, c: NbdClient, why: str) -> NoReturn:
        """``c`` reached another LUN than the one taken over: drop it, fail with EIO."""
        self._close_later(c)
        self.last_error = why
        self._refused_until = self._clock() + self.backoff_max
        raise BackendError(errno.EIO, why)

    @property
    def size(self) -> int:
        return self._size

    async def _reconnect(self, deadline: float) -> NbdClient:
        """Wait for a working connection (shared by all waiters) until ``deadline``."""
        if self._clock() < self._refused_until:
            raise BackendError(errno.EIO, self.last_error)
        if self._connecting is None or self._connecting.done():
            self._connecting = fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_retrieve)
            self._dialing = asyncio.ensure_future(self._dial())
            self._dialing.add_done_callback(functools.partial(_hand_over, fut))
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise BackendError(errno.EIO, f"source {self.uri} unreachable: {self.last_error}")
        try:
            return await asyncio.wait_for(asyncio.shield(self._connecting), remaining)
        except TimeoutError:
            raise BackendError(
                errno.EIO,
                f"source {self.uri} unreachable for {self.retry_window:g} s: {self.last_error}",
            ) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and not (task is not None and task.cancelling()):
                # aclose cancelled the reconnect, not our caller: fail, do not vanish
                # (a fast-path retry would never call its ``done``)
                raise BackendError(errno.ESHUTDOWN, f"remote LUN {self.uri} is closed") from None
            raise

    async def _dial(self) -> NbdClient:
        """Dial until connected (the requests waiting get the connection: _hand_over)."""
        delay = self.backoff_min
        while not self._closed:
            try:
                c = await NbdClient.connect(self.uri, timeout=self.connect_timeout)
            except (NbdError, OSError) as e:
                self.last_error = str(e)
                await self._sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            self._adopt(c)
            self.reconnects += 1
            log.info("reconnected to %s", self.uri)
            return c
        raise BackendError(errno.ESHUTDOWN, f"remote LUN {self.uri} is closed")

    async def _call(
        self, what: str, fn: Callable[[NbdClient], Awaitable[T]], start: float | None = None
    ) -> T:
        """``fn`` on a working connection, reconnecting within the retry window
        counted from ``start`` (now, unless the request began earlier)."""
        if start is None:
            start = self._clock()
        deadline = start + self.retry_window
        token = self._track(start)
        delay = self.backoff_min  # before asking again a source that said it is shutting down
        try:
            while True:
                c = self._client
                if c is None or c.closed:
                    self.connected = False
                    if self._closed:
                        raise BackendError(errno.ESHUTDOWN, f"remote LUN {self.uri} is closed")
                    c = await self._reconnect(deadline)
                try:
                    return await fn(c)
                except DisconnectedError as e:
                    self._lost(c, e)
                except RequestError as e:
                    if e.error != p.ESHUTDOWN:
                        raise self._refused(what, e) from None
                    self._lost(c, _shutting_down(what, e))
                    # it may take connections still: ask again a while later
                    await self._sleep(min(delay, max(0.0, deadline - self._clock())))
                    delay = min(delay * 2, self.backoff_max)
                if self._clock() >= deadline:
                    raise BackendError(
                        errno.EIO,
                        f"source {self.uri}: {what}: no answer within "
                        f"{self.retry_window:g} s: {self.last_error}",
                    )
        finally:
            del self._started[token]

    def _track(self, start: float) -> int:
        """Count a request as in flight since ``start`` (for the watchdog); its token."""
        token = next(self._tokens)
        self._started[token] = start
        self._ensure_watchdog()
        return token

    def _refused(self, what: str, e: RequestError) -> BackendError:
        """An error the source answered with, passed on unchanged."""
        return BackendError(e.error, f"source {self.uri}: {what}: {e}")

    def _lost(self, c: NbdClient, e: DisconnectedError) -> None:
        self.last_error = str(e)
        if self._client is c:
            self._client = None
            self._close_later(c)

    def _close_later(self, c: NbdClient) -> None:
        """Close ``c`` in a task :meth:`aclose` waits for."""
        task = asyncio.ensure_future(c.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _start(
        self,
        what: str,
        begin: Callable[[NbdClient, Done], bool],
        fn: Callable[[NbdClient], Awaitable[Any]],
        done: Done,
    ) -> bool:
        """The coroutine-free path (see Backend.start_read) on a working connection.
        A connection that breaks under the request hands it to :meth:`_call`, which
        retries it within what is left of the window; ``fn`` is that retry."""
        c = self._client
        if c is None or c.closed:
            return False
        start = self._clock()
        token = self._track(start)
        started = self._started

        def end(result: Any, error: Exception | None) -> None:
            del started[token]
            if error is None:
                done(result, None)
            elif isinstance(error, RequestError) and error.error != p.ESHUTDOWN:
                done(None, self._refused(what, error))
            elif isinstance(error, DisconnectedError | RequestError):
                self._lost(c, error if isinstance(error, DisconnectedError) else _shutting_down(what, error))
                task = asyncio.ensure_future(self._retry(what, fn, start, done))
                self._retries.add(task)
                task.add_done_callback(self._retries.discard)
            else:
                done(None, error)

        if not begin(c, end):
            del started[token]
            return False
        return True

    async def _retry(
        self, what: str, fn: Callable[[NbdClient], Awaitable[Any]], start: float, done: Done
    ) -> None:
        try:
            result = await self._call(what, fn, start)
        except Exception as e:
            done(None, e)
        else:
            done(result, None)

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """A source that stops answering (SIGSTOP, a dead link) never closes the
        connection: drop it when a request has waited the whole retry window, so
        the waiters fail with EIO and a reconnect begins (I6)."""
        period = max(0.05, self.retry_window / 4)
        while self._started and not self._closed:
            await self._sleep(period)
            if not self._started:
                break
            oldest = min(self._started.values())
            c = self._client
            if c is not None and self._clock() - oldest >= self.retry_window:
                self.last_error = f"no answer for {self.retry_window:g} s"
                self._client = None
                self.connected = False
                c.abort(self.last_error)

    # ---- Backend
    def start_read(self, offset: int, length: int, done: Done) -> bool:
        return self._start(
            "read",
            lambda c, end: c.start_read(offset, length, end),
            lambda c: c.read(offset, length),
            done,
        )

    def start_write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool, done: Done) -> bool:
        if fua and not self.can_fua:
            return False  # write() makes it durable with a flush
        return self._start(
            "write",
            lambda c, end: c.start_write(offset, data, fua, end),
            lambda c: _fua(c, fua, lambda f: c.write(offset, data, f)),
            done,
        )

    async def read(self, offset: int, length: int) -> bytearray:
        return await self._call("read", lambda c: c.read(offset, length))

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self._call("read", lambda c: c.read_into(offset, buf))

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        await self._call("write", lambda c: _fua(c, fua, lambda f: c.write(offset, data, f)))

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        if not self.can_zero:
            await super().write_zeroes(offset, length, may_trim, fast, fua)
            return
        await self._call(
            "write zeroes",
            lambda c: _fua(c, fua, lambda f: c.write_zeroes(offset, length, may_trim, fast, f)),
        )

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self.can_trim:
            await self._call("trim", lambda c: _fua(c, fua, lambda f: c.trim(offset, length, f)))

    async def flush(self) -> None:
        if self.can_flush:
            await self._call("flush", lambda c: c.flush())

    async def cache(self, offset: int, length: int) -> None:
        if self.can_cache:
            await self._call("cache", lambda c: c.cache(offset, length))

    async def extents(self, offset: int, length: int) -> list[p.Extent]:
        return await self._call("block status", lambda c: c.extents(offset, length))

    async def first_extent(self, offset: int, length: int) -> p.Extent:
        return (await self._call("block status", lambda c: c.extents(offset, length, one=True)))[0]

    async def aclose(self, timeout: float = 5.0) -> None:
        """Close the connection, waiting up to ``timeout`` seconds for the requests in
        flight (a stopped source answers none), and end every task this remote LUN
        started: its watchdog, its reconnect, the retries of requests a broken link
        handed on (they fail), the closes of connections it dropped. None is left
        pending: the event loop of a stopping array closes right after
        ("Task was destroyed but it is pending!")."""
        self._closed = True
        self.connected = False
        started = [t for t in (self._watchdog, self._dialing) if t is not None and not t.done()]
        for t in started:
            t.cancel()
        c, self._client = self._client, None
        if c is not None:
            await c.close(timeout)
        # The retries find the link closed and fail with ESHUTDOWN; the closes of dropped
        # connections (already broken) end at once, or abort after their own timeout.
        await asyncio.gather(*started, *self._retries, *self._closing, return_exceptions=True)

    def close(self) -> None:
        """Close without waiting: for owners that cannot await; prefer :meth:`aclose`."""
        self._closed = True
        for t in (self._watchdog, self._dialing):
            if t is not None:
                t.cancel()
        c, self._client = self._client, None
        if c is not None:
            self._close_later(c)

    def status(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "connected": self.connected,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "identity": self.identity,
        }


def _shutting_down(what: str, e: RequestError) -> DisconnectedError:
    """The source answered ESHUTDOWN: it is stopping, and a client MUST then disconnect
    (doc/proto.md, "Terminating the transmission phase"). Its connection is left as if
    lost, and the request asked again within the retry window (I6): ESHUTDOWN is not the
    remote LUN's to pass on, as if the array serving the host were the one stopping."""
    return DisconnectedError(f"{what}: the source is shutting down ({e})")


def _hand_over(fut: asyncio.Future[NbdClient], dialing: asyncio.Task[NbdClient]) -> None:
    """The outcome of a reconnection to the requests waiting on ``fut`` (a :meth:`switch`
    to another address may have answered them already, and cancelled it). A callback,
    not code in the task: a task cancelled before it ran runs none of its code."""
    if fut.done():
        return
    if dialing.cancelled():
        fut.cancel()
    elif (e := dialing.exception()) is not None:
        fut.set_exception(e)
    else:
        fut.set_result(dialing.result())


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark the outcome of a reconnection as seen: the requests that waited for it may
    all have given up (their retry window ran out) before it came."""
    if not fut.cancelled():
        fut.exception()


def _fua(c: NbdClient, fua: bool, send: Callable[[bool], Awaitable[None]]) -> Awaitable[None]:
    """``send(fua)`` on ``c``. A host that negotiated FUA with the LUN keeps it when a
    reconnection finds the source without it (the LUN advertised what the source
    offered then): the request goes without the flag, and a flush makes it durable."""
    if not fua or c.can(p.FLAG_SEND_FUA):
        return send(fua)
    return _then_flush(c, send(False))


async def _then_flush(c: NbdClient, request: Awaitable[None]) -> None:
    await request
    if c.can(p.FLAG_SEND_FLUSH):
        await c.flush()
