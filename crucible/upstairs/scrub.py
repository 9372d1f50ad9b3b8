"""The background verify of the replicas (a scrub, like DRBD's online verify).

Reads go to one replica and are checked against that replica's own
contexts, so a replica whose block is wrong but consistent (a valid hash
over other data: a lost write, a copy from elsewhere) would go unnoticed.
The scrub walks the volume a chunk at a time (at most 128 KiB, so the
guest's jobs queued behind one wait little; never across an extent) at a
limited rate: each chunk is read from all three replicas as one job, so
every replica answers at the same point in the job order, and their block
contexts are compared. Where two agree and the third differs,
the third is rewritten from one of the two (rewrite.py); where all three
differ, or only two answered and they differ, it is reported and left.

The rate is in bytes of the volume per second (each costs three reads); a
token bucket lets a chunk go when the rate has paid for it. A pass asked
for explicitly (`request`) starts at block 0 at its own rate and answers
its waiters when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crucible.upstairs.jobs import Reply
from crucible.upstairs.status import VerifyStatus

CHUNK_BYTES = 128 << 10


@dataclass(frozen=True, slots=True)
class Finding:
    fixes: dict[int, dict[int, int]]  # target client: {block index: source client}
    unresolved: list[int]  # block indices no majority settles


def compare(replies: dict[int, Reply], zero_hash: int) -> Finding:
    """Which replica's blocks differ from the two others'. A never-written
    block and one holding zeros agree; a block that failed its own check is
    left to the read path's rewrite."""
    fixes: dict[int, dict[int, int]] = {}
    unresolved: list[int] = []
    if len(replies) < 2:
        return Finding(fixes, unresolved)
    count = min(len(r[0]) for r in replies.values())
    for i in range(count):
        seen: dict[object, list[int]] = {}
        for cid, (ctxs, _, bad) in replies.items():
            if i in bad:
                continue
            ctx = ctxs[i]
            key = zero_hash if ctx is None else ctx
            seen.setdefault(key, []).append(cid)
        if len(seen) < 2:
            continue
        groups = sorted(seen.values(), key=len)
        if len(groups) == 2 and len(groups[0]) == 1 and len(groups[1]) >= 2:
            fixes.setdefault(groups[0][0], {})[i] = groups[1][0]
        else:
            unresolved.append(i)
    return Finding(fixes, unresolved)


@dataclass
class Scrub:
    rate: float = 0.0  # bytes per second in the background; 0: off
    position: int = 0  # the next block to compare
    outstanding: int | None = None  # the job comparing a chunk now
    budget: float = 0.0
    last: float | None = None
    passes: int = 0
    compared: int = 0  # blocks, this pass
    divergent: int = 0  # blocks found differing, in all
    unresolved: int = 0
    pass_started: float = 0.0
    asked_rate: float | None = None  # a requested pass runs at this rate (0: no limit)
    waiters: list[object] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.rate > 0 or self.asked_rate is not None

    @property
    def current_rate(self) -> float:
        """A requested pass's rate while one runs, else the background one."""
        return self.asked_rate if self.asked_rate is not None else self.rate

    def request(self, token: object, rate: float, now: float) -> None:
        """A pass from block 0 at `rate` (0: as fast as one chunk at a time
        goes); `token` is answered when it ends."""
        if self.asked_rate is None:
            self.position, self.compared, self.pass_started = 0, 0, now
            self.budget = 0.0
        self.asked_rate = rate
        self.waiters.append(token)

    def next_chunk(
        self, now: float, total: int, extent_size: int, block_size: int
    ) -> tuple[int, int] | None:
        """The chunk (start, count) to compare now, if one is due."""
        rate = self.current_rate
        if self.outstanding is not None or total <= 0 or not self.running:
            self.last = now
            return None
        if self.position == 0 and self.compared == 0:
            self.pass_started = now
        start = self.position
        count = min(max(1, CHUNK_BYTES // block_size), extent_size - start % extent_size)
        count = min(count, total - start)
        cost = count * block_size
        if rate > 0:
            elapsed = 0.0 if self.last is None else now - self.last
            self.budget = min(self.budget + rate * elapsed, 2 * cost)
            self.last = now
            if self.budget < cost:
                return None
            self.budget -= cost
        return start, count

    def chunk_done(self, count: int, total: int) -> bool:
        """A chunk was compared; True when that ended a pass."""
        self.outstanding = None
        self.compared += count
        self.position += count
        if self.position < total:
            return False
        self.position = 0
        self.passes += 1
        return True

    def end_pass(self) -> tuple[list[object], int]:
        """The waiters of a requested pass, and the blocks it compared."""
        waiters, self.waiters = self.waiters, []
        self.asked_rate = None
        done = self.compared
        self.compared = 0
        return waiters, done

    def status(self, total: int) -> VerifyStatus:
        return VerifyStatus(
            running=self.running,
            rate=self.current_rate,
            position=self.position,
            total=total,
            passes=self.passes,
            divergent=self.divergent,
            unresolved=self.unresolved,
        )
