"""Finished work retires without a flush: once barrier_bytes (or
barrier_jobs) of finished jobs pile up, a barrier goes to every downstairs,
and when it is done everywhere the jobs before it leave the table. Without
it the upstairs would hold every write's data until the guest flushed."""

from __future__ import annotations

from pathlib import Path

from crucible.protocol import messages as m
from crucible.upstairs.options import Options
from tests.upstairs.sim import Sim

BS = 512


def write_blocks(sim: Sim, n: int) -> None:
    """n one-block writes, each settled (acked and finished) before the next."""
    for b in range(n):
        tok = object()
        sim.apply(sim.up.write(tok, b, bytes([b + 1]) * BS, sim.now))
        sim.settle()
        assert sim.completed[tok] is None


def test_finished_bytes_send_a_barrier_and_retire(tmp_path: Path) -> None:
    limit = 4 * BS  # four finished one-block writes
    sim = Sim(tmp_path, options=Options(barrier_bytes=limit, barrier_jobs=10_000, log_jobs=False))
    try:
        sim.activate()
        write_blocks(sim, 3)
        assert all(m.Barrier not in d.received for d in sim.ds), "below the limit: none yet"
        assert len(sim.up.ds.table) == 3
        write_blocks(sim, 1)
        assert all(m.Barrier in d.received for d in sim.ds)
        # The barrier finished on all three: everything up to it is gone.
        assert len(sim.up.ds.table) == 0
        assert all(m.Flush not in d.received for d in sim.ds), "retired without a flush"
    finally:
        sim.close()


def test_finished_jobs_send_a_barrier(tmp_path: Path) -> None:
    sim = Sim(tmp_path, options=Options(barrier_bytes=1 << 40, barrier_jobs=5, log_jobs=False))
    try:
        sim.activate()
        write_blocks(sim, 4)
        assert all(m.Barrier not in d.received for d in sim.ds)
        write_blocks(sim, 1)
        assert all(m.Barrier in d.received for d in sim.ds)
        assert len(sim.up.ds.table) == 0
    finally:
        sim.close()
