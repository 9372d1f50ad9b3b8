"""Live repair under the simulated network: a downstairs is faulted, comes
back and is repaired extent by extent while guest IO goes on in any
interleaving; sometimes the target or the source dies mid-repair. Reads
always see the writes queued before them, acked flushes reached two full
copies, and at the end the three regions hold exactly the guest's data."""

from __future__ import annotations

import errno
import itertools
import random
import tempfile
import uuid
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crucible.common.errors import CrucibleError
from crucible.protocol import messages as m
from crucible.upstairs.downstairs import REPAIR_ATTEMPTS, REPAIR_BACKOFF, REPAIR_BACKOFF_MAX
from crucible.upstairs.options import Options
from crucible.upstairs.state import Mode, Stage
from tests.upstairs.guest_model import GuestModel, Token
from tests.upstairs.sim import Sim

BS = 512
ES = 4
EC = 8
TOTAL = ES * EC


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 1 << 32),
    victim=st.integers(0, 2),
    trouble=st.sampled_from(["none", "target", "source"]),
    steps=st.integers(50, 400),
)
def test_live_repair_under_io(seed: int, victim: int, trouble: str, steps: int) -> None:
    """`trouble`: nothing else goes wrong, or the target, or the source, dies mid-repair."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = Options(offline_max_jobs=3, reconnect_delay=1.0, log_jobs=False)
        sim = Sim(Path(tmp), es=ES, ec=EC, options=opts)
        sim.allow_drops = True
        try:
            _run(sim, random.Random(seed), victim, trouble, steps)
        finally:
            sim.close()


def _states(sim: Sim) -> list[Stage]:
    return [c.stage for c in sim.up.clients]


def _run(sim: Sim, rnd: random.Random, victim: int, trouble: str, steps: int) -> None:
    # Here jobs also retire past a faulted client, and a flush may fail while
    # two downstairs are out (it says so): the other rules are the same.
    g = GuestModel(sim, TOTAL, retire_rule=False)
    copies: list[int] = []

    def watch(client: int, msg: m.Message) -> None:
        g.watch(client, msg)
        if isinstance(msg, m.ExtentLiveRepairAckId):
            copies.append(client)

    sim.on_deliver = watch
    sim.activate()

    def write() -> None:
        start = rnd.randrange(TOTAL)
        n = rnd.randint(1, min(2 * ES, TOTAL - start))
        g.write(start, rnd.randbytes(1) * (n * BS))  # refused writes change nothing

    def step(kinds: list[str]) -> None:
        what = rnd.choice(kinds)
        if what == "net":
            ev = sim.events()
            if ev:
                sim.step(rnd.choice(ev), rnd.randrange(64))
        elif what == "tick":
            sim.tick(0.4)
        elif what == "write":
            write()
        elif what == "read":
            start = rnd.randrange(TOTAL)
            g.read(start, rnd.randint(1, min(2 * ES, TOTAL - start)))
        elif what == "flush":
            g.flush()
        g.check(failed_flushes_allowed=True)

    for _ in range(6):
        write()
    sim.settle()
    sim.kill(victim)
    for _ in range(20):
        write()  # held for it until there are too many
        sim.tick(0.1)
    assert sim.up.clients[victim].mode is Mode.FAULTED
    sim.revive(victim)
    for _ in range(10_000):  # it reconnects and the repair begins
        if sim.up.ds.repair is not None:
            break
        ev = sim.events()
        if ev:
            sim.step(ev[0])
        else:
            sim.tick(0.4)
    assert sim.up.ds.repair is not None and sim.up.ds.repair.targets == [victim]

    mix = ["write", "read", "flush", "tick"] + ["net"] * 8
    trouble_at = rnd.randrange(EC // 2)
    for _ in range(steps):
        step(mix)
        rep = sim.up.ds.repair
        if trouble != "none" and rep is not None and rep.extent >= trouble_at:
            who = rep.targets[0] if trouble == "target" else rep.source
            sim.kill(who)
            trouble = "none"
            sim.revive(who)  # it reconnects, is faulted and repaired like the first

    # Let everything heal: bounded rounds of delivering and ticking.
    for _ in range(400):
        sim.settle(lambda n: rnd.randrange(n))
        if _states(sim) == [Stage.ACTIVE] * 3 and sim.up.ds.repair is None:
            break
        sim.tick(0.4)
    assert _states(sim) == [Stage.ACTIVE] * 3, _states(sim)
    assert sim.up.ds.live_repairs >= 1
    assert copies, "the faulted downstairs missed writes: some extent must have been copied"
    g.check(failed_flushes_allowed=True)
    g.finish()
    for d in sim.ds:
        assert not any(d.region.is_closed(e) for e in range(EC))
    versions = [d.region.extent_versions() for d in sim.ds]
    assert versions[0] == versions[1] == versions[2]


def _faulted_2(tmp_path: Path) -> Sim:
    """An active volume whose downstairs 2 is down and missed writes (it
    will need a live repair when it returns)."""
    sim = Sim(tmp_path, es=ES, ec=EC, options=Options(offline_max_jobs=3, log_jobs=False))
    sim.allow_drops = True
    sim.activate()
    sim.kill(2)
    for i in range(6):
        sim.apply(sim.up.write(Token("write"), i, b"a" * BS, sim.now))
        sim.settle()
    return sim


def test_takeover_during_repair_answers_parked_flushes(tmp_path: Path) -> None:
    """Two downstairs out, one being repaired: a guest flush waits for the
    repair. If another upstairs takes over meanwhile, the flush fails (it does
    not hang), and a later activation starts from a clean slate."""
    sim = _faulted_2(tmp_path)
    try:
        sim.revive(2)
        sim.tick(2.0)
        for _ in range(10_000):  # until the repair has begun
            if sim.up.ds.repair is not None:
                break
            sim.step(sim.events()[0])
        sim.kill(0)  # now only client 1 holds all data
        flush = Token("flush")
        sim.apply(sim.up.write(Token("write"), 20, b"b" * BS, sim.now))
        sim.apply(sim.up.flush(flush, sim.now))
        for _ in range(10_000):
            if sim.up.ds.table.parked or not sim.events():
                break
            sim.step(sim.events()[0])
        assert sim.up.ds.table.parked, "the flush waits for the repair"
        other = m.YouAreNoLongerActive(uuid.uuid4(), uuid.uuid4(), 5)
        sim.apply(sim.up.received(1, other, sim.now))
        result = sim.completed.get(flush)
        assert isinstance(result, CrucibleError) and "took over" in str(result)
        assert sim.up.ds.repair is None and not sim.up.ds.table.parked
    finally:
        sim.close()


def test_all_three_faulted_are_reconciled(tmp_path: Path) -> None:
    """Every downstairs faulted (none left to copy from): when they return
    they are compared and reconciled in place, and the volume serves again
    with every flushed write."""
    opts = Options(degraded_timeout=1.0, reconnect_delay=1.0, log_jobs=False)
    sim = Sim(tmp_path, es=ES, ec=EC, options=opts)
    sim.allow_drops = True
    rnd = random.Random(7)
    model = bytearray(TOTAL * BS)
    try:
        sim.activate()
        for _ in range(20):
            start = rnd.randrange(TOTAL - 4)
            data = rnd.randbytes(1) * (4 * BS)
            sim.apply(sim.up.write(Token("write"), start, data, sim.now))
            model[start * BS : (start + 4) * BS] = data
        flush = Token("flush")
        sim.apply(sim.up.flush(flush, sim.now))
        sim.settle(lambda n: rnd.randrange(n))
        assert sim.completed[flush] is None
        sim.apply(sim.up.write(Token("write"), 0, b"\x01" * BS, sim.now))  # reaches only one
        sim.step(("to_ds", 0))
        sim.step(("disk", 0))
        for i in range(3):
            sim.kill(i)
        for _ in range(5):
            sim.tick(0.5)  # past the degraded timeout: all faulted
        assert all(c.mode is Mode.FAULTED for c in sim.up.clients)
        for i in range(3):
            sim.revive(i)
        for _ in range(50):
            sim.tick(0.5)
            sim.settle(lambda n: rnd.randrange(n))
            if _states(sim) == [Stage.ACTIVE] * 3:
                break
        assert _states(sim) == [Stage.ACTIVE] * 3
        stored = max(f for d in sim.ds for f in d.region.extent_versions()[1])
        assert sim.up.ds.table.next_flush > stored, (
            "the next flush number must be new to every extent"
        )
        read = Token("read")
        sim.apply(sim.up.read(read, 1, TOTAL - 1, sim.now))
        sim.settle()
        result = sim.completed[read]
        assert isinstance(result, tuple) and result[0] == bytes(model[BS:])
        flush = Token("flush")
        sim.apply(sim.up.write(Token("write"), 5, b"\x02" * BS, sim.now))
        sim.apply(sim.up.flush(flush, sim.now))
        sim.settle()
        assert sim.completed[flush] is None
        blocks = [d.region.read(0, TOTAL)[1] for d in sim.ds]
        assert blocks[0] == blocks[1] == blocks[2], "replicas differ after reconciliation"
        versions = [d.region.extent_versions() for d in sim.ds]
        assert versions[0] == versions[1] == versions[2]
    finally:
        sim.close()


def test_failing_repair_backs_off(tmp_path: Path) -> None:
    """A target whose repair fails every time (its disk is full) is tried
    again after 1, 2, 4 ... s, then only every REPAIR_BACKOFF_MAX, with the
    reason in its status; restarting it makes the next try immediate."""
    sim = _faulted_2(tmp_path)
    good_fetch = sim.ds[0].fetch

    def full(addr: object, eid: int, out: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        for d in sim.ds:
            d.fetch = full
        sim.revive(2)
        starts: list[float] = []  # when each try failed
        while sim.now < 4000:
            sim.tick(0.25)
            sim.settle()
            if sim.up.ds.live_repairs_aborted > len(starts):
                starts.append(sim.now)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert 10 <= len(starts) < 20, starts  # not once a second: 4000 tries
        for n, gap in enumerate(gaps[: REPAIR_ATTEMPTS - 1]):
            assert gap >= REPAIR_BACKOFF * 2**n, (n, gaps)
        assert all(g >= REPAIR_BACKOFF_MAX for g in gaps[REPAIR_ATTEMPTS - 1 :]), gaps
        status = sim.up.clients[2].last_error
        assert "live repair failed" in status and "No space left" in status, status
        # Space appears and the downstairs is restarted: repaired at once.
        for d in sim.ds:
            d.fetch = good_fetch
        sim.kill(2)
        sim.revive(2)
        for _ in range(40):
            sim.tick(0.25)
            sim.settle()
        assert _states(sim) == [Stage.ACTIVE] * 3, _states(sim)
    finally:
        sim.close()
