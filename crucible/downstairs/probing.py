"""Which of Crucible's downstairs probes a message fires (observe/probes.py)."""

from __future__ import annotations

from typing import Any, Final

from crucible.observe.probes import DS_JOBS
from crucible.protocol import messages as m

# The submit probes of each job message, and the os probes of those that
# reach the region.
SUBMIT: Final[dict[type, tuple[str, str]]] = {
    m.ReadRequest: DS_JOBS["read"],
    m.Write: DS_JOBS["write"],
    m.WriteUnwritten: DS_JOBS["writeunwritten"],
    m.Flush: DS_JOBS["flush"],
    m.Barrier: DS_JOBS["barrier"],
    m.Trim: DS_JOBS["trim"],
    m.ExtentLiveClose: DS_JOBS["el_close"],
    m.ExtentLiveFlushClose: DS_JOBS["el_flush_close"],
    m.ExtentLiveRepair: DS_JOBS["el_repair"],
    m.ExtentLiveReopen: DS_JOBS["el_reopen"],
    m.ExtentLiveNoOp: DS_JOBS["el_noop"],
}
OS: Final[dict[type, tuple[str, str]]] = {
    t: (f"os__{op}__start", f"os__{op}__done")
    for t, op in [
        (m.ReadRequest, "read"),
        (m.Write, "write"),
        (m.WriteUnwritten, "writeunwritten"),
        (m.Flush, "flush"),
        (m.Trim, "trim"),
    ]
}


def moved_bytes(work: Any, outcome: Any) -> int:
    """Bytes a finished job wrote or read."""
    if isinstance(work, (m.Write, m.WriteUnwritten)):
        return len(work.data)
    if isinstance(work, m.ReadRequest) and isinstance(outcome, tuple):
        return len(outcome[1])
    return 0
