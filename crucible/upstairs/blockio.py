"""What a guest drives: block IO by callbacks (`submit_*`, no coroutine per
IO, as the NBD server uses it) and the same as coroutines, built here once
from the callbacks for the upstairs and for volumes."""

from __future__ import annotations

import asyncio
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from crucible.common.buffer import Buffer
from crucible.protocol import messages as m

ReadResult = tuple[m.Data, list[m.ReadBlockContext]]
ReadDone = Callable[[ReadResult | BaseException], None]
WriteDone = Callable[[BaseException | None], None]


class BlockIO(ABC):
    @property
    @abstractmethod
    def block_size(self) -> int: ...

    @property
    @abstractmethod
    def total_blocks(self) -> int: ...

    @abstractmethod
    def submit_read(self, block: int, count: int, done: ReadDone) -> None:
        """Read blocks; `done` gets the data and each block's context (None:
        never written), or the error."""

    @abstractmethod
    def submit_write(self, block: int, data: Buffer, done: WriteDone) -> None:
        """Write whole blocks (acked when queued; a flush makes them durable).
        The caller must not change `data` afterwards."""

    @abstractmethod
    def submit_write_unwritten(self, block: int, data: Buffer, done: WriteDone) -> None:
        """As submit_write, but only blocks never written are written."""

    @abstractmethod
    def submit_trim(self, block: int, count: int, done: WriteDone) -> None:
        """Discard blocks: they read back as zeros."""

    @abstractmethod
    def submit_flush(self, done: WriteDone, snapshot: str | None = None) -> None:
        """Make every write queued before it durable."""

    @abstractmethod
    def allocation(self, block: int, count: int) -> list[tuple[int, int, bool]] | None:
        """Which blocks hold data, as runs of (start, count, allocated), when
        known without reading them; else None."""

    async def allocation_settled(self) -> None:
        """Wait while that map is being fetched (just after activation), so
        that `allocation` then says what it will go on saying."""
        return None  # this one fetches none

    async def read(self, block: int, count: int) -> bytes:
        data, _ = await self.read_with_status(block, count)
        return data

    async def read_with_status(self, block: int, count: int) -> tuple[bytes, list[bool]]:
        """The blocks, and for each whether it holds data (False: a hole that
        reads as zeros)."""
        fut: asyncio.Future[ReadResult] = asyncio.get_running_loop().create_future()
        self.submit_read(block, count, settle(fut))
        data, contexts = await fut
        return bytes(data), [c is not None for c in contexts]

    async def write(self, block: int, data: Buffer) -> None:
        # The job keeps what it writes: a buffer the caller may change is copied.
        await self._await(self.submit_write, block, owned(data))

    async def write_unwritten(self, block: int, data: Buffer) -> None:
        await self._await(self.submit_write_unwritten, block, owned(data))

    async def trim(self, block: int, count: int) -> None:
        await self._await(self.submit_trim, block, count)

    async def flush(self, snapshot: str | None = None) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submit_flush(settle(fut), snapshot)
        await fut

    @staticmethod
    async def _await(submit: Callable[[int, Any, WriteDone], None], block: int, arg: Any) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        submit(block, arg, settle(fut))
        await fut


def settle(fut: asyncio.Future[Any]) -> Callable[[Any], None]:
    """A completion callback that settles a future (once)."""

    def done(result: Any) -> None:
        if fut.done():
            return
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)

    return done


def joined(count: int, done: ReadDone) -> list[ReadDone]:
    """The callbacks of `count` pieces of one read, in order: `done` gets
    them joined once all are in, or the first error."""
    parts: list[ReadResult | None] = [None] * count
    waiting = [count]
    failed: list[BaseException] = []

    def piece_done(i: int, result: ReadResult | BaseException) -> None:
        if isinstance(result, BaseException):
            failed.append(result)
        else:
            parts[i] = result
        waiting[0] -= 1
        if waiting[0]:
            return
        if failed:
            done(failed[0])
            return
        got = [p for p in parts if p is not None]
        done((b"".join(p[0] for p in got), [c for p in got for c in p[1]]))

    return [functools.partial(piece_done, i) for i in range(count)]


def all_of(count: int, done: WriteDone) -> WriteDone:
    """One callback for `count` pieces done side by side: `done` once all
    are, or at the first error."""
    done = once(done)
    left = [count]

    def piece_done(result: BaseException | None) -> None:
        left[0] -= 1
        if result is not None or left[0] == 0:
            done(result)

    return piece_done


def once(done: WriteDone) -> WriteDone:
    """A request of several pieces completes once: with its first error, or
    when its last piece is done."""
    fired = [False]

    def first(result: BaseException | None) -> None:
        if not fired[0]:
            fired[0] = True
            done(result)

    return first


def errors_only(done: WriteDone) -> WriteDone:
    """For all but the last piece of a request: only an error is passed on
    (it completes the request at once; the last piece's result is then moot)."""

    def piece(result: BaseException | None) -> None:
        if result is not None:
            done(result)

    return piece


def owned(data: Buffer) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)
