"""migrate_volume end to end, as DESIGN.md "Migration, as the spec orders it" orders it.

Real arrays of every model (`blockmig up` with a TOML config), the `blockmig` CLI as a
subprocess, data written and checked over NBD (our NbdClient, qemu-io, fio). Every branch:

- step 1, the source driver moves it (pool to pool in a unified or pooled array);
- step 2, a target that takes over asynchronously (attachable while copying), synchronously,
  or refuses (generic host copy, also forced with --force-host-copy);
- a failure injected at each step (BLOCKMIG_FAIL_AT) leaves the volume usable on its
  authoritative side and a second migration succeeds;
- a host attached during the migration keeps correct data through the cutover (fio, and a
  model-checked NbdClient writer), two migrations at once are refused, and a follower killed
  with -9 is restarted by the next command.

The "slow" arrays have `fixed:2` media (2 ms per I/O) and their volumes hold a tagged block
every 64 KiB, so a migration between them lasts seconds: long enough to be watched.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from control.config import pid_alive
from emulator.nbd.client import NbdClient
from tests.tools import LibnbdShell

from .blockmig_env import (
    BLOCK,
    MIGRATING,
    ArraySpec,
    BlockmigEnv,
    Image,
    MiB,
    assert_content,
    block,
    fill,
    host_array,
    lun_of,
    qemu_io,
    write_blocks,
)

SLOW = "fixed:2"
ARRAYS = [
    ArraySpec("A", "unified", ("default", "gold")),
    ArraySpec("B", "unified"),
    ArraySpec("C", "takeover-sync"),
    ArraySpec("D", "pooled", ("default", "gold")),
    ArraySpec("E", "plain"),
    ArraySpec("S", "unified", media=SLOW),
    ArraySpec("T", "unified", media=SLOW),
    ArraySpec("P", "plain", media=SLOW),
    ArraySpec("R", "unified", migration_throttle=8),  # copies at 8 MB/s unless told otherwise
    # slow without slow media: its copy of a DENSE volume's 8 MiB lasts ~4 s, as T's does
    # (S's media alone does not slow a copy: the copier reads a region's runs at once)
    ArraySpec("U", "unified", migration_throttle=2),
    ArraySpec("F", "plain", capacity="8M"),  # full after 8 MiB of data
    ArraySpec("Q", "unified", ("default", "gold"), migration_throttle=2),  # slow pool moves
    ArraySpec("K", "unified", migration_throttle=2),  # killed and restarted by a test
    ArraySpec("L", "unified"),  # killed and restarted by a test
]
SMALL = 16 * MiB  # on the fast arrays: a migration takes well under a second
BIG = 64 * MiB  # on the slow arrays: a migration takes a few seconds
DENSE = 32 * 1024  # a tagged block every 32 KiB: twice as long, for windows several commands need
HOST_IO_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def bm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockmigEnv]:
    with BlockmigEnv(tmp_path_factory.mktemp("migrate") / "state") as env:  # always stops them
        env.up(ARRAYS)
        yield env


def make(
    bm: BlockmigEnv, name: str, size: int, host: str, stride: int = 64 * 1024
) -> tuple[dict[str, Any], Image]:
    """A volume with a tagged block every ``stride`` bytes (the tag names the volume and the
    offset). The smaller the stride, the longer a copy takes on the slow arrays."""
    v = bm.create(name, size, host)
    img = fill(v["provider_location"]["uri"], size, seed=zlib.crc32(name.encode()), stride=stride)
    return v, img


# ---------------------------------------------------------------------- step 1
@pytest.mark.parametrize("array", ["A", "D"], ids=["unified", "pooled"])
def test_source_driver_moves_between_pools(bm: BlockmigEnv, array: str) -> None:
    model = {a.name: a.model for a in ARRAYS}[array]
    v, img = make(bm, f"pool-move-{array}", SMALL, array)
    uri = v["provider_location"]["uri"]
    # a real peer writes too, between the tagged blocks
    r = qemu_io(uri, f"write -P 0xa5 {8 * MiB + 8192} 8192")
    assert r.returncode == 0, r.stdout + r.stderr
    img.blocks[8 * MiB + 8192] = b"\xa5" * 8192

    d = bm.ok("migrate", v["id"], f"{array}@{model}#gold", "--wait")

    assert d["migration_status"] == "success", d
    assert d["host"] == f"{array}@{model}#gold"
    loc = d["provider_location"]
    assert (loc["array"], loc["pool"], loc["lun"]) == (array, "gold", lun_of(v))
    assert bm.api(array).get_lun(lun_of(v))["pool"] == "gold"
    # step 1 answered: the routine never went on to the target driver
    mig = bm.db_migration(v["id"])
    assert mig["phase"] == "done" and "async" not in mig, mig
    assert_content(loc["uri"], img)
    r = qemu_io(loc["uri"], f"read -P 0xa5 {8 * MiB + 8192} 8192", "read -P 0 4096 61440")
    assert r.returncode == 0, r.stdout + r.stderr


def test_host_shorthand_array_hash_pool_names_a_pool(bm: BlockmigEnv) -> None:
    """`blockmig migrate v1 'A#gold'`: the CLI's help and Host.parse's own error message offer
    ARRAY#POOL as a host; it must mean pool gold of array A, not an array called 'A#gold'."""
    v, img = make(bm, "shorthand", SMALL, "A")

    r = bm.run("migrate", v["id"], "A#gold", "--wait", "--json")

    assert r.returncode == 0, f"`migrate {v['name']} A#gold` refused: {r.stderr.strip()}"
    d = json.loads(r.stdout)
    assert d["migration_status"] == "success" and d["host"] == "A@unified#gold", d
    assert_content(d["provider_location"]["uri"], img)


# ---------------------------------------------------------------------- step 2, async target
def test_async_target_is_attachable_and_serves_a_host_through_the_cutover(bm: BlockmigEnv) -> None:
    v, img = make(bm, "async", BIG, "S")
    lun = lun_of(v)

    d = bm.ok("migrate", v["id"], "T")

    assert d["migration_status"] == "migrating_attachable", d
    assert d["host"] == "T@unified#default"  # step 3: host is the target at once
    t_uri = d["provider_location"]["uri"]
    assert t_uri == bm.api("T").connection(lun)["uri"]
    # a host reads the whole volume through the target while it still copies ...
    assert_content(t_uri, img)
    st = bm.array_migration("T", lun)
    assert st is not None and st["remote_reads"] > 0, st  # (read through to the source)
    # ... then writes and reads, checked against a model, until the migration ended and on;
    # meanwhile `show` reports the migration and `attach` is allowed
    model = HostModel(img, workers=2, seed=1, think=0.02)

    def meanwhile() -> tuple[dict[str, Any], dict[str, Any]]:
        return bm.show(v["id"]), bm.ok("attach", v["id"], "--host-name", "host1")

    seen, (s, att) = asyncio.run(_host_io_until_done(bm, v["id"], t_uri, model, 60, meanwhile))

    assert s["migration_status"] == "migrating_attachable", s
    assert s["attachable"] is True
    assert s["migration"]["phase"] == "complete"
    assert s["migration"]["source"] == "S@unified#default"
    assert s["migration"]["progress"]["state"] in ("copying", "converging", "cutover"), s
    assert s["migration"]["progress"]["total_bytes"] == BIG
    assert att["data"]["uri"] == t_uri
    assert model.failed is None, f"host I/O failed during the migration: {model.failed!r}"
    assert seen[0] == "migrating_attachable" and seen[-1] == "success", seen
    assert model.writes > 20 and model.reads > 10, (model.writes, model.reads)
    end = bm.show(v["id"])
    assert end["host"] == "T@unified#default"
    assert end["provider_location"]["uri"] == t_uri
    assert bm.db_migration(v["id"])["async"] is True
    assert (bm.array_migration("T", lun) or {}).get("state") == "completed"
    assert lun not in bm.luns("S"), "step 4 must remove the source LUN"
    assert_content(t_uri, img)
    assert bm.ok("detach", v["id"])["status"] == "available"


def test_the_target_arrays_default_rate_throttles_blockmig_migrate(bm: BlockmigEnv) -> None:
    """`blockmig migrate` names no rate (the proposal's driver call has none): the target
    array's `migration_throttle` sets it."""
    v, img = make(bm, "paced", SMALL, "A", stride=BLOCK)  # every block written: 16 MiB to copy
    d = bm.ok("migrate", v["id"], "R")
    assert d["migration_status"] == "migrating_attachable", d
    end = bm.wait_migration(v["id"], timeout=60)
    assert end["migration_status"] == "success", end
    st = bm.array_migration("R", lun_of(v))
    assert st is not None and st["state"] == "completed" and st["throttle"] == 8e6, st
    took = st["finished"] - st["started"]
    assert took >= 0.8 * SMALL / 8e6, f"16 MiB copied in {took:.2f} s: faster than 8 MB/s"
    assert_content(end["provider_location"]["uri"], img)


# ---------------------------------------------------------------------- step 2, sync target
def test_sync_target_moves_then_success(bm: BlockmigEnv) -> None:
    v, img = make(bm, "sync", SMALL, "A")

    d = bm.ok("migrate", v["id"], "C", "--wait")

    assert d["migration_status"] == "success", d
    assert d["host"] == "C@takeover-sync#default"
    mig = bm.db_migration(v["id"])
    assert mig["async"] is False, mig  # moved True, migration_async False
    assert (bm.array_migration("C", lun_of(v)) or {}).get("state") == "completed"
    assert lun_of(v) not in bm.luns("A")
    assert d["provider_location"]["uri"] == bm.api("C").connection(lun_of(v))["uri"]
    assert_content(d["provider_location"]["uri"], img)


# ---------------------------------------------------------------------- step 2, target refuses
def test_plain_target_means_a_host_copy_not_attachable_meanwhile(bm: BlockmigEnv) -> None:
    v, img = make(bm, "host-copy", BIG, "S", stride=DENSE)
    lun = lun_of(v)

    d = bm.ok("migrate", v["id"], "P")

    assert d["migration_status"] == "migrating", d
    assert d["attachable"] is False
    s = bm.show(v["id"])
    assert s["migration_status"] == "migrating", s
    assert s["migration"]["phase"] == "host-copy"
    assert s["migration"]["progress"]["total_bytes"] == BIG
    msg = bm.refused("attach", v["id"])
    assert "host-copy" in msg and "not attachable" in msg and v["name"] in msg, msg
    msg = bm.refused("delete", v["id"])
    assert "migrating" in msg and v["name"] in msg, msg

    end = bm.wait_migration(v["id"])
    assert "migrating" in end["_seen"]
    assert end["migration_status"] == "success", end
    assert end["host"] == "P@plain#default"
    assert bm.array_migration("P", lun) is None  # P never took anything over
    assert lun not in bm.luns("S")
    assert_content(end["provider_location"]["uri"], img)
    assert bm.ok("attach", v["id"])["data"]["uri"] == end["provider_location"]["uri"]


def test_pooled_target_means_a_host_copy(bm: BlockmigEnv) -> None:
    v, img = make(bm, "to-pooled", SMALL, "A")

    d = bm.ok("migrate", v["id"], "D@pooled#gold", "--wait")

    assert d["migration_status"] == "success", d
    assert d["host"] == "D@pooled#gold"
    assert bm.array_migration("D", lun_of(v)) is None
    assert "async" not in bm.db_migration(v["id"])
    assert lun_of(v) not in bm.luns("A")
    assert bm.api("D").get_lun(lun_of(v))["pool"] == "gold"
    assert_content(d["provider_location"]["uri"], img)


def test_force_host_copy_between_unified_arrays(bm: BlockmigEnv) -> None:
    v, img = make(bm, "forced", SMALL, "A")

    d = bm.ok("migrate", v["id"], "B", "--force-host-copy", "--wait")

    assert d["migration_status"] == "success", d
    assert d["host"] == "B@unified#default"
    assert bm.array_migration("B", lun_of(v)) is None, "B took the LUN over: not a host copy"
    assert "async" not in bm.db_migration(v["id"])
    assert lun_of(v) not in bm.luns("A")
    assert_content(d["provider_location"]["uri"], img)


# ---------------------------------------------------------------------- failures
FAILURES = [
    # (step, target): the source is always A (unified, default pool)
    ("source", "A@unified#gold"),  # pool move
    ("source", "B"),
    ("target", "B"),
    ("host", "B"),  # B already took the LUN over (async)
    ("complete", "B"),
    ("cleanup", "B"),  # the data already lives on B
    ("host", "C"),  # C already copied everything (sync)
    ("target", "E"),
    ("copy", "E"),  # host copy
    ("cleanup", "E"),  # host copy done: the data already lives on E
]


@pytest.mark.parametrize(("step", "target"), FAILURES, ids=[f"{s}-{t[0]}" for s, t in FAILURES])
def test_failure_at_each_step_leaves_the_volume_usable(bm: BlockmigEnv, step: str, target: str) -> None:
    name = f"fail-{step}-{target.replace('#', '-').replace('@', '-')}"
    v, img = make(bm, name, SMALL, "A")
    lun = lun_of(v)
    source_host = "A@unified#default"
    dest_array = host_array(target.partition("#")[0])
    model = {a.name: a.model for a in ARRAYS}[dest_array]
    dest_host = f"{dest_array}@{model}#{target.partition('#')[2] or 'default'}"

    msg = bm.refused("migrate", v["id"], target, "--wait", env={"BLOCKMIG_FAIL_AT": step})

    assert f"failure injected at step {step!r}" in msg and name in msg, msg
    d = bm.show(v["id"])
    assert d["migration_status"] == "error", d
    assert "failure injected" in d["migration"]["error"]
    # the authoritative side: the source, unless only the source cleanup failed
    want_host = dest_host if step == "cleanup" else source_host
    assert d["host"] == want_host, (
        f"after a failure at step {step!r} the volume must stay where its data is "
        f"({want_host}), not {d['host']}"
    )
    auth = host_array(want_host)
    uri = d["provider_location"]["uri"]
    assert uri == bm.api(auth).connection(lun)["uri"]
    assert_content(uri, img)
    img.blocks[BLOCK] = block(0xF00D, BLOCK)  # still writable
    write_blocks(uri, {BLOCK: img.blocks[BLOCK]})
    assert_content(uri, img)
    assert bm.ok("attach", v["id"])["data"]["uri"] == uri
    if step != "cleanup":
        if dest_array != "A":
            assert lun not in bm.luns(dest_array), f"a failed migration left {lun} on {dest_array}"
        else:
            assert bm.api("A").get_lun(lun)["pool"] == "default"

    # a second migration is not blocked by anything the first left behind
    again = "A" if step == "cleanup" else target
    d2 = bm.ok("migrate", v["id"], again, "--wait")
    assert d2["migration_status"] == "success", d2
    assert host_array(d2["host"]) == host_array(again)
    assert_content(d2["provider_location"]["uri"], img)


# ---------------------------------------------------------------------- a host through the cutover
FIO_OFFSET, FIO_SIZE = 16 * MiB, 16 * MiB


def _fio(cwd: Path, uri: str, *extra: str) -> dict[str, Any]:
    cmd = [
        "fio", "--name=hostio", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
        "--iodepth=8", f"--offset={FIO_OFFSET}", f"--size={FIO_SIZE}", "--verify=crc32c",
        "--randrepeat=1", "--runtime=60", "--output-format=json", *extra,
    ]  # fmt: skip
    # cwd: fio drops its verify state file there, not in the checkout
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=HOST_IO_TIMEOUT, cwd=cwd)
    said = [ln for ln in r.stdout.splitlines() if not ln.startswith((" ", "{", "}"))]
    assert r.returncode == 0, f"fio {extra} failed ({r.returncode}): {r.stderr}\n" + "\n".join(said)
    out: dict[str, Any] = json.loads(r.stdout[r.stdout.index("{") :])
    assert out["jobs"][0]["error"] == 0, out["jobs"][0]
    return out


def test_attached_host_keeps_correct_data_through_the_cutover_fio(bm: BlockmigEnv, tmp_path: Path) -> None:
    v, img = make(bm, "fio", BIG, "S")
    d = bm.ok("migrate", v["id"], "T")
    assert d["migration_status"] == "migrating_attachable", d
    uri = d["provider_location"]["uri"]

    # randwrite 16M with crc32c headers, then read back and verify, on the target while it
    # copies (and `attach` says so meanwhile)
    with ThreadPoolExecutor(1) as pool:
        attached = pool.submit(bm.ok, "attach", v["id"], "--host-name", "fio-host")
        fio_start = time.time()
        out = _fio(tmp_path, uri)
        assert attached.result()["data"]["uri"] == uri
    assert out["jobs"][0]["write"]["io_bytes"] == FIO_SIZE

    end = bm.wait_migration(v["id"])
    assert end["migration_status"] == "success", end
    assert end["provider_location"]["uri"] == uri
    st = bm.array_migration("T", lun_of(v)) or {}
    assert st.get("state") == "completed" and st["finished"] > fio_start, (
        f"the migration ended before fio started: nothing was tested ({st})"
    )
    # after the cutover, everything fio wrote while it migrated is still there
    _fio(tmp_path, uri, "--verify_only")
    assert_content(uri, img, ignore=(FIO_OFFSET, FIO_OFFSET + FIO_SIZE))
    assert lun_of(v) not in bm.luns("S")


async def _poll_until_done(bm: BlockmigEnv, vid: str, seen: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _ = bm.db_row(vid)
        if not seen or seen[-1] != status:
            seen.append(str(status))
        if status not in MIGRATING:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"migration of {vid} did not end within {timeout:.0f} s: {seen}")


class HostModel:
    """A host's 4K writes (FUA) and reads, each worker owning its own blocks so the model
    knows every block's content exactly; a failed write makes its block uncertain."""

    def __init__(self, img: Image, workers: int, seed: int, think: float = 0.0, span: int = 0) -> None:
        self.img = img
        self.span = span  # I/O only to the first ``span`` bytes (0: the whole volume)
        self.workers = workers
        self.think = think
        self.rng = random.Random(seed)
        self.counter = 0
        self.writes = 0
        self.reads = 0
        self.uncertain: set[int] = set()
        self.failed: Exception | None = None

    def _offset(self, w: int) -> int:
        n = (self.span or self.img.size) // BLOCK
        return (self.rng.randrange(n // self.workers) * self.workers + w) * BLOCK

    async def worker(self, c: NbdClient, w: int, stop: asyncio.Event) -> None:
        while not stop.is_set() and self.failed is None:
            off = self._offset(w)
            if self.rng.random() < 0.6:
                self.counter += 1
                data = (struct.pack("<QQQ", 0xC0FFEE, off, self.counter) * (BLOCK // 24)).ljust(BLOCK, b"\0")
                try:
                    await c.write(off, data, fua=True)
                except Exception as e:
                    self.uncertain.add(off)
                    self.failed = e
                    return
                self.img.blocks[off] = data
                self.writes += 1
            else:
                try:
                    got = await c.read(off, BLOCK)
                except Exception as e:
                    self.failed = e
                    return
                want = self.img.blocks.get(off, bytes(BLOCK))
                assert got == want, f"read at {off} returned other data than the host wrote last"
                self.reads += 1
            if self.think:
                await asyncio.sleep(self.think)


async def _host_io_until_done(
    bm: BlockmigEnv,
    vid: str,
    uri: str,
    model: HostModel,
    timeout: float,
    meanwhile: Callable[[], Any] = lambda: None,
    after: float = 0.3,
) -> tuple[list[str], Any]:
    """Host I/O on ``uri`` (``meanwhile`` runs in a thread, e.g. CLI commands) until the
    migration ended, then ``after`` seconds more. Returns the statuses seen and what
    ``meanwhile`` returned."""
    seen: list[str] = []
    stop = asyncio.Event()
    async with await NbdClient.connect(uri) as c:
        tasks = [asyncio.create_task(model.worker(c, w, stop)) for w in range(model.workers)]
        try:
            status, _ = bm.db_row(vid)
            seen.append(str(status))
            result = await asyncio.to_thread(meanwhile)
            await _poll_until_done(bm, vid, seen, timeout)
            await asyncio.sleep(after)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    return seen, result


def test_failed_source_cleanup_keeps_what_the_host_wrote_after_cutover(bm: BlockmigEnv) -> None:
    """Step 4 cut over and only removing the source LUN failed: the target is authoritative
    then, and what the host wrote on it after the cutover must survive the failure."""
    v, img = make(bm, "cleanup-after-cutover", BIG, "S")
    d = bm.ok("migrate", v["id"], "T", env={"BLOCKMIG_FAIL_AT": "cleanup"})  # the follower fails
    assert d["migration_status"] == "migrating_attachable", d
    uri = d["provider_location"]["uri"]
    # a busy host (writes every few ms) on a few regions (so the copy still converges)
    model = HostModel(img, workers=4, seed=2, span=4 * MiB)

    seen, att = asyncio.run(
        _host_io_until_done(bm, v["id"], uri, model, 60, lambda: bm.ok("attach", v["id"]))
    )

    assert att["data"]["uri"] == uri
    assert seen[0] == "migrating_attachable" and seen[-1] == "error", seen
    assert model.writes > 20, model.writes
    end = bm.show(v["id"])
    assert "failure injected at step 'cleanup'" in end["migration"]["error"]
    # every write acknowledged (with FUA) to the host must be where the volume now points
    assert_content(end["provider_location"]["uri"], img, uncertain=model.uncertain)
    assert end["host"] == "T@unified#default", end
    assert model.failed is None, f"the host lost its volume: {model.failed!r}"


CONVERGE_TIMEOUT = 20.0  # unloaded, this migration takes 2-4 s; under a light load 5-7 s


def test_migration_converges_under_a_steady_random_write_load(bm: BlockmigEnv) -> None:
    """I5: the copy finishes under a steady write load. 8 host threads, each at queue depth
    1, random 4K FUA writes and reads all over the volume (some 700 IOPS, ~2 MB/s)."""
    v, img = make(bm, "steady-load", BIG, "S")
    d = bm.ok("migrate", v["id"], "T")
    assert d["migration_status"] == "migrating_attachable", d
    uri = d["provider_location"]["uri"]
    model = HostModel(img, workers=8, seed=3)

    try:
        asyncio.run(_host_io_until_done(bm, v["id"], uri, model, CONVERGE_TIMEOUT))
    except AssertionError as e:
        st = bm.array_migration("T", lun_of(v)) or {}
        keys = ("state", "mode", "mode_reason", "passes", "dirty_bytes", "copy_rate", "dirty_rate")
        raise AssertionError(
            f"{e}; after {model.writes} host writes the array says { {k: st.get(k) for k in keys} }"
        ) from None
    assert model.failed is None, repr(model.failed)
    assert_content(uri, img)


# ---------------------------------------------------------------------- concurrency, restart
def test_two_migrations_of_one_volume_at_once_are_refused(bm: BlockmigEnv) -> None:
    v, img = make(bm, "twice", BIG, "S", stride=DENSE)
    # both targets copy for seconds, whichever wins: against B (0.1-0.2 s) the check below,
    # "while the first one still runs", was a race that B's quick copy could win
    procs = {t: bm.popen("migrate", v["id"], t, "--json") for t in ("T", "U")}
    outs = {t: p.communicate(timeout=60) for t, p in procs.items()}
    rcs = {t: p.returncode for t, p in procs.items()}
    assert sorted(rcs.values()) == [0, 1], (rcs, outs)
    winner = next(t for t, rc in rcs.items() if rc == 0)
    loser = next(t for t, rc in rcs.items() if rc == 1)
    lost = outs[loser][1]
    assert v["id"] in lost and "migrat" in lost, lost
    assert json.loads(outs[winner][0])["migration_status"] == "migrating_attachable"

    msg = bm.refused("migrate", v["id"], "C")  # while the first one still runs
    assert v["id"] in msg or v["name"] in msg, msg
    assert "migrat" in msg, msg
    assert bm.db_row(v["id"])[0] in MIGRATING  # the refused one left the running one alone

    end = bm.wait_migration(v["id"])
    assert end["migration_status"] == "success", end
    assert host_array(end["host"]) == winner
    assert lun_of(v) not in bm.luns(loser)
    assert lun_of(v) not in bm.luns("C")
    assert lun_of(v) not in bm.luns("S")
    assert_content(end["provider_location"]["uri"], img)


@pytest.mark.parametrize("target", ["T", "P"], ids=["takeover", "host-copy"])
def test_killed_follower_is_restarted_by_the_next_command(bm: BlockmigEnv, target: str) -> None:
    v, img = make(bm, f"restart-{target}", BIG, "S")
    d = bm.ok("migrate", v["id"], target)
    assert d["migration_status"] in MIGRATING, d
    status, mig = bm.db_row(v["id"])
    pid = mig["pid"]
    assert status in MIGRATING and pid_alive(pid), (status, mig)
    assert bm.is_follower(pid), f"pid {pid} is not the follower of {v['id']}"

    os.kill(pid, signal.SIGKILL)
    _gone(pid, f"follower {pid}")
    assert bm.db_row(v["id"])[0] in MIGRATING  # nobody finished it

    listed = bm.ok("list")  # any command restarts the dead follower (recover)
    assert v["id"] in [x["id"] for x in listed]
    status, mig = bm.db_row(v["id"])
    assert mig["pid"] != pid, "no new follower was started"
    assert status == "success" or pid_alive(mig["pid"]), (status, mig)

    end = bm.wait_migration(v["id"])
    assert end["migration_status"] == "success", end
    assert host_array(end["host"]) == target
    assert lun_of(v) not in bm.luns("S")
    assert_content(end["provider_location"]["uri"], img)


# ---------------------------------------------------------------------- real faults
def _wait_array_state(bm: BlockmigEnv, array: str, lun: str, states: tuple[str, ...]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        st = bm.array_migration(array, lun) or {}
        if st.get("state") in states:
            return st
        assert time.monotonic() < deadline, f"migration of {lun} on {array} never got {states}: {st}"
        time.sleep(0.05)


def test_host_copy_onto_a_full_pool_ends_in_error_and_can_be_retried(bm: BlockmigEnv) -> None:
    """ENOSPC on the target of a host copy comes as an NBD error: it must end the migration
    in error with the reason, not as a traceback that leaves it `migrating` (and every
    later command restarting a follower that fails the same way)."""
    v, img = make(bm, "full-pool", SMALL, "A", stride=BLOCK)  # 16 MiB of data; F holds 8

    msg = bm.refused("migrate", v["id"], "F", "--wait")

    assert "ENOSPC" in msg and v["name"] in msg, msg
    d = bm.show(v["id"])
    assert d["migration_status"] == "error" and d["host"] == "A@unified#default", d
    assert "ENOSPC" in d["migration"]["error"], d
    assert lun_of(v) not in bm.luns("F"), "the failed copy left its partial LUN on F"
    assert_content(d["provider_location"]["uri"], img)
    d2 = bm.ok("migrate", v["id"], "E", "--wait")
    assert d2["migration_status"] == "success", d2
    assert_content(d2["provider_location"]["uri"], img)


def test_killed_migrate_wait_during_a_pool_move_is_followed_to_its_end(bm: BlockmigEnv) -> None:
    """kill -9 of `migrate --wait` while the array moves the LUN between its pools: the
    next command's follower follows the array's move to its end and records it (it used
    to fail it and cancel the move; before that, the move went on behind the volume's
    back: the volume said pool default, the LUN was in gold, and every retry was refused
    with "already in pool 'gold'"). Ctrl-C: tests/control/test_interrupted.py."""
    v, img = make(bm, "pool-move-killed", 8 * MiB, "Q", stride=BLOCK)  # 4 s to move at 2 MB/s
    lun = lun_of(v)
    p = bm.popen("migrate", v["id"], "Q#gold", "--wait")
    try:
        _wait_array_state(bm, "Q", lun, ("copying",))
    finally:
        p.kill()
        p.communicate(timeout=10)

    bm.show(v["id"])  # restarts the follower, which finds step 1's move running
    end = bm.wait_migration(v["id"])
    st = _wait_array_state(bm, "Q", lun, ("completed", "failed", "cancelled"))

    assert end["migration_status"] == "success", (end, st)
    assert (end["host"], end["provider_location"]["pool"]) == ("Q@unified#gold", "gold"), (end, st)
    assert bm.api("Q").get_lun(lun)["pool"] == "gold"
    assert_content(end["provider_location"]["uri"], img)
    d = bm.ok("migrate", v["id"], "Q#default", "--wait")
    assert d["migration_status"] == "success" and d["host"] == "Q@unified#default", d
    assert bm.api("Q").get_lun(lun)["pool"] == "default"
    assert_content(d["provider_location"]["uri"], img)


def _gone(pid: int, what: str, timeout: float = 10) -> None:
    """Wait for process ``pid``, sent SIGKILL, to be gone."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"{what} survived kill -9"
        time.sleep(0.05)


def _kill_target_mid_takeover(
    bm: BlockmigEnv, name: str, while_down: Callable[[dict[str, Any], dict[str, Any]], None] | None = None
) -> tuple[dict[str, Any], Image]:
    """A volume on A whose takeover by K dies with K (kill -9); K is up again after.
    The migration ends in error on the source (I1); K resumes its copy (I4) until `up`
    drops it. ``while_down(volume, show)`` checks the state before `up`."""
    # 8 s to copy at 2 MB/s: K, restarted by `up`, must not finish its resumed copy before
    # the same `up` drops it (its cutover, the source fenced all along, would be adopted)
    v, img = make(bm, name, 16 * MiB, "A", stride=BLOCK)
    p = bm.popen("migrate", v["id"], "K", "--wait")
    try:
        _wait_array_state(bm, "K", lun_of(v), ("copying",))
        pid = bm.array_pids()["K"]
        os.kill(pid, signal.SIGKILL)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 1 and err.startswith("blockmig: ") and "cannot reach" in err, (out, err)
    d = bm.show(v["id"])
    assert d["migration_status"] == "error" and d["host"] == "A@unified#default", d
    assert_content(d["provider_location"]["uri"], img)
    if while_down is not None:
        while_down(v, d)
    _gone(pid, f"array K ({pid})")
    bm.ok("up", "--config", str(bm.state_dir / "arrays.toml"))  # K again: it resumes its copy
    return v, img


def test_a_target_killed_and_restarted_mid_takeover_is_followed_to_success(bm: BlockmigEnv) -> None:
    """K dies (kill -9) while it takes a volume over and `blockmig up` starts it again at
    once: K resumes its copy by itself (I4). Before: the follower's first status poll that
    found K's API closed failed the whole migration (the volume back on A, in error, A kept
    fenced), though K was back within a second; polls that find the API unreachable are
    asked again for a while now (VolumeDriver.unreachable_window)."""
    v, img = make(bm, "target-restarted", 16 * MiB, "A", stride=BLOCK)  # 8 s at 2 MB/s
    p = bm.popen("migrate", v["id"], "K", "--wait")
    try:
        deadline = time.monotonic() + 30
        while bm.db_row(v["id"])[0] != "migrating_attachable":  # step 3 done: `--wait` follows
            assert time.monotonic() < deadline and p.poll() is None, p.communicate(timeout=10)
            time.sleep(0.02)
        _wait_array_state(bm, "K", lun_of(v), ("copying",))
        pid = bm.array_pids()["K"]
        os.kill(pid, signal.SIGKILL)
        _gone(pid, f"array K ({pid})")
        time.sleep(1.0)  # the follower's polls (every 0.2 s) find K's API closed meanwhile
        bm.ok("up", "--config", str(bm.state_dir / "arrays.toml"))  # K again: it resumes its copy
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, (out, err)
    d = bm.show(v["id"])
    assert d["migration_status"] == "success" and d["host"] == "K@unified#default", d
    assert lun_of(v) not in bm.luns("A")
    assert_content(d["provider_location"]["uri"], img)


def test_target_killed_mid_takeover_then_restarted_the_migration_can_be_retried(bm: BlockmigEnv) -> None:
    """The takeover the dead target could not be told to drop must not block the next
    migration to it."""
    v, img = _kill_target_mid_takeover(bm, "target-killed")
    d2 = bm.ok("migrate", v["id"], "K", "--wait")

    assert d2["migration_status"] == "success" and d2["host"] == "K@unified#default", d2
    assert lun_of(v) not in bm.luns("A")
    assert_content(d2["provider_location"]["uri"], img)


def test_a_target_killed_mid_takeover_keeps_the_source_fenced_until_up_drops_its_takeover(
    bm: BlockmigEnv,
) -> None:
    """K died mid-takeover and could not be told to drop it. The failure used to lift A's
    fence all the same: a host wrote to A while K, restarted, could still serve the LUN
    (reading what it copied, not what A took since) and resume. The fence stays now, `show`
    says the volume cannot be used, and `blockmig up` (which starts K again) drops the
    takeover on K and lifts the fence."""
    a_uri = ""

    def fenced_meanwhile(v: dict[str, Any], d: dict[str, Any]) -> None:
        nonlocal a_uri
        a_uri = d["provider_location"]["uri"]
        assert bm.api("A").get_lun(lun_of(v))["fenced"] is True, "the fence went while K may serve the LUN"
        mig = bm.db_migration(v["id"])
        assert mig.get("fenced") is True and mig.get("target_leftover") is True, mig
        assert d["attachable"] is False and "fenced" in d.get("unavailable", ""), d
        assert d["last_uri"] == a_uri, d
        with LibnbdShell(a_uri) as host:
            r = host.write(0, 0xEE, BLOCK)
            assert r[:2] == ["err", "EPERM"], r
        text = bm.run("show", v["id"]).stdout
        assert "unavailable:" in text and "fenced" in text, text
        msg = bm.refused("attach", v["id"])  # as show says
        assert "cannot be attached now" in msg and "fenced" in msg, msg

    v, img = _kill_target_mid_takeover(bm, "target-written", fenced_meanwhile)
    lun = lun_of(v)
    assert bm.api("A").get_lun(lun)["fenced"] is False
    assert lun not in bm.luns("K")
    mig = bm.db_migration(v["id"])
    assert not mig.get("target_leftover") and not mig.get("fenced"), mig
    d = bm.show(v["id"])
    assert d["attachable"] is True and "unavailable" not in d, d
    write_blocks(a_uri, {0: b"\xee" * BLOCK})  # the source is authoritative and writable again
    img.blocks[0] = b"\xee" * BLOCK

    d2 = bm.ok("migrate", v["id"], "K", "--wait")

    assert d2["migration_status"] == "success" and d2["host"] == "K@unified#default", d2
    assert_content(d2["provider_location"]["uri"], img)


def test_a_cutover_the_follower_never_saw_before_the_target_died_is_adopted(bm: BlockmigEnv) -> None:
    """K cut over and took a host's write, then died (kill -9) before the follower (held
    with SIGSTOP) saw it: the follower failed the migration, the volume back on A. When
    `up` started K again, the leftover was dropped as a stale copy (the writes K counts
    start with its restart), and the host's write went with it. A stayed fenced all
    along, so K's copy holds all of A and more: K is adopted."""
    v, img = make(bm, "cut-over-unseen", 8 * MiB, "A", stride=BLOCK)  # 4 s to copy at 2 MB/s
    lun = lun_of(v)
    d = bm.ok("migrate", v["id"], "K")  # a follower runs steps 4-5
    assert d["migration_status"] == "migrating_attachable", d
    deadline = time.monotonic() + 10
    while not bm.is_follower(follower := int(bm.db_migration(v["id"]).get("pid") or 0)):
        assert time.monotonic() < deadline, "no follower started"
        time.sleep(0.05)
    os.kill(follower, signal.SIGSTOP)
    try:
        _wait_array_state(bm, "K", lun, ("completed",))
        write_blocks(d["provider_location"]["uri"], {0: b"\xcd" * BLOCK})  # on K alone now
        img.blocks[0] = b"\xcd" * BLOCK
        pid = bm.array_pids()["K"]
        os.kill(pid, signal.SIGKILL)
        _gone(pid, f"array K ({pid})")
    finally:
        os.kill(follower, signal.SIGCONT)
    failed = bm.wait_migration(v["id"])
    assert failed["migration_status"] == "error" and failed["host"] == "A@unified#default", failed
    assert bm.api("A").get_lun(lun)["fenced"] is True

    bm.ok("up", "--config", str(bm.state_dir / "arrays.toml"))  # K again

    end = bm.show(v["id"])
    assert end["migration_status"] == "success" and end["host"] == "K@unified#default", end
    assert_content(end["provider_location"]["uri"], img)
    assert lun not in bm.luns("A")


def test_a_migration_to_an_array_that_does_not_answer_changes_nothing(bm: BlockmigEnv) -> None:
    """L is down (kill -9; still in the registry). The migration fenced A, failed at the
    takeover, and left a "leftover" on L it could not drop: with the fence kept for such a
    leftover, the volume would stay read-only for nothing, and before, every later migrate
    or delete failed trying to reach L. Now migrate asks L's API before anything changes.
    And a volume on L says why it cannot be used."""
    v, img = make(bm, "target-down", SMALL, "A")
    on_l = bm.create("on-l", SMALL, "L")
    pid = bm.array_pids()["L"]
    os.kill(pid, signal.SIGKILL)
    _gone(pid, f"array L ({pid})")
    try:
        msg = bm.refused("migrate", v["id"], "L")

        assert "array L does not answer" in msg and "unchanged" in msg, msg
        d = bm.show(v["id"])
        assert d["migration_status"] is None and d["host"] == "A@unified#default", d
        assert d["attachable"] is True, d
        assert bm.api("A").get_lun(lun_of(v))["fenced"] is False
        gone = bm.show(on_l["id"])
        assert gone["attachable"] is False and "array L does not answer" in gone["unavailable"], gone
        d2 = bm.ok("migrate", v["id"], "B", "--wait")  # elsewhere, nothing in the way
        assert d2["migration_status"] == "success", d2
        assert_content(d2["provider_location"]["uri"], img)
    finally:
        bm.ok("up", "--config", str(bm.state_dir / "arrays.toml"))


def test_a_follower_adopts_a_takeover_that_cut_over_after_migrate_died(bm: BlockmigEnv) -> None:
    """`migrate` died (kill -9) after B took the LUN over and before step 3 recorded it;
    B's copy cut over since, and a host that found the LUN there wrote to it. The next
    command's follower found the migration at step 2 and failed it: B's LUN, the only one
    with that write, was deleted, the volume left on A. It takes the cutover over now."""
    v, img = make(bm, "adopted", SMALL, "A")
    lun, vid = lun_of(v), v["id"]
    # what steps 1-2 did before the command died: the fence, B's takeover, the record
    alias = bm.api("A").fence_lun(lun, f"volume {vid}")["uri"]
    bm.api("B").call("POST", "/api/v1/migrations", {"lun": lun, "source": alias, "pool": "default"})
    assert bm.api("B").wait_migration(lun, timeout=30)["state"] == "completed"
    b_uri = bm.api("B").connection(lun)["uri"]
    write_blocks(b_uri, {0: b"\xab" * BLOCK})
    img.blocks[0] = b"\xab" * BLOCK
    mig = {
        "phase": "target",
        "source": "A@unified#default",
        "target": "B@unified#default",
        "started": time.time(),
        "source_location": v["provider_location"],
        "error": "",
        "fenced": True,
    }
    bm.set_migration(vid, "starting", mig, dead_follower=True)

    bm.show(vid)  # restarts a follower
    end = bm.wait_migration(vid)

    assert end["migration_status"] == "success" and end["host"] == "B@unified#default", end
    assert end["provider_location"]["uri"] == b_uri, end
    assert_content(b_uri, img)
    assert lun not in bm.luns("A")
