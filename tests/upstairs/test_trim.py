"""Trim only reaches a downstairs that says it takes it (a plain V13 one
drops the connection on the unknown message); the others get zeros written,
and the replicas still read the same."""

from __future__ import annotations

from pathlib import Path

from crucible.protocol import messages as m
from crucible.protocol.capabilities import NONE
from crucible.upstairs.jobs import zero_hash
from tests.upstairs.guest_model import Token
from tests.upstairs.sim import Sim

BS = 512


def _contexts(sim: Sim, i: int, start: int, n: int) -> list[m.ReadBlockContext]:
    return sim.ds[i].region.read(start, n)[0]


def _read(sim: Sim, start: int, n: int) -> tuple[bytes, list[m.ReadBlockContext]]:
    t = Token("read")
    sim.apply(sim.up.read(t, start, n, sim.now))
    sim.settle()
    result = sim.completed[t]
    assert isinstance(result, tuple), result
    return bytes(result[0]), result[1]


def _write_trim_flush(sim: Sim) -> None:
    sim.apply(sim.up.write(Token("write"), 0, b"\x07" * (8 * BS), sim.now))
    sim.apply(sim.up.trim(Token("trim"), 2, 4, sim.now))
    flush = Token("flush")
    sim.apply(sim.up.flush(flush, sim.now))
    sim.settle()
    assert sim.completed[flush] is None


def test_trim_where_every_downstairs_takes_it(tmp_path: Path) -> None:
    sim = Sim(tmp_path)
    try:
        sim.activate()
        assert sim.up.ds.trims()
        _write_trim_flush(sim)
        for i in range(3):
            assert m.Trim in sim.ds[i].received
            assert _contexts(sim, i, 2, 4) == [None] * 4  # never-written again: holes
        data, ctxs = _read(sim, 0, 8)
        assert data == b"\x07" * (2 * BS) + bytes(4 * BS) + b"\x07" * (2 * BS)
        assert ctxs[2:6] == [None] * 4
    finally:
        sim.close()


def test_no_trim_to_a_downstairs_without_it(tmp_path: Path) -> None:
    sim = Sim(tmp_path)
    try:
        sim.ds[1].capabilities = NONE  # it would drop the connection on a Trim
        sim.activate()
        assert not sim.up.ds.trims()
        _write_trim_flush(sim)
        zero = zero_hash(BS)
        for i in range(3):
            assert m.Trim not in sim.ds[i].received
            # Every copy says the same: zeros written (data, not holes).
            assert _contexts(sim, i, 2, 4) == [zero] * 4
        data, ctxs = _read(sim, 0, 8)
        assert data == b"\x07" * (2 * BS) + bytes(4 * BS) + b"\x07" * (2 * BS)
        assert ctxs[2:6] == [zero] * 4
        assert sim.up.ds.integrity_errors == 0
    finally:
        sim.close()


def test_a_queued_trim_replayed_to_one_that_lost_the_capability(tmp_path: Path) -> None:
    """A Trim held for an offline downstairs that comes back without Trim
    (another binary on the same region) is replayed to it as zeros; reads
    then see a hole on two copies and zeros on one, which agree."""
    sim = Sim(tmp_path)
    sim.allow_drops = True
    try:
        sim.activate()
        sim.apply(sim.up.write(Token("write"), 0, b"\x07" * (8 * BS), sim.now))
        sim.settle()
        sim.kill(2)
        sim.apply(sim.up.trim(Token("trim"), 2, 4, sim.now))  # held for downstairs 2
        sim.settle()
        sim.ds[2].capabilities = NONE
        sim.revive(2)
        for _ in range(100):
            sim.tick(0.5)
            sim.settle()
            if [c.state.name for c in sim.up.clients] == ["active"] * 3:
                break
        assert [c.state.name for c in sim.up.clients] == ["active"] * 3
        assert m.Trim not in sim.ds[2].received
        assert _contexts(sim, 2, 2, 4) == [zero_hash(BS)] * 4
        assert _contexts(sim, 0, 2, 4) == [None] * 4
        data, _ = _read(sim, 0, 8)
        assert data == b"\x07" * (2 * BS) + bytes(4 * BS) + b"\x07" * (2 * BS)
        assert sim.up.ds.integrity_errors == 0
    finally:
        sim.close()
