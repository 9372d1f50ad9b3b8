"""Rewriting a replica's bad blocks from a good copy.

A read that finds a block failing its check on one replica (a flipped bit,
a torn sector) still serves the guest from another. The bad copy is then
mended in two jobs: a read of those blocks from the other replicas, and a
write of what it returns to the bad replica alone. The read is queued after
the guest's, so it sees every write before it; blocks that a write queued
after that read changes are left out (that write replaced the bad copy on
every replica anyway).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from crucible.protocol import messages as m
from crucible.protocol.integrity import sealed_hash
from crucible.upstairs.jobs import WRITE_LIKE, Job, WriteOp, zero_hash


def runs(indices: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Consecutive runs of block indices as (first, count), in order."""
    first = prev = -2
    for i in sorted(set(indices)):
        if i != prev + 1:
            if first >= 0:
                yield first, prev - first + 1
            first = i
        prev = i
    if first >= 0:
        yield first, prev - first + 1


def touched_after(jobs: Iterable[Job], after: int, start: int, count: int) -> set[int]:
    """Blocks of [start, start+count) that a write or trim queued after job
    `after` changes."""
    out: set[int] = set()
    end = start + count
    for job in jobs:
        op = job.op
        if job.id <= after or not isinstance(op, WRITE_LIKE):
            continue
        n = len(op.contexts) if isinstance(op, WriteOp) else op.count
        lo, hi = max(start, op.start), min(end, op.start + n)
        out.update(range(lo, hi))
    return out


def rewrites(
    start: int,
    contexts: list[m.ReadBlockContext],
    data: m.Data,
    indices: Iterable[int],
    target: int,
    block_size: int,
) -> list[WriteOp]:
    """The writes that put the blocks at `indices` of a good read reply
    (blocks [start, ...)) on `target`, as they are (sealed blocks stay
    sealed: the copies keep agreeing, nonce for nonce)."""
    bs = block_size
    view = memoryview(data)
    out = []
    for first, n in runs(indices):
        chunk = bytes(view[first * bs : (first + n) * bs])
        ctxs = [
            _written(c, view[(first + k) * bs : (first + k + 1) * bs], bs)
            for k, c in enumerate(contexts[first : first + n])
        ]
        out.append(WriteOp(start + first, ctxs, chunk, to=target))
    return out


def _written(ctx: m.ReadBlockContext, block: memoryview, block_size: int) -> m.BlockContext:
    """The context a write of a block read back with `ctx` carries."""
    if ctx is None:
        return m.BlockContext(zero_hash(block_size))
    if isinstance(ctx, int):
        return m.BlockContext(ctx)
    return m.BlockContext(sealed_hash(ctx.nonce, ctx.tag, block), ctx)
