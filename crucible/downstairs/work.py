"""The per-connection job queue: jobs run once every dependency has completed.

Completed-set rule: a finished job joins the set; a finished flush or barrier
replaces the set with itself, and every job id at or below it counts as
complete from then on (the upstairs never depends on anything older).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crucible.protocol.messages import ReadRequest
from crucible.protocol.roles import RESETS, Job


@dataclass(slots=True)
class CompletedJobs:
    last_barrier: int | None = None
    done: set[int] = field(default_factory=set)

    def is_complete(self, job_id: int) -> bool:
        lb = self.last_barrier
        return (lb is not None and job_id <= lb) or job_id in self.done

    def complete(self, job_id: int, resets: bool) -> None:
        if resets:
            # Jobs newer than the flush that already finished stay complete.
            self.last_barrier = max(job_id, self.last_barrier or 0)
            self.done = {j for j in self.done if j > job_id}
        else:
            self.done.add(job_id)


class WorkQueue:
    """Jobs waiting for dependencies, and which of them may start now."""

    def __init__(self, last_flush: int | None = None) -> None:
        self.completed = CompletedJobs(last_flush)
        self.waiting: dict[int, Job] = {}
        # How many of a waiting job's dependencies are known complete: a
        # dependency never becomes incomplete again, so each is checked until it
        # is done and then never again (a flush may depend on thousands of reads).
        self._checked: dict[int, int] = {}
        # Waiting jobs by the dependency they wait on now: a finished job wakes
        # only its own waiters.
        self._blocked: dict[int, list[Job]] = {}
        self.started: set[int] = set()

    def __len__(self) -> int:
        return len(self.waiting) + len(self.started)

    def knows(self, job_id: int) -> bool:
        return (
            job_id in self.waiting or job_id in self.started or self.completed.is_complete(job_id)
        )

    def _place(self, job: Job) -> bool:
        """Start the job if every dependency is complete (True), or file it
        under the first one that is not."""
        # (get and del, not pop: compiled, dict.pop is a generic method call)
        is_complete = self.completed.is_complete
        deps = job.dependencies
        jid = job.job_id
        checked = self._checked.get(jid)
        i = 0
        if checked is not None:
            i = checked
            del self._checked[jid]
        while i < len(deps) and is_complete(deps[i]):
            i += 1
        if i == len(deps):
            if checked is not None:  # (it waited)
                del self.waiting[jid]
            self.started.add(jid)
            return True
        self._checked[job.job_id] = i
        self.waiting[job.job_id] = job
        self._blocked.setdefault(deps[i], []).append(job)
        return False

    def add(self, job: Job) -> list[Job]:
        """Queue a job; returns it if it can start at once."""
        return [job] if self._place(job) else []

    def finish(self, job: Job, ok: bool) -> list[Job]:
        """A started job ended: the jobs that may start now, oldest first. A
        failed job stays incomplete (its dependents wait), except a read: it
        changed nothing, so ordering is still kept."""
        self.started.discard(job.job_id)
        resets = type(job) in RESETS
        if ok or isinstance(job, ReadRequest):
            self.completed.complete(job.job_id, resets)
        if resets:
            # Every id at or below it now counts as complete, also ones this
            # connection never saw: look at every waiting job again.
            woken = list(self.waiting.values())
            self._blocked.clear()
        else:
            blocked = self._blocked.get(job.job_id)
            if blocked is None:
                return []  # (most jobs: nothing waits on them)
            del self._blocked[job.job_id]
            woken = blocked
        ready = [j for j in woken if self._place(j)]
        if len(ready) > 1:
            ready.sort(key=lambda j: j.job_id)
        return ready
