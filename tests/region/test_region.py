"""The extent format and region IO: contexts, flush numbers, recovery, replacement."""

from __future__ import annotations

import io
import json
import mmap
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from crucible import libc
from crucible.common.definition import RegionDefinition, RegionError
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.protocol.integrity import block_hash
from crucible.protocol.messages import BlockContext, EncryptionContext
from crucible.region import extent
from crucible.region.extent import DIRECT_BYTES, EXACT_READ_BYTES, MISSES_LIMIT, READ_AROUND_BYTES
from crucible.region.layout import extent_path, staging_dir
from crucible.region.region import Region
from tests.region.conftest import MakeRegion, tear
from tests.support import contexts_for, on_memory_fs, pattern


def blocks(start: int, n: int, version: int = 1, bs: int = 512) -> bytes:
    return b"".join(pattern(b, version, bs) for b in range(start, start + n))


def reopen(r: Region, read_only: bool = False) -> Region:
    r.close()
    return Region.open(r.dir, read_only=read_only)


def test_layout_paths() -> None:
    assert str(extent_path(Path("/r"), 18)) == "/r/00/000/012"
    assert str(extent_path(Path("/r"), 0x1234567)) == "/r/01/234/567"


def test_write_read_across_extents(make_region: MakeRegion) -> None:
    r = make_region()
    data = blocks(10, 20)
    r.write(10, contexts_for(data), data)
    ctxs, got = r.read(10, 20)
    assert got == data
    assert ctxs == [c.hash for c in contexts_for(data)]
    ctxs, got = r.read(0, 10)
    assert got == bytes(5120) and ctxs == [None] * 10  # never written: zeros, Empty


def test_flush_numbers_only_change_on_dirty_extents(make_region: MakeRegion) -> None:
    r = make_region()
    data = blocks(0, 2)
    r.write(0, contexts_for(data), data)
    r.flush(5, 2)
    assert r.extent_versions() == ([2, 0, 0, 0], [5, 0, 0, 0], [False] * 4)
    r.write(20, contexts_for(data), data)
    r = reopen(r)
    assert r.extent_versions() == ([2, 0, 0, 0], [5, 0, 0, 0], [False, True, False, False])
    r.flush(6, 3)
    assert r.extent_versions() == ([2, 3, 0, 0], [5, 6, 0, 0], [False] * 4)
    r.close()


def test_hash_mismatch_writes_nothing(make_region: MakeRegion) -> None:
    r = make_region()
    data = blocks(0, 4)
    ctxs = contexts_for(data)
    ctxs[3] = BlockContext(ctxs[3].hash ^ 1)
    before = [extent_path(r.dir, i).read_bytes() for i in range(4)]
    with pytest.raises(CrucibleError) as e:
        r.write(0, ctxs, data)
    assert e.value.kind == ErrorKind.HashMismatch
    assert [extent_path(r.dir, i).read_bytes() for i in range(4)] == before


def test_bad_shapes_refused(make_region: MakeRegion) -> None:
    r = make_region()
    data = blocks(0, 2)
    with pytest.raises(CrucibleError) as e:
        r.write(0, contexts_for(data)[:1], data)
    assert e.value.kind == ErrorKind.InvalidNumberOfBlocks
    with pytest.raises(CrucibleError) as e:
        r.write(0, contexts_for(data), data[:-1])
    assert e.value.kind == ErrorKind.DataLenUnaligned
    with pytest.raises(CrucibleError) as e:
        r.write(63, contexts_for(data), data)  # 64 blocks in all
    assert e.value.kind == ErrorKind.OffsetInvalid
    with pytest.raises(CrucibleError) as e:
        r.read(60, 5)
    assert e.value.kind == ErrorKind.OffsetInvalid
    with pytest.raises(CrucibleError) as e:
        r.flush(1, 1, extent_limit=4)
    assert e.value.kind == ErrorKind.InvalidExtent


def test_write_unwritten_skips_written_blocks(make_region: MakeRegion) -> None:
    r = make_region()
    old = blocks(4, 2, version=1)
    r.write(4, contexts_for(old), old)
    new = blocks(2, 6, version=2)
    r.write(2, contexts_for(new), new, only_unwritten=True)
    _, got = r.read(2, 6)
    assert got == blocks(2, 2, 2) + old + blocks(6, 2, 2)


def test_read_contexts_for_mixed_blocks_and_slots(make_region: MakeRegion) -> None:
    """Reads take a packed shortcut when one slot array holds plain or empty
    contexts; blocks in both slot arrays and encrypted blocks take the general
    path. Either way each block gets its own context."""
    r = make_region()
    a, b = blocks(1, 1, version=1), blocks(3, 1, version=1)
    r.write(1, contexts_for(a), a)
    r.write(3, contexts_for(b), b)
    want = [None, contexts_for(a)[0].hash, None, contexts_for(b)[0].hash, None]
    assert r.read(0, 5)[0] == want  # one slot array, mixed empty and plain
    r.flush(1, 1)
    b2 = blocks(3, 1, version=2)
    r.write(3, contexts_for(b2), b2)  # block 3 now lives in the other slot array
    want[3] = contexts_for(b2)[0].hash
    ctxs, got = r.read(0, 5)
    assert ctxs == want and got == bytes(512) + a + bytes(512) + b2 + bytes(512)
    enc_region = make_region("e", encrypted=True)
    data = os.urandom(512)
    enc = EncryptionContext(os.urandom(12), os.urandom(16))
    enc_region.write(2, [BlockContext(block_hash(BlockContext(0, enc), data), enc)], data)
    assert enc_region.read(1, 3)[0] == [None, enc, None]


def test_encrypted_contexts_stored_and_returned(make_region: MakeRegion) -> None:
    r = make_region(encrypted=True)
    data = os.urandom(512)
    enc = EncryptionContext(os.urandom(12), os.urandom(16))
    ctx = BlockContext(block_hash(BlockContext(0, enc), data), enc)
    r.write(3, [ctx], data)
    r = reopen(r)
    ctxs, got = r.read(3, 1)
    assert got == data and ctxs == [enc]
    assert r.extents[0] is not None and r.extents[0].verify() == []
    r.close()


def test_dirty_reopen_recovers_latest_slot(make_region: MakeRegion) -> None:
    r = make_region()
    for version in (1, 2, 3):  # three writes between flushes: both slots cycle
        data = blocks(0, 3, version)
        r.write(0, contexts_for(data), data)
    r = reopen(r)
    _, got = r.read(0, 3)
    assert got == blocks(0, 3, 3)
    ext = r.extent(0)
    assert ext.dirty and ext.verify() == []
    r.flush(1, 1)
    r = reopen(r)
    assert r.read(0, 3)[1] == blocks(0, 3, 3)
    r.close()


def fds_on(path: Path) -> list[int]:
    """The open flags of each of this process's fds open on `path`."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != str(path):
                continue
            flags = Path(f"/proc/self/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
        except OSError:
            continue  # the fd listdir itself used, closed by now
        found.append(int(flags, 8))
    return found


def direct_fds(path: Path) -> int:
    """How many of this process's fds are open on `path` with O_DIRECT."""
    return sum(bool(flags & os.O_DIRECT) for flags in fds_on(path))


def held(path: Path, offset: int, size: int) -> int | None:
    """Pages of the byte range the page cache holds (None: the kernel cannot say)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return libc.cached_pages(fd, offset, size)
    finally:
        os.close(fd)


def test_large_reads_of_uncached_data_go_around_the_page_cache(make_region: MakeRegion) -> None:
    """A read of EXACT_READ_BYTES or more whose data the page cache does not
    hold whole reads it through the O_DIRECT fd and leaves the cache as it
    was; asked of the cache alone it gives WouldBlock without starting a read
    into it. What the cache holds whole is read from there, on the caller's
    thread. Every way, a read returns what was written last, through either
    fd, read-only too; the fds go with the extent."""
    bs = 4096
    n = EXACT_READ_BYTES // bs
    r = make_region(bs=bs, es=2 * n, ec=1)
    path = r.extent(0).path
    if held(path, 0, 1) is None or on_memory_fs(path):
        pytest.skip("needs cachestat (Linux 6.5) and a disk-backed filesystem")
    data = blocks(0, 2 * n, 7, bs)
    r.write(0, contexts_for(data, bs), data)  # O_DIRECT
    assert held(path, 0, 2 * n * bs) == 0
    with pytest.raises(extent.WouldBlock):
        r.read(0, n, cached_only=True)
    assert r.read(0, n)[1] == data[: n * bs]
    assert held(path, 0, 2 * n * bs) == 0  # neither the try nor the read filled it
    small = blocks(3, 2, 8, bs)
    r.write(3, contexts_for(small, bs), small)  # buffered: dirty in the page cache
    want = data[: 3 * bs] + small + data[5 * bs :]
    ctxs, got = r.read(0, n)
    assert got == want[: n * bs] and ctxs == [c.hash for c in contexts_for(want, bs)][:n]
    assert held(path, 0, n * bs) in (0, 1, 2)  # the small write's pages at most
    fd = os.open(path, os.O_RDONLY)
    os.pread(fd, n * bs, n * bs)  # now the page cache holds the second half whole
    os.close(fd)
    assert r.read(n, n, cached_only=True)[1] == want[n * bs :]
    assert r.read(0, 2 * n)[1] == want  # half held: around the cache
    r.flush(1, 1)  # (a dirty extent's recovery at open reads it all into the cache)
    r = reopen(r, read_only=True)
    assert r.read(0, 2 * n)[1] == want
    assert [f & os.O_ACCMODE for f in fds_on(path) if f & os.O_DIRECT] == [os.O_RDONLY]
    r.close()
    assert fds_on(path) == []


def test_small_reads_that_miss_the_page_cache_start_the_window_around_them(
    make_region: MakeRegion,
) -> None:
    """A small read of data the page cache does not hold also starts reading
    its aligned READ_AROUND_BYTES window into the cache, so the next reads
    near it are hits. Once misses outnumber hits by MISSES_LIMIT a miss reads
    only its own blocks, until hits bring that down to half the limit (one
    hit is not enough: a cache too small for the reads has some)."""
    bs = 4096
    w = READ_AROUND_BYTES // bs  # blocks in a window
    r = make_region(bs=bs, es=24 * w, ec=1)
    path = r.extent(0).path
    if held(path, 0, 1) is None or on_memory_fs(path):
        pytest.skip("needs cachestat (Linux 6.5) and a disk-backed filesystem")
    data = blocks(0, 24 * w, 5, bs)
    r.write(0, contexts_for(data, bs), data)  # O_DIRECT: nothing in the page cache
    assert held(path, 0, len(data)) == 0
    ext = r.extent(0)

    def read(block: int) -> None:
        assert r.read(block, 1)[1] == data[block * bs : (block + 1) * bs]

    def window(k: int) -> int | None:
        return held(path, k * READ_AROUND_BYTES, READ_AROUND_BYTES)

    def settle(k: int) -> None:
        """Wait for the disk read of a window's pages (in the cache from the
        start, but a read asked of the cache alone fails until they are filled)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.pread(fd, READ_AROUND_BYTES, k * READ_AROUND_BYTES)
        finally:
            os.close(fd)

    def miss(tries: list[int], count: int, around: bool) -> int:
        """With `count` misses counted and the read-around `around`, read a
        block in the first window of `tries` whose read is taken for a miss,
        and return that window. The try that starts a read's own blocks can
        find them already read (a fast disk, the thread preempted): that
        read counts as a hit, and the next window is tried."""
        for k in tries:
            ext.misses, ext.read_around = count, around
            read(k * w + 3)
            if ext.misses == min(count + 1, MISSES_LIMIT):
                return k
            assert window(k) == 1  # its own block alone
        raise AssertionError(f"no read of windows {tries} missed the page cache")

    def hit(count: int) -> None:
        settle(k)  # (in the cache even if it was evicted meanwhile)
        ext.misses = count
        read(k * w + 1)
        assert ext.misses == count - 1

    k = miss([1, 3, 5], 0, True)
    assert (window(k), window(k + 1), ext.misses, ext.read_around) == (w, 0, 1, True)
    settle(k)
    hit(1)
    assert ext.read_around
    j = miss([7, 9, 11], MISSES_LIMIT - 1, True)  # the miss that reaches the limit
    assert (window(j), ext.misses, ext.read_around) == (w, MISSES_LIMIT, False)
    hit(MISSES_LIMIT)
    assert not ext.read_around
    m = miss([13, 15, 17], MISSES_LIMIT // 2 + 1, False)  # still off: its own block alone
    assert (window(m), ext.read_around) == (1, False)
    hit(MISSES_LIMIT // 2 + 2)
    assert not ext.read_around
    hit(MISSES_LIMIT // 2 + 1)  # down to half the limit: on again
    assert ext.read_around
    n = miss([19, 21, 23], MISSES_LIMIT // 2, True)
    assert (window(n), ext.misses, ext.read_around) == (w, MISSES_LIMIT // 2 + 1, True)
    r.close()


def test_large_reads_are_buffered_where_the_kernel_cannot_say_what_is_cached(
    make_region: MakeRegion, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without cachestat, a try asked of the page cache alone is the probe
    (it starts the read into the cache), so the read that follows it is
    buffered, without readahead, rather than read twice from the disk."""
    monkeypatch.setattr(libc, "_has_cachestat", False)
    bs = 4096
    n = EXACT_READ_BYTES // bs
    r = make_region(bs=bs, es=4 * n, ec=1)
    data = blocks(0, 4 * n, 3, bs)
    r.write(0, contexts_for(data, bs), data)  # O_DIRECT
    path = r.extent(0).path
    assert r.read(0, n)[1] == data[: n * bs]
    assert r.read(2 * n, n)[1] == data[2 * n * bs : 3 * n * bs]
    assert direct_fds(path) == 1  # the large write's, no more
    monkeypatch.setattr(libc, "_has_cachestat", True)
    if held(path, 0, 1) is not None and not on_memory_fs(path):
        assert held(path, 0, n * bs) == n  # buffered
        assert held(path, n * bs, n * bs) == 0  # without readahead
    r.close()


def test_large_writes_bypass_the_page_cache(make_region: MakeRegion) -> None:
    """Writes of DIRECT_BYTES or more go through an O_DIRECT fd; they mix with
    buffered writes of the same blocks, survive a reopen without a flush (the
    dirty recovery hashes them) and after one."""
    bs = 4096
    r = make_region(bs=bs, es=256, ec=2)
    n = DIRECT_BYTES // bs
    small = blocks(8, 4, 1, bs)
    r.write(8, contexts_for(small, bs), small)  # buffered: in the page cache
    assert direct_fds(r.extent(0).path) == 0
    data = blocks(0, n, 2, bs)
    r.write(0, contexts_for(data, bs), data)  # over the cached blocks
    assert direct_fds(r.extent(0).path) == 1
    assert r.read(0, n)[1] == data
    again = blocks(9, 2, 3, bs)
    r.write(9, contexts_for(again, bs), again)  # buffered again, over direct data
    want = data[: 9 * bs] + again + data[11 * bs :]
    assert r.read(0, n)[1] == want
    r = reopen(r)
    ctxs, got = r.read(0, n)
    assert got == want and ctxs == [c.hash for c in contexts_for(want, bs)]
    assert r.extent(0).verify() == []
    r.flush(1, 1)
    r = reopen(r)
    assert r.read(0, n)[1] == want
    assert direct_fds(r.extent(0).path) == 0  # closed with the extent
    r.close()


def test_huge_direct_write_does_not_keep_its_buffer(make_region: MakeRegion) -> None:
    bs = 4096
    r = make_region(bs=bs, es=2048, ec=1)
    small = blocks(0, DIRECT_BYTES // bs, 1, bs)
    r.write(0, contexts_for(small, bs), small)
    kept = extent.bounce_buffer()
    assert kept is not None and len(kept) <= extent.BOUNCE_KEEP
    data = blocks(0, 2048, 2, bs)  # 8 MiB, over BOUNCE_KEEP
    r.write(0, contexts_for(data, bs), data)
    assert r.read(0, 2048)[1] == data
    assert extent.bounce_buffer() is kept  # the huge one's buffer went with it
    r.close()


def test_aligned_direct_write_takes_no_bounce_copy(make_region: MakeRegion) -> None:
    """Page-aligned writable data (a large frame's, see framing.py) goes to
    the O_DIRECT fd as it is: the thread never needs its aligned buffer."""
    bs = 4096
    r = make_region(bs=bs, es=256, ec=1)
    data = blocks(0, DIRECT_BYTES // bs, 4, bs)
    aligned = memoryview(mmap.mmap(-1, len(data)))
    aligned[:] = data
    unaligned = memoryview(bytearray(len(data) + 1))[1:]
    unaligned[:] = blocks(0, DIRECT_BYTES // bs, 5, bs)

    def write(view: memoryview) -> mmap.mmap | None:
        r.write(0, contexts_for(bytes(view), bs), view)
        return extent.bounce_buffer()

    with ThreadPoolExecutor(1) as fresh:  # a thread with no aligned buffer yet
        assert fresh.submit(write, aligned).result() is None
        assert direct_fds(r.extent(0).path) == 1
        assert r.read(0, len(data) // bs)[1] == data
        assert fresh.submit(write, unaligned).result() is not None  # copied to align it
        assert r.read(0, len(data) // bs)[1] == bytes(unaligned)
    r.close()


def test_large_writes_buffered_without_o_direct(
    make_region: MakeRegion, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the system has no O_DIRECT, large writes are buffered like the rest."""
    monkeypatch.setattr(extent, "_O_DIRECT", 0)
    bs = 4096
    r = make_region(bs=bs, es=256, ec=1)
    data = blocks(0, DIRECT_BYTES // bs, 1, bs)
    r.write(0, contexts_for(data, bs), data)
    assert direct_fds(r.extent(0).path) == 0
    r = reopen(r)
    assert r.read(0, len(data) // bs)[1] == data
    r.close()


def test_torn_write_is_reported_never_served(make_region: MakeRegion, tmp_path: Path) -> None:
    r = make_region()
    data = blocks(0, 4, 1)
    r.write(0, contexts_for(data), data)
    r.flush(1, 1)
    tear(r, 2, pattern(2, 9))
    r = reopen(r)
    with pytest.raises(CrucibleError) as e:
        r.read(2, 1)
    assert e.value.kind == ErrorKind.MissingContextSlot
    assert r.read(0, 2)[1] == blocks(0, 2, 1)  # neighbours are intact
    problems = r.extent(0).verify()
    assert problems and "block 2" in problems[0]
    # Clean metadata over the torn bytes would make them look good: refused.
    with pytest.raises(CrucibleError) as e:
        r.flush(2, 1)
    assert e.value.kind == ErrorKind.MissingContextSlot and e.value.values == (2, 0)
    # Rewriting the block heals it.
    fresh = pattern(2, 10)
    r.write(2, contexts_for(fresh), fresh)
    assert r.read(2, 1)[1] == fresh
    r.flush(2, 1)
    r.close()


def test_torn_first_write_goes_back_to_never_written(make_region: MakeRegion) -> None:
    """A block never written before, torn by a crash during its first write:
    its empty slot is the state at the last flush, so it becomes a hole again,
    its data zeros, and the rest of the extent is served as usual."""
    r = make_region()
    data = blocks(0, 2, 1)
    r.write(0, contexts_for(data), data)
    r.flush(1, 1)
    tear(r, 3, pattern(3, 9))
    r = reopen(r, read_only=True)  # a read-only open changes nothing: reported
    with pytest.raises(CrucibleError):
        r.read(3, 1)
    r = reopen(r)
    ctxs, got = r.read(2, 3)
    assert ctxs == [None, None, None] and got == bytes(3 * 512)
    with open(extent_path(r.dir, 0), "rb") as f:
        f.seek(3 * 512)
        assert f.read(512) == bytes(512)  # on disk too: data and context agree
    assert r.extent(0).verify() == []
    assert r.read(0, 2)[1] == data
    r.flush(2, 1)
    r = reopen(r)
    assert r.read(3, 1) == ([None], bytes(512))
    r.close()


def test_data_without_context_is_reported(make_region: MakeRegion) -> None:
    r = make_region()
    lay = r.layout
    with open(extent_path(r.dir, 1), "r+b") as f:
        f.seek(lay.meta_offset)
        f.write(b"\x01")
        f.seek(5 * lay.block_size)
        f.write(b"stray")
    r = reopen(r, read_only=True)
    with pytest.raises(CrucibleError):
        r.read(16 + 5, 1)
    assert r.extent(1).verify()
    r.close()


def test_read_only_region_refuses_writes(make_region: MakeRegion) -> None:
    r = reopen(make_region(), read_only=True)
    data = blocks(0, 1)
    with pytest.raises(CrucibleError) as e:
        r.write(0, contexts_for(data), data)
    assert e.value.kind == ErrorKind.ModifyingReadOnlyRegion
    r.close()


# ---- create / open errors -------------------------------------------------------------


def test_create_refuses_existing_region(make_region: MakeRegion) -> None:
    r = make_region()
    with pytest.raises(RegionError, match="already exists"):
        Region.create(r.dir, r.definition)


def test_open_missing_region(tmp_path: Path) -> None:
    with pytest.raises(RegionError, match="does not exist"):
        Region.open(tmp_path / "nothing")


GOOD_JSON = {
    "block_size": 512,
    "extent_size": {"value": 16, "shift": 9},
    "extent_count": 4,
    "uuid": "00000000-0000-0000-0000-000000000000",
    "encrypted": False,
    "database_read_version": 1,
    "database_write_version": 1,
}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (b"{not json", "not valid JSON"),
        (b"\x00\xff\xfe binary", "not UTF-8 text"),
        (b"[]", "must be a JSON object, not list"),
        (b'{"block_size": 512}', "field extent_size is missing"),
        (json.dumps({**GOOD_JSON, "block_size": 500}).encode(), "block size 500"),
        (json.dumps({**GOOD_JSON, "block_size": "512"}).encode(), "block_size must be an integer"),
        (json.dumps({**GOOD_JSON, "extent_size": 16}).encode(), "extent_size must be a JSON"),
        (json.dumps({**GOOD_JSON, "uuid": 7}).encode(), "uuid must be a UUID"),
        (json.dumps({**GOOD_JSON, "encrypted": 0}).encode(), "encrypted must be true or false"),
    ],
)
def test_open_corrupt_region_json(make_region: MakeRegion, text: bytes, says: str) -> None:
    r = make_region()
    r.close()
    (r.dir / "region.json").write_bytes(text)
    with pytest.raises(RegionError) as e:
        Region.open(r.dir)
    assert str(r.dir / "region.json") in str(e.value) and says in str(e.value), e.value


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (
            {"extent_count": 2},
            "says 2 extents, but 2 more extent files are there (e.g. 00/000/002)",
        ),
        ({"extent_size": {"value": 8, "shift": 9}}, "says bs:512 es:8"),
        ({"block_size": 4096, "extent_size": {"value": 16, "shift": 12}}, "says bs:4096 es:16"),
    ],
)
def test_definition_not_matching_the_extent_files(
    make_region: MakeRegion, change: dict[str, object], says: str
) -> None:
    r = make_region()
    r.close()
    obj = {**json.loads((r.dir / "region.json").read_text()), **change}
    (r.dir / "region.json").write_text(json.dumps(obj))
    for read_only in (False, True):
        with pytest.raises(RegionError) as e:
            Region.open(r.dir, read_only=read_only)
        assert says in str(e.value) and "does not match the extent files" in str(e.value)


def test_one_writer_at_a_time(make_region: MakeRegion) -> None:
    r = make_region()
    with pytest.raises(RegionError, match="in use by another process"):
        Region.open(r.dir)
    Region.open(r.dir, read_only=True).close()  # reading (dump, export) is allowed
    r.close()
    Region.open(r.dir).close()  # closed: free again


def test_open_truncated_extent(make_region: MakeRegion) -> None:
    r = make_region()
    r.close()
    path = extent_path(r.dir, 2)
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(RegionError, match="truncated"):
        Region.open(r.dir)


def test_open_missing_extent(make_region: MakeRegion) -> None:
    r = make_region()
    r.close()
    extent_path(r.dir, 3).unlink()
    with pytest.raises(RegionError, match="missing"):
        Region.open(r.dir)


def test_definition_validation() -> None:
    for bs in (256, 513, 65536):
        with pytest.raises(RegionError):
            RegionDefinition(bs, 10, 1, uuid.uuid4()).validate()
    with pytest.raises(RegionError):
        RegionDefinition(512, 0, 1, uuid.uuid4()).validate()
    with pytest.raises(RegionError):
        RegionDefinition(32768, 1 << 20, 1, uuid.uuid4()).validate()


# ---- extent replacement ------------------------------------------------------------------


def _source_with_data(make_region: MakeRegion) -> Region:
    src = make_region("src")
    data = blocks(16, 16, 7)
    src.write(16, contexts_for(data), data)
    src.flush(4, 3)
    return src


def test_replace_extent(make_region: MakeRegion) -> None:
    src = _source_with_data(make_region)
    dst = make_region("dst")
    src_file = extent_path(src.dir, 1)
    dst.close_extent(1)
    dst.replace_extent(1, lambda f: f.write(src_file.read_bytes()))
    dst.reopen_extent(1)
    assert dst.read(16, 16)[1] == blocks(16, 16, 7)
    assert dst.extent_versions()[0][1] == 3
    assert not any(
        p.name.endswith((".copy", ".replace", ".completed"))
        for p in extent_path(dst.dir, 1).parent.iterdir()
    )


def test_replace_refuses_open_extent_and_bad_file(make_region: MakeRegion) -> None:
    dst = make_region("dst")
    with pytest.raises(CrucibleError):
        dst.replace_extent(1, lambda f: None)
    dst.close_extent(1)
    with pytest.raises(CrucibleError) as e:
        dst.replace_extent(1, lambda f: f.write(b"short"))
    assert e.value.kind == ErrorKind.RepairFilesInvalid
    dst.reopen_extent(1)
    assert dst.read(16, 1)[1] == bytes(512)


@pytest.mark.parametrize("stage", ["copy", "replace-full", "replace-moved", "completed"])
def test_replace_crash_at_each_stage_is_settled_on_open(
    make_region: MakeRegion, stage: str
) -> None:
    src = _source_with_data(make_region)
    dst = make_region("dst")
    dst.close()
    path = extent_path(dst.dir, 1)
    old = path.read_bytes()
    new = extent_path(src.dir, 1).read_bytes()
    name = stage.split("-")[0]
    d = staging_dir(path, name)
    d.mkdir()
    if stage == "copy":
        (d / path.name).write_bytes(new[:1000])  # copy cut short: undone
    elif stage == "replace-full":
        (d / path.name).write_bytes(new)  # complete copy staged: finished
    elif stage == "replace-moved":
        path.write_bytes(new)  # already renamed into place: cleaned up
    else:
        path.write_bytes(new)
    dst = Region.open(dst.dir)
    expect_new = stage != "copy"
    assert path.read_bytes() == (new if expect_new else old)
    assert not d.exists()
    assert dst.read(16, 1)[1] == (pattern(16, 7) if expect_new else bytes(512))
    dst.close()


def test_fetch_through_file_object(make_region: MakeRegion) -> None:
    src = _source_with_data(make_region)
    dst = make_region("dst")
    buf = io.BytesIO(extent_path(src.dir, 1).read_bytes())
    dst.close_extent(1)
    dst.replace_extent(1, lambda f: shutil.copyfileobj(buf, f))
    dst.reopen_extent(1)
    assert dst.read(20, 1)[1] == pattern(20, 7)


def test_trim_frees_space_and_reads_as_never_written(make_region: MakeRegion) -> None:
    r = make_region(es=256, ec=2)
    data = os.urandom(512 * 256)
    r.write(0, contexts_for(data), data)
    r.flush(1, 1)
    path = extent_path(r.dir, 0)
    before = path.stat().st_blocks
    r.trim(16, 200)
    assert path.stat().st_blocks < before  # the filesystem got the space back
    ctxs, got = r.read(0, 256)
    assert ctxs[16:216] == [None] * 200 and got[16 * 512 : 216 * 512] == bytes(200 * 512)
    assert got[: 16 * 512] == data[: 16 * 512] and got[216 * 512 :] == data[216 * 512 :]
    r = reopen(r)  # dirty: slots recovered from what is on disk
    assert r.read(16, 200)[0] == [None] * 200
    assert r.extent(0).verify() == []
    r.flush(2, 1)
    r = reopen(r)
    assert r.read(16, 1) == ([None], bytes(512))
    r.close()


def test_trim_cut_short_keeps_old_data(make_region: MakeRegion) -> None:
    """A crash after the empty context was written but before the hole was
    punched: the block keeps its old data and context."""
    from crucible.region.context import EMPTY_SLOT

    r = make_region()
    data = blocks(0, 2, 5)
    r.write(0, contexts_for(data), data)
    r.flush(1, 1)
    ext = r.extent(0)
    with open(extent_path(r.dir, 0), "r+b") as f:
        f.seek(r.layout.meta_offset)
        f.write(b"\x01")
        f.seek(r.layout.slot_offset(1 - ext.active[1], 1))
        f.write(EMPTY_SLOT)
    r = reopen(r)
    assert r.read(0, 2)[1] == data
    assert r.extent(0).verify() == []
    r.close()
