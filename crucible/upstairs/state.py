"""The states of the upstairs and of each of its three downstairs.

Theory of operation. A downstairs client's state is a Stage and, while it is
connecting, the Mode it will rejoin in:

    IDLE --activate--> CONNECT --connected--> HELLO --YesItsMe--> PROBE
    --capabilities--> PROMOTE --YouAreNowActive--> REGION --RegionInfo-->
      VERSIONS --ExtentVersions--> WAIT_QUORUM (activation: compared with the
                                   others, maybe RECONCILE, then ACTIVE)
                               or  REPAIR_READY (the volume serves: LIVE_REPAIR,
                                   then ACTIVE)
                               or  ACTIVE (read-only: nothing to reconcile)
      or, in mode OFFLINE, straight to ACTIVE (LastFlush, then the held jobs
      are replayed)

Any connected stage can fall back to CONNECT (a drop, a fault, a reconcile
that is started over), and any stage to IDLE (deactivation, failed
activation) or DISABLED (another upstairs took over). The mode says how a
client that falls back rejoins: NEW at activation; OFFLINE when an active one
drops (its jobs are held for it); FAULTED when it cannot be trusted (its jobs
are skipped, live repair brings it back); REPLACED for a new region at a new
address. The mode changes only on the way into CONNECT, except that
REPAIR_READY -> WAIT_QUORUM (all three were faulted: reconciled as at
activation) starts again as NEW.

Every legal move is in the table below; `check_transition` is the one place
that judges a move, and Client.set_state (client.py) the one place that
makes it. An illegal move raises IllegalTransition at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class UpState(Enum):
    INIT = "initializing"
    GO_ACTIVE = "go-active"
    ACTIVE = "active"
    DEACTIVATING = "deactivating"
    DISABLED = "disabled"


class Stage(Enum):
    IDLE = "new"  # not wanted: before activation, after deactivation
    CONNECT = "connect"  # no connection: one is being made, or will be after a delay
    HELLO = "hello"  # HereIAm sent, YesItsMe expected
    PROBE = "probe"  # its repair server is asked what it supports
    PROMOTE = "promote"  # PromoteToActive sent
    REGION = "region"  # RegionInfoPlease sent
    VERSIONS = "versions"  # ExtentVersionsPlease sent
    WAIT_QUORUM = "wait-quorum"  # negotiated: waits for the others (activation)
    RECONCILE = "reconcile"  # activation's reconciliation runs
    REPAIR_READY = "live-repair-ready"  # negotiated while the volume serves
    ACTIVE = "active"  # takes IO
    LIVE_REPAIR = "live-repair"  # being repaired: takes the IO live repair sends it
    DISABLED = "disabled"  # another upstairs took over; nothing until a new activation


class Mode(Enum):
    """How a (re)connecting downstairs rejoins once negotiated."""

    NEW = "new"  # at activation: compared with the others and reconciled
    OFFLINE = "offline"  # dropped while active: LastFlush, then the held jobs are replayed
    FAULTED = "faulted"  # missed jobs: live repair from a healthy replica
    REPLACED = "replaced"  # a new region at a new address: live repair fills it


# Stages on the way from a connection to IO: a client in one of them has a mode.
CONNECTING = frozenset(
    {
        Stage.CONNECT,
        Stage.HELLO,
        Stage.PROBE,
        Stage.PROMOTE,
        Stage.REGION,
        Stage.VERSIONS,
        Stage.WAIT_QUORUM,
        Stage.RECONCILE,
        Stage.REPAIR_READY,
    }
)
NEGOTIATING = frozenset({Stage.HELLO, Stage.PROBE, Stage.PROMOTE, Stage.REGION, Stage.VERSIONS})
# Connected: pinged, and dropped when silent too long.
CONNECTED = (CONNECTING - {Stage.CONNECT}) | {Stage.ACTIVE, Stage.LIVE_REPAIR}
# A tuple, not a set: it is asked on every IO and reply, and an Enum's
# __hash__ is Python code where a tuple compares by identity.
TAKES_IO = (Stage.ACTIVE, Stage.LIVE_REPAIR)


@dataclass(frozen=True, slots=True)
class DsState:
    stage: Stage
    mode: Mode | None = None  # set exactly while connecting

    @property
    def name(self) -> str:
        """As people read it: offline and faulted clients say so while they
        wait to reconnect."""
        if self.stage is Stage.CONNECT:
            if self.mode is Mode.OFFLINE:
                return "offline"
            if self.mode in (Mode.FAULTED, Mode.REPLACED):
                return "faulted"
            return "connecting"
        if self.stage in NEGOTIATING:
            return "negotiating"
        return str(self.stage.value)


IDLE = DsState(Stage.IDLE)
ACTIVE = DsState(Stage.ACTIVE)
LIVE_REPAIR = DsState(Stage.LIVE_REPAIR)
DISABLED = DsState(Stage.DISABLED)


# Where each stage may go next, besides the moves every stage has: back to
# CONNECT (from a connected or connecting stage), IDLE and DISABLED.
_FORWARD: dict[Stage, frozenset[Stage]] = {
    Stage.IDLE: frozenset({Stage.CONNECT}),
    Stage.DISABLED: frozenset({Stage.CONNECT}),
    Stage.CONNECT: frozenset({Stage.HELLO}),
    Stage.HELLO: frozenset({Stage.PROBE}),
    Stage.PROBE: frozenset({Stage.PROMOTE}),
    Stage.PROMOTE: frozenset({Stage.REGION}),
    Stage.REGION: frozenset({Stage.VERSIONS, Stage.ACTIVE}),
    Stage.VERSIONS: frozenset({Stage.WAIT_QUORUM, Stage.REPAIR_READY, Stage.ACTIVE}),
    Stage.WAIT_QUORUM: frozenset({Stage.RECONCILE, Stage.ACTIVE}),
    Stage.RECONCILE: frozenset({Stage.WAIT_QUORUM}),
    Stage.REPAIR_READY: frozenset({Stage.LIVE_REPAIR, Stage.WAIT_QUORUM}),
    Stage.ACTIVE: frozenset(),
    Stage.LIVE_REPAIR: frozenset({Stage.ACTIVE}),
}
_ANYWHERE = frozenset({Stage.IDLE, Stage.DISABLED})


class IllegalTransition(Exception):
    """A state change the table does not allow: a bug in the upstairs."""


def check_transition(old: DsState, new: DsState) -> None:
    """Raise IllegalTransition unless `old -> new` is a legal move."""
    a, b = old.stage, new.stage
    if (b in CONNECTING) != (new.mode is not None):
        raise IllegalTransition(f"{new} must carry a mode exactly while connecting")
    if b in _ANYWHERE:
        return
    if b is Stage.CONNECT:
        if a in _ANYWHERE:
            ok = new.mode is Mode.NEW
        elif a is Stage.CONNECT and old.mode is Mode.FAULTED:
            ok = new.mode in (Mode.FAULTED, Mode.REPLACED)  # replace() of a faulted one
        elif a in CONNECTING:
            ok = new.mode in (old.mode, Mode.FAULTED)
        elif a is Stage.ACTIVE:
            ok = True  # offline, faulted, replaced, or a read-only one reconnecting
        else:  # LIVE_REPAIR
            ok = new.mode is Mode.FAULTED
        if not ok:
            raise IllegalTransition(f"{old} -> {new}: no such change of mode")
        return
    if b not in _FORWARD[a]:
        raise IllegalTransition(f"{old} -> {new}")
    if a is Stage.REGION and b is Stage.ACTIVE and old.mode is not Mode.OFFLINE:
        raise IllegalTransition(f"{old} -> {new}: only an offline client resumes at once")
    if a is Stage.VERSIONS and b is Stage.REPAIR_READY and old.mode is Mode.OFFLINE:
        raise IllegalTransition(f"{old} -> {new}: an offline client resumes, not repairs")
    restart = a is Stage.REPAIR_READY and b is Stage.WAIT_QUORUM and new.mode is Mode.NEW
    if b in CONNECTING and new.mode != old.mode and not restart:
        raise IllegalTransition(f"{old} -> {new}: the mode changes only into CONNECT")
