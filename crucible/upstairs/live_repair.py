"""Live repair: bring back a downstairs that missed writes while the guest keeps going.

The targets (faulted or replaced clients) are repaired from one healthy source,
one extent at a time from extent 0. For each extent four consecutive job ids
are reserved, and the jobs run in that order on every client:

  close   the healthy clients flush and close the extent; the targets close it.
          Each replies with the extent's (gen, flush, dirty).
  repair  queued once every close is in: targets that differ from the source
          (or are dirty) copy the closed extent from its repair server; others,
          and all when nothing differs, do nothing.
  noop    queued once every repair is in; the reopen depends on it, so the
          source cannot reopen (and change) the extent while it is copied.
  reopen  queued with the close, so IO to the extent is ordered after it;
          every client reopens the extent.

The reopen is the extent's last writer in the dependency map, so guest IO to
the extent waits for the repair. While a repair runs, a target gets writes
that start at or below the extent under repair (their data is not in its copy)
and flushes limited to the repaired extents; everything above is skipped and
arrives later through the copy. Reads never go to a target. After the last
extent, a flush; when it is done everywhere the targets are active again.

Any failure of a repair job, or the source or a target leaving, aborts: the
targets are faulted, and the extent in progress still gets its remaining jobs
(as no-ops) so that IO queued behind its reopen completes. The targets come
back and a new repair starts at extent 0; extents already repaired now match
and cost only the close and reopen.

LiveRepair plans: given the job that just finished, it makes the jobs that
follow. Sending them, faulting and finishing is the caller's (downstairs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from crucible.protocol.wire import SocketAddr
from crucible.upstairs.job_table import JobTable
from crucible.upstairs.jobs import (
    WRITE_LIKE,
    FlushOp,
    IOState,
    Job,
    LiveCloseOp,
    LiveNoOp,
    LiveReopenOp,
    LiveRepairOp,
    Op,
    ReadOp,
)
from crucible.upstairs.status import LiveRepairStatus


@dataclass(slots=True)
class ExtentJobs:
    close: int

    @property
    def repair(self) -> int:
        return self.close + 1

    @property
    def noop(self) -> int:
        return self.close + 2

    @property
    def reopen(self) -> int:
        return self.close + 3


@dataclass
class LiveRepair:
    source: int
    source_addr: SocketAddr  # the source's repair server
    targets: list[int]
    extent_count: int
    extent_size: int  # blocks
    started: float
    extent: int = -1  # the extent whose jobs are queued; -1 before the first
    jobs: ExtentJobs | None = None
    abort_reason: str | None = None
    final_flush: int | None = None
    repaired: int = 0  # extents copied
    confirmed: int = 0  # extents that already matched

    @property
    def aborting(self) -> bool:
        return self.abort_reason is not None

    def sends_to_target(self, op: Op) -> bool:
        """Whether a guest job goes to a client under repair (see the module doc)."""
        if isinstance(op, ReadOp):
            return False
        if isinstance(op, WRITE_LIKE):
            return op.start // self.extent_size <= self.extent
        return True  # flush, barrier and the repair's own jobs

    def flush_limit(self, op: Op) -> int | None:
        """The last extent a target may flush: above it, its data is stale."""
        if isinstance(op, FlushOp) and self.extent < self.extent_count - 1:
            return max(self.extent, 0)
        return None

    def needs_copy(self, closed: dict[int, tuple[int, int, bool]]) -> tuple[int, ...]:
        """Targets whose extent differs from the source's after the close."""
        src = closed.get(self.source)
        return tuple(
            t for t in self.targets if src is None or closed.get(t) != src or src[2] is True
        )

    def status(self) -> LiveRepairStatus:
        return LiveRepairStatus(
            source=self.source,
            targets=list(self.targets),
            extent=max(self.extent, 0),
            extent_count=self.extent_count,
            repaired=self.repaired,
            confirmed=self.confirmed,
            aborting=self.abort_reason,
        )

    # ---- planning ---------------------------------------------------------------

    def next_extent(self, table: JobTable, gen: int, now: float) -> list[Job] | None:
        """The next extent's close and reopen, or the final flush after the
        last; None when an abort ends the repair here."""
        self.extent += 1
        if self.aborting:
            return None
        if self.extent >= self.extent_count:
            flush = table.new_job(FlushOp(table.take_flush_number(), gen), None, now)
            self.final_flush = flush.id
            return [flush]
        ids = ExtentJobs(table.reserve(4))
        self.jobs = ids
        es = self.extent_size
        # The reopen becomes the extent's last writer: IO to it waits for the repair.
        deps = table.blocks.add_write(ids.reopen, self.extent * es, es)
        close = LiveCloseOp(self.extent, table.take_flush_number(), gen, tuple(self.targets))
        reopen = LiveReopenOp(self.extent)
        return [
            Job(ids.close, close, deps, [IOState.SKIPPED] * 3),
            Job(ids.reopen, reopen, [ids.noop], [IOState.SKIPPED] * 3),
        ]

    def after(self, job: Job, table: JobTable, gen: int, now: float) -> list[Job] | None:
        """A repair job (or the final flush) finished everywhere: the jobs that
        follow; None when the repair is over (done, or aborted)."""
        ids = self.jobs
        op = job.op
        if isinstance(op, LiveCloseOp) and ids and job.id == ids.close:
            copy: tuple[int, ...] = ()
            if not self.aborting:
                copy = self.needs_copy(job.closed)
                if copy:
                    self.repaired += 1
                else:
                    self.confirmed += 1
            repair = LiveRepairOp(op.extent, self.source, self.source_addr, copy)
            return [Job(ids.repair, repair, [ids.close], [IOState.SKIPPED] * 3)]
        if isinstance(op, LiveRepairOp) and ids and job.id == ids.repair:
            # Only now may the source reopen (and change) the extent: every copy is done.
            return [Job(ids.noop, LiveNoOp(), [job.id], [IOState.SKIPPED] * 3)]
        if isinstance(op, LiveReopenOp) and ids and job.id == ids.reopen:
            return self.next_extent(table, gen, now)
        if job.id == self.final_flush:
            return None
        return []

    def progress_line(self, job: Job) -> str | None:
        """A line for the log every tenth of the way (and at the end)."""
        if not isinstance(job.op, LiveReopenOp):
            return None
        n = job.op.extent + 1
        if n == self.extent_count or n % max(1, self.extent_count // 10) == 0:
            return (
                f"live repair: extent {n} of {self.extent_count} "
                f"({self.repaired} copied, {self.confirmed} matched)"
            )
        return None
