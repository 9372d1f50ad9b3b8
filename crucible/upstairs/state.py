"""The states of the upstairs and what it knows about each of its three downstairs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import Enum

from crucible.common.definition import RegionDefinition
from crucible.protocol.wire import SocketAddr
from crucible.upstairs.mend import ExtentVersions


class UpState(Enum):
    INIT = "initializing"
    GO_ACTIVE = "go-active"
    ACTIVE = "active"
    DEACTIVATING = "deactivating"
    DISABLED = "disabled"


class CState(Enum):
    IDLE = "new"
    CONNECTING = "connecting"
    NEGOTIATING = "negotiating"
    WAIT_QUORUM = "wait-quorum"
    RECONCILE = "reconcile"
    ACTIVE = "active"
    OFFLINE = "offline"
    FAULTED = "faulted"
    REPAIR_READY = "live-repair-ready"
    LIVE_REPAIR = "live-repair"
    DISABLED = "disabled"


class Mode(Enum):
    """How a (re)connecting downstairs rejoins once negotiated."""

    NEW = "new"  # at activation: compared with the others and reconciled
    OFFLINE = "offline"  # dropped while active: LastFlush, then the held jobs are replayed
    FAULTED = "faulted"  # missed jobs: live repair from a healthy replica
    REPLACED = "replaced"  # a new region at a new address: live repair fills it


@dataclass
class Client:
    id: int
    target: SocketAddr
    state: CState = CState.IDLE
    mode: Mode = Mode.NEW
    phase: str = ""
    repair_addr: SocketAddr | None = None
    region: RegionDefinition | None = None
    region_uuid: uuid.UUID | None = None  # the region this client must keep talking to
    versions: ExtentVersions | None = None
    last_rx: float = 0.0
    last_ping: float = 0.0
    reconnect_at: float | None = None
    offline_since: float | None = None
    last_flush_done: int | None = None
    inflight_jobs: int = 0
    inflight_bytes: int = 0
    skipped: set[int] = field(default_factory=set)
    # Jobs below this id were never sent on the current session (live repair
    # starts one): dependencies on them are dropped.
    first_job: int = 0
    last_error: str = ""
    connects: int = 0

    _name: tuple[SocketAddr, str] | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        """host:port of the target (built once per target: it is in every reply's checks)."""
        if self._name is None or self._name[0] is not self.target:
            self._name = (self.target, f"{self.target[0]}:{self.target[1]}")
        return self._name[1]

    @property
    def holds_jobs(self) -> bool:
        """Offline (or reconnecting to resume): jobs wait here for its return."""
        return self.state is CState.OFFLINE or (
            self.mode is Mode.OFFLINE and self.state in (CState.CONNECTING, CState.NEGOTIATING)
        )

    @property
    def accepts_io(self) -> bool:
        return self.state in (CState.ACTIVE, CState.LIVE_REPAIR) or self.holds_jobs
