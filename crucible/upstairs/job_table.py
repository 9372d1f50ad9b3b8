"""The jobs of one session: their ids and numbers, their dependencies, and
their life from queued to retired.

Ids start at 1000 and only grow; live repair reserves four consecutive ones
per extent (`reserve`). Flush numbers come from here too, so that a guest
flush, a live-repair close and a reconciliation each get one of their own.
A job stays in the table until a flush or barrier at or after it has
finished on all three downstairs (`retire`); until then it can be replayed
to a downstairs that comes back (`replay_to`). Counts are kept as the jobs
move, so that no event has to walk the table.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any, Final

from crucible.upstairs.deps import BlockMap
from crucible.upstairs.jobs import (
    LIVE_OPS,
    WRITE_LIKE,
    IOState,
    Job,
    Op,
    ReadOp,
    TrimOp,
    WriteOp,
)
from crucible.upstairs.report import work_summary

FIRST_JOB_ID: Final = 1000
RECENT_RETIRED: Final = 8


class JobTable:
    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}
        self.blocks = BlockMap()
        self.next_id = FIRST_JOB_ID
        self.next_gw = 1
        self.next_flush = 0
        self.flushes_pending = 0  # flushes and barriers not yet finished
        self.finished = 0  # jobs finished so far (only grows)
        self.done_jobs = 0  # finished, not yet retired
        self.done_bytes = 0
        self.retired = 0
        # The last jobs retired, as the control API's /work shows them.
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_RETIRED)
        self.last_io = 0.0  # when the last job was queued
        self.need_flush = False  # guest IO since the last flush or barrier: the idle flush
        # Guest flushes done on one full copy and on copies under live repair:
        # durable on two once the repair ends, and answered then.
        self.parked: list[object] = []

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs.values())

    def get(self, job_id: int) -> Job | None:
        return self.jobs.get(job_id)

    def deps_of(self, job_id: int) -> list[int] | None:
        job = self.jobs.get(job_id)
        return None if job is None else job.deps

    # ---- numbering ------------------------------------------------------------------

    def reserve(self, n: int) -> int:
        """The first of `n` consecutive job ids, taken now."""
        first = self.next_id
        self.next_id += n
        return first

    def take_flush_number(self) -> int:
        n = self.next_flush
        self.next_flush += 1
        return n

    # ---- adding -------------------------------------------------------------------

    def new_job(self, op: Op, guest: object | None, now: float) -> Job:
        """A job for `op` with the next id and its dependencies (not yet in the table)."""
        jid = self.reserve(1)
        self.last_io = now
        match op:
            case WriteOp():
                deps = self.blocks.add_write(jid, op.start, len(op.contexts))
            case TrimOp():
                deps = self.blocks.add_write(jid, op.start, op.count)
            case ReadOp():
                deps = self.blocks.add_read(jid, op.start, op.count)
            case _:
                deps = self.blocks.add_barrier(jid)
        gw = 0
        if guest is not None or isinstance(op, WRITE_LIKE):
            gw = self.next_gw
            self.next_gw += 1
        job = Job(jid, op, deps, [IOState.SKIPPED] * 3, guest, gw)
        self.need_flush = not job.is_flush_like
        job.nbytes = len(op.data) if isinstance(op, WriteOp) else 0
        return job

    def insert(self, job: Job) -> None:
        self.jobs[job.id] = job
        if job.is_flush_like:
            self.flushes_pending += 1

    # ---- finishing ------------------------------------------------------------------

    def mark_finished(self, job: Job) -> None:
        """Every client has answered (or been skipped) for this job."""
        job.finished = True
        self.finished += 1
        self.done_jobs += 1
        self.done_bytes += job.nbytes
        if job.is_flush_like:
            self.flushes_pending -= 1

    def retire(self, upto: int) -> int:
        """Forget finished and acked jobs up to a flush or barrier that finished
        on all three; how many went."""
        gone = [jid for jid, j in self.jobs.items() if jid <= upto and j.complete and j.acked]
        for jid in gone[-RECENT_RETIRED:]:
            self.recent.append(work_summary(self.jobs[jid]))
        for jid in gone:
            job = self.jobs.pop(jid)
            self.done_jobs -= 1
            self.done_bytes -= job.nbytes
        self.retired += len(gone)
        return len(gone)

    def needs_barrier(self, max_jobs: int, max_bytes: int) -> bool:
        """Finished work piles up (no flush lately): a barrier lets it retire."""
        if self.flushes_pending:
            return False
        return self.done_jobs >= max_jobs or self.done_bytes >= max_bytes

    def new_session(self) -> None:
        """A new activation: the downstairs know none of the earlier job ids."""
        self.blocks = BlockMap()

    def clear(self) -> None:
        """Every job is gone (failed or forgotten): a new session's dependencies."""
        self.jobs.clear()
        self.blocks = BlockMap()
        self.flushes_pending = self.done_jobs = self.done_bytes = 0

    # ---- replay -------------------------------------------------------------------------

    def replay_to(self, cid: int, last_flush: int | None) -> list[Job]:
        """A client back from offline is sent again every job it did not skip
        after the last flush it finished; jobs it had done are reopened for it
        (the downstairs' completed set starts at that flush)."""
        out = []
        for job in self.jobs.values():
            if last_flush is not None and job.id <= last_flush:
                continue
            state = job.state[cid]
            if state is IOState.SKIPPED:
                continue
            if state is IOState.DONE:
                job.state[cid] = IOState.IN_PROGRESS
                if job.finished:  # it will finish again when the replay is done
                    job.finished = False
                    self.done_jobs -= 1
                    self.done_bytes -= job.nbytes
                    if job.is_flush_like:
                        self.flushes_pending += 1
            job.replay = True
            if job.state[cid] is IOState.IN_PROGRESS:
                out.append(job)
        return out

    def has_live_repair_jobs(self) -> bool:
        """Live-repair jobs were queued out of id order: a replay cannot be trusted."""
        return any(isinstance(j.op, LIVE_OPS) for j in self.jobs.values())
