"""Migrations whose source is another NBD server, not one of our arrays.

A target array takes over "any nbd:// URI": here the source is nbdkit's
sparse-random plugin (thousands of 4 KiB-granular extents, answered as nbdkit
answers BLOCK_STATUS) and qemu-nbd serving a sparse raw file written at odd
offsets. Real processes on 127.0.0.1 and unix sockets; the target LUN is read
back with nbdcopy and compared byte for byte with what nbdcopy reads from the
source; holes stay holes on the target and cost no data on the wire.
"""

from __future__ import annotations

import asyncio
import filecmp
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from control.api_client import ApiError
from emulator.nbd.client import NbdClient
from tests.files import data_bytes
from tests.servers import ArrayDaemon, array_api, array_daemon, nbdkit, qemu_nbd

KiB, MiB = 1 << 10, 1 << 20


def nbdcopy(src: str, dst: Path) -> None:
    subprocess.run(["nbdcopy", src, str(dst)], check=True, timeout=60, capture_output=True)


def migrate_and_compare(b: ArrayDaemon, source: str, lun: str, tmp: Path, **opts: object) -> dict[str, Any]:
    """Migrate ``source`` into LUN ``lun`` of ``b``; every byte must equal the source's."""
    array_api(b).call("POST", "/api/v1/migrations", {"lun": lun, "source": source, **opts})
    st = array_api(b).wait_migration(lun, 60)
    assert st["state"] == "completed", st
    want, got = tmp / f"{lun}.want", tmp / f"{lun}.got"
    nbdcopy(source, want)
    nbdcopy(b.uri(lun), got)
    assert filecmp.cmp(want, got, shallow=False), f"LUN {lun} differs from its source"
    return st


@pytest.mark.timeout(120)
@pytest.mark.parametrize("region_size", [256 * KiB, MiB])
def test_from_nbdkit_sparse_random(tmp_path: Path, region_size: int) -> None:
    if not shutil.which("nbdkit") or not shutil.which("nbdcopy"):
        pytest.skip("nbdkit and nbdcopy are needed (make install)")
    size = 160 * MiB  # three 64 MiB map windows, the last one short
    with (
        nbdkit(tmp_path, "sparse-random", f"size={size}", "seed=3", "percent=20", "runlength=12288") as src,
        array_daemon(tmp_path / "B", "B") as b,
    ):
        st = migrate_and_compare(b, src.uri, "vol", tmp_path, region_size=region_size)
        allocated = data_bytes(tmp_path / "vol.want")  # nbdcopy keeps the source's holes
        assert 0.15 * size < allocated < 0.25 * size, allocated
        # Holes cost nothing: only data came over the wire, nothing was zeroed on the
        # fresh LUN, and it is as sparse as the source (up to the file system's blocks).
        assert st["copied_bytes"] == allocated, (st["copied_bytes"], allocated)
        assert st["zeroed_bytes"] == 0, st["zeroed_bytes"]
        assert array_api(b).get_lun("vol")["allocated"] <= allocated * 1.01


@pytest.mark.timeout(120)
def test_from_qemu_nbd_with_data_at_odd_offsets(tmp_path: Path) -> None:
    if not shutil.which("qemu-nbd") or not shutil.which("nbdcopy"):
        pytest.skip("qemu-nbd and nbdcopy are needed (make install)")
    size = 70 * MiB + 3 * 4096  # not a whole number of regions
    img = tmp_path / "src.img"
    rng = random.Random(11)
    with open(img, "wb") as f:
        f.truncate(size)
        for off in (0, 511, 64 * MiB - 100, MiB - 1, size - 5000):  # straddling regions and windows
            f.seek(off)
            f.write(rng.randbytes(min(9000, size - off)))
        for _ in range(40):
            off = rng.randrange(0, size - 20000)
            f.seek(off)
            f.write(rng.randbytes(rng.randint(1, 20000)))
    with qemu_nbd(tmp_path, img) as src, array_daemon(tmp_path / "B", "B") as b:
        st = migrate_and_compare(b, src.uri, "odd", tmp_path)
        assert filecmp.cmp(img, tmp_path / "odd.got", shallow=False)
        assert st["copied_bytes"] == data_bytes(img) and st["zeroed_bytes"] == 0, st
        # (allocated counts st_blocks: the file system's extent tree blocks too)
        assert data_bytes(img) <= array_api(b).get_lun("odd")["allocated"] <= data_bytes(img) + 64 * KiB


@pytest.mark.timeout(120)
def test_from_an_array_whose_map_takes_several_replies_a_window(tmp_path: Path) -> None:
    """Our own array as the source answers at most 1024 extents a reply: a window of
    4 KiB runs takes several map reads, and the last one reaches into the next window."""
    if not shutil.which("nbdcopy"):
        pytest.skip("nbdcopy is needed (make install)")
    size = 96 * MiB
    with array_daemon(tmp_path / "A", "A") as a, array_daemon(tmp_path / "B", "B") as b:
        array_api(a).create_lun("thin", size)

        async def fill() -> None:
            c = await NbdClient.connect(a.uri("thin"))
            try:
                for off in range(60 * MiB, 70 * MiB, 2 * 4096):  # 1280 data runs, as many holes
                    await c.write(off, os.urandom(4096))
                await c.write(size - 4096, b"\x01" * 4096)
                await c.flush()
            finally:
                await c.close()

        asyncio.run(fill())
        st = migrate_and_compare(b, a.uri("thin"), "thin", tmp_path)
        assert st["copied_bytes"] == 1281 * 4096 and st["zeroed_bytes"] == 0, st


@pytest.mark.timeout(120)
def test_a_source_that_needs_aligned_requests(tmp_path: Path) -> None:
    """Regression (was a bug): the target advertised a minimum block size of 1 while its
    source (nbdkit, blocksize-minimum=4096, blocksize-error-policy=error) refuses what is
    not 4 KiB-aligned, so qemu-io's 1-byte write and 513-byte read through the migrating
    LUN failed with EINVAL where straight on the source they work (qemu aligns them).
    The LUN advertises its source's minimum now, while it migrates and once it is remote."""
    if not shutil.which("nbdkit") or not shutil.which("qemu-io") or not shutil.which("nbdcopy"):
        pytest.skip("nbdkit, qemu-io and nbdcopy are needed (make install)")
    size = 16 * MiB
    policy = ("blocksize-minimum=4096", "blocksize-error-policy=error")
    with (
        nbdkit(tmp_path, "--filter=blocksize-policy", "memory", f"size={size}", *policy) as src,
        nbdkit(tmp_path, "--filter=blocksize-policy", "memory", f"size={size}", *policy) as src2,
        array_daemon(tmp_path / "B", "B") as b,
    ):
        sources = {"mig": src.uri, "rem": src2.uri}  # one LUN of an array takes a source over

        async def fill_and_block_size(uri: str) -> int:
            async with await NbdClient.connect(uri) as c:
                if uri in sources.values():
                    for off in range(0, size, MiB):
                        await c.write(off, bytes([off // MiB + 1]) * 64 * KiB)
                    await c.flush()
                return c.block_size.minimum

        assert asyncio.run(fill_and_block_size(src.uri)) == asyncio.run(fill_and_block_size(src2.uri)) == 4096
        api = array_api(b)
        for lun, action in (("mig", "pause"), ("rem", "cancel")):
            # paused: still a migrating LUN (its host I/O goes through to the source)
            api.call("POST", "/api/v1/migrations", {"lun": lun, "source": sources[lun], "throttle": 1})
            api.call("POST", f"/api/v1/migrations/{lun}/{action}")
            assert api.migration(lun)["state"] == {"pause": "paused", "cancel": "cancelled"}[action]
            assert asyncio.run(fill_and_block_size(b.uri(lun))) == 4096, lun
            off = 5 * MiB + 1 if lun == "mig" else 9 * MiB + 1
            p = subprocess.run(
                [
                    "qemu-io",
                    "-f",
                    "raw",
                    "-c",
                    f"write -P 0xab {off} 1",
                    "-c",
                    f"read -P 0xab {off} 1",
                    "-c",
                    f"read {off - 2} 513",
                    b.uri(lun),
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert p.returncode == 0 and "failed" not in p.stdout + p.stderr, p.stdout + p.stderr
        api.call("POST", "/api/v1/migrations/mig/resume")
        st = api.wait_migration("mig", 60)
        assert st["state"] == "completed", st
        want, got = tmp_path / "want", tmp_path / "got"
        nbdcopy(src.uri, want)
        nbdcopy(b.uri("mig"), got)
        assert filecmp.cmp(want, got, shallow=False)
        assert want.read_bytes()[5 * MiB : 5 * MiB + 2] == b"\x06\xab"
        nbdcopy(src2.uri, want)
        assert want.read_bytes()[9 * MiB + 1] == 0xAB  # rem's write reached its source


def test_a_source_whose_size_is_not_a_multiple_of_its_minimum_block_is_refused(tmp_path: Path) -> None:
    """Regression (was a bug): a source of 1000448 bytes (a multiple of 512) with a 4 KiB
    minimum block size (nbdkit, blocksize-policy) was taken over, and its migration stayed
    \"copying\" for good: the copier's BLOCK_STATUS and reads of the last 1 KiB cannot be
    aligned (EINVAL), nor can a host's. doc/proto.md (\"Block size constraints\") has the
    size a multiple of the minimum; one that is not is refused at the start, naming both,
    and nothing is left behind."""
    if not shutil.which("nbdkit"):
        pytest.skip("nbdkit is needed (make install)")
    policy = ("blocksize-minimum=4096", "blocksize-error-policy=error")
    with (
        nbdkit(tmp_path, "--filter=blocksize-policy", "memory", "size=1000448", *policy) as src,
        array_daemon(tmp_path / "B", "B") as b,
    ):
        api = array_api(b)
        with pytest.raises(ApiError) as ei:
            api.call("POST", "/api/v1/migrations", {"lun": "odd", "source": src.uri})
        assert ei.value.status == 400, ei.value
        assert "1000448" in ei.value.message and "4096" in ei.value.message, ei.value.message
        assert api.call("GET", "/api/v1/luns") == api.call("GET", "/api/v1/migrations") == []


@pytest.mark.timeout(120)
def test_a_host_req_one_block_status_asks_the_source_for_one_extent(tmp_path: Path) -> None:
    """Regression: a host's BLOCK_STATUS with REQ_ONE on a migrating (and on a remote)
    LUN went to the source without the flag, so a fragmented source answered every
    extent of the range asked and the target threw all but the first away. nbdkit's
    log filter shows the flag each request reached the source with."""
    if not shutil.which("nbdkit"):
        pytest.skip("nbdkit is needed (make install)")
    size, log = 64 * MiB, tmp_path / "source.log"
    sparse = ("sparse-random", f"size={size}", "seed=5", "percent=50", "runlength=8192")
    with (
        nbdkit(tmp_path, "--filter=log", *sparse, f"logfile={log}") as src,
        array_daemon(tmp_path / "B", "B") as b,
    ):
        api = array_api(b)

        async def first_extent(uri: str) -> tuple[int, int]:
            async with await NbdClient.connect(uri) as c:
                [e] = await c.extents(0, size, one=True)
                return e.length, e.flags

        want = asyncio.run(first_extent(src.uri))
        api.call("POST", "/api/v1/migrations", {"lun": "mig", "source": src.uri, "throttle": 1})
        for action in ("pause", "cancel"):  # a migrating LUN, then a remote one
            api.call("POST", f"/api/v1/migrations/mig/{action}")
            asked = log.read_text().count(" Extents id=")
            assert asyncio.run(first_extent(b.uri("mig"))) == want, action
            new = [ln for ln in log.read_text().splitlines() if " Extents id=" in ln][asked:]
            assert new and all("req_one=1" in ln for ln in new), (action, new)


@pytest.mark.timeout(120)
def test_a_sparse_read_fetches_its_data_runs_at_once(tmp_path: Path) -> None:
    """Regression: a host's structured READ over holes on a migrating LUN asked the
    source for its data runs one after another, a round trip each (four runs behind
    a 50 ms fabric: 200 ms). They go out together now: nbdkit's log filter (outside
    its delay filter) shows every run's READ begun before the first one ends."""
    if not shutil.which("nbdkit"):
        pytest.skip("nbdkit is needed (make install)")
    size, log = 16 * MiB, tmp_path / "source.log"
    # Holes cost the copier nothing: 4 MiB of data ahead of the runs keep it (1 MB/s,
    # paused at once) off them for seconds; alone, they were its first copy.
    ahead, base = 4 * MiB, 8 * MiB
    runs = [base + i * 256 * KiB for i in range(4)]
    with (
        nbdkit(
            tmp_path,
            "--filter=log",
            "--filter=delay",
            "memory",
            f"size={size}",
            "rdelay=50ms",
            f"logfile={log}",
        ) as src,
        array_daemon(tmp_path / "B", "B") as b,
    ):

        async def fill() -> None:
            async with await NbdClient.connect(src.uri) as c:
                await c.write(0, b"a" * ahead)
                for o in runs:
                    await c.write(o, bytes([(o - base) // (256 * KiB) + 1]) * 64 * KiB)

        async def read_mib(uri: str) -> bytes | bytearray:
            async with await NbdClient.connect(uri) as c:
                assert c.structured
                return await c.read(base, MiB)

        asyncio.run(fill())
        api = array_api(b)
        api.call("POST", "/api/v1/migrations", {"lun": "mig", "source": src.uri, "throttle": 1})
        api.call("POST", "/api/v1/migrations/mig/pause")
        seen = len(log.read_text().splitlines())
        data = asyncio.run(read_mib(b.uri("mig")))
        assert data == b"".join(bytes([i + 1]) * 64 * KiB + bytes(192 * KiB) for i in range(4))
        reads = [ln for ln in log.read_text().splitlines()[seen:] if "Read id=" in ln]
        begun = [ln for ln in reads if any(f" offset={o:#x} " in ln for o in runs)]
        assert len(begun) == len(runs), reads
        # the copier's READs (of the data ahead) may end meanwhile: the runs' own
        ids = {ln.split(" Read id=")[1].split()[0] for ln in begun}
        ended = [
            i
            for i, ln in enumerate(reads)
            if "...Read id=" in ln and ln.split("...Read id=")[1].split()[0] in ids
        ]
        assert max(reads.index(ln) for ln in begun) < min(ended), reads
