"""Driver compliance (STYLE habit 11, after Cinder): every class in control.drivers.DRIVERS,
against a real array of the matching model, keeps the interface's contracts.

- migrate_volume returns a MigrateResult, migrate_volume_target a TargetMigrateResult
  (NamedTuples: the order of the fields can never be got wrong);
- the capability flags are the array model's capabilities (GET /api/v1/array);
- deleting a missing volume succeeds; a deleted volume's data never leaks into a new one;
- initialize_connection gives host, port, export, uri and an nbd-client command line, and
  the URI serves the volume.
"""

from __future__ import annotations

import asyncio
import typing
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from control.api_client import ApiError
from control.drivers import DRIVERS, MigrateResult, TargetMigrateResult, VolumeDriver, driver_for
from control.drivers.base import Host, RemoteTakeoverMixin
from control.volumes import Volume
from emulator.array.models import MODELS
from emulator.nbd.client import NbdClient

from .blockmig_env import BLOCK, ArraySpec, BlockmigEnv, Image, MiB, assert_content, block, write_blocks

#: one array per model (name: model), two pools where the model moves LUNs between pools
MODEL_ARRAY = {"unified": "U", "takeover-sync": "K", "pooled": "Q", "plain": "N"}
ARRAYS = [
    ArraySpec("U", "unified", ("default", "gold")),
    ArraySpec("K", "takeover-sync", ("default", "gold")),
    ArraySpec("Q", "pooled", ("default", "gold")),
    ArraySpec("N", "plain", ("default", "gold")),
    ArraySpec("SRC", "plain"),  # the array the takeovers take LUNs from
]
SIZE = 8 * MiB
INTERFACE = (
    "create_volume",
    "delete_volume",
    "initialize_connection",
    "terminate_connection",
    "migrate_volume",
    "migrate_volume_target",
    "complete_migration_target",
)


@pytest.fixture(scope="module")
def bm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockmigEnv]:
    with BlockmigEnv(tmp_path_factory.mktemp("drivers") / "state") as env:  # always stops them
        env.up(ARRAYS)
        yield env


@dataclass
class Case:
    model: str
    array: str
    driver: VolumeDriver
    bm: BlockmigEnv

    def volume(self, size: int = SIZE) -> Volume:
        vid = uuid.uuid4().hex[:12]
        return Volume(vid, f"compliance-{vid}", size, "available", f"{self.array}@{self.model}#default")


@pytest.fixture(params=sorted(DRIVERS))
def case(request: pytest.FixtureRequest, bm: BlockmigEnv) -> Case:
    model: str = request.param
    array = MODEL_ARRAY[model]
    return Case(model, array, DRIVERS[model](array, bm.api(array)), bm)


def _read(uri: str, timeout: float = 30.0) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        async with await NbdClient.connect(uri) as c:
            return c.size, bytes(await c.read(0, c.size))

    return asyncio.run(asyncio.wait_for(go(), timeout))


def _pattern(img: Image, seed: int) -> dict[int, bytes]:
    """Every 4K block of the volume written (no hole left to hide a leak in)."""
    img.blocks = {o: block(seed, o) for o in range(0, img.size, BLOCK)}
    return img.blocks


# ---------------------------------------------------------------------- static
def test_every_array_model_has_a_driver(bm: BlockmigEnv) -> None:
    assert set(DRIVERS) == set(MODELS), "a model without a driver (or a driver without a model)"
    for model, cls in DRIVERS.items():
        assert issubclass(cls, VolumeDriver), cls
        assert type(driver_for(model, "X", bm.api("SRC"))) is cls
    with pytest.raises(ValueError, match="no driver for array model"):
        driver_for("no-such-model", "X", bm.api("SRC"))


def test_the_interface_states_its_contracts() -> None:
    for name in INTERFACE:
        doc = getattr(VolumeDriver, name).__doc__
        assert doc and doc.strip(), f"VolumeDriver.{name} has no docstring stating its contract"
    doc = VolumeDriver.delete_volume.__doc__ or ""
    assert "missing" in doc and "leak" in doc, doc
    assert MigrateResult._fields == ("moved", "model_update")
    assert TargetMigrateResult._fields == ("moved", "migration_async", "model_update")
    for model, cls in DRIVERS.items():
        assert typing.get_type_hints(cls.migrate_volume)["return"] is MigrateResult, model
        assert typing.get_type_hints(cls.migrate_volume_target)["return"] is TargetMigrateResult, model


# ---------------------------------------------------------------------- against the array
def test_capability_flags_match_the_array_model(case: Case) -> None:
    info = case.driver.api.array_info()
    assert info["model"] == case.model
    caps = info["capabilities"]
    assert {
        "pool_migration": case.driver.supports_pool_migration,
        "remote_takeover": case.driver.supports_remote_takeover,
        "async_migration": case.driver.supports_async_migration,
    } == caps, f"driver {type(case.driver).__name__} flags differ from array model {case.model}"
    assert caps == MODELS[case.model].capabilities()
    # the mixin is there exactly when the flag says so (the manager relies on isinstance)
    assert isinstance(case.driver, RemoteTakeoverMixin) == caps["remote_takeover"]


def test_create_and_initialize_connection(case: Case) -> None:
    drv, vol = case.driver, case.volume()
    loc = drv.create_volume(vol, "default")
    try:
        assert {"array": case.array, "lun": vol.lun, "pool": "default"}.items() <= loc.items(), loc
        info = drv.initialize_connection(vol, {"host": "compliance-host"})
        assert info["driver_volume_type"] == "nbd"
        c = info["data"]
        assert {"host", "port", "export", "uri", "nbd_client"} <= c.keys(), c
        assert c["host"] == "127.0.0.1" and isinstance(c["port"], int) and c["port"] > 0
        assert c["export"] == vol.lun
        assert c["uri"] == f"nbd://{c['host']}:{c['port']}/{c['export']}" == loc["uri"]
        assert drv.connection_uri(vol) == c["uri"]
        words = c["nbd_client"].split()
        assert words[0] == "nbd-client" and c["host"] in words and str(c["port"]) in words, words
        assert c["export"] in words and "-N" in words, words
        size, data = _read(c["uri"])  # the URI really serves the new (empty) volume
        assert size == SIZE and data == bytes(SIZE)
        drv.terminate_connection(vol, {"host": "compliance-host"})
    finally:
        drv.delete_volume(vol)


def test_delete_of_a_missing_volume_succeeds(case: Case) -> None:
    drv, vol = case.driver, case.volume()
    drv.delete_volume(vol)  # never created: no error
    drv.create_volume(vol, "default")
    assert vol.lun in case.bm.luns(case.array)
    drv.delete_volume(vol)
    assert vol.lun not in case.bm.luns(case.array)
    drv.delete_volume(vol)  # deleted twice: no error


@pytest.mark.parametrize("pool", ["default", "gold"])
def test_a_deleted_volume_never_leaks_into_a_new_one(case: Case, pool: str) -> None:
    drv, vol = case.driver, case.volume()
    loc = drv.create_volume(vol, pool)
    img = Image(SIZE)
    write_blocks(loc["uri"], _pattern(img, seed=0x1EA4))
    assert_content(loc["uri"], img)
    drv.delete_volume(vol)

    # the same LUN name, size and pool again, and another volume alongside
    again, other = vol, case.volume()
    try:
        for v in (again, other):
            uri = drv.create_volume(v, pool)["uri"]
            size, data = _read(uri)
            assert size == SIZE
            leaked = sum(data[o : o + BLOCK] != bytes(BLOCK) for o in range(0, SIZE, BLOCK))
            assert leaked == 0, f"{leaked} blocks of a deleted volume readable in new volume {v.lun}"
    finally:
        drv.delete_volume(again)
        drv.delete_volume(other)


def test_migrate_volume_returns_a_MigrateResult(case: Case) -> None:
    drv, vol = case.driver, case.volume()
    loc = drv.create_volume(vol, "default")
    img = Image(SIZE, {0: block(7, 0), SIZE - BLOCK: block(7, SIZE - BLOCK)})
    write_blocks(loc["uri"], img.blocks)
    try:
        # another array: never the source driver's job
        other = Host("SRC", "plain", "default")
        r = drv.migrate_volume(vol, other)
        assert type(r) is MigrateResult and r == MigrateResult(False, None), r
        assert case.bm.api(case.array).get_lun(vol.lun)["pool"] == "default"

        # another pool of the same array: the array's job if it moves LUNs between pools
        r = drv.migrate_volume(vol, Host(case.array, case.model, "gold"))
        assert type(r) is MigrateResult, type(r)
        lun = case.bm.api(case.array).get_lun(vol.lun)
        if drv.supports_pool_migration:
            assert r.moved is True
            assert r.model_update == {
                "array": case.array, "lun": vol.lun, "pool": "gold", "uri": loc["uri"],
            }  # fmt: skip
            assert lun["pool"] == "gold"
        else:
            assert r == MigrateResult(False, None), r
            assert lun["pool"] == "default"
        assert_content(loc["uri"], img)
    finally:
        drv.delete_volume(vol)


def test_migrate_volume_target_returns_a_TargetMigrateResult(case: Case, bm: BlockmigEnv) -> None:
    drv, vol = case.driver, case.volume()
    src = DRIVERS["plain"]("SRC", bm.api("SRC"))
    src_uri = src.create_volume(vol, "default")["uri"]
    img = Image(SIZE)
    write_blocks(src_uri, _pattern(img, seed=0x7A6))
    try:
        r = drv.migrate_volume_target(vol, src_uri, "default")

        assert type(r) is TargetMigrateResult, type(r)
        caps = drv.api.array_info()["capabilities"]
        if not caps["remote_takeover"]:
            assert r == TargetMigrateResult(False, False, None), r
            assert vol.lun not in bm.luns(case.array), "a refused takeover left a LUN behind"
            with pytest.raises(NotImplementedError, match=case.array):
                drv.complete_migration_target(vol)
            return
        assert r.moved is True
        assert r.migration_async is caps["async_migration"]
        assert r.model_update is not None
        assert r.model_update["array"] == case.array and r.model_update["lun"] == vol.lun
        assert r.model_update["uri"] == drv.connection_uri(vol)
        if not r.migration_async:  # moved and not async: the copy is already done
            assert (bm.array_migration(case.array, vol.lun) or {}).get("state") == "completed"
        loc = drv.complete_migration_target(vol)
        assert loc == r.model_update, (loc, r.model_update)
        assert (bm.array_migration(case.array, vol.lun) or {}).get("state") == "completed"
        assert_content(loc["uri"], img)
    finally:
        drv.delete_volume(vol)
        src.delete_volume(vol)


def test_cancel_of_a_takeover_drops_the_remote_lun(bm: BlockmigEnv) -> None:
    """What the manager does when a step after the takeover fails (manager._fail). One
    that cut over is not deleted (409) unless keep_completed says what to do."""
    for model, cls in DRIVERS.items():
        if not issubclass(cls, RemoteTakeoverMixin):
            continue
        array = MODEL_ARRAY[model]
        drv = cls(array, bm.api(array))
        src = DRIVERS["plain"]("SRC", bm.api("SRC"))
        vol = Case(model, array, drv, bm).volume()
        src_uri = src.create_volume(vol, "default")["uri"]
        img = Image(SIZE)
        write_blocks(src_uri, _pattern(img, seed=0xCA))
        try:
            assert drv.migrate_volume_target(vol, src_uri, "default").moved
            if not drv.supports_async_migration:
                # a sync takeover has cut over when it returns: its LUN holds the volume
                # now, and a cancel deletes it only when told to
                with pytest.raises(ApiError) as ei:
                    drv.cancel_migration_target(vol)
                assert (ei.value.status, ei.value.code) == (409, "completed"), ei.value
                assert "already cut over" in ei.value.message and vol.lun in ei.value.message
                assert vol.lun in bm.luns(array), f"{model}: a cancel deleted a takeover that cut over"
                drv.cancel_migration_target(vol, keep_completed=True)
                assert vol.lun in bm.luns(array)
                assert_content(drv.connection_uri(vol), img)
                drv.cancel_migration_target(vol, keep_completed=False)
            else:
                drv.cancel_migration_target(vol)
            assert vol.lun not in bm.luns(array), f"{model}: the cancelled takeover left its LUN"
            drv.cancel_migration_target(vol)  # again: nothing left to cancel, still fine
            assert_content(src_uri, img)  # the source is untouched
        finally:
            try:
                drv.delete_volume(vol)
            except ApiError:
                pass
            src.delete_volume(vol)
