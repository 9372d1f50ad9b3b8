"""What NBD commands mean on whole blocks, without processes: block-status
extents and the range locks of read-modify-write."""

from __future__ import annotations

import asyncio

from crucible.nbd import protocol as p
from crucible.nbd.disk import MAX_EXTENTS, Disk, RangeLocks, block_runs, status_extents
from crucible.upstairs.blockio import ReadDone
from tests.volume.test_volume_reads import MemoryDisk

HOLE = p.STATE_HOLE | p.STATE_ZERO


def test_status_extents_runs_of_blocks() -> None:
    runs = block_runs(10, [True, True, False, False, True])
    assert runs == [(10, 2, True), (12, 2, False), (14, 1, True)]
    assert status_extents(runs, 10 * 512, 5 * 512, 512, False) == [
        (1024, 0),
        (1024, HOLE),
        (512, 0),
    ]


def test_status_extents_unaligned_edges_and_req_one() -> None:
    runs = block_runs(0, [False, True, True])
    # Bytes 100 .. 1400 of blocks 0..2: the first extent is cut at the range start.
    assert status_extents(runs, 100, 1300, 512, False) == [(412, HOLE), (888, 0)]
    assert status_extents(runs, 100, 1300, 512, True) == [(412, HOLE)]
    assert status_extents([(7, 1, True)], 7 * 4096 + 5, 10, 4096, False) == [(10, 0)]


def test_status_extents_merge_alike_runs_and_stop_at_the_cap() -> None:
    # Runs alike side by side are one extent.
    runs = [(0, 2, False), (2, 3, False), (5, 1, True)]
    assert status_extents(runs, 0, 6 * 512, 512, False) == [(2560, HOLE), (512, 0)]
    # Alternating single blocks: the reply stops at MAX_EXTENTS, a prefix of the range.
    many = [(i, 1, i % 2 == 0) for i in range(MAX_EXTENTS + 10)]
    ext = status_extents(many, 0, (MAX_EXTENTS + 10) * 512, 512, False)
    assert len(ext) == MAX_EXTENTS and all(n == 512 for n, _ in ext)


def test_range_locks_hold_back_only_what_overlaps() -> None:
    async def run() -> list[str]:
        locks = RangeLocks()
        order: list[str] = []
        token = await locks.acquire(0, 4)
        locks.when_clear(2, 3, lambda: order.append("overlapping write"))
        locks.when_clear(8, 9, lambda: order.append("elsewhere"))  # not held: at once
        second = asyncio.ensure_future(locks.acquire(3, 6))
        await asyncio.sleep(0)
        assert order == ["elsewhere"] and not second.done()
        locks.release(token)
        # The waiting write starts, and the second read-modify-write takes its
        # range at once: a write to it now waits for that one.
        assert order == ["elsewhere", "overlapping write"]
        locks.when_clear(5, 6, lambda: order.append("behind the second"))
        t2 = await second
        assert order == ["elsewhere", "overlapping write"]
        locks.release(t2)
        return order

    assert asyncio.run(run()) == ["elsewhere", "overlapping write", "behind the second"]


class _MapOnItsWay(MemoryDisk):
    """A volume whose map of blocks holding data arrives after a while; reading
    blocks to learn it is what block status must not do meanwhile."""

    def __init__(self) -> None:
        super().__init__(16)
        self.arrived = asyncio.Event()
        self.reads = 0

    def submit_read(self, block: int, count: int, done: ReadDone) -> None:
        self.reads += 1
        super().submit_read(block, count, done)

    def allocation(self, block: int, count: int) -> list[tuple[int, int, bool]] | None:
        if not self.arrived.is_set():
            return None
        return [(block, count, block < 4)]

    async def allocation_settled(self) -> None:
        await self.arrived.wait()


def test_block_status_waits_for_a_map_on_its_way_instead_of_reading() -> None:
    async def run() -> None:
        vol = _MapOnItsWay()
        disk = Disk(vol, lambda coro: None)
        bs = vol.block_size
        status = asyncio.ensure_future(disk.block_status(0, 4 * bs, False))
        await asyncio.sleep(0)
        assert not status.done()
        vol.arrived.set()
        assert await status == [(4 * bs, 0)]
        assert vol.reads == 0

    asyncio.run(run())
