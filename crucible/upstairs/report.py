"""An upstairs' state in the shapes Crucible's own tools read: the control
API's `/info` and `/work` (Crucible's upstairs control server) and the
`up__status` probe's DtraceInfo record (what its DTrace scripts print)."""

from __future__ import annotations

from typing import Any

from crucible.upstairs.jobs import (
    BarrierOp,
    FlushOp,
    IOState,
    Job,
    LiveCloseOp,
    LiveNoOp,
    LiveReopenOp,
    LiveRepairOp,
    ReadOp,
    TrimOp,
    WriteOp,
)
from crucible.upstairs.status import DownstairsStatus, UpstairsStatus

# Our client state names (DsState.name) as Crucible's DsState: the control
# API's tagged form, and the DTrace scripts' Display form.
_CONNECTING = {
    "wait-quorum": "wait_quorum",
    "reconcile": "reconcile",
    "live-repair-ready": "live_repair_ready",
    "negotiating": "start",
}
_DISPLAY = {
    "active": "Active",
    "live-repair": "LiveRepair",
    "wait-quorum": "WaitQuorum",
    "reconcile": "Reconcile",
    "live-repair-ready": "LiveRepairReady",
    "disabled": "Disabled",
}
_MODE_DISPLAY = {"new": "New", "offline": "Offline", "faulted": "Faulted", "replaced": "Replaced"}


def ds_state_tagged(d: DownstairsStatus) -> dict[str, Any]:
    if d.state == "active":
        return {"type": "active"}
    if d.state == "live-repair":
        return {"type": "live_repair"}
    if d.state == "disabled":
        return {"type": "stopping", "value": {"type": "disabled"}}
    state = _CONNECTING.get(d.state, "wait_connect")
    return {"type": "connecting", "value": {"state": {"type": state}, "mode": d.mode}}


def ds_state_display(d: DownstairsStatus) -> str:
    shown = _DISPLAY.get(d.state)
    if shown is not None:
        return shown
    if d.state == "faulted" and d.mode == "replaced":
        return "Replaced"
    return _MODE_DISPLAY.get(d.mode if d.state not in ("offline", "faulted") else d.state, "New")


def _up_state(state: str) -> str:
    return state if state in ("active", "deactivating") else "initializing"


def info(s: UpstairsStatus) -> dict[str, Any]:
    """GET /info: Crucible's UpstairsStats fields, then ours."""
    ds = s.downstairs
    rep = s.live_repair
    limit = [rep.extent if rep is not None and i in rep.targets else None for i in range(len(ds))]
    crucible: dict[str, Any] = {
        "state": _up_state(s.state),
        "ds_state": [ds_state_tagged(d) for d in ds],
        "up_jobs": s.guest_jobs_waiting,
        "ds_jobs": s.jobs,
        "reconcile_done": s.reconcile_done,
        "reconcile_needed": s.reconcile_needed,
        "extents_repaired": [d.extents_repaired for d in ds],
        "extents_confirmed": [d.extents_confirmed for d in ds],
        "extent_limit": limit,
        "live_repair_completed": [d.live_repairs for d in ds],
        "live_repair_aborted": [d.live_repairs_aborted for d in ds],
    }
    ours = s.as_dict()
    ours["upstairs_state"] = ours.pop("state")
    return {**crucible, **ours}


def dtrace_info(s: UpstairsStatus, io_count: dict[str, list[int]]) -> dict[str, Any]:
    """The up__status probe's record: Crucible's DtraceInfo fields."""
    ds = s.downstairs
    zeros = [0] * len(ds)
    rep = s.live_repair
    return {
        "upstairs_id": s.upstairs_id,
        "session_id": s.session_id,
        "up_count": s.guest_jobs_waiting,
        "next_job_id": s.next_job_id,
        "ds_count": s.jobs,
        "write_bytes_out": max((d.bytes_in_flight for d in ds if d.state == "active"), default=0),
        "ds_state": [ds_state_display(d) for d in ds],
        "ds_io_count": io_count,
        "ds_reconciled": s.reconcile_done,
        "ds_reconcile_needed": s.reconcile_needed,
        "ds_reconcile_aborted": 0,
        "ds_live_repair_completed": [d.live_repairs for d in ds],
        "ds_live_repair_aborted": [d.live_repairs_aborted for d in ds],
        "ds_connected": [d.connections for d in ds],
        "ds_replaced": zeros,
        "ds_extents_repaired": [d.extents_repaired for d in ds],
        "ds_extents_confirmed": [d.extents_confirmed for d in ds],
        "ds_delay_us": zeros,
        "ds_ro_lr_skipped": zeros,
        "ds_extent_limit": rep.extent if rep is not None else 0,
    }


def io_count(jobs: list[Job]) -> dict[str, list[int]]:
    """Jobs in the table by their state on each client (DtraceInfo's ds_io_count)."""
    out = {"in_progress": [0, 0, 0], "done": [0, 0, 0], "skipped": [0, 0, 0], "error": [0, 0, 0]}
    key = {
        IOState.IN_PROGRESS: "in_progress",
        IOState.DONE: "done",
        IOState.SKIPPED: "skipped",
        IOState.ERROR: "error",
    }
    for job in jobs:
        for i, st in enumerate(job.state):
            out[key[st]][i] += 1
    return out


_STATE = {
    IOState.IN_PROGRESS: "Sent",
    IOState.DONE: "Done",
    IOState.SKIPPED: "Skip",
    IOState.ERROR: " Err",  # (Crucible's own spelling, leading space and all)
}


def work_summary(job: Job) -> dict[str, Any]:
    """A job as the control API's /work lists it (Crucible's WorkSummary)."""
    op = job.op
    job_type: str
    num = 0
    match op:
        case WriteOp():
            job_type, num = ("WriteU" if op.unwritten else "Write"), len(op.contexts)
        case ReadOp():
            job_type, num = "Read", op.count
        case TrimOp():
            job_type, num = "Trim", op.count
        case FlushOp():
            job_type = "Flush"
        case BarrierOp():
            job_type = "Barrier"
        case LiveCloseOp():
            job_type, num = "FClose", op.extent  # (Crucible puts the extent here)
        case LiveRepairOp():
            job_type, num = "Repair", op.extent
        case LiveReopenOp():
            job_type, num = "Reopen", op.extent
        case LiveNoOp():
            job_type = "NoOp"
    return {
        "id": job.id,
        "replay": job.replay,
        "job_type": job_type,
        "num_blocks": num,
        "deps": list(job.deps),
        "ack_status": "acked" if job.acked else "not_acked",
        "state": [_STATE[s] for s in job.state],
    }
