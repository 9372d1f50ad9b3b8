"""The verify of the replicas as pure logic: which replica a comparison
blames, and how the rate paces the chunks."""

from __future__ import annotations

from crucible.upstairs.jobs import Reply
from crucible.upstairs.scrub import CHUNK_BYTES, Scrub, compare

Z = 99  # the zero block's hash


def _reply(*ctxs: int | None, bad: set[int] | None = None) -> Reply:
    return list(ctxs), b"", bad or set()


def test_compare_blames_the_odd_one_out() -> None:
    found = compare({0: _reply(1, 2, 3), 1: _reply(1, 5, 3), 2: _reply(1, 2, 4)}, Z)
    assert found.fixes == {1: {1: 0}, 2: {2: 0}}
    assert found.unresolved == []


def test_compare_never_written_equals_zeros() -> None:
    found = compare({0: _reply(None, 7), 1: _reply(Z, 7), 2: _reply(None, 7)}, Z)
    assert found.fixes == {} and found.unresolved == []


def test_compare_reports_what_no_majority_settles() -> None:
    three = compare({0: _reply(1), 1: _reply(2), 2: _reply(3)}, Z)
    assert three.fixes == {} and three.unresolved == [0]
    two = compare({0: _reply(1), 2: _reply(2)}, Z)  # one replica did not answer
    assert two.fixes == {} and two.unresolved == [0]
    alone = compare({0: _reply(1)}, Z)
    assert alone.fixes == {} and alone.unresolved == []


def test_compare_leaves_blocks_that_failed_their_own_check() -> None:
    found = compare({0: _reply(1), 1: _reply(2, bad={0}), 2: _reply(1)}, Z)
    assert found.fixes == {} and found.unresolved == []


def test_chunks_stay_in_an_extent_and_cover_the_volume() -> None:
    s = Scrub()
    s.request("t", 0.0, 0.0)
    seen = []
    while True:
        chunk = s.next_chunk(0.0, total=1000, extent_size=300, block_size=4096)
        assert chunk is not None
        seen.append(chunk)
        s.outstanding = 1
        assert s.next_chunk(0.0, 1000, 300, 4096) is None  # one at a time
        if s.chunk_done(chunk[1], 1000):
            break
    n = CHUNK_BYTES // 4096  # 32 blocks: chunks end at extents' ends too
    assert seen[:2] == [(0, n), (n, n)]
    assert all(start // 300 == (start + count - 1) // 300 for start, count in seen)
    assert sum(count for _, count in seen) == 1000 and seen[-1] == (996, 4)
    assert s.end_pass() == (["t"], 1000) and not s.running


def test_rate_paces_chunks() -> None:
    s = Scrub(rate=CHUNK_BYTES)  # one chunk a second
    n = CHUNK_BYTES // 4096
    assert s.next_chunk(0.0, 10_000, 8192, 4096) is None  # nothing paid for yet
    assert s.next_chunk(0.5, 10_000, 8192, 4096) is None
    assert s.next_chunk(1.0, 10_000, 8192, 4096) == (0, n)
    s.chunk_done(n, 10_000)
    assert s.next_chunk(1.5, 10_000, 8192, 4096) is None
    assert s.next_chunk(2.0, 10_000, 8192, 4096) == (n, n)


def test_off_by_default() -> None:
    assert Scrub().next_chunk(5.0, 100, 100, 512) is None
