"""A volume keeps every byte through a live migration while a host writes to it.

The example of docs/testing.md: blockmig's pytest plugin gives this test two running arrays
(``blockmig_arrays``) and stops them afterwards.
"""

import random

import pytest

from blockmig.testing import ArraySpec, BlockmigEnv, assert_same_data

MiB = 1 << 20
BLOCK = 4096


# Array A answers each I/O in 2 ms and B copies at 4 MB/s: the copy of the 8 MiB of known data
# takes about 2 s, long enough to write meanwhile.
@pytest.mark.blockmig_arrays(ArraySpec("A", media="fixed:2"), ArraySpec("B", migration_throttle=4))
def test_volume_keeps_every_byte_through_a_live_migration(blockmig_arrays: BlockmigEnv) -> None:
    vol = blockmig_arrays.create_volume("data", size=32 * MiB, host="A")
    rng = random.Random(1)
    expected = bytearray(vol.size)

    # known data: a random 4 KiB block every 16 KiB (2048 extents for B to copy)
    pieces = {off: rng.randbytes(BLOCK) for off in range(0, vol.size, 16 * 1024)}
    with vol.open() as dev:
        dev.write_many(pieces)
    for off, data in pieces.items():
        expected[off : off + BLOCK] = data

    # B takes the volume over and serves it at once; A still holds the data
    assert vol.migrate(to="B", wait=False) == "migrating_attachable"
    uri = vol.attach()
    assert uri.startswith("nbd://127.0.0.1:") and uri == vol.uri

    # a host writes through B (each write acknowledged once A has it) until the migration ends
    writes = 0
    with vol.open() as dev:
        while writes < 100 or vol.migration_status == "migrating_attachable":
            off = rng.randrange(vol.size // BLOCK) * BLOCK
            data = rng.randbytes(BLOCK)
            dev.write(off, data, fua=True)
            expected[off : off + BLOCK] = data
            writes += 1

    assert vol.wait() == "success"
    assert vol.host.startswith("B@")
    assert_same_data(vol.read(), expected, f"volume {vol.name} on B")
