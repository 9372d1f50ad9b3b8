"""The sans-IO upstairs under a simulated network that delays and reorders
replies: ack, dependency and retirement rules hold after every step."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crucible.common.errors import CrucibleError
from crucible.protocol import messages as m
from tests.upstairs.sim import Sim


class Token:
    def __init__(self, kind: str, expect: bytes | None = None) -> None:
        self.kind = kind
        self.expect = expect


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_rules_hold_under_reordering(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sim = Sim(Path(tmp))
        try:
            _run(sim, data)
        finally:
            sim.close()


def _run(sim: Sim, data: st.DataObject) -> None:
    total = 32
    model = bytearray(total * 512)
    flush_acks: dict[int, set[int]] = {}
    barrier_done: dict[int, set[int]] = {}

    def watch(client: int, msg: m.Message) -> None:
        if isinstance(msg, m.FlushAck | m.BarrierAck):
            flush_acks.setdefault(msg.job_id, set()).add(client)
        if isinstance(msg, m.FlushAck | m.BarrierAck | m.WriteAck | m.ReadResponse):
            barrier_done.setdefault(msg.job_id, set()).add(client)

    sim.on_deliver = watch
    sim.activate()

    pending_reads: list[Token] = []
    pending_flushes: dict[Token, int] = {}
    seen_jobs: set[int] = set()
    for _ in range(data.draw(st.integers(5, 40), label="steps")):
        choices = ["write", "read", "flush", "net", "net", "net"]
        what = data.draw(st.sampled_from(choices))
        if what == "net":
            ev = sim.events()
            if ev:
                sim.step(data.draw(st.sampled_from(ev)), data.draw(st.integers(0, 64)))
        elif what == "write":
            start = data.draw(st.integers(0, total - 1))
            n = data.draw(st.integers(1, min(6, total - start)))
            payload = data.draw(st.binary(min_size=1, max_size=1)) * (n * 512)
            t = Token("write")
            sim.apply(sim.up.write(t, start, payload, sim.now))
            assert sim.completed.get(t, "missing") is None, "writes are acked when queued"
            model[start * 512 : (start + n) * 512] = payload
        elif what == "read":
            start = data.draw(st.integers(0, total - 1))
            n = data.draw(st.integers(1, min(6, total - start)))
            t = Token("read", bytes(model[start * 512 : (start + n) * 512]))
            sim.apply(sim.up.read(t, start, n, sim.now))
            pending_reads.append(t)
        else:
            t = Token("flush")
            jid = sim.up.ds.table.next_id
            sim.apply(sim.up.flush(t, sim.now))
            pending_flushes[t] = jid
        seen_jobs |= set(sim.up.ds.table.jobs)
        _check(sim, pending_reads, pending_flushes, flush_acks, seen_jobs)

    sim.settle(lambda n: data.draw(st.integers(0, n - 1)))
    _check(sim, pending_reads, pending_flushes, flush_acks, seen_jobs)
    assert not pending_reads and not pending_flushes
    t = Token("flush")
    sim.apply(sim.up.flush(t, sim.now))
    sim.settle()
    assert sim.completed[t] is None
    assert not sim.up.ds.table.jobs, "a flush finished everywhere retires everything before it"
    for d in sim.ds:
        assert d.region.read(0, total)[1] == bytes(model)


def _check(
    sim: Sim,
    reads: list[Token],
    flushes: dict[Token, int],
    flush_acks: dict[int, set[int]],
    seen: set[int],
) -> None:
    for t in list(reads):
        if t in sim.completed:
            result = sim.completed[t]
            assert not isinstance(result, CrucibleError), result
            assert isinstance(result, tuple)
            assert result[0] == t.expect, "a read saw other writes than those queued before it"
            reads.remove(t)
    for t, jid in list(flushes.items()):
        if t in sim.completed:
            assert sim.completed[t] is None
            assert len(flush_acks.get(jid, ())) >= 2, "flush acked before two downstairs did it"
            del flushes[t]
    # Retired jobs: some flush or barrier at or after them finished on all three.
    done_everywhere = [j for j, who in flush_acks.items() if len(who) == 3]
    for jid in seen - set(sim.up.ds.table.jobs):
        assert any(f >= jid for f in done_everywhere), f"job {jid} retired too early"
