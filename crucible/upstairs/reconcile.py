"""Running a reconciliation plan (from mend.py), sans-IO.

Per extent to repair, four steps: ExtentFlush to the source, ExtentClose to
all, ExtentRepair to the destinations (they copy from the source's repair
server), ExtentReopen to all. One step is in flight at a time and must be
acked by every client it went to before the next goes out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from crucible.common.errors import ErrorKind
from crucible.protocol import messages as m
from crucible.protocol.wire import SocketAddr
from crucible.upstairs.mend import Repair

EVERYONE = (0, 1, 2)


@dataclass(frozen=True, slots=True)
class Step:
    msg: m.ExtentFlush | m.ExtentClose | m.ExtentRepair | m.ExtentReopen
    clients: tuple[int, ...]
    repair: Repair


class Outcome(Enum):
    IGNORED = "ignored"  # not an answer to the step in flight
    WAITING = "waiting"  # acked, others still to answer
    STEP_DONE = "step-done"  # everyone acked: send the next step
    FAILED = "failed"  # a downstairs could not do it: abort


class Reconciliation:
    def __init__(
        self,
        repairs: list[Repair],
        repair_addrs: list[SocketAddr | None],
        first_id: int,
        flush_no: int,
        gen_no: int,
        now: float,
    ) -> None:
        """`flush_no` must be one no guest flush will use: the repaired extents
        get it, and (gen, flush) is how replicas are later told apart."""
        self.steps: list[Step] = []
        rid = first_id
        for r in repairs:
            source_addr = repair_addrs[r.source]
            assert source_addr is not None
            self.steps += [
                Step(m.ExtentFlush(rid, r.extent, r.source, flush_no, gen_no), (r.source,), r),
                Step(m.ExtentClose(rid + 1, r.extent), EVERYONE, r),
                Step(
                    m.ExtentRepair(rid + 2, r.extent, r.source, source_addr, list(r.dests)),
                    r.dests,
                    r,
                ),
                Step(m.ExtentReopen(rid + 3, r.extent), EVERYONE, r),
            ]
            rid += 4
        self.next_id = rid
        self.needed = len(repairs)
        self.done = 0
        self.started = now
        self.waiting: set[int] = set()
        # (extent, client): a source that could not flush its copy, as it
        # holds a torn block; the next plan must take another.
        self.bad_source: tuple[int, int] | None = None

    def advance(self) -> list[tuple[int, m.Message]]:
        """The messages of the next step; empty when the plan is finished."""
        while self.steps and not self.steps[0].clients:
            self.steps.pop(0)
        if not self.steps:
            return []
        step = self.steps[0]
        self.waiting = set(step.clients)
        return [(c, step.msg) for c in step.clients]

    def reply(self, client: int, msg: m.Message) -> tuple[Outcome, str]:
        """What an answer means, with a line to log when there is one."""
        if not self.steps:
            return Outcome.IGNORED, ""
        step = self.steps[0]
        if isinstance(msg, m.ExtentError) and msg.repair_id == step.msg.repair_id:
            torn = msg.error.kind is ErrorKind.MissingContextSlot
            if isinstance(step.msg, m.ExtentFlush) and torn:
                self.bad_source = (step.repair.extent, client)
            return Outcome.FAILED, f"extent {msg.extent_id}: {msg.error}"
        if not isinstance(msg, m.RepairAckId) or msg.repair_id != step.msg.repair_id:
            return Outcome.IGNORED, ""
        self.waiting.discard(client)
        if self.waiting:
            return Outcome.WAITING, ""
        self.steps.pop(0)
        if not isinstance(step.msg, m.ExtentReopen):
            return Outcome.STEP_DONE, ""
        self.done += 1
        r = step.repair
        return Outcome.STEP_DONE, (
            f"repaired extent {r.extent} from [{r.source}] to "
            f"{list(r.dests)} ({self.done}/{self.needed})"
        )
