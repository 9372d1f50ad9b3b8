"""What an upstairs reports about itself (Upstairs.info()): plain dataclasses,
ready to be shown, compared in tests, or serialized (`as_dict`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class LiveRepairStatus:
    source: int  # client index of the healthy copy
    targets: list[int]
    extent: int  # the extent being repaired
    extent_count: int
    repaired: int  # extents copied so far
    confirmed: int  # extents that already matched
    aborting: str | None  # why it is being aborted, if it is


@dataclass(frozen=True, slots=True)
class VerifyStatus:
    """The background verify of the replicas (scrub.py)."""

    running: bool
    rate: float  # bytes of the volume per second (0 while a pass asked for runs unlimited)
    position: int  # the next block to compare
    total: int  # blocks in the volume
    passes: int  # whole passes done
    divergent: int  # blocks found differing between replicas, in all
    unresolved: int  # of those, blocks no two replicas agreed on


@dataclass(slots=True)
class GuestCount:
    ops: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class DownstairsStatus:
    target: str  # host:port
    state: str  # active, offline, faulted, live-repair, ... (state.py)
    mode: str  # how it rejoins when it reconnects: new, offline, faulted, replaced
    jobs_in_flight: int
    bytes_in_flight: int
    last_error: str
    connections: int  # connections made so far
    trim: bool | None  # takes the Trim message (None: not known yet)
    live_repairs: int  # live repairs of this downstairs finished
    live_repairs_aborted: int
    extents_repaired: int  # by those live repairs: extents copied to it
    extents_confirmed: int  # and extents that already matched


@dataclass(frozen=True, slots=True)
class UpstairsStatus:
    state: str  # initializing, go-active, active, deactivating, disabled
    generation: int
    upstairs_id: str
    session_id: str
    block_size: int | None  # None until a downstairs has described the region
    extent_size: int | None
    extent_count: int | None
    total_size: int | None  # bytes
    downstairs: list[DownstairsStatus]
    live_repair: LiveRepairStatus | None
    live_repairs: int  # finished live repairs
    live_repairs_aborted: int
    jobs: int  # in the job table (not yet retired)
    guest_jobs_waiting: int  # not yet acked to the guest
    next_job_id: int
    next_flush: int
    reconcile_needed: int  # extents the latest reconciliation had to repair
    reconcile_done: int
    integrity_errors: int
    reads_retried: int  # reads sent to another replica after one failed them
    verify: VerifyStatus
    blocks_rewritten: int  # bad blocks of a replica rewritten from a good copy
    retired: int  # jobs retired so far
    guest: dict[str, GuestCount]  # guest jobs acked, by kind (read, write, flush, ...)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
