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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crucible.upstairs.jobs import FlushOp, Op, ReadOp, TrimOp, WriteOp


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
    copied: set[int] = field(default_factory=set)

    @property
    def aborting(self) -> bool:
        return self.abort_reason is not None

    def sends_to_target(self, op: Op) -> bool:
        """Whether a guest job goes to a client under repair (see the module doc)."""
        if isinstance(op, ReadOp):
            return False
        if isinstance(op, WriteOp):
            return op.start // self.extent_size <= self.extent
        if isinstance(op, TrimOp):
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

    def progress(self) -> dict[str, object]:
        return {
            "source": self.source,
            "targets": list(self.targets),
            "extent": max(self.extent, 0),
            "extent_count": self.extent_count,
            "repaired": self.repaired,
            "confirmed": self.confirmed,
            "aborting": self.abort_reason,
        }
