"""Test Backends that misbehave on purpose, the way a buggy server or store would."""

from __future__ import annotations

from emulator.nbd.backend import MemoryBackend
from emulator.nbd.protocol import Extent


class FixedMap(MemoryBackend):
    """A MemoryBackend whose allocation map is always ``answer``, whatever range is asked.

    Reads and writes are a MemoryBackend's; only ``extents`` lies (a fresh list each call).
    """

    def __init__(self, size: int, answer: list[Extent]) -> None:
        super().__init__(size)
        self.answer = answer

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return list(self.answer)
