"""The sans-IO upstairs under a simulated network that delays and reorders
replies: ack, dependency and retirement rules hold after every step."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crucible.upstairs.encryption import BlockCipher
from crucible.upstairs.options import Options
from crucible.upstairs.status import VerifyStatus
from tests.support import contexts_for
from tests.upstairs.guest_model import BS, GuestModel
from tests.upstairs.sim import Sim

TOTAL = 32


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_rules_hold_under_reordering(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sim = Sim(Path(tmp), options=_options(data))
        try:
            _run(sim, data)
        finally:
            sim.close()


def random_step(sim: Sim, g: GuestModel, data: st.DataObject, kinds: list[str]) -> None:
    """One guest request or network event, drawn by hypothesis; then the rules."""
    what = data.draw(st.sampled_from(kinds))
    if what == "net":
        ev = sim.events()
        if ev:
            sim.step(data.draw(st.sampled_from(ev)), data.draw(st.integers(0, 64)))
    elif what == "write":
        start = data.draw(st.integers(0, g.total - 1))
        n = data.draw(st.integers(1, min(6, g.total - start)))
        payload = data.draw(st.binary(min_size=1, max_size=1)) * (n * BS)
        assert g.write(start, payload) is None, "writes are acked when queued"
    elif what == "trim":
        start = data.draw(st.integers(0, g.total - 1))
        assert g.trim(start, data.draw(st.integers(1, min(6, g.total - start)))) is None
    elif what == "read":
        start = data.draw(st.integers(0, g.total - 1))
        sim.up.ds.turn = data.draw(st.integers(0, 2))  # which replica it tries first
        g.read(start, data.draw(st.integers(1, min(6, g.total - start))))
    else:
        g.flush()
    g.check()


MIX = ["write", "read", "flush", "trim", "net", "net", "net"]


def _options(data: st.DataObject) -> Options:
    """Plain or encrypted, drawn: the rules are the same."""
    if data.draw(st.booleans(), label="encrypted"):
        return Options(cipher=BlockCipher(bytes(range(32))))
    return Options()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_bad_block_rewritten_from_a_good_copy(data: st.DataObject) -> None:
    """A block goes bad on one replica; guest IO goes on around it. A read
    that meets it is served from a good copy, and the bad copy is rewritten
    with the data current at that point (never over a newer write): in the
    end every replica holds the guest's data."""
    with _written(data) as (sim, g, block, bad):
        sim.corrupt(bad, block)
        for _ in range(data.draw(st.integers(0, 30), label="steps")):
            random_step(sim, g, data, MIX)
        sim.settle(lambda n: data.draw(st.integers(0, n - 1)))
        sim.up.ds.turn = bad  # nothing in flight: the read goes there
        g.read(block, 1)
        sim.settle(lambda n: data.draw(st.integers(0, n - 1)))
        g.check()
        g.finish()


@contextlib.contextmanager
def _written(data: st.DataObject) -> Iterator[tuple[Sim, GuestModel, int, int]]:
    """An active volume after some writes have settled, with a block and a
    replica drawn."""
    with tempfile.TemporaryDirectory() as tmp:
        sim = Sim(Path(tmp), options=_options(data))
        try:
            g = GuestModel(sim, TOTAL)
            sim.activate()
            for _ in range(data.draw(st.integers(0, 10), label="writes")):
                random_step(sim, g, data, ["write", "write", "flush", "net"])
            sim.settle()
            block = data.draw(st.integers(0, TOTAL - 1), label="block")
            yield sim, g, block, data.draw(st.integers(0, 2), label="replica")
        finally:
            sim.close()


def _run(sim: Sim, data: st.DataObject) -> None:
    g = GuestModel(sim, TOTAL)
    sim.activate()
    assert sim.up.allocation(0, TOTAL) is not None, "the map is known once active"
    for _ in range(data.draw(st.integers(5, 40), label="steps")):
        random_step(sim, g, data, MIX)
    sim.settle(lambda n: data.draw(st.integers(0, n - 1)))
    g.check()
    g.finish()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_verify_rewrites_a_replica_that_silently_diverged(data: st.DataObject) -> None:
    """One replica holds other data under a valid hash (so its reads verify),
    or a corrupt block; a verify pass, with guest IO going on, finds it and
    rewrites it from the two others, never over a newer write: in the end
    every replica holds the guest's data."""
    with _written(data) as (sim, g, block, victim):
        corrupt = data.draw(st.booleans(), label="corrupt")
        mix = MIX
        if corrupt:
            sim.corrupt(victim, block)
        else:
            other = bytes(b ^ 0xA5 for b in g.data[block * BS : (block + 1) * BS])
            cipher = sim.up.opts.cipher
            if cipher is None:
                sim.ds[victim].region.write(block, contexts_for(other), other)
            else:  # sealed at its own index: it opens (an older copy, say)
                sealed, ctxs = cipher.seal(block, other, BS)
                sim.ds[victim].region.write(block, ctxs, sealed)
            # No reads: one sent to the diverged replica would get its data,
            # which verifies (what only the comparison can find).
            mix = ["write", "flush", "trim", "net", "net", "net"]
        tok = object()
        sim.apply(sim.up.verify_replicas(tok, 0.0, sim.now))
        steps = data.draw(st.integers(0, 30), label="steps")
        for _ in range(steps):
            random_step(sim, g, data, mix)
        sim.settle(lambda n: data.draw(st.integers(0, n - 1)))
        status = sim.completed[tok]
        assert isinstance(status, VerifyStatus) and status.passes == 1
        if steps == 0:  # nothing else changed the block
            found = 0 if corrupt else 1  # a bad block is rewritten as a read's is
            assert (status.divergent, status.unresolved) == (found, 0)
            assert sim.up.ds.blocks_rewritten == 1
        g.check()
        g.finish()
