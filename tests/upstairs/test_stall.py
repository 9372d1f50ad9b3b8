"""The progress check on the simulated network: a downstairs that finishes
no job while the others do is faulted, unless what it is still doing is a
snapshot (a copy of the whole region where the filesystem cannot clone). A
read home that finishes nothing sends reads on to the others, so that it
shows as stuck even when nothing else went to them."""

from __future__ import annotations

from pathlib import Path

from crucible.upstairs.options import Options
from crucible.upstairs.state import Mode
from tests.upstairs.sim import Sim

SLOW = 2  # the downstairs whose disk work does not run


def run_all_but(sim: Sim, held: set[int]) -> None:
    """Everything that can happen but the disk work of the downstairs `held`."""
    for _ in range(1000):
        ev = [e for e in sim.events() if e[0] != "disk" or e[1] not in held]
        if not ev:
            return
        sim.step(ev[0])
    raise AssertionError("the simulation did not settle")


def with_a_block(tmp_path: Path, one_host: bool = False) -> Sim:
    """Three downstairs (of one host: every small read has one home, the
    first), block 0 written with 0x5a; a progress timeout of 2 s."""
    opts = Options(progress_timeout=2.0, timeout=3600.0, log_jobs=False)
    sim = Sim(tmp_path, options=opts, one_host=one_host)
    sim.allow_drops = True
    sim.activate()
    w = object()
    sim.apply(sim.up.write(w, 0, b"\x5a" * 512, sim.now))
    sim.settle()
    assert sim.completed[w] is None
    return sim


def flush_with_one_slow(tmp_path: Path, snapshot: str | None) -> tuple[Sim, object]:
    """A write, then a flush (with `snapshot`) that every downstairs but SLOW
    finishes; then four progress timeouts pass."""
    sim = with_a_block(tmp_path)
    tok = object()
    sim.apply(sim.up.flush(tok, sim.now, snapshot))
    sim.now += 0.5  # the others' replies come after it was sent
    run_all_but(sim, {SLOW})
    assert sim.ds[SLOW].work, "the slow one still has the flush to do"
    for _ in range(4):
        sim.tick(2.0)
    return sim, tok


def test_stalled_flush_is_faulted(tmp_path: Path) -> None:
    sim, _ = flush_with_one_slow(tmp_path, None)
    try:
        assert sim.up.clients[SLOW].state.mode is Mode.FAULTED
        assert "no job finished in" in sim.up.clients[SLOW].last_error
    finally:
        sim.close()


def test_slow_snapshot_is_waited_for(tmp_path: Path) -> None:
    sim, tok = flush_with_one_slow(tmp_path, "s1")
    try:
        assert sim.up.clients[SLOW].state.mode is not Mode.FAULTED
        assert tok not in sim.completed  # a snapshot needs all three
        sim.settle()
        assert sim.completed[tok] is None
        assert all(c.state.mode is not Mode.FAULTED for c in sim.up.clients)
    finally:
        sim.close()


def _data(sim: Sim, token: object) -> bytes:
    done = sim.completed[token]
    assert isinstance(done, tuple), done  # (data, contexts), not an error
    return bytes(done[0])


def test_a_stuck_read_home_is_faulted_while_the_others_stand_idle(tmp_path: Path) -> None:
    # The guest only reads: nothing but spilled reads goes to the others.
    sim = with_a_block(tmp_path, one_host=True)
    try:
        stuck = object()
        sim.apply(sim.up.read(stuck, 0, 1, sim.now))
        run_all_but(sim, {0})
        assert sim.ds[0].work and stuck not in sim.completed  # the home holds it
        sim.tick(0.5)
        near = object()  # not yet half the progress timeout: still the home
        sim.apply(sim.up.read(near, 0, 1, sim.now))
        run_all_but(sim, {0})
        assert near not in sim.completed
        sim.tick(0.5)
        later = object()  # half the progress timeout without progress: another serves it
        sim.apply(sim.up.read(later, 0, 1, sim.now))
        run_all_but(sim, {0})
        assert _data(sim, later) == b"\x5a" * 512
        for _ in range(2):
            sim.tick(1.0)
        assert sim.up.clients[0].state.mode is Mode.FAULTED
        assert "no job finished in" in sim.up.clients[0].last_error
        run_all_but(sim, {0})  # the reads it held went to the others
        assert _data(sim, stuck) == _data(sim, near) == b"\x5a" * 512
    finally:
        sim.close()


def test_replicas_stuck_alike_are_not_faulted_when_reads_spill(tmp_path: Path) -> None:
    # One disk under all three: the reads a stuck home spills stick too, and
    # being sent jobs is not finishing them, so no replica is faulted.
    sim = with_a_block(tmp_path, one_host=True)
    try:
        reads = []
        for _ in range(8):
            tok = object()
            reads.append(tok)
            sim.apply(sim.up.read(tok, 0, 1, sim.now))
            run_all_but(sim, {0, 1, 2})
            sim.tick(1.0)
        assert all(d.work for d in sim.ds), "the stuck home's reads spilled to both others"
        assert all(c.state.mode is not Mode.FAULTED for c in sim.up.clients)
        sim.settle()
        assert all(_data(sim, t) == b"\x5a" * 512 for t in reads)
    finally:
        sim.close()
