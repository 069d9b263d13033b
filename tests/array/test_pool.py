"""Pool accounting on real sparse files, and the Array's LUN lifecycle.

Pools hold thin LUNs: what counts is what the files really allocate,
checked here against the filesystem of the test's tmp dir (st_blocks). The
Array tests cover create/grow/delete errors and what Array.open() finishes
after a crash (states set in the metadata DB as a crash would leave them).
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from emulator.array.array import MAX_LUN_SIZE, Array
from emulator.array.errors import Conflict, InvalidInput, NotFound
from emulator.array.file_backend import FileBackend
from emulator.array.lun import LunBackend, lun_id_of
from emulator.array.metadata import Metadata
from emulator.array.models import MODELS
from emulator.array.pool import FsRoom, Pool
from emulator.nbd.client import NbdClient
from emulator.nbd.errors import BackendError, RequestError
from emulator.nbd.server import NbdServer

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
KIB = 1024
MIB = 1 << 20
CHUNK = 64 * KIB


def run(coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def allocated(fb: FileBackend) -> int:
    return os.fstat(fb.fd).st_blocks * 512


@pytest.fixture
def block(tmp_path: Path) -> int:
    """The filesystem's allocation unit; the tests assume it divides 64 KiB."""
    bs = os.statvfs(tmp_path).f_bsize
    if CHUNK % bs:
        pytest.skip(f"block size {bs} does not divide {CHUNK}")
    # the tests need real holes
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        f.truncate(MIB)
    ok = os.stat(probe).st_blocks == 0
    probe.unlink()
    if not ok:
        pytest.skip("the tmp filesystem does not keep sparse files sparse")
    return bs


class PoolLun:
    """One LUN file in a pool, written the way the array writes: charge, then write."""

    def __init__(self, pool: Pool, path: Path, name: str = "lun1", size: int = 4 * MIB) -> None:
        self.pool = pool
        self.name = name
        self.fb = FileBackend(str(path), create_size=size)
        pool.files[name] = self.fb
        self.lb = LunBackend(name, self.fb, pool, self.fb)

    def write(self, offset: int, length: int, byte: int = 1) -> None:
        run(self.lb.write(offset, bytes([byte]) * length))

    def read(self, offset: int, length: int) -> bytes:
        return bytes(run(self.lb.read(offset, length)))

    def close(self) -> None:
        self.fb.close()


@pytest.fixture
def pool_lun(tmp_path: Path, block: int) -> Iterator[PoolLun]:
    pool = Pool("gold", 256 * KIB, tmp_path)
    lun = PoolLun(pool, tmp_path / "lun1.img")
    try:
        yield lun
    finally:
        lun.close()


# =========================================================================== Pool
def test_charge_within_capacity(pool_lun: PoolLun) -> None:
    pool = pool_lun.pool
    for i in range(4):  # 4 x 64 KiB = the whole capacity
        pool_lun.write(i * CHUNK, CHUNK)
    assert pool.used() == 4 * CHUNK == pool.capacity
    assert pool.free == 0
    assert pool_lun.read(0, 4 * CHUNK) == b"\1" * 4 * CHUNK


def test_write_into_holes_beyond_capacity_is_enospc(pool_lun: PoolLun) -> None:
    for i in range(4):
        pool_lun.write(i * CHUNK, CHUNK)
    before = allocated(pool_lun.fb)
    with pytest.raises(BackendError) as e:
        pool_lun.write(MIB, CHUNK)
    assert e.value.errno == errno.ENOSPC
    msg = str(e.value)
    assert "'gold'" in msg and "'lun1'" in msg and "full" in msg
    # nothing changed
    assert allocated(pool_lun.fb) == before
    assert pool_lun.read(MIB, CHUNK) == bytes(CHUNK)
    assert pool_lun.lb.stats.ops["write"].errors == 1
    # a write half over data, half over a hole also allocates: refused too
    with pytest.raises(BackendError):
        pool_lun.write(3 * CHUNK + CHUNK // 2, CHUNK)
    assert pool_lun.read(4 * CHUNK, CHUNK // 2) == bytes(CHUNK // 2)


def test_overwrite_allocated_never_fails_when_full(pool_lun: PoolLun) -> None:
    for i in range(4):
        pool_lun.write(i * CHUNK, CHUNK)
    for byte in (2, 3, 4):
        for i in range(4):
            pool_lun.write(i * CHUNK, CHUNK, byte)
        pool_lun.write(CHUNK + 100, 5000, byte)  # unaligned, inside allocated blocks
    assert pool_lun.pool.used() == pool_lun.pool.capacity
    assert pool_lun.read(0, CHUNK) == b"\4" * CHUNK


def test_trim_gives_space_back(pool_lun: PoolLun) -> None:
    for i in range(4):
        pool_lun.write(i * CHUNK, CHUNK)
    with pytest.raises(BackendError):
        pool_lun.write(MIB, CHUNK)
    run(pool_lun.fb.trim(CHUNK, CHUNK))  # punches a hole
    assert pool_lun.pool.used() == 3 * CHUNK
    pool_lun.write(MIB, CHUNK, 9)
    assert pool_lun.read(MIB, CHUNK) == b"\x09" * CHUNK
    assert pool_lun.read(CHUNK, CHUNK) == bytes(CHUNK)
    with pytest.raises(BackendError):
        pool_lun.write(2 * MIB, CHUNK)


def test_zero_with_may_trim_is_free(pool_lun: PoolLun) -> None:
    for i in range(4):
        pool_lun.write(i * CHUNK, CHUNK)
    run(pool_lun.lb.write_zeroes(0, CHUNK, may_trim=True))  # a hole: frees space
    assert pool_lun.pool.used() == 3 * CHUNK
    assert allocated(pool_lun.fb) <= 3 * CHUNK + 4 * KIB
    pool_lun.write(MIB, CHUNK)  # the freed space is usable again
    with pytest.raises(BackendError):
        pool_lun.write(2 * MIB, CHUNK)


def test_zero_range_is_charged(pool_lun: PoolLun) -> None:
    """Regression (was a bug): WRITE_ZEROES without may_trim (NBD_CMD_FLAG_NO_HOLE) runs
    fallocate(ZERO_RANGE), which allocates blocks (st_blocks grows) as
    *unwritten* extents; SEEK_DATA reports those as holes on ext4 and XFS, so
    allocated_bytes() and _unallocated() never see them. After the first
    recount a host can zero-allocate without limit past the pool's capacity."""
    pool = pool_lun.pool
    refused = 0
    for i in range(4 * MIB // CHUNK):  # 16 x 64 KiB into a 256 KiB pool
        try:
            run(pool_lun.lb.write_zeroes(i * CHUNK, CHUNK))
        except BackendError as e:
            assert e.errno == errno.ENOSPC
            refused += 1
    really = allocated(pool_lun.fb)  # what the file system gave the file
    assert refused > 0, f"no write refused; the file holds {really} bytes in a {pool.capacity}-byte pool"
    assert really <= pool.capacity + 4 * KIB, really


def test_several_luns_share_the_capacity(tmp_path: Path, block: int) -> None:
    pool = Pool("gold", 256 * KIB, tmp_path)
    a = PoolLun(pool, tmp_path / "a.img", "a")
    b = PoolLun(pool, tmp_path / "b.img", "b")
    try:
        a.write(0, 2 * CHUNK)
        b.write(0, 2 * CHUNK)
        with pytest.raises(BackendError) as e:
            a.write(MIB, CHUNK)
        assert "'a'" in str(e.value)
        with pytest.raises(BackendError) as e:
            b.write(MIB, CHUNK)
        assert "'b'" in str(e.value)
        assert pool.used() == 4 * CHUNK
    finally:
        a.close()
        b.close()


class SmallFs(FsRoom):
    """The room of a file system of ``size`` bytes that holds only these pools' files."""

    def __init__(self, path: Path, size: int, reserve: int) -> None:
        super().__init__(path, reserve)
        self.size = size
        self.pools: list[Pool] = []

    def fs_free(self) -> int:
        return self.size - sum(p.used() for p in self.pools)


def test_pools_larger_than_their_file_system_leave_its_reserve_free(tmp_path: Path, block: int) -> None:
    """Thin pools may together be larger than their file system: writes to any of them
    are refused before the reserve the array keeps on it for its metadata is taken
    (with that taken, no LUN could be deleted any more), overwrites still fit."""
    room = SmallFs(tmp_path, size=6 * CHUNK, reserve=2 * CHUNK)
    gold, silver = Pool("gold", MIB, tmp_path, room), Pool("silver", MIB, tmp_path, room)
    room.pools = [gold, silver]
    a = PoolLun(gold, tmp_path / "a.img", "a")
    b = PoolLun(silver, tmp_path / "b.img", "b")
    try:
        a.write(0, 2 * CHUNK)
        b.write(0, 2 * CHUNK)  # 4 of 6 chunks: the rest is the reserve
        for lun in (a, b):
            with pytest.raises(BackendError) as e:
                lun.write(MIB, CHUNK)
            assert e.value.errno == errno.ENOSPC
            assert "file system" in str(e.value) and f"'{lun.name}'" in str(e.value)
        assert gold.used() + silver.used() == 4 * CHUNK
        a.write(0, 2 * CHUNK, 7)  # allocated already
        assert a.read(0, 2 * CHUNK) == b"\7" * 2 * CHUNK
        run(b.lb.trim(0, CHUNK))  # space given back: it fits again
        a.write(MIB, CHUNK)
    finally:
        a.close()
        b.close()


def test_small_scattered_writes_stay_within_capacity(tmp_path: Path, block: int) -> None:
    """Regression (was a bug): the fast path charges ``length`` bytes, but a write into a hole
    allocates whole filesystem blocks. 512-byte writes one block apart each
    allocate a block (8x more on 4 KiB blocks) and the pool ends far past
    its capacity before the exact recount starts refusing."""
    pool = Pool("gold", 64 * KIB, tmp_path)
    lun = PoolLun(pool, tmp_path / "lun1.img", size=4 * MIB)
    try:
        for i in range(4 * MIB // block):
            try:
                lun.write(i * block, 512)
            except BackendError as e:
                assert e.errno == errno.ENOSPC
        used = pool.used()
        assert used <= pool.capacity, f"pool holds {used} bytes, capacity {pool.capacity}"
    finally:
        lun.close()


def test_overwrite_never_fails_when_over_capacity(tmp_path: Path, block: int) -> None:
    """A pool over its capacity (restarted with a smaller --pool capacity)
    still takes overwrites of allocated blocks: they allocate nothing."""
    big = Pool("gold", MIB, tmp_path)
    lun = PoolLun(big, tmp_path / "lun1.img")
    lun.write(0, 8 * CHUNK)  # 512 KiB
    lun.close()
    small = Pool("gold", 256 * KIB, tmp_path)
    lun2 = PoolLun(small, tmp_path / "lun1.img")
    try:
        assert small.used() == 8 * CHUNK > small.capacity
        with pytest.raises(BackendError):
            lun2.write(MIB, CHUNK)  # new space: refused, rightly
        lun2.write(0, CHUNK, 7)  # allocated already: must pass
        assert lun2.read(0, CHUNK) == b"\7" * CHUNK
    finally:
        lun2.close()


# =========================================================================== Array: errors
class ArrayFixture:
    def __init__(self, data_dir: Path, pools: dict[str, int] | None = None) -> None:
        self.data_dir = data_dir
        self.pools = pools if pools is not None else {"default": 64 * MIB, "small": 256 * KIB}
        self.server = NbdServer()
        self.array = self.open()

    def open(self, pools: dict[str, int] | None = None) -> Array:
        a = Array(self.data_dir, "arr1", MODELS["unified"], self.server, pools or self.pools)
        a.open()
        self.array = a
        return a

    def close(self) -> None:
        run(self.array.close())

    def reopen(self, pools: dict[str, int] | None = None) -> Array:
        self.close()
        self.server = NbdServer()
        return self.open(pools)


@pytest.fixture
def arr(tmp_path: Path) -> Iterator[ArrayFixture]:
    f = ArrayFixture(tmp_path / "array")
    try:
        yield f
    finally:
        f.close()


def test_create_lun(arr: ArrayFixture) -> None:
    a = arr.array
    lun = a.create_lun("vol1", 2 * MIB)
    assert (lun.name, lun.size, lun.pool, lun.state) == ("vol1", 2 * MIB, "default", "ready")
    assert os.path.getsize(lun.file.path) == 2 * MIB and lun.allocated == 0
    assert Path(lun.file.path) == arr.data_dir / "pools" / "default" / "vol1.img"
    assert "vol1" in arr.server.exports
    lun2 = a.create_lun("vol2", MIB, "small")
    assert lun2.pool == "small" and "vol2" in a.pools["small"].files
    assert a.meta is not None and {(r.name, r.state) for r in a.meta.luns()} == {
        ("vol1", "ready"),
        ("vol2", "ready"),
    }


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".x", "x" * 65, None, 5, "é"])
def test_create_lun_bad_name(arr: ArrayFixture, name: object) -> None:
    with pytest.raises(InvalidInput) as e:
        arr.array.create_lun(name, MIB)
    assert repr(name) in e.value.message
    assert arr.array.luns == {}


@pytest.mark.parametrize("size", [0, -512, 1, 1000, True, 512.0, "1G", None, MAX_LUN_SIZE + 512])
def test_create_lun_bad_size(arr: ArrayFixture, size: object) -> None:
    with pytest.raises(InvalidInput) as e:
        arr.array.create_lun("vol1", size)
    assert "size" in e.value.message
    assert arr.array.luns == {} and arr.array.meta is not None and arr.array.meta.luns() == []


def test_create_lun_pool_errors(arr: ArrayFixture) -> None:
    with pytest.raises(NotFound) as e:
        arr.array.create_lun("vol1", MIB, "nope")
    assert "'nope'" in e.value.message and "default" in e.value.message and "small" in e.value.message
    with pytest.raises(InvalidInput):
        arr.array.create_lun("vol1", MIB, "../default")
    assert arr.array.luns == {}


def test_create_lun_duplicate(arr: ArrayFixture) -> None:
    arr.array.create_lun("vol1", MIB)
    for pool in (None, "small"):
        with pytest.raises(Conflict) as e:
            arr.array.create_lun("vol1", 2 * MIB, pool)
        assert "'vol1'" in e.value.message and "'arr1'" in e.value.message
    lun = arr.array.get_lun("vol1")
    assert (lun.size, lun.pool) == (MIB, "default")


def test_create_lun_records_with_its_state_in_one_transaction(arr: ArrayFixture) -> None:
    """What ``also`` records appears with the LUN's state or not at all: a
    record that fails leaves no LUN, row or file, and the name free again."""
    a = arr.array
    assert a.meta is not None
    a.meta.db.execute("CREATE TABLE notes (lun TEXT PRIMARY KEY)")

    def note(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO notes VALUES ('vol1')")

    a.create_lun("vol1", MIB, state="migrating", also=note)
    assert [r.state for r in a.meta.luns()] == ["migrating"]
    assert a.meta.db.execute("SELECT lun FROM notes").fetchall() == [("vol1",)]
    with pytest.raises(sqlite3.IntegrityError):  # the same note again
        a.create_lun("vol2", MIB, state="migrating", also=note)
    assert "vol2" not in a.luns and [r.name for r in a.meta.luns()] == ["vol1"]
    assert not (arr.data_dir / "pools" / "default" / "vol2.img").exists()
    assert a.create_lun("vol2", MIB).state == "ready"


def test_grow_lun(arr: ArrayFixture) -> None:
    a = arr.array
    a.create_lun("vol1", MIB)
    lun = a.grow_lun("vol1", 3 * MIB)
    assert lun.size == 3 * MIB == lun.file.size == os.path.getsize(lun.file.path)
    assert lun.backend.size == 3 * MIB
    assert a.grow_lun("vol1", 3 * MIB).size == 3 * MIB  # same size: nothing to do
    with pytest.raises(InvalidInput) as e:
        a.grow_lun("vol1", MIB)
    assert "shrink" in e.value.message
    for bad in (0, 1000, True, "4M", MAX_LUN_SIZE + 512):
        with pytest.raises(InvalidInput):
            a.grow_lun("vol1", bad)
    with pytest.raises(NotFound) as e2:
        a.grow_lun("nope", 4 * MIB)
    assert "'nope'" in e2.value.message
    with pytest.raises(InvalidInput):
        a.grow_lun("../vol1", 4 * MIB)
    assert a.meta is not None and [(r.name, r.size) for r in a.meta.luns()] == [("vol1", 3 * MIB)]


def test_delete_lun(arr: ArrayFixture) -> None:
    a = arr.array
    lun = a.create_lun("vol1", MIB)
    path = lun.file.path
    with pytest.raises(NotFound):
        run(a.delete_lun("nope"))
    with pytest.raises(InvalidInput):
        run(a.delete_lun("../vol1"))
    run(a.delete_lun("vol1"))
    assert "vol1" not in a.luns and "vol1" not in arr.server.exports and not os.path.exists(path)
    assert "vol1" not in a.pools["default"].files
    assert a.meta is not None and a.meta.luns() == []
    with pytest.raises(NotFound):
        run(a.delete_lun("vol1"))
    # the name is free again, and the new LUN does not see the old data
    assert a.create_lun("vol1", MIB).allocated == 0


def test_delete_lun_with_connected_host(arr: ArrayFixture) -> None:
    a = arr.array
    a.create_lun("vol1", MIB)

    async def scenario() -> None:
        _, port = await arr.server.listen_tcp("127.0.0.1", 0)
        client = await NbdClient.connect(f"nbd://127.0.0.1:{port}/vol1", timeout=5)
        try:
            await client.write(0, b"h" * 4096)
            assert len(a.connected_hosts("vol1")) == 1
            with pytest.raises(Conflict) as e:
                await a.delete_lun("vol1")
            assert "'vol1'" in e.value.message and "force" in e.value.message
            assert await client.read(0, 4096) == b"h" * 4096
            await a.delete_lun("vol1", force=True)
            assert a.connected_hosts("vol1") == []
            with pytest.raises((RequestError, OSError, Exception)):  # noqa: B017 - any disconnect error
                await asyncio.wait_for(client.read(0, 4096), 5)
        finally:
            await client.close()
            await arr.server.close()

    run(scenario())
    assert "vol1" not in a.luns


# =========================================================================== Array: restart recovery
def test_open_finishes_interrupted_changes(arr: ArrayFixture) -> None:
    a = arr.array
    keep = a.create_lun("keep", MIB)
    run(keep.backend.write(0, b"k" * 4096))
    for name in ("creating", "deleting", "nofile"):
        a.create_lun(name, MIB)
    grow = a.create_lun("grow", MIB)
    run(grow.backend.write(4096, b"g" * 4096))
    paths = {n: Path(lun.file.path) for n, lun in a.luns.items()}
    arr.close()
    # what a crash leaves behind
    meta = Metadata(arr.data_dir / "array.db")
    meta.update_lun("creating", state="creating")
    meta.update_lun("deleting", state="deleting")
    meta.update_lun("nofile", state="creating")
    meta.update_lun("grow", size=3 * MIB)  # recorded, file not yet extended
    meta.close()
    paths["nofile"].unlink()
    assert os.path.getsize(paths["grow"]) == MIB

    b = arr.reopen()
    assert sorted(b.luns) == ["grow", "keep"]
    for name in ("creating", "deleting", "nofile"):
        assert not paths[name].exists(), name
        assert name not in arr.server.exports
    assert b.meta is not None and sorted((r.name, r.state) for r in b.meta.luns()) == [
        ("grow", "ready"),
        ("keep", "ready"),
    ]
    g = b.get_lun("grow")
    assert g.size == 3 * MIB == g.file.size == g.backend.size == os.path.getsize(paths["grow"])
    assert bytes(run(g.backend.read(4096, 4096))) == b"g" * 4096
    assert bytes(run(b.get_lun("keep").backend.read(0, 4096))) == b"k" * 4096
    # names of cleaned-up LUNs are free again
    assert b.create_lun("creating", MIB).state == "ready"


def test_open_recreates_missing_file_of_ready_lun(arr: ArrayFixture) -> None:
    path = Path(arr.array.create_lun("vol1", 2 * MIB).file.path)
    arr.close()
    path.unlink()
    b = arr.reopen()
    assert b.get_lun("vol1").size == 2 * MIB == os.path.getsize(path)
    assert bytes(run(b.get_lun("vol1").backend.read(0, 4096))) == bytes(4096)


def test_open_refuses_another_arrays_data_dir(arr: ArrayFixture) -> None:
    """Regression (was a bug): when Array.open() fails after taking the data dir's flock
    (here: the dir belongs to another array; also a bad pool name in the
    config), it neither closes the lock fd nor the metadata DB, so the lock
    stays held and the right array cannot open the dir in the same process."""
    arr.close()
    other = Array(arr.data_dir, "arr2", MODELS["plain"], NbdServer())
    with pytest.raises(InvalidInput) as e:
        other.open()
    assert "'arr1'" in e.value.message and "'arr2'" in e.value.message
    if other.meta is not None:
        other.meta.close()
    arr.open()


def test_second_open_of_a_data_dir_is_conflict(arr: ArrayFixture) -> None:
    other = Array(arr.data_dir, "arr1", MODELS["unified"], NbdServer())
    with pytest.raises(Conflict) as e:
        other.open()
    assert "in use" in e.value.message
    assert arr.array.meta is not None and arr.array.create_lun("still-mine", MIB).state == "ready"


def test_open_keeps_grown_pool_usage_and_capacity(arr: ArrayFixture, block: int) -> None:
    """A restart keeps the LUNs and pool capacity; the pool still refuses past it."""
    a = arr.array
    lun = a.create_lun("vol1", 4 * MIB, "small")
    run(lun.backend.write(0, b"s" * (192 * KIB)))
    b = arr.reopen()
    assert b.pools["small"].capacity == 256 * KIB
    info = {p["name"]: p for p in b.info()["pools"]}
    assert info["small"]["used"] == 192 * KIB and info["small"]["luns"] == 1
    with pytest.raises(BackendError) as e:
        run(b.get_lun("vol1").backend.write(MIB, b"x" * (128 * KIB)))
    assert e.value.errno == errno.ENOSPC


def test_restart_counts_existing_data(arr: ArrayFixture, block: int) -> None:
    """Right after a restart, before anything asks for the pool's usage, the
    data already in the files counts: the pool refuses writes past capacity."""
    a = arr.array
    lun = a.create_lun("vol1", 4 * MIB, "small")
    run(lun.backend.write(0, b"s" * (192 * KIB)))
    b = arr.reopen()
    with pytest.raises(BackendError) as e:
        run(b.get_lun("vol1").backend.write(MIB, b"x" * (128 * KIB)))
    assert e.value.errno == errno.ENOSPC


def test_lun_ids_are_kept_advertised_and_never_reused(arr: ArrayFixture) -> None:
    """A LUN's id survives a restart, is in its export's description (an array that
    took the LUN over checks it on reconnection: emulator/mirror/remote.py), and a LUN
    made again under the same name has another one. A data dir from before ids gives
    its LUNs one when it opens, kept from then on."""
    a = arr.array
    first = a.create_lun("vol1", MIB).uuid
    assert lun_id_of(arr.server.exports["vol1"].description) == first != ""
    assert a.lun_info(a.get_lun("vol1"))["id"] == first
    b = arr.reopen()
    assert b.get_lun("vol1").uuid == first
    assert lun_id_of(arr.server.exports["vol1"].description) == first
    run(b.delete_lun("vol1"))
    again = b.create_lun("vol1", MIB).uuid
    assert again not in ("", first)
    arr.close()
    db = sqlite3.connect(arr.data_dir / "array.db")  # as an array of before ids left it
    db.execute("ALTER TABLE luns DROP COLUMN uuid")
    db.close()
    arr.server = NbdServer()
    c = arr.open()
    given = c.get_lun("vol1").uuid
    assert given not in ("", first, again)
    assert lun_id_of(arr.server.exports["vol1"].description) == given
    assert arr.reopen().get_lun("vol1").uuid == given


def test_lun_id_of_an_export_description() -> None:
    uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    assert lun_id_of(f"array A pool default, LUN id {uid}") == uid
    assert lun_id_of(f"array A pool p, LUN id {uid}, fenced for x") == uid
    for other in ("", "array A pool default", "LUN 7 of pool gold", f"LUN id {uid[:-1]}", f"LUN id {uid}0"):
        assert lun_id_of(other) == "", other
