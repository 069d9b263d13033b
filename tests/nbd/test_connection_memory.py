"""Memory a connected host costs the server: its receive buffer.

Before: every NBD connection got a 256 KiB receive buffer at the end of its
handshake (and kept its 4 KiB handshake buffer), zero-filled, so touched: 300
idle hosts grew an array's RSS by ~69 MB (~259 KiB each), and as glibc keeps
freed heap memory, it did not go back once they left. Now the buffer starts at
16 KiB, grows to 256 KiB when a receive fills it (a host sending faster than
that drains), and goes back once the host has sent nothing for IDLE_SHRINK
seconds: 300 idle hosts cost ~14 KiB each.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from emulator.nbd import protocol as p
from emulator.nbd import server as srv
from emulator.nbd.backend import MemoryBackend
from emulator.nbd.client import NbdClient
from emulator.nbd.server import NbdServer
from tests.servers import array_api, array_daemon

HOSTS = 200


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_idle_hosts_cost_the_array_little_memory(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "A") as a:
        api = array_api(a)
        for i in range(4):
            api.create_lun(f"l{i}", 64 << 20)

        async def go() -> int:
            before = rss(a.proc.pid)
            clients = [await NbdClient.connect(a.uri(f"l{i % 4}")) for i in range(HOSTS)]
            try:
                await clients[0].read(0, 4096)
                grown = rss(a.proc.pid) - before
                # the array still takes a write of the largest size, and reads it back
                data = os.urandom(p.MAX_BLOCK)
                await clients[4].write(0, data)
                assert await clients[8].read(0, p.MAX_BLOCK) == data  # both on l0
                return grown
            finally:
                for c in clients:
                    await c.close()

        grown = asyncio.run(asyncio.wait_for(go(), 120))
    per_host = grown / HOSTS
    assert per_host < 64 * 1024, f"{per_host / 1024:.0f} KiB a connected host (was ~259)"


def test_a_busy_host_grows_its_buffer_and_gives_it_back_when_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(srv, "IDLE_SHRINK", 0.05)

    async def main() -> None:
        server = NbdServer()
        server.add_export("x", MemoryBackend(64 << 20))
        _, port = await server.listen_tcp("127.0.0.1", 0)
        try:
            async with await NbdClient.connect(f"nbd://127.0.0.1:{port}/x") as c:
                (conn,) = server.connections
                dec = conn._dec
                assert dec is not None and not dec.grown
                assert len(conn._hs_buf) == 0  # the handshake's buffer is let go
                await c.read(0, 4096)
                assert not dec.grown  # a host at queue depth 1 never fills 16 KiB
                data = os.urandom(64 * 1024)
                for _ in range(4):  # pipelined: receives fill the small buffer
                    await asyncio.gather(*(c.write(k * len(data), data) for k in range(16)))
                assert dec.grown
                for _ in range(100):
                    if not dec.grown:
                        break
                    await asyncio.sleep(0.02)
                assert not dec.grown, "the buffer was not given back after the host went idle"
                # and grows again, and every byte still lands where it should
                big = os.urandom(p.MAX_BLOCK)
                await asyncio.gather(
                    c.write(0, big), *(c.write(p.MAX_BLOCK + k * 4096, data[:4096]) for k in range(64))
                )
                assert await c.read(0, p.MAX_BLOCK) == big
                assert await c.read(p.MAX_BLOCK + 63 * 4096, 4096) == data[:4096]
        finally:
            await server.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_decoder_grows_when_a_receive_fills_it_and_shrinks_when_empty() -> None:
    dec = p.RequestDecoder()
    assert len(dec.get_buffer()) == p.INITIAL_BUFFER
    reqs = b"".join(p.Request(0, p.CMD_READ, i, 0, 512).header() for i in range(2000))
    buf = dec.get_buffer()
    n = len(buf)
    buf[:] = reqs[:n]
    dec.buffer_updated(n)  # filled: more is coming
    assert dec.grown and len(dec.get_buffer()) > p.INITIAL_BUFFER
    assert not dec.shrink()  # unparsed bytes: not now
    got = []
    while (r := dec.next_event()) is not None:
        got.append(r.cookie)
    dec.receive_data(reqs[n:])
    while (r := dec.next_event()) is not None:
        got.append(r.cookie)
    assert got == list(range(2000))
    assert dec.shrink() and not dec.grown
    assert len(dec.get_buffer()) == p.INITIAL_BUFFER
