"""What reconciliation repairs and from where (mend), and a torn copy that
can never be the source."""

from __future__ import annotations

from pathlib import Path

import pytest

from crucible.region.region import Region
from crucible.upstairs.mend import ExtentVersions, Repair, Unrepairable, mend
from tests.region.conftest import tear
from tests.support import contexts_for, pattern
from tests.upstairs.sim import Sim


def v(*meta: tuple[int, int, bool]) -> ExtentVersions:
    return ExtentVersions([g for g, _, _ in meta], [f for _, f, _ in meta], [d for *_, d in meta])


def test_mend_picks_the_newest_copy() -> None:
    a = v((1, 5, False), (1, 5, False), (1, 4, True))
    b = v((1, 5, False), (2, 1, False), (1, 4, False))
    c = v((1, 5, False), (1, 5, False), (1, 4, True))
    assert mend([a, b, c]) == [
        Repair(1, 1, (0, 2)),  # higher generation wins
        Repair(2, 0, (1, 2)),  # dirty beats clean at equal numbers; dirty: everyone copies
    ]


def test_mend_never_takes_an_unusable_source() -> None:
    a = v((1, 5, True))
    b = v((1, 5, True))
    c = v((1, 5, True))
    assert mend([a, b, c]) == [Repair(0, 0, (1, 2))]
    assert mend([a, b, c], frozenset({(0, 0)})) == [Repair(0, 1, (0, 2))]
    assert mend([a, b, c], frozenset({(0, 0), (0, 1)})) == [Repair(0, 2, (0, 1))]
    with pytest.raises(Unrepairable):
        mend([a, b, c], frozenset({(0, 0), (0, 1), (0, 2)}))


def test_a_torn_copy_is_not_the_source(tmp_path: Path) -> None:
    """Downstairs 0 would be the source (all copies dirty and alike, ties go
    to the lowest), but it holds a torn block: it refuses to flush the
    extent, activation tries again with another source, and every copy ends
    up with the good data."""
    sim = Sim(tmp_path)
    sim.allow_drops = True
    try:
        old, new = pattern(1, 1), pattern(1, 2)
        for d in sim.ds:
            d.region.write(1, contexts_for(old), old)
            d.region.flush(1, 1)
            d.region.write(1, contexts_for(new), new)  # not flushed: extent 0 dirty
        tear(sim.ds[0].region, 1, pattern(1, 3))
        sim.ds[0].region.close()
        sim.ds[0].region = Region.open(sim.ds[0].region.dir)
        tok = object()
        sim.apply(sim.up.activate(tok, 2, sim.now))
        for _ in range(50):
            sim.settle()
            if tok in sim.completed:
                break
            sim.tick(1.0)
        assert sim.completed[tok] is None
        assert sim.up.activation.unusable == {(0, 0)}
        for d in sim.ds:
            assert d.region.read(1, 1)[1] == new
            assert d.region.extent(0).verify() == []
    finally:
        sim.close()
