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

from dataclasses import dataclass
from typing import TYPE_CHECKING

from crucible.common.errors import CrucibleError, ErrorKind
from crucible.upstairs.actions import Action, Complete, Log
from crucible.upstairs.jobs import (
    FlushOp,
    IOState,
    Job,
    LiveCloseOp,
    LiveNoOp,
    LiveReopenOp,
    LiveRepairOp,
    Op,
    ReadOp,
    TrimOp,
    WriteOp,
)
from crucible.upstairs.state import CState, Mode, UpState

if TYPE_CHECKING:
    from crucible.upstairs.core import UpstairsCore


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

    @property
    def aborting(self) -> bool:
        return self.abort_reason is not None

    def sends_to_target(self, op: Op) -> bool:
        """Whether a guest job goes to a client under repair (see the module doc)."""
        if isinstance(op, ReadOp):
            return False
        if isinstance(op, WriteOp | TrimOp):
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


# ---- driving a repair: functions of the upstairs core (core.py) ------------------------


def start(up: UpstairsCore, now: float) -> list[Action]:
    """Begin a repair if a client is ready for one and a healthy source exists."""
    if up.state is not UpState.ACTIVE or up.repair is not None or up.opts.read_only:
        return []
    ready = [c for c in up.clients if c.state is CState.REPAIR_READY]
    healthy = [c for c in up.clients if c.state is CState.ACTIVE]
    if not ready or not healthy or up.region is None:
        return []
    acts: list[Action] = []
    for c in up.clients:
        if c.holds_jobs:  # its replay would interleave with the repair's jobs
            acts += up._fault(c, "offline when live repair started", now)
    source = healthy[-1]
    r = up.region
    up.repair = LiveRepair(source.id, [c.id for c in ready], r.extent_count, r.extent_size, now)
    for c in ready:
        c.state = CState.LIVE_REPAIR
        c.first_job = up.next_id
        c.skipped.clear()
        c.inflight_jobs = c.inflight_bytes = 0
    names = ", ".join(c.name for c in ready)
    acts.append(
        Log(f"live repair of {names} from {source.name}: {r.extent_count} extents", "warning")
    )
    return acts + next_extent(up, now)


def next_extent(up: UpstairsCore, now: float) -> list[Action]:
    """Queue the next extent's close and reopen, or the final flush after the last."""
    rep = up.repair
    assert rep is not None and up.region is not None
    rep.extent += 1
    if rep.aborting:
        return end(up, now)
    if rep.extent >= rep.extent_count:
        rep.final_flush = up.next_id  # the id _enqueue is about to give it
        return up._enqueue(FlushOp(up._take_flush_number(), up.gen), None, now)
    ids = ExtentJobs(up.next_id)
    up.next_id += 4
    rep.jobs = ids
    es = rep.extent_size
    # The reopen becomes the extent's last writer: IO to it waits for the repair.
    deps = up.blocks.add_write(ids.reopen, rep.extent * es, es)
    close = LiveCloseOp(rep.extent, up._take_flush_number(), up.gen, tuple(rep.targets))
    acts = up._add_job(Job(ids.close, close, deps, [IOState.SKIPPED] * 3), now)
    reopen = Job(ids.reopen, LiveReopenOp(rep.extent), [ids.noop], [IOState.SKIPPED] * 3)
    return acts + up._add_job(reopen, now)


def step(up: UpstairsCore, job: Job, now: float) -> list[Action]:
    """A repair job (or the final flush) finished everywhere: queue what follows."""
    rep = up.repair
    if rep is None:
        return []
    op = job.op
    if isinstance(op, LiveCloseOp) and rep.jobs and job.id == rep.jobs.close:
        ids = rep.jobs
        copy: tuple[int, ...] = ()
        if not rep.aborting:
            copy = rep.needs_copy(job.closed)
            if copy:
                rep.repaired += 1
            else:
                rep.confirmed += 1
        src = up.clients[rep.source].repair_addr
        assert src is not None
        repair = LiveRepairOp(op.extent, rep.source, src, copy)
        return up._add_job(Job(ids.repair, repair, [ids.close], [IOState.SKIPPED] * 3), now)
    if isinstance(op, LiveRepairOp) and rep.jobs and job.id == rep.jobs.repair:
        # Only now may the source reopen (and change) the extent: every copy is done.
        noop = Job(rep.jobs.noop, LiveNoOp(), [job.id], [IOState.SKIPPED] * 3)
        return up._add_job(noop, now)
    if isinstance(op, LiveReopenOp) and rep.jobs and job.id == rep.jobs.reopen:
        out: list[Action] = []
        n = op.extent + 1
        if n == rep.extent_count or n % max(1, rep.extent_count // 10) == 0:
            out.append(
                Log(
                    f"live repair: extent {n} of {rep.extent_count} "
                    f"({rep.repaired} copied, {rep.confirmed} matched)"
                )
            )
        return out + next_extent(up, now)
    if job.id == rep.final_flush:
        return end(up, now)
    return []


def end(up: UpstairsCore, now: float) -> list[Action]:
    """Done, or aborted: targets become active (or stay faulted); parked flushes answer."""
    rep = up.repair
    assert rep is not None
    up.repair = None
    waiters, up.repair_waiters = up.repair_waiters, []
    took = now - rep.started
    if rep.aborting:
        up.live_repairs_aborted += 1
        err = CrucibleError(ErrorKind.IoError, f"live repair aborted: {rep.abort_reason}")
        return [Complete(w, err) for w in waiters]
    acts: list[Action] = []
    for t in rep.targets:
        c = up.clients[t]
        if c.state is CState.LIVE_REPAIR:
            c.state = CState.ACTIVE
            c.mode = Mode.NEW
            c.last_error = ""
    up.live_repairs += 1
    acts.append(
        Log(
            f"live repair done in {took:.2f} s: {rep.repaired} extents copied, "
            f"{rep.confirmed} matched",
            "warning",
        )
    )
    return acts + [Complete(w, None) for w in waiters]


def abort(up: UpstairsCore, reason: str, now: float) -> list[Action]:
    """Fault the targets; the extent in progress still gets its jobs, as no-ops."""
    rep = up.repair
    assert rep is not None
    rep.abort_reason = reason
    acts: list[Action] = [Log(f"live repair aborted: {reason}", "error")]
    for t in rep.targets:
        acts += up._fault(up.clients[t], "live repair aborted", now)
    return acts
