"""The upstairs' job table entries: one guest-visible operation sent to three downstairs."""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import assert_never

import xxhash

import crucible.protocol.messages as m
from crucible.common.buffer import Buffer, zeros
from crucible.protocol.wire import SocketAddr


class IOState(Enum):
    IN_PROGRESS = "sent"  # sent, or held for a downstairs that is offline
    DONE = "done"
    SKIPPED = "skipped"
    ERROR = "error"


# init=False and an __init__ of its own: compiled with mypyc, the one a
# dataclass generates runs interpreted, at several times the cost per object.
@dataclass(slots=True, init=False)
class WriteOp:
    start: int
    contexts: m.Contexts
    data: Buffer
    unwritten: bool
    to: int | None  # a rewrite of bad blocks: this client only (rewrite.py)

    def __init__(
        self,
        start: int,
        contexts: m.Contexts,
        data: Buffer,
        unwritten: bool = False,
        to: int | None = None,
    ) -> None:
        self.start = start
        self.contexts = contexts
        self.data = data
        self.unwritten = unwritten
        self.to = to


@dataclass(slots=True, init=False)
class ReadOp:
    start: int
    count: int
    # Fetches a good copy of blocks that are bad on this client, for them to
    # be rewritten there (rewrite.py).
    mend: int | None
    # To all three, the replies' contexts compared (the background verify).
    compare: bool

    def __init__(
        self, start: int, count: int, mend: int | None = None, compare: bool = False
    ) -> None:
        self.start = start
        self.count = count
        self.mend = mend
        self.compare = compare


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
    data = zeros(count * block_size)
    ctx = m.BlockContext(zero_hash(block_size))
    return WriteOp(start, [ctx] * count, data)


@functools.lru_cache(maxsize=8)
def zero_hash(block_size: int) -> int:
    """The context hash of an all-zero block."""
    return xxhash.xxh64_intdigest(bytes(block_size))


# What one replica said for a comparing read: contexts, data, and the blocks
# that failed their own check.
Reply = tuple[list[m.ReadBlockContext], m.Data, set[int]]


@dataclass(slots=True, init=False)  # init=False: see WriteOp
class Job:
    id: int
    op: Op
    deps: list[int]
    state: list[IOState]
    guest: object | None  # token of the guest request waiting on this job
    gw_id: int
    acked: bool
    finished: bool  # complete on all three and counted as such
    replay: bool
    retried: bool  # a read queued again for another replica after one failed it
    avoid: tuple[int, ...]  # clients a read must not go to (they failed it)
    replies: dict[int, Reply]  # of a comparing read
    read_contexts: list[m.ReadBlockContext] | None
    read_data: m.Data | None  # as stored: sealed, in an encrypted volume
    read_plain: bytearray | None  # then, what the guest gets
    # A read whose replies each had bad blocks: the blocks that verified so far,
    # and which are still missing. Acked once none are.
    read_pieces: tuple[bytearray, list[m.ReadBlockContext], set[int]] | None
    errors: list[str]
    nbytes: int  # write payload: what backpressure and barriers count
    # A live close's (gen, flush, dirty) from each client.
    closed: dict[int, tuple[int, int, bool]]
    # Clients being live-repaired when this job was queued: their copy is partial.
    partial: tuple[int, ...]
    queued: float  # when, by the probes' clock (set only while probes are attached)
    is_flush_like: bool  # a flush or barrier (asked several times per job: kept)

    def __init__(
        self,
        id: int,
        op: Op,
        deps: list[int],
        state: list[IOState],
        guest: object | None = None,
        gw_id: int = 0,
    ) -> None:
        self.id = id
        self.op = op
        self.deps = deps
        self.state = state
        self.guest = guest
        self.gw_id = gw_id
        self.acked = False
        self.finished = False
        self.replay = False
        self.retried = False
        self.avoid = ()
        self.replies = {}
        self.read_contexts = None
        self.read_data = None
        self.read_plain = None
        self.read_pieces = None
        self.errors = []
        self.nbytes = 0
        self.closed = {}
        self.partial = ()
        self.queued = 0.0
        self.is_flush_like = isinstance(op, FLUSH_LIKE)

    def count(self, s: IOState) -> int:
        return sum(1 for x in self.state if x is s)

    @property
    def complete(self) -> bool:
        return IOState.IN_PROGRESS not in self.state

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
