"""Fencing a LUN for a takeover, on a real array process over real NBD.

While another array takes a LUN over, a host still attached to the LUN directly must
not write behind the importer's back (its write would be lost at the cutover): the
array makes the LUN read-only to hosts (those connected get EPERM, new ones negotiate
READ_ONLY) and gives the importer a secret alias export with full access. The fence
lives in the array's metadata, so it survives kill -9.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.parse
from pathlib import Path

import pytest

from control.api_client import ApiError
from emulator.nbd.client import NbdClient, list_exports
from emulator.nbd.errors import OptionError
from tests.servers import ArrayDaemon, array_api, array_daemon, nbdkit
from tests.tools import LibnbdShell, need

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
SIZE = 4 * MiB
IO_TIMEOUT = 20.0


def post_fence(d: ArrayDaemon, lun: str, body: dict[str, str] | None) -> tuple[int, dict[str, object]]:
    """POST .../fence with ``body`` (None: no body at all); (status, JSON)."""
    u = urllib.parse.urlsplit(d.api)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=IO_TIMEOUT)
    try:
        headers = {"Authorization": f"Bearer {d.token}"}
        data = None if body is None else json.dumps(body)
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn.request("POST", f"/api/v1/luns/{lun}/fence", body=data, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


async def _io(uri: str, offset: int, data: bytes | None = None) -> bytes:
    """Write ``data`` (FUA) at ``offset`` if given, then read 4 KiB there back."""
    async with await NbdClient.connect(uri) as c:
        if data is not None:
            await c.write(offset, data, fua=True)
        return bytes(await c.read(offset, 4096))


def io(uri: str, offset: int, data: bytes | None = None) -> bytes:
    return asyncio.run(asyncio.wait_for(_io(uri, offset, data), IO_TIMEOUT))


def landed(d: ArrayDaemon, offset: int = MiB, data: bytes = b"\xab" * 4096) -> bool:
    """``data`` is at ``offset`` in LUN vol's file on ``d`` (the write reached the media)."""
    with open(d.data_dir / "pools" / "default" / "vol.img", "rb") as fh:
        fh.seek(offset)
        return fh.read(len(data)) == data


def read_only(uri: str) -> bool:
    async def ro() -> bool:
        async with await NbdClient.connect(uri) as c:
            return c.read_only

    return asyncio.run(asyncio.wait_for(ro(), IO_TIMEOUT))


def test_a_fenced_lun_is_read_only_to_hosts_and_writable_through_its_alias(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "A") as d:
        api = array_api(d)
        api.create_lun("vol", SIZE)
        uri = d.uri("vol")
        io(uri, 0, b"\x11" * 4096)
        assert api.get_lun("vol")["fenced"] is False

        with LibnbdShell(uri) as old:  # a host attached before the fence
            assert old.write(8192, 0x22, 4096) == ["ok"]

            status, f = post_fence(d, "vol", {"holder": "array B"})

            assert status == 201, f
            alias, alias_uri = str(f["export"]), str(f["uri"])
            assert alias.startswith("vol~fence-") and alias_uri == d.uri(alias), f
            assert post_fence(d, "vol", {"holder": "array B"}) == (200, f)  # idempotent
            assert post_fence(d, "vol", None) == (200, f)  # no body: the same fence
            status, err = post_fence(d, "vol", {"holder": "array C"})
            assert status == 409, err  # someone else's fence
            lun = api.get_lun("vol")
            assert lun["fenced"] is True and lun["fence"]["holder"] == "array B", lun
            assert alias not in json.dumps(lun), "GET of the LUN must not reveal the alias"
            # the host attached before: its writes now fail with EPERM, its reads work
            r = old.write(8192, 0x33, 4096)
            assert r[:2] == ["err", "EPERM"], r
            assert old.read(8192, 4096) == b"\x22" * 4096
            assert old.ask("f") == ["ok"]
            # a new host sees the export read-only
            assert read_only(uri) is True
            with LibnbdShell(uri) as new:
                assert new.write(0, 0x44, 512)[0] == "err"
            # the alias: full access, and not listed
            assert read_only(alias_uri) is False
            assert io(alias_uri, 8192, b"\x55" * 4096) == b"\x55" * 4096
            names = [n for n, _ in asyncio.run(asyncio.wait_for(list_exports(uri), IO_TIMEOUT))]
            assert names == ["vol"], names
            assert len(api.get_lun("vol")["connected_hosts"]) == 1  # the old host
            # its holder took it over at this size: it cannot grow under the fence
            with pytest.raises(ApiError) as e:
                api.call("POST", "/api/v1/luns/vol/grow", {"size": 2 * SIZE})
            assert e.value.status == 409 and "fenced" in str(e.value), e.value

            # lifting the fence: writes work again, also for the host attached before
            api.unfence_lun("vol")
            api.unfence_lun("vol")  # idempotent
            assert old.write(12288, 0x66, 4096) == ["ok"]
            assert read_only(uri) is False
            assert api.get_lun("vol")["fenced"] is False
            with pytest.raises(OptionError):  # the alias is gone
                io(alias_uri, 0)

        # fenced again (a new alias), then kill -9: the fence survives the restart
        status, f2 = post_fence(d, "vol", {"holder": "array B"})
        assert status == 201 and f2["export"] != alias, f2
        alias2 = str(f2["export"])
        io(d.uri(alias2), 16384, b"\x77" * 4096)
        d.sigkill()

    with array_daemon(tmp_path / "a", "A") as d2:
        api = array_api(d2)
        assert api.get_lun("vol")["fenced"] is True
        assert read_only(d2.uri("vol")) is True
        with LibnbdShell(d2.uri("vol")) as host:
            assert host.write(0, 0x88, 4096)[0] == "err"
            assert host.read(16384, 4096) == b"\x77" * 4096
        # the importer reconnects to the same alias export (the port is the new one here)
        assert io(d2.uri(alias2), 20480, b"\x99" * 4096) == b"\x99" * 4096
        assert io(d2.uri("vol"), 0) == b"\x11" * 4096
        assert post_fence(d2, "vol", {"holder": "array B"})[1]["export"] == alias2

        # deleting the LUN takes its fence with it
        api.delete_lun("vol", force=True)
        with pytest.raises(ApiError) as ei:
            api.unfence_lun("vol")
        assert ei.value.status == 404
        with pytest.raises(OptionError):
            io(d2.uri(alias2), 0)
        api.create_lun("vol", SIZE)  # a new LUN of that name is not fenced
        assert api.get_lun("vol")["fenced"] is False
        assert io(d2.uri("vol"), 0, b"\xaa" * 4096) == b"\xaa" * 4096


def test_the_fence_returns_once_the_writes_in_flight_landed(tmp_path: Path) -> None:
    """A host's write accepted before the fence but still on its way to the media when the
    fence answers would land after the importer may have copied its region: lost. The
    fence waits for it (the media takes 500 ms an I/O here)."""
    with array_daemon(tmp_path / "a", "A", "--media", "fixed:500") as d:
        array_api(d).create_lun("vol", SIZE)

        async def run() -> float:
            async with await NbdClient.connect(d.uri("vol")) as c:
                write = asyncio.create_task(c.write(MiB, b"\xab" * 4096))
                await asyncio.sleep(0.15)  # the write waits on the media
                t0 = time.monotonic()
                status, f = await asyncio.to_thread(post_fence, d, "vol", {"holder": "B"})
                took = time.monotonic() - t0
                assert status == 201, f
                assert landed(d), "the fence answered before the write landed"
                await write  # accepted before the fence: acknowledged
                return took

        took = asyncio.run(asyncio.wait_for(run(), IO_TIMEOUT))
        assert took > 0.2, took


def test_a_second_fence_call_answers_once_the_first_drained_the_writes(tmp_path: Path) -> None:
    """Two fence calls at once (a retry whose first try still runs): the second found the
    fence and answered at once, while the first still waited for a host's write in flight;
    its caller could copy the region before the write landed (lost). It waits too now."""
    with array_daemon(tmp_path / "a", "A", "--media", "fixed:500") as d:
        array_api(d).create_lun("vol", SIZE)

        async def run() -> None:
            async with await NbdClient.connect(d.uri("vol")) as c:
                write = asyncio.create_task(c.write(MiB, b"\xab" * 4096))
                await asyncio.sleep(0.1)  # the write waits on the media (500 ms)
                first = asyncio.create_task(asyncio.to_thread(post_fence, d, "vol", {"holder": "B"}))
                while not array_api(d).get_lun("vol")["fenced"]:  # the first call is draining
                    await asyncio.sleep(0.01)
                status, f = await asyncio.to_thread(post_fence, d, "vol", {"holder": "B"})
                assert status == 200, f
                assert landed(d), "the second fence call answered before the write in flight landed"
                assert (await first)[0] == 201
                await write

        asyncio.run(asyncio.wait_for(run(), IO_TIMEOUT))


def test_a_fence_while_the_last_one_is_lifted_keeps_the_export_read_only(tmp_path: Path) -> None:
    """Lifting a fence waits for its holder's requests in flight; a new fence taken
    meanwhile was undone when that wait ended: the export turned writable again while
    fenced, and hosts wrote behind the new holder's back."""
    with array_daemon(tmp_path / "a", "A", "--media", "fixed:500") as d:
        api = array_api(d)
        api.create_lun("vol", SIZE)
        status, f = post_fence(d, "vol", {"holder": "B"})
        assert status == 201, f

        async def run() -> None:
            async with await NbdClient.connect(str(f["uri"])) as holder:
                read = asyncio.create_task(holder.read(0, 4096))  # 500 ms on the media
                await asyncio.sleep(0.1)
                lift = asyncio.create_task(asyncio.to_thread(api.unfence_lun, "vol"))
                while api.get_lun("vol")["fenced"]:
                    await asyncio.sleep(0.01)
                assert not lift.done(), "the unfence did not wait for the holder's read"
                status, f2 = await asyncio.to_thread(post_fence, d, "vol", {"holder": "B"})
                assert status == 201 and f2["export"] != f["export"], f2
                await lift
                await read

        asyncio.run(asyncio.wait_for(run(), IO_TIMEOUT))
        assert api.get_lun("vol")["fenced"] is True
        assert read_only(d.uri("vol")) is True, "fenced, but new hosts may write"
        with LibnbdShell(d.uri("vol")) as host:
            r = host.write(0, 0x22, 4096)
            assert r[:2] == ["err", "EPERM"], r


def test_a_migrating_lun_cannot_be_fenced(tmp_path: Path) -> None:
    """A migrating (or remote) LUN sends hosts' writes on to its source without a Task the
    fence could wait for: the fence answered 201 before such a write was acknowledged. It
    answers 409 now (the control layer never fences one: the volume is migrating then)."""
    need("nbdkit")
    with nbdkit(tmp_path, "--filter=cow", "pattern", "64M") as src, array_daemon(tmp_path / "a", "A") as d:
        api = array_api(d)
        api.call("POST", "/api/v1/migrations", {"lun": "vol", "source": src.uri, "throttle": 1})
        assert api.get_lun("vol")["state"] == "migrating"
        status, err = post_fence(d, "vol", {"holder": "B"})
        assert status == 409 and "migrating" in str(err), err
        assert api.get_lun("vol")["fenced"] is False
        assert read_only(d.uri("vol")) is False


def test_a_fence_whose_writes_are_still_in_flight_after_its_drain_time_says_so(tmp_path: Path) -> None:
    """A host's write still on its way to the media when the fence gave up waiting
    (FENCE_DRAIN_S, 5 s; this media takes 6 s an I/O): the fence answered 201 with a
    warning, and the write landed (acknowledged) after the holder may have copied its
    region. It answers 503 now, fenced all the same; called again it waits for the write."""
    with array_daemon(tmp_path / "a", "A", "--media", "fixed:6000") as d:
        api = array_api(d)
        api.create_lun("vol", SIZE)

        async def run() -> None:
            async with await NbdClient.connect(d.uri("vol")) as c:
                write = asyncio.create_task(c.write(MiB, b"\xab" * 4096))
                await asyncio.sleep(0.2)  # the write waits on the media
                status, err = await asyncio.to_thread(post_fence, d, "vol", {"holder": "B"})
                assert status == 503 and not landed(d), (status, err)
                assert api.get_lun("vol")["fenced"] is True
                status, f = await asyncio.to_thread(post_fence, d, "vol", {"holder": "B"})
                assert status == 200, f
                assert landed(d), "the fence answered before the write in flight landed"
                await write

        asyncio.run(asyncio.wait_for(run(), IO_TIMEOUT + 10))
