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
from tests.upstairs.sim import Sim
from tests.upstairs.test_simulation import Token, _check

TOTAL = 32
BS = 512


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
    model = bytearray(TOTAL * BS)
    flush_acks: dict[int, set[int]] = {}

    def watch(client: int, msg: m.Message) -> None:
        if isinstance(msg, m.FlushAck | m.BarrierAck):
            flush_acks.setdefault(msg.job_id, set()).add(client)

    sim.on_deliver = watch
    sim.activate()
    reads: list[Token] = []
    flushes: dict[Token, int] = {}
    seen: set[int] = set()

    def step(kinds: list[str]) -> None:
        what = data.draw(st.sampled_from(kinds))
        if what == "net":
            ev = sim.events()
            if ev:
                sim.step(data.draw(st.sampled_from(ev)), data.draw(st.integers(0, 64)))
        elif what == "write":
            start = data.draw(st.integers(0, TOTAL - 1))
            n = data.draw(st.integers(1, min(6, TOTAL - start)))
            payload = data.draw(st.binary(min_size=1, max_size=1)) * (n * BS)
            t = Token("write")
            sim.apply(sim.up.write(t, start, payload, sim.now))
            if sim.completed[t] is None:
                model[start * BS : (start + n) * BS] = payload
        elif what == "read":
            start = data.draw(st.integers(0, TOTAL - 1))
            n = data.draw(st.integers(1, min(6, TOTAL - start)))
            t = Token("read", bytes(model[start * BS : (start + n) * BS]))
            sim.apply(sim.up.read(t, start, n, sim.now))
            reads.append(t)
        else:
            t = Token("flush")
            jid = sim.up.ds.table.next_id
            sim.apply(sim.up.flush(t, sim.now))
            flushes[t] = jid
        seen.update(j.id for j in sim.up.ds.table)
        _check(sim, reads, flushes, flush_acks, seen)

    mix = ["write", "read", "flush", "net", "net", "net"]
    for _ in range(data.draw(st.integers(0, 20), label="before")):
        step(mix)
    victim = data.draw(st.integers(0, 2), label="victim")
    sim.kill(victim)
    assert sim.up.clients[victim].state.mode is Mode.OFFLINE
    for _ in range(data.draw(st.integers(0, 30), label="while away")):
        step(mix)
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
        step(mix)
    sim.settle(lambda n: data.draw(st.integers(0, n - 1)))
    _check(sim, reads, flushes, flush_acks, seen)
    assert not reads and not flushes
    t = Token("flush")
    sim.apply(sim.up.flush(t, sim.now))
    sim.settle()
    assert sim.completed[t] is None
    assert not sim.up.ds.table.jobs
    for d in sim.ds:
        assert d.region.read(0, TOTAL)[1] == bytes(model), "a replica differs from the guest data"
