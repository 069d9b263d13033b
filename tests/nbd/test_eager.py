"""run_eager: a request that never waits costs no Task; one that waits ends
in a Task that behaves like one made with create_task (results, errors,
cancellation reaching the coroutine, bare yields)."""

from __future__ import annotations

import asyncio

import pytest

from emulator.nbd.eager import run_eager


def test_a_coroutine_that_never_waits_runs_at_once_without_a_task() -> None:
    async def main() -> None:
        seen: list[int] = []

        async def quick() -> None:
            seen.append(1)

        assert run_eager(quick()) is None
        assert seen == [1]

        async def fails() -> None:
            raise ValueError("at once")

        with pytest.raises(ValueError, match="at once"):
            run_eager(fails())

    asyncio.run(main())


def test_a_coroutine_that_waits_finishes_in_a_task() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        async def inner() -> int:
            await asyncio.sleep(0)  # a bare yield, then a future
            return await fut + 1

        async def outer() -> int:
            return await inner() * 10

        task = run_eager(outer())
        assert task is not None and not task.done()
        loop.call_later(0.01, fut.set_result, 4)
        assert await task == 50

        fut2: asyncio.Future[int] = loop.create_future()

        async def fails_later() -> None:
            await fut2
            raise KeyError("later")

        task2 = run_eager(fails_later())
        assert task2 is not None
        fut2.set_result(0)
        with pytest.raises(KeyError, match="later"):
            await task2

    asyncio.run(main())


@pytest.mark.parametrize("recover", [False, True])
def test_cancel_reaches_the_coroutine_while_it_waits_on_its_first_future(recover: bool) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        first: asyncio.Future[None] = loop.create_future()
        events: list[str] = []

        async def req() -> str:
            try:
                await first
            except asyncio.CancelledError:
                events.append("cancelled")
                if not recover:
                    raise
                await asyncio.sleep(0.001)  # waits again after the cancel
                return "recovered"
            finally:
                events.append("finally")
            return "done"

        task = run_eager(req())
        assert task is not None
        await asyncio.sleep(0)
        task.cancel()
        if recover:
            assert await task == "recovered"
        else:
            with pytest.raises(asyncio.CancelledError):
                await task
        assert events == ["cancelled", "finally"]

    asyncio.run(main())
