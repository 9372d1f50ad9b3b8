"""Which blocks of the volume hold data, known without reading them: what
block status (NBD's map of data and holes) is answered from.

When the volume goes active, one downstairs that can tell (capabilities.py)
is asked for its map (ALLOCATION_PATH); until it answers, every write, trim
and zero-fill the guest queues is logged. The map is taken at some moment
after activation, so it holds, for each block, the effect of some first
part of the operations on that block (a downstairs applies the writes to
one block in order); laying the whole log over it, in order, gives the
state after every operation queued so far, since each operation sets its
blocks to a fixed value. From then on each operation updates the map as it
is queued. Without an answer (a Rust downstairs, an error, a log grown too
long) the map stays unknown and block status reads the blocks instead.

Blocks are tracked as sorted, disjoint runs of allocated blocks: the cost of
an update or a query is in runs touched, not blocks. Scattered writes to a
fresh volume can cut it into as many runs as blocks, so past MAX_RUNS
neighbouring runs are merged: the map then counts a few holes as data,
which block status may always say (a reader gets the zeros it would have
skipped), and its memory and the cost of an update stay bounded.
"""

from __future__ import annotations

import bisect
from enum import Enum

Runs = list[tuple[int, int]]  # (first block, block count)
MAX_LOG = 100_000  # operations logged while the map is fetched; past it, give up
MAX_RUNS = 16_384  # runs kept; past it, each run is merged with the next


class State(Enum):
    UNKNOWN = "unknown"  # block status reads the blocks
    LOADING = "loading"  # asked; operations are logged meanwhile
    KNOWN = "known"


class Allocation:
    def __init__(self) -> None:
        self.state = State.UNKNOWN
        self.epoch = 0  # which loading an answer belongs to
        self._starts: list[int] = []  # allocated runs: [start, end) pairs
        self._ends: list[int] = []
        self._log: list[tuple[int, int, bool]] = []

    def begin(self) -> None:
        """The volume went active: start logging; the map is asked for next."""
        self.state = State.LOADING
        self.epoch += 1
        self._log = []

    def forget(self) -> None:
        self.state = State.UNKNOWN
        self._log = []
        self._starts, self._ends = [], []

    def loaded(self, epoch: int, runs: Runs | None) -> None:
        """The map arrived (None: it cannot be had)."""
        if self.state is not State.LOADING or epoch != self.epoch:
            return  # for an earlier activation
        if runs is None:
            self.forget()
            return
        self._starts = [s for s, _ in runs]
        self._ends = [s + n for s, n in runs]
        self._bound()
        for start, count, allocated in self._log:
            self._set(start, count, allocated)
        self._log = []
        self.state = State.KNOWN

    def mark(self, start: int, count: int, allocated: bool) -> None:
        """A write (True) or a trim (False) of these blocks was queued."""
        if self.state is State.KNOWN:
            self._set(start, count, allocated)
        elif self.state is State.LOADING:
            self._log.append((start, count, allocated))
            if len(self._log) > MAX_LOG:
                self.forget()

    def _set(self, start: int, count: int, allocated: bool) -> None:
        end = start + count
        if count <= 0:
            return
        starts, ends = self._starts, self._ends
        # Runs touching or overlapping [start, end) merge with it (or are cut by it).
        lo = bisect.bisect_left(ends, start)
        hi = bisect.bisect_right(starts, end)
        if allocated and lo < hi and starts[lo] <= start and ends[lo] >= end:
            return  # already inside one run: the common case of rewrites
        keep_starts: list[int] = []
        keep_ends: list[int] = []
        if allocated:
            if lo < hi:
                start = min(start, starts[lo])
                end = max(end, ends[hi - 1])
            keep_starts, keep_ends = [start], [end]
        else:
            if lo < hi and starts[lo] < start:
                keep_starts.append(starts[lo])
                keep_ends.append(start)
            if lo < hi and ends[hi - 1] > end:
                keep_starts.append(end)
                keep_ends.append(ends[hi - 1])
        starts[lo:hi] = keep_starts
        ends[lo:hi] = keep_ends
        if len(starts) > MAX_RUNS:
            self._bound()

    def _bound(self) -> None:
        """Merge each pair of neighbouring runs (the hole between them counted
        as data) until at most MAX_RUNS are left."""
        while len(self._starts) > MAX_RUNS:
            self._starts = self._starts[0::2]
            ends = self._ends
            self._ends = (ends[1::2] + ends[-1:]) if len(ends) % 2 else ends[1::2]

    def query(self, first: int, count: int) -> list[tuple[int, int, bool]] | None:
        """[first, first+count) as runs of (start, count, allocated), in
        order and covering it; None while the map is not known."""
        if self.state is not State.KNOWN:
            return None
        out: list[tuple[int, int, bool]] = []
        end = first + count
        pos = first
        i = bisect.bisect_right(self._ends, first)
        starts, ends = self._starts, self._ends
        while pos < end:
            if i < len(starts) and starts[i] <= pos:
                stop = min(ends[i], end)
                out.append((pos, stop - pos, True))
                i += 1
            else:
                stop = min(starts[i], end) if i < len(starts) else end
                out.append((pos, stop - pos, False))
            pos = stop
        return out

    def runs(self) -> Runs:
        return [(s, e - s) for s, e in zip(self._starts, self._ends, strict=True)]
