"""A volume: sub-volumes concatenated in order, and optionally a read-only
parent under them from block 0, copied into them in the background.

* Reads and writes that cross sub-volume boundaries are split and the pieces
  go out together; a flush goes to every sub-volume.
* Below the scrub point nothing more comes from the parent. Above it, a read
  of blocks the parent holds also reads the parent, and takes from it every
  block the sub-volumes have never had written.
* Writes go to the sub-volumes only. The scrub copies the parent in chunks
  with write_unwritten, so it never overwrites what the guest wrote; then it
  flushes, and the parent is closed and dropped: reads never touch it again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from crucible.common.buffer import Buffer
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.protocol import messages as m
from crucible.upstairs.blockio import (
    BlockIO,
    ReadDone,
    ReadResult,
    WriteDone,
    all_of,
    joined,
    settle,
)
from crucible.volume.sources import Source, SourceError

log = logging.getLogger("crucible.volume")

SCRUB_CHUNK = 1 << 20  # bytes of the parent per scrub step (one job per sub-volume)
SCRUB_RETRIES = 5
FROM_PARENT: m.ReadBlockContext = 0  # a block read from the parent: it holds data


@dataclass
class ScrubOptions:
    start_delay: float = 0.0  # seconds after activation before the scrub starts
    pause: float = 0.0  # seconds between chunks
    # Called once the parent is copied in and dropped: to make that last
    # (the VCR without its parent), as Crucible's control plane does.
    on_done: Callable[[], None] | None = None


@dataclass
class ScrubStatus:
    """The copy of the parent into the volume."""

    point: int  # blocks below it come from the sub-volumes only
    total: int  # the parent's blocks
    done: bool
    error: str  # why it stopped early, if it did


class Volume(BlockIO):
    def __init__(
        self,
        subs: list[BlockIO],
        parent: Source | None = None,
        scrub: ScrubOptions | None = None,
    ) -> None:
        self.subs = subs
        self.parent = parent
        self.scrub_options = scrub or ScrubOptions()
        self.scrub_point = 0
        self.parent_blocks = 0
        self.scrub_done = parent is None
        self.scrub_error = ""
        self._scrub: asyncio.Task[None] | None = None
        self._starts: list[int] = []
        self._block_size = 0

    # ---- shape -----------------------------------------------------------------------

    def settle_shape(self) -> None:
        """Once every part is open: where each sub-volume starts; the block
        sizes and the parent's size checked."""
        sizes = {s.block_size for s in self.subs}
        if self.parent is not None:
            sizes.add(self.parent.block_size)
        if len(sizes) > 1:
            raise CrucibleError(ErrorKind.BlockSizeMismatch, f"block sizes {sorted(sizes)}")
        self._block_size = sizes.pop()
        self._starts = [0]
        for s in self.subs:
            self._starts.append(self._starts[-1] + s.total_blocks)
        if self.parent is not None:
            self.parent_blocks = self.parent.total_blocks
            if self.subs and self.parent_blocks > self.total_blocks:
                raise CrucibleError(
                    ErrorKind.InvalidNumberOfBlocks,
                    f"the parent has {self.parent_blocks} blocks, the volume {self.total_blocks}",
                )

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def sub_starts(self) -> list[int]:
        """The block at which each sub-volume starts (once the shape is settled)."""
        return self._starts[:-1]

    @property
    def total_blocks(self) -> int:
        if not self.subs:  # a parent alone: a read-only disk of its size
            return self.parent_blocks
        return self._starts[-1] if self._starts else 0

    def _pieces(self, block: int, count: int) -> list[tuple[int, int, int, int]]:
        """(sub-volume, its block, count, offset in the request) for each piece."""
        out = []
        end = block + count
        for i in range(len(self.subs)):
            lo, hi = max(block, self._starts[i]), min(end, self._starts[i + 1])
            if lo < hi:
                out.append((i, lo - self._starts[i], hi - lo, lo - block))
        return out

    def _check(self, block: int, count: int) -> CrucibleError | None:
        if not self.subs:
            return CrucibleError(ErrorKind.CannotReceiveBlocks, "the volume has only a parent")
        if block < 0 or count < 0 or block + count > self.total_blocks:
            why = f"blocks {block}..{block + count} are outside the volume's {self.total_blocks}"
            return CrucibleError(ErrorKind.OffsetInvalid, why)
        return None

    # ---- reads -----------------------------------------------------------------------

    def submit_read(self, block: int, count: int, done: ReadDone) -> None:
        if self.parent is not None and block < self.parent_blocks and not self.scrub_done:
            if block + count > max(self.total_blocks, self.parent_blocks) or block < 0:
                done(CrucibleError(ErrorKind.OffsetInvalid, "outside the volume"))
                return
            # The sub-volumes' read is queued now, in submission order with
            # the guest's writes; only the parent's part waits for a task.
            sub_read: asyncio.Future[ReadResult] | None = None
            if self.subs:
                sub_read = asyncio.get_running_loop().create_future()
                self._read_subs(block, count, settle(sub_read))
            # Taken after the sub-volumes' read was queued: blocks the scrub
            # copied below this point were queued before it (the read has
            # them); from here up, the parent holds what was never written.
            lo = block if sub_read is None else max(block, self.scrub_point)
            self._spawn(self._read_over_parent(block, count, lo, sub_read, done))
            return
        err = self._check(block, count)
        if err:
            done(err)
            return
        self._read_subs(block, count, done)

    def _read_subs(self, block: int, count: int, done: ReadDone) -> None:
        pieces = self._pieces(block, count)
        if len(pieces) == 1:
            i, b, n, _ = pieces[0]
            self.subs[i].submit_read(b, n, done)
            return
        if not pieces:
            done((b"", []))
            return
        callbacks = joined(len(pieces), done)
        for (i, b, n, _), cb in zip(pieces, callbacks, strict=True):
            self.subs[i].submit_read(b, n, cb)

    async def _read_over_parent(
        self,
        block: int,
        count: int,
        lo: int,
        sub_read: asyncio.Future[ReadResult] | None,
        done: ReadDone,
    ) -> None:
        """Blocks the sub-volumes never had written, from the parent (from
        block `lo` on), over what `sub_read` (queued already) returns."""
        bs = self.block_size
        parent = self.parent
        try:
            upto = min(block + count, self.parent_blocks)
            from_parent = b""
            if parent is not None and not self.scrub_done and lo < upto:
                from_parent = await parent.read(lo, upto - lo)
            if sub_read is None:
                data = bytearray(from_parent.ljust(count * bs, b"\0"))
                done((data, [FROM_PARENT] * (upto - block) + [None] * (block + count - upto)))
                return
            sub_data, contexts = await sub_read
        except (CrucibleError, SourceError) as e:
            done(e if isinstance(e, CrucibleError) else CrucibleError(ErrorKind.IoError, str(e)))
            return
        if not from_parent:
            done((sub_data, contexts))
            return
        data = bytearray(sub_data)
        contexts = list(contexts)
        for i in range(lo - block, upto - block):
            if contexts[i] is None:  # never written: the parent's
                j = i - (lo - block)
                data[i * bs : (i + 1) * bs] = from_parent[j * bs : (j + 1) * bs]
                contexts[i] = FROM_PARENT
        done((data, contexts))

    def allocation(self, block: int, count: int) -> list[tuple[int, int, bool]] | None:
        if self.parent is not None and not self.scrub_done and block < self.parent_blocks:
            return None  # the parent's blocks: read them to tell
        runs: list[tuple[int, int, bool]] = []
        for i, b, n, off in self._pieces(block, count):
            got = self.subs[i].allocation(b, n)
            if got is None:
                return None
            runs += [(block + off + (s - b), c, a) for s, c, a in got]
        return runs

    async def allocation_settled(self) -> None:
        await asyncio.gather(*(sub.allocation_settled() for sub in self.subs))

    # ---- writes ----------------------------------------------------------------------

    def _split(self, block: int, count: int, done: WriteDone, each: Piece) -> None:
        err = self._check(block, count)
        if err:
            done(err)
            return
        pieces = self._pieces(block, count)
        if not pieces:
            done(None)
            return
        cb = all_of(len(pieces), done) if len(pieces) > 1 else done
        for i, b, n, off in pieces:
            each(i, b, n, off, cb)

    def submit_write(self, block: int, data: Buffer, done: WriteDone) -> None:
        self._write(block, data, done, unwritten=False)

    def submit_write_unwritten(self, block: int, data: Buffer, done: WriteDone) -> None:
        self._write(block, data, done, unwritten=True)

    def _write(self, block: int, data: Buffer, done: WriteDone, unwritten: bool) -> None:
        bs = self.block_size or 1
        if len(data) % bs:
            done(CrucibleError(ErrorKind.DataLenUnaligned, f"{len(data)} bytes"))
            return
        view = memoryview(data).cast("B")

        def each(i: int, b: int, n: int, off: int, cb: WriteDone) -> None:
            piece = view[off * bs : (off + n) * bs] if len(self.subs) > 1 else data
            sub = self.subs[i]
            submit = sub.submit_write_unwritten if unwritten else sub.submit_write
            submit(b, piece, cb)

        self._split(block, len(data) // bs, done, each)

    def submit_trim(self, block: int, count: int, done: WriteDone) -> None:
        self._split(block, count, done, lambda i, b, n, _, cb: self.subs[i].submit_trim(b, n, cb))

    def submit_flush(self, done: WriteDone, snapshot: str | None = None) -> None:
        if not self.subs:
            done(None)  # a parent alone holds nothing to flush
            return
        cb = all_of(len(self.subs), done)
        for s in self.subs:
            s.submit_flush(cb, snapshot)

    # ---- the scrub -------------------------------------------------------------------

    def start_scrub(self) -> None:
        if self.parent is not None and self.subs and self._scrub is None and not self.scrub_done:
            self._scrub = asyncio.get_running_loop().create_task(self._run_scrub())

    def scrub_status(self) -> ScrubStatus:
        return ScrubStatus(self.scrub_point, self.parent_blocks, self.scrub_done, self.scrub_error)

    async def _run_scrub(self) -> None:
        parent = self.parent
        assert parent is not None
        opts = self.scrub_options
        await asyncio.sleep(opts.start_delay)
        step = max(1, SCRUB_CHUNK // self.block_size)
        total = self.parent_blocks
        began, shown = time.monotonic(), -1
        log.info("scrub: copying %d blocks of the parent into the volume", total)
        while self.scrub_point < total:
            b = self.scrub_point
            n = min(step, total - b)
            try:
                data = await _retried(functools.partial(parent.read, b, n))
                await self.write_unwritten(b, data)
            except (CrucibleError, SourceError) as e:
                self.scrub_error = str(e)
                log.error("scrub: stopped at block %d of %d: %s", b, total, e)
                return
            self.scrub_point = b + n
            tenth = self.scrub_point * 10 // total
            if tenth != shown:
                shown = tenth
                log.info("scrub: %d of %d blocks (%d%%)", self.scrub_point, total, tenth * 10)
            if opts.pause:
                await asyncio.sleep(opts.pause)
        await self.flush()
        self.scrub_done = True
        self.parent = None
        await parent.close()
        log.info("scrub: done in %.1f s; the parent is dropped", time.monotonic() - began)
        if opts.on_done is not None:
            opts.on_done()

    async def stop_scrub(self) -> None:
        task, self._scrub = self._scrub, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # ---- helpers ---------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)


_tasks: set[asyncio.Task[None]] = set()
# What a write-like request does with one piece: (sub-volume, its block,
# count, offset in the request, completion).
Piece = Callable[[int, int, int, int, WriteDone], None]


async def _retried(read: Callable[[], Coroutine[Any, Any, bytes]]) -> bytes:
    """A parent read, tried again (after 0.1, 0.2, 0.4 ... s) before it fails."""
    delay = 0.1
    for attempt in range(SCRUB_RETRIES):
        try:
            return await read()
        except SourceError as e:
            if attempt == SCRUB_RETRIES - 1:
                raise
            log.warning("scrub: a parent read failed (%s); trying again", e)
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")
