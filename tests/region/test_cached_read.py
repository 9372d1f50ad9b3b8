"""Reads asked only of the page cache: the same bytes and contexts as a read
that waits for the disk, or WouldBlock having read nothing from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash

from crucible.protocol.messages import BlockContext
from crucible.region.extent import WouldBlock, pread_cached
from crucible.region.layout import extent_path
from crucible.region.region import Region
from tests.region.conftest import MakeRegion
from tests.support import drop_page_cache, on_memory_fs

pytestmark = pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="needs preadv2 RWF_NOWAIT")


@pytest.fixture(autouse=True)
def disk_backed(tmp_path: Path) -> None:
    if on_memory_fs(tmp_path):
        pytest.skip("a memory filesystem's pages are the file: none can be dropped")


def test_pread_cached_reads_only_what_the_cache_holds(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pread_cached(fd, len(data), 0) == data  # just written: cached
        drop_page_cache(path)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: just what is read
        assert os.pread(fd, 8192, 0) == data[:8192]
        assert pread_cached(fd, 8192, 0) == data[:8192]
        with pytest.raises(WouldBlock):  # a cached head is not enough
            pread_cached(fd, len(data), 0)
        drop_page_cache(path)
        with pytest.raises(WouldBlock):
            pread_cached(fd, len(data), 0)
        os.pread(fd, len(data), 0)
        assert pread_cached(fd, 4096, 4096) == data[4096:8192]
        with pytest.raises(WouldBlock):  # past the end is a short read: not for here
            pread_cached(fd, 4096, len(data) - 2048)
    finally:
        os.close(fd)


def fill(r: Region) -> list[bytes]:
    bs, total = r.definition.block_size, r.definition.total_blocks
    blocks = [os.urandom(bs) for _ in range(total)]
    r.write(0, [BlockContext(xxhash.xxh64_intdigest(b)) for b in blocks], b"".join(blocks))
    r.flush(1, 1)
    return blocks


def test_region_read_cached_matches_the_blocking_read(make_region: MakeRegion) -> None:
    r = make_region()
    blocks = fill(r)
    es = r.definition.extent_size
    start, count = es - 3, es + 6  # across two extent boundaries
    ctxs, data = r.read(start, count)
    assert bytes(data) == b"".join(blocks[start : start + count])
    assert r.read(start, count, cached_only=True) == (ctxs, data)

    drop_page_cache(extent_path(r.dir, 1))
    with pytest.raises(WouldBlock):
        r.read(start, count, cached_only=True)
    assert r.read(start, count) == (ctxs, data)  # waits, and fills the cache
    assert r.read(start, count, cached_only=True) == (ctxs, data)
