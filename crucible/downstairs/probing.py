"""Which of Crucible's downstairs probes a job message fires (observe/probes.py):
one record per kind of job, found with one lookup by the message's type."""

from __future__ import annotations

from typing import Any, Final

import crucible.protocol.messages as m
from crucible.observe.probes import DS, DS_JOBS, Probe

WORK_START: Final = DS.probe("work__start")
WORK_DONE: Final = DS.probe("work__done")

# What a finished job moved, for submit__*__done's byte count.
_NOTHING, _WRITTEN, _READ = 0, 1, 2


class JobProbes:
    """The probes one kind of job fires: submit start/done, and os start/done
    for those that reach the region."""

    def __init__(self, submit: str, disk: str | None, moves: int) -> None:
        start, done = DS_JOBS[submit]
        self.start: Probe = DS.probe(start)
        self.done: Probe = DS.probe(done)
        self.os_start: Probe | None = DS.probe(f"os__{disk}__start") if disk else None
        self.os_done: Probe | None = DS.probe(f"os__{disk}__done") if disk else None
        self.moves = moves

    # (A job message is one of several dataclasses, each with a job_id: typed
    # Any here, it is read the same way as through their union.)

    def taken(self, work: Any) -> None:
        if self.start.handlers:
            self.start.fire2(work.job_id, work)

    def answered(self, work: Any, outcome: Any, err: Any) -> None:
        """Its reply is about to be sent: `outcome` of its work, `err` if failed."""
        if self.done.handlers:
            self.done.fire4(work.job_id, work, err, self._moved(work, outcome))

    def began(self, work: Any) -> None:
        """Its dependencies are met and its region work begins."""
        if WORK_START.handlers:
            WORK_START.fire1(work.job_id)
        if self.os_start is not None and self.os_start.handlers:
            self.os_start.fire2(work.job_id, work)

    def ended(self, work: Any, seconds: float) -> None:
        """Its region work ended, `seconds` after it began."""
        if self.os_done is not None and self.os_done.handlers:
            self.os_done.fire3(work.job_id, work, seconds)
        if WORK_DONE.handlers:
            WORK_DONE.fire1(work.job_id)

    def _moved(self, work: Any, outcome: Any) -> int:
        """Bytes the finished job wrote or read."""
        if self.moves == _WRITTEN:
            return len(work.data)
        if self.moves == _READ and isinstance(outcome, tuple):
            return len(outcome[1])
        return 0


JOB_PROBES: Final[dict[type, JobProbes]] = {
    m.ReadRequest: JobProbes("read", "read", _READ),
    m.Write: JobProbes("write", "write", _WRITTEN),
    m.WriteUnwritten: JobProbes("writeunwritten", "writeunwritten", _WRITTEN),
    m.Flush: JobProbes("flush", "flush", _NOTHING),
    m.Barrier: JobProbes("barrier", None, _NOTHING),
    m.Trim: JobProbes("trim", "trim", _NOTHING),
    m.ExtentLiveClose: JobProbes("el_close", None, _NOTHING),
    m.ExtentLiveFlushClose: JobProbes("el_flush_close", None, _NOTHING),
    m.ExtentLiveRepair: JobProbes("el_repair", None, _NOTHING),
    m.ExtentLiveReopen: JobProbes("el_reopen", None, _NOTHING),
    m.ExtentLiveNoOp: JobProbes("el_noop", None, _NOTHING),
}
