"""Dependencies from the blocks a job touches.

A map of disjoint block ranges, each holding the last *blocking* job (a write,
flush or barrier) and the *nonblocking* jobs (reads) since it. A write depends
on the reads since the last write of its blocks, or on that write if there
were none; a read depends only on the last write; reads never wait on reads.
Flush and barrier cover every block, so the map collapses to one range after
each: it only ever holds what happened since the last flush.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

END: Final = 1 << 64
_bisect_right: Final = bisect.bisect_right  # (compiled: a static, not a module lookup)


@dataclass(slots=True, init=False)
class _Range:
    start: int
    blocking: int | None
    nonblocking: list[int]

    # Not the dataclass's __init__: compiled with mypyc, that one runs interpreted.
    def __init__(
        self, start: int, blocking: int | None, nonblocking: list[int] | None = None
    ) -> None:
        self.start = start
        self.blocking = blocking
        self.nonblocking = [] if nonblocking is None else nonblocking


class BlockMap:
    def __init__(self) -> None:
        self._ranges: list[_Range] = [_Range(0, None)]  # sorted by start, covering [0, END)
        self._starts: list[int] = [0]

    def __len__(self) -> int:
        return len(self._ranges)

    def _split(self, at: int) -> int:
        """Make a range begin at `at`; return its index."""
        i = _bisect_right(self._starts, at) - 1
        r = self._ranges[i]
        if r.start == at:
            return i
        self._ranges.insert(i + 1, _Range(at, r.blocking, list(r.nonblocking)))
        self._starts.insert(i + 1, at)
        return i + 1

    def _span(self, start: int, end: int) -> tuple[int, int]:
        lo = self._split(start)
        hi = self._split(end) if end < END else len(self._ranges)
        return lo, hi

    def add_write(self, job_id: int, start: int, count: int) -> list[int]:
        """Register a blocking job over [start, start+count); return its deps."""
        lo, hi = self._span(start, start + count)
        deps: set[int] = set()
        for r in self._ranges[lo:hi]:
            if r.nonblocking:
                deps.update(r.nonblocking)
            elif r.blocking is not None:
                deps.add(r.blocking)
        merged = _Range(start, job_id)
        self._ranges[lo:hi] = [merged]
        self._starts[lo:hi] = [start]
        return sorted(deps)

    def add_read(self, job_id: int, start: int, count: int) -> list[int]:
        lo, hi = self._span(start, start + count)
        if hi == lo + 1:  # one range (a small read): no set, no sort
            r = self._ranges[lo]
            r.nonblocking.append(job_id)
            return [] if r.blocking is None else [r.blocking]
        deps: set[int] = set()
        for r in self._ranges[lo:hi]:
            if r.blocking is not None:
                deps.add(r.blocking)
            r.nonblocking.append(job_id)
        return sorted(deps)

    def add_barrier(self, job_id: int) -> list[int]:
        """A flush or barrier: depends on every range's frontier, then is the only one."""
        deps: set[int] = set()
        for r in self._ranges:
            if r.nonblocking:
                deps.update(r.nonblocking)
            elif r.blocking is not None:
                deps.add(r.blocking)
        self._ranges = [_Range(0, job_id)]
        self._starts = [0]
        return sorted(deps)


def deps_for_client(
    deps: list[int], skipped: set[int], floor: int, deps_of: Callable[[int], list[int] | None]
) -> list[int]:
    """A job's dependencies as one downstairs sees them: a job it skipped
    stands for that job's own dependencies (`deps_of`; None once retired), so
    order through it is kept, and jobs below `floor` (before its session
    began) are gone."""
    for d in deps:  # the usual case, none skipped nor gone, without the sets below
        if d < floor or d in skipped:
            break
    else:
        return deps
    out: set[int] = set()
    seen: set[int] = set()
    todo = list(deps)
    while todo:
        d = todo.pop()
        if d < floor or d in seen:
            continue
        seen.add(d)
        if d in skipped:
            todo.extend(deps_of(d) or ())
        else:
            out.add(d)
    return sorted(out)
