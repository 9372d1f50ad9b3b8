"""Which replica a read goes to: the same one for the same MiB of the volume
(so each downstairs' page cache holds its own third), another when that one
is much busier than the rest. When the three are on one host (their page
cache is one) every small read has the same home, and large reads keep
theirs per MiB."""

from __future__ import annotations

from pathlib import Path

from crucible.protocol import messages as m
from crucible.upstairs.downstairs import (
    READ_HOME_BYTES,
    SHARED_HOME_MAX,
    SHARED_SPILL_JOBS,
    SPILL_JOBS,
)
from tests.upstairs.sim import Sim

BS = 512
PER_MIB = READ_HOME_BYTES // BS


def _reads_sent(sim: Sim) -> list[int]:
    """How many reads wait in each downstairs' inbox."""
    return [sum(isinstance(x, m.ReadRequest) for x in d.inbox) for d in sim.ds]


def _sim(tmp_path: Path, one_host: bool = False) -> Sim:
    sim = Sim(tmp_path, es=PER_MIB, ec=3, one_host=one_host)  # three MiB, one extent each
    sim.activate()
    return sim


def test_each_mib_is_read_from_its_own_replica(tmp_path: Path) -> None:
    sim = _sim(tmp_path)
    try:
        homes = []
        for mib in range(3):
            before = _reads_sent(sim)
            for k in range(4):  # anywhere in the MiB: the same replica
                sim.apply(sim.up.read(object(), mib * PER_MIB + k * 100, 1, sim.now))
            after = _reads_sent(sim)
            moved = [i for i in range(3) if after[i] != before[i]]
            assert len(moved) == 1 and after[moved[0]] - before[moved[0]] == 4, (before, after)
            homes.append(moved[0])
        assert sorted(homes) == [0, 1, 2], homes  # three MiB, three replicas
        sim.settle()
        # Another offset moves every MiB's home, as the simulation's draws do.
        sim.up.ds.turn = 1
        sim.apply(sim.up.read(object(), 0, 1, sim.now))
        assert _reads_sent(sim)[(homes[0] + 1) % 3] == 1
        sim.settle()
    finally:
        sim.close()


def test_a_busy_home_spills_to_the_least_busy(tmp_path: Path) -> None:
    sim = _sim(tmp_path)
    try:
        n = SPILL_JOBS + 1 + 4
        tokens = [object() for _ in range(n)]
        for tok in tokens:  # nothing answers meanwhile: the home's queue grows
            sim.apply(sim.up.read(tok, 0, 1, sim.now))
        sent = _reads_sent(sim)
        home = sent.index(max(sent))
        # The home takes reads while it has at most SPILL_JOBS more than
        # another; past that they go to the others.
        assert sent[home] > SPILL_JOBS and sent[home] - min(sent) <= SPILL_JOBS + 1, sent
        assert sum(sent) == n and all(s >= 1 for s in sent), sent
        sim.settle()
        assert all(isinstance(sim.completed[t], tuple) for t in tokens)  # (data, contexts)
    finally:
        sim.close()


def test_replicas_of_one_host_serve_small_reads_from_one_home(tmp_path: Path) -> None:
    sim = _sim(tmp_path, one_host=True)
    try:
        n = SHARED_SPILL_JOBS + 1 + 4
        tokens = [object() for _ in range(n)]
        for i, tok in enumerate(tokens):  # every MiB, nothing answering meanwhile
            sim.apply(sim.up.read(tok, (i % 3) * PER_MIB + i, 1, sim.now))
        sent = _reads_sent(sim)
        home = sent.index(max(sent))
        # Every MiB's reads go to the one home while it has at most
        # SHARED_SPILL_JOBS more in flight than another; past that a read
        # spills to the least busy, which lets the home take one more.
        assert sorted(sent) == [1, 2, SHARED_SPILL_JOBS + 2] and home == 0, sent
        sim.settle()
        assert all(isinstance(sim.completed[t], tuple) for t in tokens)  # (data, contexts)
        sim.up.ds.turn = 1  # another offset moves the home
        sim.apply(sim.up.read(object(), 2 * PER_MIB, 1, sim.now))
        assert _reads_sent(sim)[(home + 1) % 3] == 1
        sim.settle()
        # A large read keeps its home per MiB: three MiB, three replicas; the
        # largest small read goes to the one home.
        large = SHARED_HOME_MAX // BS + 1
        for mib in range(3):
            sim.apply(sim.up.read(object(), mib * PER_MIB, large, sim.now))
        assert _reads_sent(sim) == [1, 1, 1]
        sim.settle()
        sim.apply(sim.up.read(object(), 2 * PER_MIB, large - 1, sim.now))
        assert _reads_sent(sim)[(home + 1) % 3] == 1 and sum(_reads_sent(sim)) == 1
        sim.settle()
    finally:
        sim.close()


def test_a_replacement_on_another_host_brings_back_homes_per_mib(tmp_path: Path) -> None:
    sim = _sim(tmp_path, one_host=True)
    try:
        assert sim.up.ds.one_host
        done = object()
        sim.up.ds.replace(done, ("10.0.0.1", 4000), ("10.0.0.9", 4000), sim.now)
        assert not sim.up.ds.one_host
    finally:
        sim.close()
