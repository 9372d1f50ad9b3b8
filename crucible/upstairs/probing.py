"""Which of Crucible's probe names a job fires (observe/probes.py), and the
bytes a guest job moves: computed only while something is attached."""

from __future__ import annotations

from crucible.upstairs.jobs import (
    BarrierOp,
    FlushOp,
    Job,
    LiveCloseOp,
    LiveNoOp,
    LiveReopenOp,
    LiveRepairOp,
    ReadOp,
    TrimOp,
    WriteOp,
)

_OP = {
    ReadOp: "read",
    TrimOp: "trim",
    FlushOp: "flush",
    BarrierOp: "barrier",
    LiveCloseOp: "close",
    LiveRepairOp: "repair",
    LiveNoOp: "noop",
    LiveReopenOp: "reopen",
}
# The kinds of guest job, as counted (Downstairs.guest_counts) and reported.
GUEST_OPS = ("read", "write", "write_unwritten", "flush", "barrier", "trim")
_LIVE = (LiveCloseOp, LiveRepairOp, LiveNoOp, LiveReopenOp)


def op_name(job: Job) -> str:
    """read, write, write_unwritten, flush, barrier, trim, close, repair, noop, reopen."""
    op = job.op
    if isinstance(op, WriteOp):
        return "write_unwritten" if op.unwritten else "write"
    return _OP[type(op)]


def is_live(job: Job) -> bool:
    return isinstance(job.op, _LIVE)


def job_bytes(job: Job, block_size: int) -> int:
    """Guest bytes the job reads or writes (0 for the others)."""
    op = job.op
    if isinstance(op, WriteOp):
        return len(op.data)
    if isinstance(op, ReadOp):
        return op.count * block_size
    return 0


def extent_of(job: Job, extent_size: int) -> int | None:
    """The extent a job touches first (None for flushes and barriers)."""
    op = job.op
    if isinstance(op, (WriteOp, ReadOp, TrimOp)):
        return op.start // extent_size if extent_size else None
    if isinstance(op, (LiveCloseOp, LiveRepairOp, LiveReopenOp)):
        return op.extent
    return None
