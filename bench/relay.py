"""A raw TCP byte relay on uvloop: the floor of any userspace hop.

``python -m bench.relay HOST PORT`` listens on 127.0.0.1 (port 0), prints its
port, and relays every connection to HOST:PORT byte for byte: no NBD
parsing, no copies beyond the kernel's, each read forwarded as it comes. The
read-through benchmark runs the same fio job through it to the source: what
a hop costs on this machine before a target array does anything of its own.
Backpressure both ways: a side stops reading while its peer cannot write.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import cast

import uvloop


class _Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.early: list[bytes] = []  # bytes that came before the peer was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)
        else:
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # the peer's transport is full: stop reading what would go there
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()

    def accept() -> _Side:
        down = _Side()

        async def connect() -> None:
            up = _Side()
            up.peer, down.peer = down, up
            try:
                await loop.create_connection(lambda: up, host, port)
            except OSError:
                if down.transport is not None:
                    down.transport.close()
                return
            assert up.transport is not None
            if down.transport is None or down.transport.is_closing():
                up.transport.close()  # the client left while we connected
                return
            for data in down.early:
                up.transport.write(data)
            down.early.clear()

        asyncio.ensure_future(connect())
        return down

    server = await loop.create_server(accept, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit() or not 0 < int(argv[1]) < 65536:
        # (a port past 65535 started a relay that refused every connection it took)
        print("usage: python -m bench.relay HOST PORT (1-65535)", file=sys.stderr)
        return 2
    uvloop.install()
    asyncio.run(serve(argv[0], int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
