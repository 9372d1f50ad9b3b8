"""Which of Crucible's probe names a job fires (observe/probes.py), and the
bytes a guest job moves: computed only while something is attached."""

from __future__ import annotations

from typing import Final, NamedTuple

from crucible.observe.probes import UP, Probe
from crucible.upstairs.jobs import (
    LIVE_OPS,
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


class Names(NamedTuple):
    """The probes one kind of job fires."""

    op: str
    gw_start: Probe
    gw_done: Probe
    to_ds: Probe | None  # up__to__ds__*__start (none for live-repair jobs)
    client_start: Probe
    client_done: Probe
    live: bool


def _names(op: str, live: bool) -> Names:
    client = f"ds__{op}" if live else f"ds__{op}__client"
    to_ds = None if live else UP.probe(f"up__to__ds__{op}__start")
    return Names(
        op, UP.probe(f"gw__{op}__start"), UP.probe(f"gw__{op}__done"), to_ds,
        UP.probe(f"{client}__start"), UP.probe(f"{client}__done"), live,
    )  # fmt: skip


_NAMES: Final = {t: _names(op, t in LIVE_OPS) for t, op in _OP.items()}
_WRITE_NAMES: Final = {False: _names("write", False), True: _names("write_unwritten", False)}


def names(job: Job) -> Names:
    op = job.op
    if isinstance(op, WriteOp):
        return _WRITE_NAMES[op.unwritten]
    return _NAMES[type(op)]


def op_name(job: Job) -> str:
    """read, write, write_unwritten, flush, barrier, trim, close, repair, noop, reopen."""
    return names(job).op


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
