"""Rewriting a replica's bad blocks: the pure helpers, and the one ordering
that must never lose a write (a guest write queued while the mending read is
out)."""

from __future__ import annotations

from pathlib import Path

import xxhash

from crucible.common.errors import CrucibleError
from crucible.protocol import messages as m
from crucible.upstairs.jobs import IOState, Job, ReadOp, TrimOp, WriteOp
from crucible.upstairs.rewrite import runs, touched_after
from tests.upstairs.guest_model import BS, GuestModel
from tests.upstairs.sim import Sim

CTX = m.BlockContext(0)


def test_runs() -> None:
    assert list(runs([])) == []
    assert list(runs([3])) == [(3, 1)]
    assert list(runs([5, 0, 1, 2, 7, 6])) == [(0, 3), (5, 3)]


def test_touched_after() -> None:
    def job(jid: int, op: WriteOp | ReadOp | TrimOp) -> Job:
        return Job(jid, op, [], [IOState.DONE] * 3)

    jobs = [
        job(1, WriteOp(0, [], b"")),
        job(5, ReadOp(10, 4)),
        job(6, WriteOp(8, [CTX] * 3, b"")),
        job(7, TrimOp(13, 5)),
        job(9, WriteOp(30, [CTX], b"")),
    ]
    assert touched_after(jobs, 5, 10, 4) == {10, 13}
    assert touched_after(jobs, 6, 10, 4) == {13}
    assert touched_after(jobs, 9, 10, 4) == set()


def test_write_queued_during_the_mending_read_is_kept(tmp_path: Path) -> None:
    sim = Sim(tmp_path)
    try:
        g = GuestModel(sim, 32)
        sim.activate()
        g.write(3, b"\x01" * BS)
        g.flush()
        sim.settle()
        sim.corrupt(1, 3)
        sim.up.ds.turn = 1  # the read goes to the bad copy
        g.read(3, 1)

        def mending() -> bool:
            return any(isinstance(j.op, ReadOp) and j.op.mend is not None for j in sim.up.ds.table)

        for _ in range(1000):
            if mending():
                break
            sim.step(sim.events()[0])
        assert mending(), "the bad copy was not seen"
        g.write(3, b"\x02" * BS)  # queued after the mending read, before its data is in
        sim.settle()
        g.check()
        g.finish()  # every replica holds \x02: the rewrite left block 3 alone
        assert sim.up.ds.integrity_errors == 1
    finally:
        sim.close()


def test_a_block_this_upstairs_cannot_decrypt_is_not_rewritten(tmp_path: Path) -> None:
    """No key is no proof of a bad copy: the read fails, nothing is mended."""
    sim = Sim(tmp_path)
    try:
        sim.activate()
        data = bytes(range(256)) * 2
        enc = m.EncryptionContext(b"n" * 12, b"t" * 16)
        h = xxhash.xxh64(enc.nonce)
        h.update(enc.tag)
        h.update(data)
        for d in sim.ds:
            d.region.write(3, [m.BlockContext(h.intdigest(), enc)], data)
        tok = object()
        sim.apply(sim.up.read(tok, 3, 1, sim.now))
        sim.settle()
        result = sim.completed[tok]
        assert isinstance(result, CrucibleError) and "no key" in str(result)
        assert not any(isinstance(j.op, ReadOp) and j.op.mend is not None for j in sim.up.ds.table)
        assert sim.up.ds.blocks_rewritten == 0
    finally:
        sim.close()
