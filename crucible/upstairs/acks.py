"""When a guest hears back, and what it hears: the ack rules as pure functions
of a job's per-client states.

* A write (or trim) is acked when it is queued (by the caller), never here.
* A read is acked with the first reply that verified.
* A flush is acked once it is done on `need` clients that hold every block
  (two; three for a snapshot or while deactivating). Clients being
  live-repaired when it was queued hold only part of the volume, so they
  do not count.
* A job that finishes everywhere without having been acked answers with an
  error if it could not do what it promised: a read that no client could
  serve, a flush durable on fewer than two full copies (or a snapshot that
  missed any client), a write that reached fewer than two.
"""

from __future__ import annotations

from typing import Final

from crucible.common.errors import CrucibleError, ErrorKind
from crucible.upstairs.jobs import FlushOp, IOState, Job, ReadOp

NOT_YET: Final = object()  # no ack yet


def durable_on(job: Job) -> int:
    """Clients done with this flush that hold every block (not mid-repair)."""
    return sum(1 for i, s in enumerate(job.state) if s is IOState.DONE and i not in job.partial)


def flush_need(op: FlushOp, deactivating: bool) -> int:
    return 3 if op.snapshot is not None or deactivating else 2


def early_ack(job: Job, deactivating: bool) -> object:
    """The result to ack the guest with now, or NOT_YET."""
    op = job.op
    if isinstance(op, ReadOp):
        if job.read_data is None:
            return NOT_YET
        data = job.read_data if job.read_plain is None else job.read_plain
        return data, job.read_contexts
    if isinstance(op, FlushOp) and durable_on(job) >= flush_need(op, deactivating):
        return None
    return NOT_YET


def parkable(job: Job) -> bool:
    """A flush done on only one full copy but also on clients being repaired
    is durable on two once their repair is done: it may wait for that."""
    if not isinstance(job.op, FlushOp):
        return False
    full = durable_on(job)
    partial = sum(1 for i in job.partial if job.state[i] is IOState.DONE)
    return full >= 1 and full + partial >= 2


def final_result(job: Job) -> CrucibleError | None:
    """What a job finished everywhere but never acked answers its guest with."""
    bad = job.count(IOState.SKIPPED) + job.count(IOState.ERROR)
    op = job.op
    if isinstance(op, ReadOp):
        why = "read failed on every downstairs: " + "; ".join(job.errors)
        return CrucibleError(ErrorKind.IoError, why)
    if isinstance(op, FlushOp):
        failed = durable_on(job) < 2 or (bool(op.snapshot) and bad > 0)
    else:
        failed = bad > 1
    if not failed:
        return None
    return CrucibleError(
        ErrorKind.IoError,
        f"{job.kind} {job.id} reached only {durable_on(job)} of 3 downstairs "
        "holding all data: " + ("; ".join(job.errors) or "the others are out"),
    )
