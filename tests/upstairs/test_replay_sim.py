"""A downstairs that drops while the volume serves and returns soon, under
the simulated network: it is resumed with LastFlush and the held jobs are
replayed (not live-repaired), the ack and retirement rules hold after every
step, and in the end all three regions hold exactly the guest's data."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crucible.protocol import messages as m
from crucible.upstairs.options import Options
from crucible.upstairs.state import Mode, Stage
from tests.upstairs.guest_model import GuestModel
from tests.upstairs.sim import Sim
from tests.upstairs.test_simulation import MIX, TOTAL, random_step


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_offline_downstairs_is_replayed(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        opts = Options(offline_max_jobs=200, log_jobs=False)
        sim = Sim(Path(tmp), options=opts)
        sim.allow_drops = True
        try:
            _run(sim, data)
        finally:
            sim.close()


def _run(sim: Sim, data: st.DataObject) -> None:
    g = GuestModel(sim, TOTAL)
    sim.activate()
    for _ in range(data.draw(st.integers(0, 20), label="before")):
        random_step(sim, g, data, MIX)
    victim = data.draw(st.integers(0, 2), label="victim")
    sim.kill(victim)
    assert sim.up.clients[victim].state.mode is Mode.OFFLINE
    for _ in range(data.draw(st.integers(0, 30), label="while away")):
        random_step(sim, g, data, MIX)  # held for it
    sim.revive(victim)
    for _ in range(200):  # it reconnects (bounded rounds of ticks and delivery)
        sim.tick(0.5)
        sim.settle(lambda n: data.draw(st.integers(0, n - 1)))
        if all(c.state.stage is Stage.ACTIVE for c in sim.up.clients):
            break
    assert all(c.state.stage is Stage.ACTIVE for c in sim.up.clients)
    assert m.LastFlush in sim.ds[victim].received, "it came back through LastFlush"
    assert sim.up.ds.live_repairs == 0, "replayed, not live-repaired"
    for _ in range(data.draw(st.integers(0, 20), label="after")):
        random_step(sim, g, data, MIX)
    sim.settle(lambda n: data.draw(st.integers(0, n - 1)))
    g.check()
    g.finish()
