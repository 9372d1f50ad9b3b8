"""The upstairs' job table entries: one guest-visible operation sent to three downstairs."""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import assert_never

import xxhash

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
    to: int | None = None  # a rewrite of bad blocks: this client only (rewrite.py)


@dataclass(slots=True)
class ReadOp:
    start: int
    count: int
    # Fetches a good copy of blocks that are bad on this client, for them to
    # be rewritten there (rewrite.py).
    mend: int | None = None
    # To all three, the replies' contexts compared (the background verify).
    compare: bool = False


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
FLUSH_LIKE = (FlushOp, BarrierOp)  # complete every job before them
WRITE_LIKE = (WriteOp, TrimOp)  # change blocks
# Sent to each client as its own message (see Downstairs._message_for).
PER_CLIENT = (*LIVE_OPS, TrimOp)


def zero_fill(start: int, count: int, block_size: int) -> WriteOp:
    """Blocks written with zeros: what a trim becomes for a downstairs that
    cannot trim (the zeros are one shared buffer per size)."""
    data = _zeros(count * block_size)
    ctx = m.BlockContext(zero_hash(block_size))
    return WriteOp(start, [ctx] * count, data)


@functools.lru_cache(maxsize=8)
def _zeros(n: int) -> bytes:
    return bytes(n)


@functools.lru_cache(maxsize=8)
def zero_hash(block_size: int) -> int:
    """The context hash of an all-zero block."""
    return xxhash.xxh64_intdigest(bytes(block_size))


# What one replica said for a comparing read: contexts, data, and the blocks
# that failed their own check.
Reply = tuple[list[m.ReadBlockContext], m.Data, set[int]]


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
    retried: bool = False  # a read queued again for another replica after one failed it
    avoid: tuple[int, ...] = ()  # clients a read must not go to (they failed it)
    replies: dict[int, Reply] = field(default_factory=dict)  # of a comparing read
    read_contexts: list[m.ReadBlockContext] | None = None
    read_data: m.Data | None = None  # as stored: sealed, in an encrypted volume
    read_plain: bytearray | None = None  # then, what the guest gets
    # A read whose replies each had bad blocks: the blocks that verified so far,
    # and which are still missing. Acked once none are.
    read_pieces: tuple[bytearray, list[m.ReadBlockContext], set[int]] | None = None
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
        return isinstance(self.op, FLUSH_LIKE)

    @property
    def kind(self) -> str:
        op = self.op
        match op:
            case WriteOp():
                if op.to is not None:
                    return "rewrite"
                return "write_unwritten" if op.unwritten else "write"
            case ReadOp():
                if op.compare:
                    return "comparing read"
                return "read" if op.mend is None else "mending read"
            case TrimOp():
                return "trim"
            case FlushOp():
                return "flush"
            case BarrierOp():
                return "barrier"
            case LiveCloseOp():
                return "live-close"
            case LiveRepairOp():
                return "live-repair"
            case LiveNoOp():
                return "live-noop"
            case LiveReopenOp():
                return "live-reopen"
            case _:
                assert_never(op)

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
        jid = self.id
        match op:
            case WriteOp():
                cls = m.WriteUnwritten if op.unwritten else m.Write
                return cls(up, sess, jid, deps, op.start, op.contexts, op.data)
            case ReadOp():
                return m.ReadRequest(up, sess, jid, deps, op.start, op.count)
            case TrimOp():
                return m.Trim(up, sess, jid, deps, op.start, op.count)
            case FlushOp():
                fl, gen, snap = op.flush_number, op.gen, op.snapshot
                return m.Flush(up, sess, jid, deps, fl, gen, snap, extent_limit)
            case BarrierOp():
                return m.Barrier(up, sess, jid, deps)
            case LiveCloseOp():
                if client in op.targets:
                    return m.ExtentLiveClose(up, sess, jid, deps, op.extent)
                fl, gen = op.flush_number, op.gen
                return m.ExtentLiveFlushClose(up, sess, jid, deps, op.extent, fl, gen)
            case LiveRepairOp():
                if client not in op.targets:
                    return m.ExtentLiveNoOp(up, sess, jid, deps)
                src, addr = op.source, op.source_addr
                return m.ExtentLiveRepair(up, sess, jid, deps, op.extent, src, addr)
            case LiveNoOp():
                return m.ExtentLiveNoOp(up, sess, jid, deps)
            case LiveReopenOp():
                return m.ExtentLiveReopen(up, sess, jid, deps, op.extent)
            case _:
                assert_never(op)
