"""The upstairs' job table entries: one guest-visible operation sent to three downstairs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import Enum

from crucible.protocol import messages as m


class IOState(Enum):
    IN_PROGRESS = "sent"  # sent, or held for a downstairs that is offline
    DONE = "done"
    SKIPPED = "skipped"
    ERROR = "error"


@dataclass(slots=True)
class WriteOp:
    start: int
    contexts: list[m.BlockContext]
    data: bytes | memoryview
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


Op = WriteOp | ReadOp | TrimOp | FlushOp | BarrierOp


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
    read_data: bytes | None = None
    errors: list[str] = field(default_factory=list)
    nbytes: int = 0  # write payload: what backpressure and barriers count

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
        return "flush" if isinstance(op, FlushOp) else "barrier"

    def message(self, up: uuid.UUID, sess: uuid.UUID, deps: list[int]) -> m.Message:
        op = self.op
        if isinstance(op, WriteOp):
            cls = m.WriteUnwritten if op.unwritten else m.Write
            return cls(up, sess, self.id, deps, op.start, op.contexts, op.data)
        if isinstance(op, ReadOp):
            return m.ReadRequest(up, sess, self.id, deps, op.start, op.count)
        if isinstance(op, TrimOp):
            return m.Trim(up, sess, self.id, deps, op.start, op.count)
        if isinstance(op, FlushOp):
            return m.Flush(up, sess, self.id, deps, op.flush_number, op.gen, op.snapshot, None)
        return m.Barrier(up, sess, self.id, deps)
