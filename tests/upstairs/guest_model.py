"""A guest of a simulated volume: what it asked for, and the rules every
answer must keep, checked after every step of a simulation.

* A read sees exactly the writes queued before it; one retried on another
  replica may also see, block by block, writes queued while it was out
  (either order is what a disk allows for IO in flight together).
* A flush is acked only once two downstairs have done it.
* A job retires only after a flush or barrier at or after it finished on
  all three (`retire_rule`; live repair also retires past a faulted client).
* In the end, after a last flush, every replica holds exactly the guest's data.
* Where the volume's map of allocation is known, every block written since
  its last trim is allocated, and every block it calls a hole reads zeros.
"""

from __future__ import annotations

from crucible.common.errors import CrucibleError
from crucible.protocol import messages as m
from crucible.upstairs.verify import check_blocks
from tests.upstairs.sim import Sim

BS = 512


class Token:
    def __init__(self, kind: str, expect: bytes | None = None, start: int = 0) -> None:
        self.kind = kind
        self.expect = expect
        self.start = start
        self.later: list[tuple[int, bytes]] = []  # (start, data) queued while a read is out

    def allows(self, got: bytes, retried: bool) -> bool:
        """Whether a read's answer is one it may give (see the module doc)."""
        if got == self.expect:
            return True
        if not retried or self.expect is None or len(got) != len(self.expect):
            return False
        for i in range(len(got) // BS):
            block = self.start + i
            have = got[i * BS : (i + 1) * BS]
            may = {self.expect[i * BS : (i + 1) * BS]}
            for s, data in self.later:
                if s <= block < s + len(data) // BS:
                    may.add(data[(block - s) * BS : (block - s + 1) * BS])
            if have not in may:
                return False
        return True


class GuestModel:
    def __init__(self, sim: Sim, total: int, retire_rule: bool = True) -> None:
        self.sim = sim
        self.total = total
        self.data = bytearray(total * BS)
        self.written = bytearray(total)  # 1: written since its last trim
        self.reads: list[Token] = []
        self.flushes: dict[Token, int] = {}  # the flush's job id
        self.flush_acks: dict[int, set[int]] = {}  # job id: clients that acked it
        self.seen: set[int] = set()  # every job id seen in the table
        self.retire_rule = retire_rule
        sim.on_deliver = self.watch

    def watch(self, client: int, msg: m.Message) -> None:
        if isinstance(msg, m.FlushAck | m.BarrierAck):
            self.flush_acks.setdefault(msg.job_id, set()).add(client)

    def write(self, start: int, payload: bytes) -> object:
        """Queue a write; what it completed with (refused writes change nothing)."""
        t = Token("write")
        sim = self.sim
        sim.apply(sim.up.write(t, start, payload, sim.now))
        if sim.completed[t] is None:
            self.data[start * BS : start * BS + len(payload)] = payload
            self.written[start : start + len(payload) // BS] = b"\x01" * (len(payload) // BS)
            self._later(start, payload)
        return sim.completed[t]

    def _later(self, start: int, data: bytes) -> None:
        for r in self.reads:
            if r not in self.sim.completed:
                r.later.append((start, data))

    def trim(self, start: int, n: int) -> object:
        t = Token("trim")
        sim = self.sim
        sim.apply(sim.up.trim(t, start, n, sim.now))
        if sim.completed[t] is None:
            self.data[start * BS : (start + n) * BS] = bytes(n * BS)
            self.written[start : start + n] = bytes(n)
            self._later(start, bytes(n * BS))
        return sim.completed[t]

    def read(self, start: int, n: int) -> None:
        t = Token("read", bytes(self.data[start * BS : (start + n) * BS]), start)
        self.sim.apply(self.sim.up.read(t, start, n, self.sim.now))
        self.reads.append(t)

    def flush(self) -> None:
        t = Token("flush")
        jid = self.sim.up.ds.table.next_id
        self.sim.apply(self.sim.up.flush(t, self.sim.now))
        self.flushes[t] = jid

    def check(self, failed_flushes_allowed: bool = False) -> None:
        """The rules, for everything answered since the last check."""
        sim = self.sim
        self.seen.update(sim.up.ds.table.jobs)
        for t in list(self.reads):
            if t in sim.completed:
                result = sim.completed[t]
                assert not isinstance(result, CrucibleError), result
                assert isinstance(result, tuple)
                ok = t.allows(bytes(result[0]), t in sim.retried)
                assert ok, "a read saw other writes than those queued before it"
                self.reads.remove(t)
        for t, jid in list(self.flushes.items()):
            if t not in sim.completed:
                continue
            if failed_flushes_allowed and isinstance(sim.completed[t], CrucibleError):
                del self.flushes[t]  # it said so: while two are out a flush cannot be durable
                continue
            assert sim.completed[t] is None
            acks = self.flush_acks.get(jid, ())
            assert len(acks) >= 2, "flush acked before two downstairs did it"
            del self.flushes[t]
        self.check_allocation()
        if self.retire_rule:
            done_everywhere = [j for j, who in self.flush_acks.items() if len(who) == 3]
            for jid in self.seen - set(sim.up.ds.table.jobs):
                assert any(f >= jid for f in done_everywhere), f"job {jid} retired too early"

    def check_allocation(self) -> None:
        runs = self.sim.up.allocation(0, self.total)
        if runs is None:
            return
        assert sum(n for _, n, _ in runs) == self.total
        for start, n, allocated in runs:
            if allocated:
                continue
            assert not any(self.written[start : start + n]), "a written block is called a hole"
            assert not any(self.data[start * BS : (start + n) * BS]), "a hole that is not zeros"

    def finish(self) -> None:
        """Nothing pending; a last flush retires everything; every replica
        holds exactly the guest's data."""
        sim = self.sim
        assert not self.reads and not self.flushes
        t = Token("flush")
        sim.apply(sim.up.flush(t, sim.now))
        sim.settle()
        assert sim.completed[t] is None
        assert not sim.up.ds.table.jobs, "a flush finished everywhere retires everything before it"
        cipher = sim.up.opts.cipher
        for d in sim.ds:
            ctxs, got = d.region.read(0, self.total)
            if cipher is not None:  # what it holds, opened
                bad, plain = check_blocks(0, BS, "replica", ctxs, got, cipher)
                assert not bad and plain is not None, bad
                got = bytes(plain)
            assert got == bytes(self.data), "a replica differs from the guest data"
