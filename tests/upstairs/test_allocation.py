"""The upstairs' map of blocks holding data: runs kept as writes and trims
are queued, operations logged while the map is fetched laid over it, and
the map from a region's extent files (SEEK_DATA / SEEK_HOLE)."""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from pathlib import Path

import pytest

from crucible.common.definition import RegionDefinition
from crucible.region.allocation import allocated_runs
from crucible.region.region import Region
from crucible.upstairs import allocation
from crucible.upstairs.allocation import MAX_LOG, Allocation, State
from crucible.upstairs.guest import Upstairs
from tests.support import Cluster, cluster, contexts_for


def _flags(a: Allocation, total: int) -> list[bool]:
    runs = a.query(0, total)
    assert runs is not None
    out: list[bool] = []
    pos = 0
    for start, n, allocated in runs:
        assert start == pos and n > 0, "runs cover the range in order"
        out += [allocated] * n
        pos += n
    return out


def test_marks_match_a_flag_per_block(rng: random.Random) -> None:
    total = 200
    a = Allocation()
    a.begin()
    a.loaded(a.epoch, [])
    model = [False] * total
    for _ in range(2000):
        start = rng.randrange(total)
        n = rng.randint(1, min(20, total - start))
        allocated = rng.random() < 0.6
        a.mark(start, n, allocated)
        model[start : start + n] = [allocated] * n
        if rng.random() < 0.05:
            assert _flags(a, total) == model
    assert _flags(a, total) == model
    # Runs are maximal: no two stored runs touch.
    runs = a.runs()
    assert all(s1 + n1 < s2 for (s1, n1), (s2, _) in itertools.pairwise(runs))
    # A query of a middle range starts and ends where asked.
    part = a.query(37, 50)
    assert part is not None and part[0][0] == 37 and sum(n for _, n, _ in part) == 50


def test_a_scattered_map_stays_bounded_and_never_calls_data_a_hole(
    rng: random.Random, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every other block written: past MAX_RUNS runs, neighbours merge. Every
    block written is still data; blocks trimmed or written after the merge
    are exact again."""
    monkeypatch.setattr(allocation, "MAX_RUNS", 64)
    total = 2000
    a = Allocation()
    a.begin()
    a.loaded(a.epoch, [(b, 1) for b in range(0, 400, 2)])  # 200 runs from the downstairs
    assert len(a.runs()) <= 64
    model = [b < 400 and b % 2 == 0 for b in range(total)]
    for b in rng.sample(range(400, total), 600):
        a.mark(b, 1, True)
        model[b] = True
        assert len(a.runs()) <= 64
    flags = _flags(a, total)
    assert all(flags[b] for b in range(total) if model[b]), "a written block reported as a hole"
    assert sum(flags) < total, "still tells some holes apart"
    # Trimmed: every block written since the map came (a smaller trim may
    # leave MAX_RUNS runs, and the write after it merge them all again). What
    # is left are the first 400 blocks' runs, at most 50 since the first merge.
    a.mark(400, total - 400, False)
    assert len(a.runs()) <= 51
    a.mark(1050, 3, True)
    flags = _flags(a, total)
    assert flags[400:] == [False] * 650 + [True] * 3 + [False] * (total - 1053)


def test_the_log_is_laid_over_a_map_taken_later() -> None:
    a = Allocation()
    a.begin()
    a.mark(0, 4, True)  # queued before the map was taken ...
    a.mark(2, 1, False)
    # ... the downstairs had done the write but not yet the trim.
    a.loaded(a.epoch, [(0, 4), (10, 2)])
    assert a.state is State.KNOWN
    assert a.runs() == [(0, 2), (3, 1), (10, 2)]


def test_an_answer_for_an_earlier_activation_is_ignored() -> None:
    a = Allocation()
    a.begin()
    old = a.epoch
    a.forget()
    a.begin()
    a.loaded(old, [(0, 1)])
    assert a.query(0, 1) is None, "still loading"
    a.loaded(a.epoch, None)  # the downstairs could not say
    assert a.state is State.UNKNOWN


def test_a_log_grown_too_long_gives_up() -> None:
    a = Allocation()
    a.begin()
    for i in range(MAX_LOG + 1):
        a.mark(i, 1, True)
    assert a.state is State.UNKNOWN
    a.loaded(a.epoch, [])
    assert a.query(0, 1) is None


def test_region_map_from_holes(tmp_path: Path) -> None:
    d = RegionDefinition(4096, 16, 3, uuid.uuid4())
    region = Region.create(tmp_path / "r", d)
    try:
        assert allocated_runs(region.dir, d) == []
        data = b"\x07" * 8192
        region.write(21, contexts_for(data, 4096), data)
        runs = allocated_runs(region.dir, d)
        blocks = {b for s, n in runs for b in range(s, s + n)}
        assert {21, 22} <= blocks <= set(range(16, 32)), runs
        region.trim(21, 2)
        assert allocated_runs(region.dir, d) == [], "a trimmed block is a hole again"
    finally:
        region.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_map_fetched_at_activation_can_be_waited_for(tmp_path: Path) -> None:
    """Just after activation the map is on its way from a downstairs:
    allocation_settled returns once it is in, and from then on it is known."""

    async def go(c: Cluster) -> None:
        async with Upstairs(c.targets) as up:
            await up.activate(1)
            page = 4096 // up.block_size  # the holes' grain in the extent files
            await up.write(page, b"\x01" * 4096)
            await up.allocation_settled()
            assert up.allocation(0, 3 * page) == [
                (0, page, False),
                (page, page, True),
                (2 * page, page, False),
            ]

    with cluster(tmp_path) as c:
        asyncio.run(go(c))
