"""Several migrations and arrays at once, with real `blockmig array serve` processes.

1. six LUNs migrating A -> B together, each written by two host connections
   (our NbdClient, disjoint halves), random pause / resume / cancel through the
   API, different throttles, kill -9 of B in the middle and a restart: every LUN
   equals its reference model (on B, and on A too when cancelled), every
   migration ends in a final state that the list, the single status and the
   LUN's state agree on, the pools' used space is what their files hold, and
   pause / resume / cancel of a migration that ended before the restart are
   409s, as they were before it;
2. a chain: while LUN x migrates A -> B, C migrates B's x (a source that is
   itself migrating), in both orders of completion: the host on C's x sees its
   writes, and A, B and C end with the same bytes;
3. concurrent DELETEs of a migrating LUN: one deletes it, the others are told
   clearly (409 or 404), never a 500.

The reference models and host loads are those of test_faults.py. Tests marked
``Regression (fixed)`` pin a defect found while writing this file.
"""

from __future__ import annotations

import asyncio
import os
import random
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from control.api_client import ApiError
from tests.mirror.test_faults import (
    FINAL,
    Load,
    MiB,
    Model,
    Running,
    api,
    make_data,
    read_all,
    restart,
    run,
    write_all,
)
from tests.servers import ArrayDaemon, array_daemon

pytestmark = pytest.mark.slow

ACTIONS = ("pause", "resume", "cancel")


async def call(d: ArrayDaemon, method: str, path: str, body: Any = None, **query: str) -> tuple[int, Any]:
    """(200, JSON) or (the error's status, its message), through the API in a thread."""
    try:
        return 200, await asyncio.to_thread(api(d).call, method, path, body, query or None)
    except ApiError as e:
        return e.status, str(e)


async def migrate(d: ArrayDaemon, lun: str, source: str, throttle: float) -> None:
    r = await call(d, "POST", "/api/v1/migrations", {"lun": lun, "source": source, "throttle": throttle})
    assert r[0] == 200, r


async def wait_end(d: ArrayDaemon, lun: str, timeout: float = 30) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        code, st = await call(d, "GET", f"/api/v1/migrations/{lun}", wait="10")
        assert code == 200, st
        if st["state"] in FINAL or loop.time() > deadline:
            return dict(st)


async def new_luns(a: ArrayDaemon, names: list[str], size: int, seed: int) -> dict[str, Model]:
    models = {}
    for i, n in enumerate(names):
        data = make_data(seed * 100 + i, size)
        await asyncio.to_thread(api(a).create_lun, n, size)
        await write_all(a.uri(n), data)
        models[n] = Model(data)
    return models


def clean_log(d: ArrayDaemon) -> None:
    out = d.output()
    for bad in ("Traceback", "never retrieved", "was destroyed", "internal error"):
        assert bad not in out, f"array {d.name} logged {bad!r}:\n{out[-4000:]}"


def pools_match_files(d: ArrayDaemon) -> None:
    info = api(d).array_info()
    for pool in info["pools"]:
        files = sum(p.stat().st_blocks * 512 for p in (d.data_dir / "pools" / pool["name"]).glob("*.img"))
        assert pool["used"] == files, (d.name, pool, files)


# --------------------------------------------------------------------------- 1. six at once
@pytest.mark.timeout(120)
def test_six_migrations_with_pauses_cancels_and_a_kill_9_of_the_target(tmp_path: Path) -> None:
    rng = random.Random(3)
    size = 8 * MiB
    names = [f"v{i}" for i in range(6)]
    with ExitStack() as stack:
        a = stack.enter_context(array_daemon(tmp_path / "a", "A"))
        b = stack.enter_context(array_daemon(tmp_path / "b", "B"))

        async def body() -> None:
            nonlocal b
            models = await new_luns(a, names, size, seed=3)
            throttles = [1, 2, 4, 8, 2, 1]
            await asyncio.gather(*(migrate(b, n, a.uri(n), t) for n, t in zip(names, throttles, strict=True)))
            loads = {
                (n, k): Load(
                    models[n],
                    random.Random(rng.random()),
                    interval=0.02,
                    span=(k * size // 2, (k + 1) * size // 2),
                )
                for n in names
                for k in range(2)
            }

            def hosts(d: ArrayDaemon) -> list[Running]:
                return [Running(ld, d.uri(n)) for (n, _), ld in loads.items()]

            async def chaos(d: ArrayDaemon, seconds: float) -> None:
                for _ in range(int(seconds / 0.1)):
                    n, act = rng.choice(names), rng.choice(ACTIONS[:2] * 3 + ACTIONS[2:])
                    code, msg = await call(d, "POST", f"/api/v1/migrations/{n}/{act}")
                    assert code in (200, 409), (n, act, code, msg)
                    await asyncio.sleep(rng.uniform(0, 0.1))

            running = hosts(b)
            await chaos(b, 2)
            b.sigkill()
            for r in running:
                await r.stop()
            b = await restart(stack, b.data_dir, "B")
            running = hosts(b)
            await chaos(b, 2)
            for n in names:  # whatever is paused now finishes
                code, msg = await call(b, "POST", f"/api/v1/migrations/{n}/resume")
                assert code in (200, 409), (n, code, msg)
            ends = {n: await wait_end(b, n) for n in names}
            for r in running:
                await r.stop()
            listed = {m["lun"]: m for m in api(b).call("GET", "/api/v1/migrations")}
            for n in names:
                lun = api(b).get_lun(n)
                assert listed[n]["state"] == ends[n]["state"], (listed[n], ends[n])
                state = ends[n]["state"]
                pair = (state, lun["state"])
                assert pair in (("completed", "ready"), ("cancelled", "remote")), (n, pair)
                models[n].check(await read_all(b.uri(n), size), f"B {n} ({state})")
                if state == "cancelled":
                    models[n].check(await read_all(a.uri(n), size), f"A {n} (cancelled)")
                for act in ACTIONS:  # ended before or after the restart: the same 409
                    code, msg = await call(b, "POST", f"/api/v1/migrations/{n}/{act}")
                    assert code == 409 and f"{n} is" in msg and state in msg, (n, act, code, msg)
            for d in (a, b):
                pools_match_files(d)
                clean_log(d)

        run(body(), 110)


@pytest.mark.timeout(60)
def test_regression_actions_on_a_migration_that_ended_before_a_restart_are_409(tmp_path: Path) -> None:
    """Regression (fixed): a migration that ended (cancelled, completed) before the
    target restarted was listed and shown (GET 200), but pause, resume and cancel
    of it answered 404 "no migration of LUN ...", where before the restart they
    were 409s ("... is cancelled"): MigrationManager.get knew only the migrations
    running since the start, not the ended ones it keeps the status of."""
    size = 2 * MiB
    with ExitStack() as stack:
        a = stack.enter_context(array_daemon(tmp_path / "a", "A"))
        b = stack.enter_context(array_daemon(tmp_path / "b", "B"))

        async def body() -> None:
            nonlocal b
            await new_luns(a, ["c", "d"], size, seed=4)
            await migrate(b, "c", a.uri("c"), 0.1)
            await migrate(b, "d", a.uri("d"), 0)
            assert (await call(b, "POST", "/api/v1/migrations/c/cancel"))[0] == 200
            assert (await wait_end(b, "d"))["state"] == "completed"
            before = {
                (n, act): await call(b, "POST", f"/api/v1/migrations/{n}/{act}")
                for n in ("c", "d")
                for act in ACTIONS
            }
            b.sigkill()
            b = await restart(stack, b.data_dir, "B")
            for (n, act), was in before.items():
                assert was[0] == 409, (n, act, was)
                code, st = await call(b, "GET", f"/api/v1/migrations/{n}")
                assert code == 200 and st["state"] == {"c": "cancelled", "d": "completed"}[n], st
                now = await call(b, "POST", f"/api/v1/migrations/{n}/{act}")
                assert now[0] == 409, (n, act, now, "before the restart:", was)
            clean_log(b)

        run(body(), 50)


# --------------------------------------------------------------------------- 2. a chain
@pytest.mark.timeout(90)
@pytest.mark.parametrize("b_rate,c_rate", [(2, 1), (1, 4)], ids=["b-first", "c-first"])
def test_a_chain_migrates_a_migrating_lun(tmp_path: Path, b_rate: float, c_rate: float) -> None:
    """While x migrates A -> B, C takes B's x over (its source is a migrating LUN).
    The host moves to C: its writes go C -> B -> A while both copy. Whichever ends
    first, every array ends with the model's bytes (b-first: B cuts over first,
    C's copy then reads B's local copy; c-first: C cuts over while B still reads
    through to A)."""
    size = 4 * MiB
    with ExitStack() as stack:
        a, b, c = (stack.enter_context(array_daemon(tmp_path / n.lower(), n)) for n in "ABC")

        async def body() -> None:
            model = (await new_luns(a, ["x"], size, seed=5))["x"]
            await migrate(b, "x", a.uri("x"), b_rate)
            host = Running(Load(model, random.Random(1), interval=0.005), b.uri("x"))
            await asyncio.sleep(0.3)
            await host.stop()  # the host moves to C before C takes B's x over
            await migrate(c, "x", b.uri("x"), c_rate)
            host = Running(Load(model, random.Random(2), interval=0.005), c.uri("x"))
            await asyncio.sleep(0.4)
            load = await host.stop()
            assert load.acked > 20 and not load.write_errors, load.summary()
            for d in (b, c):  # else the host's last writes need not be on A (and B)
                st = (await call(d, "GET", "/api/v1/migrations/x"))[1]
                assert st["state"] != "completed", f"{d.name} cut over under the host's writes"
            ends = [(d.name, (await wait_end(d, "x"))["state"]) for d in (b, c)]
            assert ends == [("B", "completed"), ("C", "completed")], ends
            for d in (a, b, c):
                model.check(await read_all(d.uri("x"), size), f"{d.name}'s x")
                pools_match_files(d)
                clean_log(d)
            # Back to A: its old LUN x is still there (the manager removes it), so a
            # clear 409; once deleted, B's x migrates back.
            code, msg = await call(a, "POST", "/api/v1/migrations", {"lun": "x", "source": c.uri("x")})
            assert code == 409 and "already exists" in msg, (code, msg)
            await asyncio.to_thread(api(a).delete_lun, "x")
            await migrate(a, "x", c.uri("x"), 0)
            assert (await wait_end(a, "x"))["state"] == "completed"
            model.check(await read_all(a.uri("x"), size), "A's x migrated back")

        run(body(), 80)


# --------------------------------------------------------------------------- 3. races
@pytest.mark.timeout(60)
def test_regression_concurrent_deletes_of_a_migrating_lun(tmp_path: Path) -> None:
    """Regression (fixed): two DELETEs of one migrating LUN at once: both found the
    LUN, the second while the first waited for the migration's cancel, and the
    slower one failed with a 500 (KeyError removing the LUN twice, a traceback in
    the log). Now one deletes it and the others are a 409 ("already being
    deleted") or, once it is gone, a 404; the source and another migration are
    untouched."""
    size = 4 * MiB
    names = ["d0", "d1", "d2", "other"]
    with ExitStack() as stack:
        a = stack.enter_context(array_daemon(tmp_path / "a", "A"))
        b = stack.enter_context(array_daemon(tmp_path / "b", "B"))

        async def body() -> None:
            models = await new_luns(a, names, size, seed=6)
            for n in names:
                await migrate(b, n, a.uri(n), 1)
            other = Running(Load(models["other"], random.Random(1), interval=0.01), b.uri("other"))
            for n in names[:3]:
                host = Running(Load(models[n], random.Random(2), interval=0.005), b.uri(n))
                await asyncio.sleep(0.1)
                codes = sorted(
                    code
                    for code, _ in await asyncio.gather(
                        *(call(b, "DELETE", f"/api/v1/luns/{n}", force="true") for _ in range(3))
                    )
                )
                assert codes[0] == 200 and all(c in (404, 409) for c in codes[1:]), (n, codes)
                host.stop_event.set()
                await asyncio.wait_for(host.task, 10)
                assert (await call(b, "GET", f"/api/v1/luns/{n}"))[0] == 404
                models[n].check(await read_all(a.uri(n), size), f"A's {n} after the deletes on B")
            await other.stop()
            code, st = await call(b, "GET", "/api/v1/migrations/other")
            assert code == 200 and st["state"] not in ("failed", "cancelled"), st
            models["other"].check(await read_all(b.uri("other"), size), "B's other")
            assert sorted(os.listdir(b.data_dir / "pools" / "default")) == ["other.img", "other.progress"]
            pools_match_files(b)
            clean_log(b)

        run(body(), 50)
