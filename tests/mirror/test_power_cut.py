"""A real power cut of the target array, not only kill -9 (I4, durability rules).

kill -9 keeps the page cache, so it cannot catch a missing or misordered
fdatasync. Here the target array B keeps its --data-dir on crashfs
(tests/crashfs.py), which holds every file's data in memory until that file
is fsync'ed: B is killed -9, then the power is cut (every unsynced write of
the LUN file, the progress file and sqlite is dropped), and B restarts on
what was durable. Then, after the resumed migration completes, every byte of
B's LUN must equal A's LUN and the reference model (initial data plus every
acknowledged write; a write cut off by the crash may be old or new per block),
and the resume re-copies only part of the LUN: checkpoints every second made
the progress up to the last one durable (I4).

Checked by hand that they can fail: without the target flush of
Migration._checkpoint the four mid-copy cases cut after a checkpoint fail
(regions believed clean hold zeroes; the one cut before any checkpoint cannot);
with the progress committed BEFORE that flush, the two "commit" cases (cut right
after a progress commit) fail every time, the "random" ones only by luck;
without the flushes of the cutover the after-completion case fails.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.crashfs import CrashMount
from tests.mirror.test_faults import (
    LUN,
    RUNNING,
    Load,
    MiB,
    Model,
    Running,
    api,
    brief,
    clean_fraction,
    make_data,
    new_source,
    poll,
    read_all,
    restart,
    run,
    start_migration,
    status,
    wait_final,
    write_all,
)
from tests.servers import array_daemon

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse for crashfs"),
]

SIZE = 32 * MiB
THROTTLE = 8  # MB/s: the first pass takes ~4 s, so several checkpoints (1 s apart) come before the cut
REGION = 64 * 1024  # a host write dirties 64 KiB, not 1 MiB: background mode stays background
#: (mode, seed, cut this many seconds after the start: low, high; MiB of data, then holes; cut)
#: cut "random": at that time, under host writes; "commit": the host load stops then and the
#: power goes off right after the next commit of the progress file (a checkpoint's), so a
#: progress committed before its data was flushed is caught every time
CASES = [
    ("background", 11, 1.5, 2.5, 32, "random"),
    ("background", 12, 1.5, 2.4, 24, "commit"),
    ("active", 13, 1.5, 2.5, 32, "random"),
    ("active", 14, 1.5, 2.4, 24, "commit"),
    ("background", 15, 0.0, 0.3, 24, "random"),  # before the first checkpoint
]


def differing_blocks(a: bytes | bytearray, b: bytes | bytearray, block: int = 4096) -> list[int]:
    x = np.frombuffer(a, np.uint8).reshape(-1, block)
    y = np.frombuffer(b, np.uint8).reshape(-1, block)
    return [i * block for i in np.flatnonzero((x != y).any(axis=1)).tolist()]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "mode,seed,lo,hi,data_mib,cut", CASES, ids=[f"{c[0]}-seed{c[1]}-{c[5]}" for c in CASES]
)
def test_power_cut_of_the_target_mid_copy_loses_no_acknowledged_write(
    tmp_path: Path, mode: str, seed: int, lo: float, hi: float, data_mib: int, cut: str
) -> None:
    """A sparse source (data_mib < 32) has zero runs: crashfs has no SEEK_DATA, so on
    resume the local copy may hold data anywhere, and each such run is zeroed there
    with fallocate, which crashfs refuses (EOPNOTSUPP): FileBackend writes zeroes."""
    rng = random.Random(seed)
    at = rng.uniform(lo, hi)
    with ExitStack() as stack:
        fs = stack.enter_context(CrashMount(tmp_path / "crashfs"))  # left last: unmounted after B stopped
        b_dir = fs.mount()  # the mount point is B's data dir (its logs go beside it, off crashfs)
        a = stack.enter_context(array_daemon(tmp_path / "a", "A"))
        b = stack.enter_context(array_daemon(b_dir, "B"))

        async def body() -> None:
            model = await new_source(a, make_data(seed, SIZE, data_mib * MiB), data_mib * MiB)
            t0 = time.monotonic()
            await asyncio.to_thread(
                start_migration,
                b,
                a.uri(LUN),
                "--throttle",
                str(THROTTLE),
                "--mode",
                mode,
                "--region-size",
                str(REGION),
            )
            t_started = time.monotonic()
            load = Load(model, rng, interval=0.03, read_share=0.2)
            run1 = Running(load, b.uri(LUN))

            def cut_now(s: dict[str, Any]) -> bool:
                return (time.monotonic() - t_started >= at and load.acked >= 3) or s["state"] not in RUNNING

            before = await poll(b, cut_now, 30, f"{at:.1f} s of copying")
            if cut == "commit":
                await run1.stop()  # else the next commit may be a write's (clearing bits), not a checkpoint's
                fs.cut_after_fsync_of(".progress")
                assert await asyncio.to_thread(fs.wait_power_off, 10), "no progress commit within 10 s"
                before = await status(b)  # B runs on in memory: it is at least as far as the disk
            assert before["state"] in RUNNING, f"the migration ended before the cut: {brief(before)}"
            t_cut = time.monotonic() - t0
            ran = time.monotonic() - t_started
            # kill -9 B, then the power: B may wait on the file system in the kernel,
            # unkillable until crashfs dies. The host load runs on meanwhile.
            b.proc.kill()
            await asyncio.to_thread(fs.power_cut)
            await asyncio.to_thread(b.proc.wait, 10)
            if cut == "random":
                await run1.stop()
            await asyncio.to_thread(fs.mount)

            b2 = await restart(stack, b_dir, "B")
            after = await status(b2)
            # Cut before the cutover: acknowledged writes are on A, so none may be lost
            # (after a cutover a write not flushed by the host could be, legitimately).
            assert after["state"] in RUNNING, f"not resumed: {brief(after)}"
            recopied = after["recopied_regions_on_resume"] * REGION
            # Writes through the resumed migration too, paused meanwhile: a cutover would
            # send later writes to B alone, and A's LUN could no longer be compared with B's.
            paused = await asyncio.to_thread(api(b2).call, "POST", f"/api/v1/migrations/{LUN}/pause")
            assert paused["state"] == "paused", f"the migration ended before the pause: {brief(paused)}"
            run2 = Running(load, b2.uri(LUN))
            await asyncio.sleep(1.0)
            await run2.stop()
            await asyncio.to_thread(api(b2).call, "POST", f"/api/v1/migrations/{LUN}/resume")
            done = await wait_final(b2, 40)
            assert done["state"] == "completed", brief(done)

            got_b = await read_all(b2.uri(LUN), SIZE)
            got_a = await read_all(a.uri(LUN), SIZE)
            print(
                f"\n[power-cut {mode} seed={seed}] cut at {t_cut:.1f} s ({ran:.1f} s after the start) "
                f"with {clean_fraction(before):.0%} clean in memory; resume re-copies {recopied >> 10} KiB = "
                f"{recopied / SIZE:.0%} of the LUN (dirty in memory at the cut "
                f"{before['dirty_bytes'] >> 10} KiB); final mode {done['mode']}, "
                f"zeroed {done['zeroed_bytes'] >> 10} KiB; {load.summary()}"
            )
            model.check(got_a, "A (the source) after the migration")
            model.check(got_b, "B after the power cut and the resumed migration")
            diff = differing_blocks(got_a, got_b)
            assert not diff, (
                f"after the power cut B's LUN differs from A's in {len(diff)} blocks of 4 KiB, "
                f"first {[hex(o) for o in diff[:8]]}: regions believed clean whose data was not durable"
            )
            # I4: the progress of the checkpoints before the cut survived it. Nothing is
            # believed clean that was not clean in memory before the cut (a few regions of
            # slack: the copy ran on up to one poll after the last status), and the
            # resume re-copies at most what was dirty then plus what the copy made clean
            # since the last checkpoint (1 s at the throttle) and writes held dirty.
            slack = 4 * REGION
            assert recopied >= before["dirty_bytes"] - slack, (recopied, brief(before))
            if ran >= 1.5:  # a checkpoint came (1 s after the start, then every second)
                assert recopied < SIZE, "the resume re-copies the whole LUN (I4: only a bounded part)"
            # else the cut may come before the first checkpoint: then nothing was durable
            # yet, not even the LUN file's size, and the whole LUN is copied again.
            assert recopied <= before["dirty_bytes"] + 2 * THROTTLE * 10**6 + 2 * MiB, (
                f"the resume re-copies {recopied >> 10} KiB, far more than was dirty at the cut "
                f"({before['dirty_bytes'] >> 10} KiB): progress was lost"
            )

        run(body(), 80)


@pytest.mark.timeout(60)
def test_power_cut_right_after_completion_keeps_the_whole_lun(tmp_path: Path) -> None:
    """The cutover flushes the local copy before it records the migration completed:
    a power cut just after it, with no host FLUSH since, leaves the LUN ready and whole.
    (The host load stops before the cutover: writes that went to both sides while it
    settled need a host FLUSH to be durable on the target, as on any disk.)"""
    rng = random.Random(21)
    with ExitStack() as stack:
        fs = stack.enter_context(CrashMount(tmp_path / "crashfs"))
        b_dir = fs.mount()
        a = stack.enter_context(array_daemon(tmp_path / "a", "A"))
        b = stack.enter_context(array_daemon(b_dir, "B"))

        async def body() -> None:
            model = await new_source(a, make_data(21, SIZE))
            await asyncio.to_thread(
                start_migration, b, a.uri(LUN), "--throttle", str(2 * THROTTLE), "--region-size", str(REGION)
            )
            load = Load(model, rng, interval=0.03, read_share=0.2)
            run1 = Running(load, b.uri(LUN))
            await poll(b, lambda s: clean_fraction(s) >= 0.5 or s["state"] not in RUNNING, 30, "half clean")
            await run1.stop()
            done = await poll(b, lambda s: s["state"] not in RUNNING, 30, "completion", interval=0.01)
            assert done["state"] == "completed", brief(done)
            await asyncio.to_thread(b.sigkill)
            fs.power_cut()
            await asyncio.to_thread(fs.mount)

            b2 = await restart(stack, b_dir, "B")
            lun = await asyncio.to_thread(api(b2).get_lun, LUN)
            assert lun["state"] == "ready", lun
            got_b = await read_all(b2.uri(LUN), SIZE)
            diff = differing_blocks(await read_all(a.uri(LUN), SIZE), got_b)
            assert not diff, (
                f"after a power cut just after completion B's LUN differs from A's in {len(diff)} "
                f"blocks of 4 KiB, first {[hex(o) for o in diff[:8]]}: the cutover's data was not durable"
            )
            model.check(got_b, "B after a power cut right after completion")
            print(f"\n[power-cut after completion] {load.summary()}")

        run(body(), 50)


def fresh_data_dir(stack: ExitStack, tmp_path: Path) -> tuple[CrashMount, Path]:
    """crashfs, mounted (and unmounted when ``stack`` closes), and a data dir the array
    makes on it (its logs go beside the path given, off crashfs)."""
    fs = stack.enter_context(CrashMount(tmp_path / "crashfs"))
    fs.mount()
    link = tmp_path / "b"
    link.symlink_to(fs.mountpoint / "data")
    return fs, link


#: (pool of the new LUN or None, the array's --pool options)
NEW_LUN_CASES = [(None, ()), ("gold", ("--pool", "gold=64M"))]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pool,args", NEW_LUN_CASES, ids=["default-pool", "named-pool"])
def test_power_cut_keeps_the_flushed_data_of_a_new_lun(
    tmp_path: Path, pool: str | None, args: tuple[str, ...]
) -> None:
    """Regressions (fixed): the names a new array and LUN rely on were not durable
    (POSIX: a name is durable once its directory is fsync'ed; a file's own fsync
    does not make it so). A fresh array made its data dir and pools/POOL with no
    fsync of their parents, and a LUN's file was created with none of its pool's
    directory. A host wrote to a new LUN and FLUSHed, the power went: the file
    (or the directory holding it) was gone, and the array recreated the LUN empty
    (its row was in sqlite), silently losing acknowledged, flushed data."""
    data = make_data(31, 4 * MiB)
    with ExitStack() as stack:
        fs, b_dir = fresh_data_dir(stack, tmp_path)
        b = stack.enter_context(array_daemon(b_dir, "B", *args))

        async def body() -> None:
            await asyncio.to_thread(api(b).create_lun, LUN, len(data), pool)
            await write_all(b.uri(LUN), data)  # written, then FLUSHed: durable from here on
            await asyncio.to_thread(b.sigkill)
            fs.power_cut()
            await asyncio.to_thread(fs.mount)
            b2 = await restart(stack, b_dir, "B", *args)
            assert "has no file" not in b2.output(), b2.output()
            lun = await asyncio.to_thread(api(b2).get_lun, LUN)
            assert (lun["pool"], lun["state"]) == (pool or "default", "ready"), lun
            Model(data).check(await read_all(b2.uri(LUN), len(data)), "a new LUN after FLUSH and a power cut")

        run(body(), 40)


@pytest.mark.timeout(60)
def test_power_cut_after_a_lun_delete_leaves_no_half_lun(tmp_path: Path) -> None:
    """Regression (fixed): a deleted LUN's file was unlinked, then its row deleted,
    with no fsync of the pool's directory between: a power cut after the DELETE
    was acknowledged brought the file back (POSIX: an unlink is durable once its
    directory is fsync'ed) with no row, a file no LUN owns, its space used for
    good. Deleted, the LUN must stay gone whole: no row, no file."""
    with ExitStack() as stack:
        fs, b_dir = fresh_data_dir(stack, tmp_path)
        b = stack.enter_context(array_daemon(b_dir, "B"))
        img = b_dir / "pools" / "default" / f"{LUN}.img"

        async def body() -> None:
            await new_source(b, make_data(32, 4 * MiB))
            assert img.exists()
            await asyncio.to_thread(api(b).delete_lun, LUN)
            await asyncio.to_thread(b.sigkill)
            fs.power_cut()
            await asyncio.to_thread(fs.mount)
            b2 = await restart(stack, b_dir, "B")
            assert await asyncio.to_thread(api(b2).list_luns) == []
            assert not img.exists(), f"{img} came back after its LUN's DELETE was acknowledged"

        run(body(), 40)


@pytest.mark.timeout(60)
def test_power_cut_keeps_the_generated_api_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (fixed): the API token a fresh array generates into DATA_DIR/token
    (where clients read it) was never fsync'ed. The array's later fsync of the data
    dir made its name durable, not its data: after a power cut the file was empty,
    and the restarted array took the empty token, its API open to anyone sending
    'Authorization: Bearer ' (and no longer to the clients holding the token)."""
    monkeypatch.delenv("BLOCKMIG_TOKEN", raising=False)
    with ExitStack() as stack:
        fs, b_dir = fresh_data_dir(stack, tmp_path)
        b = stack.enter_context(array_daemon(b_dir, "B", token=None))
        b.sigkill()
        fs.power_cut()
        fs.mount()
        b2 = stack.enter_context(array_daemon(b_dir, "B", token=None))
        assert (b2.token, len(b.token)) == (b.token, 43), "the API token changed at a power cut"
        assert api(b2).list_luns() == []


@pytest.mark.timeout(60)
def test_power_cut_after_a_pool_move_leaves_no_old_file(tmp_path: Path) -> None:
    """Regression (fixed): a completed move to another pool unlinked the LUN's old
    file with no fsync of its directory: a power cut brought it back, a file no
    LUN owns in the old pool (its space used for good). The LUN itself is whole
    in its new pool."""
    data = make_data(33, 4 * MiB)
    args = ("--pool", "default=64M", "--pool", "gold=64M")
    with ExitStack() as stack:
        fs, b_dir = fresh_data_dir(stack, tmp_path)
        b = stack.enter_context(array_daemon(b_dir, "B", *args))

        async def body() -> None:
            model = await new_source(b, data)
            await asyncio.to_thread(api(b).call, "POST", f"/api/v1/luns/{LUN}/move", {"pool": "gold"})
            done = await wait_final(b, 30)
            assert done["state"] == "completed", brief(done)
            await asyncio.to_thread(b.sigkill)
            fs.power_cut()
            await asyncio.to_thread(fs.mount)
            b2 = await restart(stack, b_dir, "B", *args)
            lun = await asyncio.to_thread(api(b2).get_lun, LUN)
            assert (lun["pool"], lun["state"]) == ("gold", "ready"), lun
            model.check(await read_all(b2.uri(LUN), len(data)), "a LUN moved, then a power cut")
            old = b_dir / "pools" / "default" / f"{LUN}.img"
            assert not old.exists(), f"{old} came back after the move to pool gold completed"

        run(body(), 40)
