"""Run a coroutine eagerly: no Task unless it really has to wait.

Python 3.12 has ``asyncio.eager_task_factory``; on 3.11 we do the same by
hand. Most NBD requests to a file backend complete without awaiting (a
page-cache hit), and a Task per request costs more than the pread itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


class _Resume:
    """Awaitable that continues a coroutine already started by hand."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self._coro, self._first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as e:  # CancelledError and friends go to the coroutine
                try:
                    value = coro.throw(e)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                value = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _finish(resume: _Resume) -> Any:
    return await resume


def run_eager(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T] | None:
    """Start ``coro`` now. If it completes without suspending, return None
    (exceptions propagate to the caller); else return a Task that finishes it.
    """
    try:
        first = coro.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_finish(_Resume(coro, first)))
