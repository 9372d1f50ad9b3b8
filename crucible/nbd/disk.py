"""What NBD's byte-addressed commands mean on a volume of whole blocks.

* A read covers the blocks its byte range touches and answers the bytes
  asked for; every read takes this one path.
* A write of whole blocks is queued at once (acked when queued, like any
  upstairs write), after any read-modify-write of an overlapping range has
  finished. A write that does not cover whole blocks is read-modify-write of
  the blocks it touches, with that range locked meanwhile so that no other
  write to it interleaves; a read-modify-write takes its whole range in one
  step, so two of them never wait on each other.
* TRIM discards the whole blocks inside its range (they read as zeros; the
  edges are left alone, TRIM being advisory); WRITE_ZEROES discards whole
  blocks unless the client asks for no holes (then writes zeros) and writes
  zeros into partial edge blocks.
* Block status says, per run of blocks, whether they were ever written
  (`status_extents`, a pure function).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import crucible.nbd.protocol as p
from crucible.upstairs.blockio import BlockIO, ReadResult

MAX_STATUS_BYTES = 64 << 20  # one BLOCK_STATUS answered by reading covers at most this
MAX_EXTENTS = 1 << 16  # extents in one BLOCK_STATUS reply

ReadReply = Callable[[memoryview | BaseException], None]
Done = Callable[[BaseException | None], None]


class RangeLocks:
    """Block ranges under read-modify-write. Work that must not overlap one
    waits (`when_clear`, or `acquire` for another read-modify-write) and
    starts, in arrival order, as soon as nothing it overlaps is held."""

    def __init__(self) -> None:
        self.held: dict[int, tuple[int, int]] = {}
        self._waiting: list[tuple[int, int, Callable[[], None]]] = []
        self._next = 0

    def _overlaps(self, first: int, last: int) -> bool:
        return any(a < last and first < b for a, b in self.held.values())

    def when_clear(self, first: int, last: int, start: Callable[[], None]) -> None:
        """Run `start` once no held range overlaps [first, last)."""
        if not self._overlaps(first, last):
            start()
        else:
            self._waiting.append((first, last, start))

    async def acquire(self, first: int, last: int) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.when_clear(first, last, lambda: fut.set_result(self._take(first, last)))
        return await fut

    def _take(self, first: int, last: int) -> int:
        self._next += 1
        self.held[self._next] = (first, last)
        return self._next

    def release(self, token: int) -> None:
        del self.held[token]
        waiting, self._waiting = self._waiting, []
        for first, last, start in waiting:
            if self._overlaps(first, last):  # (a waiter started just now may hold it)
                self._waiting.append((first, last, start))
            else:
                start()


class Disk:
    def __init__(self, up: BlockIO, spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        """`spawn` runs a coroutine the caller keeps track of (read-modify-write)."""
        self.up = up
        self.locks = RangeLocks()
        self._spawn = spawn

    @property
    def block_size(self) -> int:
        return self.up.block_size

    @property
    def size(self) -> int:
        return self.up.total_blocks * self.up.block_size

    def outer_blocks(self, offset: int, length: int) -> tuple[int, int]:
        """The blocks [first, last) a byte range touches, partly or wholly."""
        bs = self.block_size
        return offset // bs, -(-(offset + length) // bs)

    def inner_blocks(self, offset: int, length: int) -> tuple[int, int]:
        """The whole blocks [first, last) inside a byte range (first >= last: none)."""
        bs = self.block_size
        return -(-offset // bs), (offset + length) // bs

    # ---- reads and writes: callbacks, no task per IO ------------------------------

    def read(self, offset: int, length: int, reply: ReadReply) -> None:
        first, last = self.outer_blocks(offset, length)
        skip = offset - first * self.block_size

        def done(result: ReadResult | BaseException) -> None:
            if isinstance(result, BaseException):
                reply(result)
            else:
                reply(memoryview(result[0])[skip : skip + length])

        self.up.submit_read(first, last - first, done)

    def write(self, offset: int, data: bytes | bytearray, fua: bool, done: Done) -> None:
        """Write any byte range; `data` is the volume's from now on."""
        bs = self.block_size
        if fua:
            done = self._then_flush(done)
        if offset % bs or len(data) % bs:
            self._spawn(self._read_modify_write(offset, data, done))
            return
        if not data:
            done(None)
            return
        first, last = offset // bs, (offset + len(data)) // bs
        if not self.locks.held:  # no read-modify-write under way: the common case
            self.up.submit_write(first, data, done)
        else:
            self.locks.when_clear(first, last, lambda: self.up.submit_write(first, data, done))

    def _then_flush(self, done: Done) -> Done:
        """FUA: the write is answered once a flush after it is done."""

        def written(err: BaseException | None) -> None:
            if err is not None:
                done(err)
            else:
                self.up.submit_flush(done)

        return written

    async def _read_modify_write(self, offset: int, data: bytes | bytearray, done: Done) -> None:
        try:
            await self._rmw(offset, data)
        except Exception as e:  # the client gets the error; the server goes on
            done(e)
            return
        done(None)

    async def _rmw(self, offset: int, data: bytes | bytearray) -> None:
        bs = self.block_size
        end = offset + len(data)
        first, last = self.outer_blocks(offset, len(data))
        token = await self.locks.acquire(first, last)
        try:
            head = offset - first * bs
            buf = bytearray((last - first) * bs)
            buf[head : head + len(data)] = data
            old_first = await self.up.read(first, 1)
            buf[:head] = old_first[:head]
            tail_start = end - first * bs
            if tail_start < len(buf):
                old_last = await self.up.read(last - 1, 1)
                keep = len(buf) - tail_start
                buf[tail_start:] = old_last[bs - keep :]
            await self.up.write(first, bytes(buf))
        finally:
            self.locks.release(token)

    # ---- the rest: coroutines --------------------------------------------------------

    async def flush(self) -> None:
        await self.up.flush()

    async def trim(self, offset: int, length: int) -> None:
        first, last = self.inner_blocks(offset, length)
        if last > first:
            await self._discard(first, last)

    async def write_zeroes(self, offset: int, length: int, no_hole: bool) -> None:
        bs = self.block_size
        first, last = self.inner_blocks(offset, length)
        if last <= first:
            await self._write_bytes(offset, bytes(length))
            return
        if no_hole:
            await self._zero(first, last)
        else:
            await self._discard(first, last)
        if offset < first * bs:
            await self._write_bytes(offset, bytes(first * bs - offset))
        if offset + length > last * bs:
            await self._write_bytes(last * bs, bytes(offset + length - last * bs))

    async def block_status(self, offset: int, length: int, req_one: bool) -> list[tuple[int, int]]:
        """From the volume's map of the blocks that hold data, without reading
        any (waiting for it while it is fetched, just after activation); where
        that map is not known (a downstairs that cannot tell), by reading the
        blocks, at most MAX_STATUS_BYTES at a time."""
        first, last = self.outer_blocks(offset, length)
        runs = self.up.allocation(first, last - first)
        if runs is None:
            await self.up.allocation_settled()  # a map on its way beats reading
            runs = self.up.allocation(first, last - first)
        if runs is None:
            length = min(length, MAX_STATUS_BYTES)
            first, last = self.outer_blocks(offset, length)
            _, written = await self.up.read_with_status(first, last - first)
            runs = block_runs(first, written)
        return status_extents(runs, offset, length, self.block_size, req_one)

    async def _write_bytes(self, offset: int, data: bytes) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.write(offset, data, False, lambda err: _settle(fut, err))
        await fut

    async def _clear(self, first: int, last: int) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.locks.when_clear(first, last, lambda: fut.set_result(None))
        await fut

    async def _discard(self, first: int, last: int) -> None:
        await self._clear(first, last)
        await self.up.trim(first, last - first)

    async def _zero(self, first: int, last: int) -> None:
        await self._clear(first, last)
        step = max(1, (1 << 20) // self.block_size)
        zero = bytes(step * self.block_size)
        for b in range(first, last, step):
            n = min(step, last - b)
            await self.up.write(b, zero[: n * self.block_size])


def _settle(fut: asyncio.Future[None], err: BaseException | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


Run = tuple[int, int, bool]  # first block, block count, holds data


def block_runs(first: int, written: list[bool]) -> list[Run]:
    """Per-block flags from `first` on, as runs."""
    runs: list[Run] = []
    for i, w in enumerate(written):
        if runs and runs[-1][2] == w:
            start, n, _ = runs[-1]
            runs[-1] = (start, n + 1, w)
        else:
            runs.append((first + i, 1, w))
    return runs


def status_extents(
    runs: list[Run], offset: int, length: int, block_size: int, req_one: bool
) -> list[tuple[int, int]]:
    """NBD block-status extents (length, flags) for the bytes [offset,
    offset+length), from runs of blocks covering them in order: data, or
    holes that read as zeros. Neighbouring runs alike are one extent; at most
    MAX_EXTENTS are answered (the client asks again from where they end);
    with `req_one`, only the first."""
    extents: list[tuple[int, int]] = []
    hole = p.STATE_HOLE | p.STATE_ZERO
    pos, end = offset, offset + length
    limit = 1 if req_one else MAX_EXTENTS
    for start, count, data in runs:
        stop = min(end, (start + count) * block_size)
        if stop <= pos:
            continue
        state = 0 if data else hole
        if extents and extents[-1][1] == state:
            extents[-1] = (extents[-1][0] + stop - pos, state)
        elif len(extents) == limit:
            break
        else:
            extents.append((stop - pos, state))
        pos = stop
        if pos >= end:
            break
    return extents
