"""How often the event loop ran other callbacks while an awaitable ran: a test that
some work hands the loop back (hosts' I/O keeps going) instead of holding it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def loop_turns_during(aw: Awaitable[T]) -> tuple[T, int]:
    """Await ``aw`` beside a task that counts its turns of the loop: (result, turns)."""
    turns = 0
    done = False

    async def other() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(other())
    await asyncio.sleep(0)
    before = turns
    try:
        result = await aw
    finally:
        done = True
        await task
    return result, turns - before
