"""The upstairs' job table entries: one guest-visible operation sent to three downstairs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import Enum

from crucible.protocol import messages as m
from crucible.protocol.wire import SocketAddr


class IOState(Enum):
    IN_PROGRESS = "sent"  # sent, or held for a downstairs that is offline
    DONE = "done"
    SKIPPED = "skipped"
    ERROR = "error"


@dataclass(slots=True)
class WriteOp:
    start: int
    contexts: list[m.BlockContext]
    data: bytes | bytearray | memoryview
    unwritten: bool = False


@dataclass(slots=True)
class ReadOp:
    start: int
    count: int


@dataclass(slots=True)
class TrimOp:
    start: int
    count: int


@dataclass(slots=True)
class FlushOp:
    flush_number: int
    gen: int
    snapshot: str | None = None


@dataclass(slots=True)
class BarrierOp:
    pass


# Live repair of one extent: four jobs with consecutive ids (live_repair.py).
@dataclass(slots=True)
class LiveCloseOp:
    """Flush and close the extent on healthy clients, close it on the targets."""

    extent: int
    flush_number: int
    gen: int
    targets: tuple[int, ...]


@dataclass(slots=True)
class LiveRepairOp:
    """Targets copy the closed extent from the source; the others do nothing."""

    extent: int
    source: int
    source_addr: SocketAddr
    targets: tuple[int, ...]


@dataclass(slots=True)
class LiveNoOp:
    pass


@dataclass(slots=True)
class LiveReopenOp:
    extent: int


LiveOp = LiveCloseOp | LiveRepairOp | LiveNoOp | LiveReopenOp
Op = WriteOp | ReadOp | TrimOp | FlushOp | BarrierOp | LiveOp
LIVE_OPS = (LiveCloseOp, LiveRepairOp, LiveNoOp, LiveReopenOp)
_LIVE_KINDS = {
    LiveCloseOp: "live-close",
    LiveRepairOp: "live-repair",
    LiveNoOp: "live-noop",
    LiveReopenOp: "live-reopen",
}


@dataclass(slots=True)
class Job:
    id: int
    op: Op
    deps: list[int]
    state: list[IOState]
    guest: object | None = None  # token of the guest request waiting on this job
    gw_id: int = 0
    acked: bool = False
    finished: bool = False  # complete on all three and counted as such
    replay: bool = False
    read_contexts: list[m.ReadBlockContext] | None = None
    read_data: m.Data | None = None
    errors: list[str] = field(default_factory=list)
    nbytes: int = 0  # write payload: what backpressure and barriers count
    # A live close's (gen, flush, dirty) from each client.
    closed: dict[int, tuple[int, int, bool]] = field(default_factory=dict)
    # Clients being live-repaired when this job was queued: their copy is partial.
    partial: tuple[int, ...] = ()

    def count(self, s: IOState) -> int:
        return sum(1 for x in self.state if x is s)

    @property
    def complete(self) -> bool:
        return IOState.IN_PROGRESS not in self.state

    @property
    def is_flush_like(self) -> bool:
        return isinstance(self.op, FlushOp | BarrierOp)

    @property
    def kind(self) -> str:
        op = self.op
        if isinstance(op, WriteOp):
            return "write_unwritten" if op.unwritten else "write"
        if isinstance(op, ReadOp):
            return "read"
        if isinstance(op, TrimOp):
            return "trim"
        if isinstance(op, FlushOp):
            return "flush"
        if isinstance(op, BarrierOp):
            return "barrier"
        return _LIVE_KINDS[type(op)]

    def message(
        self,
        up: uuid.UUID,
        sess: uuid.UUID,
        deps: list[int],
        client: int = -1,
        extent_limit: int | None = None,
    ) -> m.Message:
        """The job as sent to `client` (live-repair jobs differ per client; a
        flush to a client under repair only covers the extents repaired so far)."""
        op = self.op
        if isinstance(op, WriteOp):
            cls = m.WriteUnwritten if op.unwritten else m.Write
            return cls(up, sess, self.id, deps, op.start, op.contexts, op.data)
        if isinstance(op, ReadOp):
            return m.ReadRequest(up, sess, self.id, deps, op.start, op.count)
        if isinstance(op, TrimOp):
            return m.Trim(up, sess, self.id, deps, op.start, op.count)
        if isinstance(op, FlushOp):
            return m.Flush(
                up, sess, self.id, deps, op.flush_number, op.gen, op.snapshot, extent_limit
            )
        if isinstance(op, BarrierOp):
            return m.Barrier(up, sess, self.id, deps)
        if isinstance(op, LiveCloseOp):
            if client in op.targets:
                return m.ExtentLiveClose(up, sess, self.id, deps, op.extent)
            return m.ExtentLiveFlushClose(
                up, sess, self.id, deps, op.extent, op.flush_number, op.gen
            )
        if isinstance(op, LiveRepairOp) and client in op.targets:
            return m.ExtentLiveRepair(up, sess, self.id, deps, op.extent, op.source, op.source_addr)
        if isinstance(op, LiveReopenOp):
            return m.ExtentLiveReopen(up, sess, self.id, deps, op.extent)
        return m.ExtentLiveNoOp(up, sess, self.id, deps)
