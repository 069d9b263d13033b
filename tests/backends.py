"""Test Backends: ones that misbehave on purpose, the way a buggy server or store
would (FixedMap), and one that ends I/O begun without a coroutine later on the loop
(StartedLater); with ``started``, which runs such an I/O the way the NBD server does."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable, Container, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from emulator.mirror.migration import Migration, MigrationConfig
from emulator.nbd.backend import Backend, Done, MemoryBackend
from emulator.nbd.errors import BackendError
from emulator.nbd.protocol import Extent

T = TypeVar("T")


class Lun:
    """What a Migration needs of its LUN, in-process: one it swaps the Backend of."""

    def __init__(self) -> None:
        self.backend: Backend | None = None

    def swap(self, backend: Backend) -> None:
        self.backend = backend


def local_migration(
    source: Backend,
    target: Backend,
    tmp_path: Path,
    config: MigrationConfig | None = None,
    lun: Lun | None = None,
    **kw: Any,
) -> Migration:
    """An in-process migration "vol" of ``source`` to ``target`` with no NBD between
    them (as a move between pools of one array is), its progress in ``tmp_path``."""
    return Migration(
        "vol",
        "move:x:y",
        lun or Lun(),
        target,
        tmp_path / "vol.progress",
        config or MigrationConfig(),
        on_change=lambda m: None,
        source=source,
        **kw,
    )


class FixedMap(MemoryBackend):
    """A MemoryBackend whose allocation map is always ``answer``, whatever range is asked.

    Reads and writes are a MemoryBackend's; only ``extents`` lies (a fresh list each call).
    """

    def __init__(self, size: int, answer: list[Extent]) -> None:
        super().__init__(size)
        self.answer = answer

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return list(self.answer)


def finished(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never waits (a MemoryBackend call), run here and now."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the coroutine waited")


class StartedLater(MemoryBackend):
    """A MemoryBackend that offers start_read / start_write, as a remote LUN does, and
    ends each such I/O ``delay(offset)`` seconds later on the event loop (so replies
    go out of order); reads and writes at offsets in ``fail`` end with EIO. With
    ``hold`` set, started I/O waits in ``held`` until :meth:`release`.

    A write lands when it ends, from the caller's buffer: a caller that reuses the
    buffer before ``done`` (which the contract forbids) is caught by the data."""

    can_start_io = True

    def __init__(
        self,
        size: int,
        delay: Callable[[int], float] = lambda offset: 0.0,
        fail: Container[int] = (),
        hold: bool = False,
    ) -> None:
        super().__init__(size)
        self.delay, self.fail, self.hold = delay, fail, hold
        self.started = 0  # I/O taken by start_read / start_write
        self.ended = 0  # ``done`` calls made
        self.held: list[Callable[[], None]] = []

    def _later(self, offset: int, done: Done, op: Callable[[], Coroutine[Any, Any, Any]]) -> bool:
        def end() -> None:
            self.ended += 1
            if offset in self.fail:
                done(None, BackendError(errno.EIO, f"bad block at {offset}"))
            else:
                done(finished(op()), None)

        self.started += 1
        if self.hold:
            self.held.append(end)
        else:
            asyncio.get_running_loop().call_later(self.delay(offset), end)
        return True

    def release(self) -> None:
        held, self.held, self.hold = self.held, [], False
        for end in held:
            end()

    def start_read(self, offset: int, length: int, done: Done) -> bool:
        return self._later(offset, done, lambda: self.read(offset, length))

    def start_write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool, done: Done) -> bool:
        return self._later(offset, done, lambda: self.write(offset, data))


async def started(begin: Callable[[Done], bool], fallback: Callable[[], Awaitable[Any]] | None = None) -> Any:
    """Run an I/O the way the NBD server does: ``begin(done)`` (a Backend's start_read /
    start_write), or ``fallback()`` if it declines (with no fallback, declining fails).
    Checks that ``done`` runs once, and only after ``begin`` returned True."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    returned = False

    def done(result: Any, error: Exception | None) -> None:
        assert returned, "done ran before start_* returned"
        assert not fut.done(), "done ran twice"
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)

    if not begin(done):
        assert fallback is not None, "start_* declined the I/O"
        return await fallback()
    returned = True
    return await fut
