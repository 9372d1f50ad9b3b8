"""A simulated network for the sans-IO upstairs and downstairs.

Three real DownstairsCore + Region pairs (small regions in a temp dir) and one
UpstairsCore exchange messages over per-direction FIFO links (as TCP keeps
order on one connection); a chooser decides which link delivers next, which
downstairs runs its next disk work, and when guest IO arrives, so replies
from different downstairs are delayed and reordered in every way. A
connection can be cut (what was in flight is lost) and made again; live
repair copies extent files between the regions directly.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from crucible.common.definition import RegionDefinition
from crucible.downstairs import core as dcore
from crucible.downstairs import ops
from crucible.protocol import codec
from crucible.protocol import messages as m
from crucible.protocol.capabilities import Capabilities
from crucible.protocol.framing import FrameDecoder
from crucible.protocol.wire import SocketAddr
from crucible.region.allocation import allocated_runs
from crucible.region.layout import extent_path
from crucible.region.region import Region
from crucible.upstairs import actions as ua
from crucible.upstairs.core import UpstairsCore
from crucible.upstairs.options import Options


def _wire(msg: m.Message) -> m.Message:
    """Through the codec, as on a real socket."""
    dec = FrameDecoder()
    dec.feed(codec.encode(msg))
    out = dec.next_message()
    assert out is not None
    return out


class SimDownstairs:
    def __init__(self, path: Path, definition: RegionDefinition, repair_port: int) -> None:
        self.region = Region.create(path, definition)
        self.repair_addr: SocketAddr = ("127.0.0.1", repair_port)
        self.core = dcore.DownstairsCore(definition, False, self.repair_addr)
        self.conn = 1
        self.inbox: deque[m.Message] = deque()  # upstairs -> downstairs
        self.outbox: deque[m.Message] = deque()  # downstairs -> upstairs
        self.work: deque[dcore.Execute] = deque()
        self.fetch = _no_fetch
        self.down = False
        self.received: list[type] = []  # every message type it was given

    @property
    def capabilities(self) -> Capabilities:
        """What its repair server reports, and what its core takes."""
        return self.core.capabilities

    @capabilities.setter
    def capabilities(self, caps: Capabilities) -> None:
        self.core.capabilities = caps

    def cut(self) -> None:
        """The connection breaks: whatever was on the wire is lost."""
        self.inbox.clear()
        self.outbox.clear()
        self.apply(self.core.disconnected(self.conn))
        self.conn += 1

    def apply(self, actions: list[dcore.Action]) -> None:
        for a in actions:
            if isinstance(a, dcore.Send):
                self.outbox.append(_wire(a.msg))
            elif isinstance(a, dcore.Execute):
                self.work.append(a)
            elif isinstance(a, dcore.Disconnect):
                raise AssertionError(f"downstairs dropped the upstairs: {a.reason}")

    def deliver(self) -> None:
        msg = self.inbox.popleft()
        self.received.append(type(msg))
        self.apply(self.core.received(self.conn, msg))

    def run_work(self, pick: int = 0) -> None:
        """Run one queued piece of disk work; any of them may go first (the
        dependency rules, not arrival order, are what must keep IO correct)."""
        ex = self.work[pick % len(self.work)]
        del self.work[pick % len(self.work)]
        if self.core.wants(ex.conn):
            outcome = ops.run(self.region, ex.work, self.fetch)
            self.apply(self.core.finished(ex.conn, ex.work, outcome))


def _no_fetch(addr: SocketAddr, eid: int, out: BinaryIO) -> None:
    raise AssertionError("no repair in this simulation")


class Sim:
    def __init__(
        self,
        base: Path,
        es: int = 8,
        ec: int = 4,
        options: Options | None = None,
        one_host: bool = False,
    ) -> None:
        """`one_host`: the three downstairs' addresses name one host."""
        encrypted = options is not None and options.cipher is not None
        d = RegionDefinition(512, es, ec, uuid.uuid4(), encrypted)
        self.ds = [SimDownstairs(base / f"ds{i}", d, 4000 + i) for i in range(3)]
        for x in self.ds:
            x.fetch = self._fetch
        hosts = ["10.0.0.1"] * 3 if one_host else ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        self.up = UpstairsCore([(h, 4000 + i) for i, h in enumerate(hosts)], options)
        self.now = 0.0
        self.completed: dict[object, object] = {}
        self.on_deliver: Callable[[int, m.Message], None] | None = None
        self.allow_drops = False
        self.asked: list[ua.FetchAllocation] = []  # maps of allocation asked for
        self.retried: set[object] = set()  # requests whose read went to a second replica

    def _fetch(self, addr: SocketAddr, eid: int, out: BinaryIO) -> None:
        src = next(d for d in self.ds if d.repair_addr == addr)
        assert src.region.is_closed(eid), "live repair copies only a closed extent"
        out.write(extent_path(src.region.dir, eid).read_bytes())

    def activate(self, gen: int = 1) -> None:
        """Activate and let negotiation finish."""
        tok = object()
        self.apply(self.up.activate(tok, gen, self.now))
        self.settle()
        assert self.completed[tok] is None

    def kill(self, i: int) -> None:
        """Downstairs i goes away (until `revive`): its connection is cut."""
        self.ds[i].down = True
        self.ds[i].cut()
        self.apply(self.up.disconnected(i, self.now))

    def revive(self, i: int) -> None:
        self.ds[i].down = False

    def corrupt(self, i: int, block: int) -> None:
        """Flip a byte of one block's data in downstairs i's extent file, as
        a failing disk would."""
        d = self.ds[i].region
        es, bs = d.definition.extent_size, d.definition.block_size
        with open(extent_path(d.dir, block // es), "r+b") as f:
            f.seek((block % es) * bs + 7)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x5A]))

    def tick(self, dt: float) -> None:
        self.now += dt
        self.apply(self.up.tick(self.now))

    def apply(self, actions: list[ua.Action]) -> None:
        for a in actions:
            if isinstance(a, ua.Send):
                self.ds[a.client].inbox.append(_wire(a.msg))
            elif isinstance(a, ua.Connect):
                d = self.ds[a.client]
                if d.down:
                    self.apply(self.up.connect_failed(a.client, "refused", self.now))
                    continue
                d.apply(d.core.connected(d.conn, "sim"))
                self.apply(self.up.connected(a.client, self.now))
            elif isinstance(a, ua.Probe):
                caps = self.ds[a.client].capabilities
                self.apply(self.up.probed(a.client, a.attempt, caps, self.now))
            elif isinstance(a, ua.FetchAllocation):
                self.asked.append(a)  # answered as an event of its own
            elif isinstance(a, ua.Complete):
                assert a.token not in self.completed, "a request completed twice"
                self.completed[a.token] = a.result
                if any(j.guest is a.token and j.retried for j in self.up.ds.table):
                    self.retried.add(a.token)
            elif isinstance(a, ua.Drop):
                if not self.allow_drops:
                    raise AssertionError(f"upstairs dropped downstairs {a.client}: {a.reason}")
                self.ds[a.client].cut()
                self.apply(self.up.disconnected(a.client, self.now))

    def events(self) -> list[tuple[str, int]]:
        """Everything that could happen next."""
        ev: list[tuple[str, int]] = []
        for i, d in enumerate(self.ds):
            if d.inbox:
                ev.append(("to_ds", i))
            if d.outbox:
                ev.append(("to_up", i))
            if d.work:
                ev.append(("disk", i))
        ev += [("alloc", i) for i in range(len(self.asked))]
        return ev

    def step(self, event: tuple[str, int], pick: int = 0) -> None:
        kind, i = event
        if kind == "alloc":  # the repair server's answer, from the files as they are now
            ask = self.asked.pop(i)
            d = self.ds[ask.client]
            runs = allocated_runs(d.region.dir, d.region.definition)
            self.apply(self.up.allocation_fetched(ask.epoch, runs))
            return
        d = self.ds[i]
        if kind == "to_ds":
            d.deliver()
        elif kind == "disk":
            d.run_work(pick)
        else:
            msg = d.outbox.popleft()
            if self.on_deliver is not None:
                self.on_deliver(i, msg)
            self.apply(self.up.received(i, msg, self.now))

    def settle(self, choose: Callable[[int], int] | None = None, limit: int = 100_000) -> None:
        for _ in range(limit):
            ev = self.events()
            if not ev:
                return
            self.step(ev[choose(len(ev)) if choose else 0], choose(1 << 16) if choose else 0)
        raise AssertionError("simulation did not settle")

    def close(self) -> None:
        for d in self.ds:
            d.region.close()
