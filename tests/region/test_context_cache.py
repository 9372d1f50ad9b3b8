"""The contexts a region keeps for reads (extent.ContextCache): what a
read returns is always what the slots on disk say, through writes, trims,
write-unwritten, flushes, extents closed and reopened, and the cache
dropping everything when full."""

from __future__ import annotations

import os
import random

import pytest

from crucible.common.errors import CrucibleError, ErrorKind
from crucible.protocol.integrity import block_hash
from crucible.protocol.messages import BlockContext, EncryptionContext, ReadBlockContext
from crucible.region.extent import CONTEXT_CHUNK
from crucible.region.layout import extent_path
from crucible.region.region import Region
from tests.region.conftest import MakeRegion

BS, ES, EC = 512, 2 * CONTEXT_CHUNK, 4  # two chunks an extent
TOTAL = ES * EC


def _write(
    r: Region, rng: random.Random, start: int, n: int, encrypted: bool, unwritten: bool
) -> list[BlockContext]:
    data = rng.randbytes(n * BS)
    ctxs = []
    for i in range(n):
        block = data[i * BS : (i + 1) * BS]
        enc = EncryptionContext(rng.randbytes(12), rng.randbytes(16)) if encrypted else None
        ctxs.append(BlockContext(block_hash(BlockContext(0, enc), block), enc))
    r.write(start, ctxs, data, only_unwritten=unwritten)
    return ctxs


def _as_read(ctx: BlockContext) -> ReadBlockContext:
    return ctx.encryption if ctx.encryption is not None else ctx.hash


@pytest.mark.parametrize("capacity", [3, 1000])  # 3: dropped again and again
@pytest.mark.parametrize("encrypted", [False, True])
def test_reads_say_what_the_slots_say(
    make_region: MakeRegion, rng: random.Random, encrypted: bool, capacity: int
) -> None:
    r = make_region(bs=BS, es=ES, ec=EC, encrypted=encrypted)
    r.context_cache.capacity = capacity
    model: list[ReadBlockContext] = [None] * TOTAL
    flushes = 0
    for _ in range(600):
        start = rng.randrange(TOTAL)
        n = rng.randint(1, min(2 * CONTEXT_CHUNK + 6, TOTAL - start))
        op = rng.random()
        if op < 0.2:
            for i, ctx in enumerate(_write(r, rng, start, n, encrypted, unwritten=False)):
                model[start + i] = _as_read(ctx)
        elif op < 0.27:
            for i, ctx in enumerate(_write(r, rng, start, n, encrypted, unwritten=True)):
                if model[start + i] is None:
                    model[start + i] = _as_read(ctx)
        elif op < 0.32:
            r.trim(start, n)
            model[start : start + n] = [None] * n
        elif op < 0.36:
            flushes += 1
            r.flush(flushes, 1)
        elif op < 0.39:
            eid = rng.randrange(EC)
            r.close_extent(eid)
            r.reopen_extent(eid)
        else:
            if op < 0.7:
                n = min(n, CONTEXT_CHUNK + 3)  # mostly within a chunk, some across two
            # (else across up to three chunks, some covered whole)
            assert r.read(start, n)[0] == model[start : start + n], (start, n)
        assert r.context_cache.held == sum(
            len(e.context_chunks) for e in r.extents if e is not None
        )
        assert r.context_cache.held <= r.context_cache.capacity
    # What is on disk, read by a region with nothing kept, agrees.
    path = r.dir
    r.close()
    fresh = Region.open(path)
    try:
        assert fresh.read(0, TOTAL)[0] == model
    finally:
        fresh.close()


def test_a_bad_slot_fails_only_its_own_block(make_region: MakeRegion) -> None:
    """A chunk is read whole when first needed; a slot in it that cannot be
    decoded fails reads of its block, not of the others."""
    r = make_region(bs=BS, es=ES, ec=EC)
    data = os.urandom(2 * BS)
    ctxs = [BlockContext(block_hash(BlockContext(0), data[i * BS : (i + 1) * BS])) for i in (0, 1)]
    r.write(0, ctxs, data)
    ext = r.extent(0)
    fd = os.open(extent_path(r.dir, 0), os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x07", r.layout.slot_offset(ext.active[1], 1))  # an invalid slot tag
    finally:
        os.close(fd)
    assert r.read(0, 1)[0] == [ctxs[0].hash]
    with pytest.raises(CrucibleError) as e:
        r.read(1, 1)
    assert e.value.kind is ErrorKind.BadContextSlot
    assert r.read(0, 1)[0] == [ctxs[0].hash]


def test_large_reads_and_writes_keep_the_chunks_they_cover_whole(make_region: MakeRegion) -> None:
    """A read or write of whole chunks keeps them, so reading them again
    needs no slots from disk; a chunk covered in part is not kept."""
    r = make_region(bs=BS, es=ES, ec=EC)
    ext = r.extent(1)
    data = os.urandom(CONTEXT_CHUNK * BS)
    ctxs = [
        BlockContext(block_hash(BlockContext(0), data[i * BS : (i + 1) * BS]))
        for i in range(CONTEXT_CHUNK)
    ]
    r.write(ES + CONTEXT_CHUNK, ctxs, data)  # extent 1's second chunk, whole
    assert sorted(ext.context_chunks) == [1]
    assert r.read(ES + CONTEXT_CHUNK, CONTEXT_CHUNK)[0] == [c.hash for c in ctxs]
    r.close_extent(1)
    r.reopen_extent(1)
    ext = r.extent(1)
    assert r.read(ES + 1, CONTEXT_CHUNK + 4)[0][-5:] == [c.hash for c in ctxs[:5]]
    assert ext.context_chunks == {}  # neither chunk was read whole
    assert r.read(ES, 2 * CONTEXT_CHUNK)[0] == [None] * CONTEXT_CHUNK + [c.hash for c in ctxs]
    assert sorted(ext.context_chunks) == [0, 1]
    assert r.context_cache.held == 2
    assert r.read(ES + 3, 2 * CONTEXT_CHUNK - 5)[0] == ([None] * (CONTEXT_CHUNK - 3)) + [
        c.hash for c in ctxs[:-2]
    ]
