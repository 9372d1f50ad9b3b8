"""Which of Crucible's downstairs probes a message fires (observe/probes.py)."""

from __future__ import annotations

from typing import Any, Final

from crucible.observe.probes import DS, DS_JOBS, Probe
from crucible.protocol import messages as m


def _pair(start: str, done: str) -> tuple[Probe, Probe]:
    return DS.probe(start), DS.probe(done)


# The submit probes of each job message, and the os probes of those that
# reach the region.
SUBMIT: Final[dict[type, tuple[Probe, Probe]]] = {
    t: _pair(*DS_JOBS[op])
    for t, op in [
        (m.ReadRequest, "read"),
        (m.Write, "write"),
        (m.WriteUnwritten, "writeunwritten"),
        (m.Flush, "flush"),
        (m.Barrier, "barrier"),
        (m.Trim, "trim"),
        (m.ExtentLiveClose, "el_close"),
        (m.ExtentLiveFlushClose, "el_flush_close"),
        (m.ExtentLiveRepair, "el_repair"),
        (m.ExtentLiveReopen, "el_reopen"),
        (m.ExtentLiveNoOp, "el_noop"),
    ]
}
OS: Final[dict[type, tuple[Probe, Probe]]] = {
    t: _pair(f"os__{op}__start", f"os__{op}__done")
    for t, op in [
        (m.ReadRequest, "read"),
        (m.Write, "write"),
        (m.WriteUnwritten, "writeunwritten"),
        (m.Flush, "flush"),
        (m.Trim, "trim"),
    ]
}
WORK_START: Final = DS.probe("work__start")
WORK_DONE: Final = DS.probe("work__done")


def moved_bytes(work: Any, outcome: Any) -> int:
    """Bytes a finished job wrote or read."""
    if isinstance(work, (m.Write, m.WriteUnwritten)):
        return len(work.data)
    if isinstance(work, m.ReadRequest) and isinstance(outcome, tuple):
        return len(outcome[1])
    return 0
