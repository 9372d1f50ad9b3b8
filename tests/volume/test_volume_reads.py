"""The volume's read rules over a parent, on in-memory parts (pure logic):
a read that spans the scrub point takes every block above it the
sub-volumes never had written from the parent, whatever the read's start."""

from __future__ import annotations

import asyncio

from crucible.common.buffer import Buffer
from crucible.protocol import messages as m
from crucible.upstairs.blockio import BlockIO, ReadDone, WriteDone
from crucible.volume.sources import Source
from crucible.volume.volume import Volume

BS = 512


class MemoryDisk(BlockIO):
    """Blocks in memory; a block's context says whether it was ever written."""

    def __init__(self, blocks: int) -> None:
        self.data = bytearray(blocks * BS)
        self.written = [False] * blocks

    @property
    def block_size(self) -> int:
        return BS

    @property
    def total_blocks(self) -> int:
        return len(self.written)

    def submit_read(self, block: int, count: int, done: ReadDone) -> None:
        ctxs: list[m.ReadBlockContext] = [
            1 if w else None for w in self.written[block : block + count]
        ]
        done((bytes(self.data[block * BS : (block + count) * BS]), ctxs))

    def _put(self, block: int, data: Buffer, unwritten: bool) -> None:
        for i in range(len(data) // BS):
            if not (unwritten and self.written[block + i]):
                self.data[(block + i) * BS : (block + i + 1) * BS] = data[i * BS : (i + 1) * BS]
                self.written[block + i] = True

    def submit_write(self, block: int, data: Buffer, done: WriteDone) -> None:
        self._put(block, data, False)
        done(None)

    def submit_write_unwritten(self, block: int, data: Buffer, done: WriteDone) -> None:
        self._put(block, data, True)
        done(None)

    def submit_trim(self, block: int, count: int, done: WriteDone) -> None:
        done(None)

    def submit_flush(self, done: WriteDone, snapshot: str | None = None) -> None:
        done(None)

    def allocation(self, block: int, count: int) -> list[tuple[int, int, bool]] | None:
        return None


class MemorySource(Source):
    def __init__(self, data: bytes) -> None:
        self.data, self.block_size, self.total_blocks = data, BS, len(data) // BS

    async def open(self) -> None:
        return None

    async def read(self, block: int, count: int) -> bytes:
        return self.data[block * BS : (block + count) * BS]


def test_a_read_across_the_scrub_point_sees_the_parent_above_it() -> None:
    parent = b"".join(bytes([i + 1]) * BS for i in range(16))  # each block its own

    async def go() -> None:
        disk = MemoryDisk(32)
        vol = Volume([disk], MemorySource(parent))
        vol.settle_shape()
        # The scrub has copied blocks 0..3; the guest wrote block 6.
        await vol.write_unwritten(0, parent[: 4 * BS])
        vol.scrub_point = 4
        await vol.write(6, b"\xee" * BS)
        data, written = await vol.read_with_status(2, 8)
        expect = bytearray(parent[2 * BS : 10 * BS])
        expect[4 * BS : 5 * BS] = b"\xee" * BS
        assert data == bytes(expect)
        assert written == [True] * 8
        assert await vol.read(12, 8) == parent[12 * BS :] + bytes(4 * BS)

    asyncio.run(go())


def test_a_read_over_the_parent_does_not_see_a_write_submitted_after_it() -> None:
    """The sub-volumes' part of the read is queued when the read is
    submitted, not a loop step later, so a write the guest submits next
    cannot slip in before it."""
    parent = bytes([7]) * (4 * BS)

    async def go() -> None:
        disk = MemoryDisk(8)
        vol = Volume([disk], MemorySource(parent))
        vol.settle_shape()
        await vol.write(1, b"\x01" * BS)
        loop = asyncio.get_running_loop()
        got: asyncio.Future[object] = loop.create_future()
        vol.submit_read(0, 4, got.set_result)
        vol.submit_write(1, b"\x02" * BS, lambda err: None)
        result = await got
        assert isinstance(result, tuple)
        data = bytes(result[0])
        assert data == bytes([7]) * BS + b"\x01" * BS + bytes([7]) * (2 * BS)

    asyncio.run(go())
