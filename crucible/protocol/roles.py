"""What each message does, declared once.

ROLES gives every message type its role: which phase it belongs to, for a
job the reply it gets when it succeeds, whether it changes the region,
whether it belongs to live repair, whether it completes everything before it
(flush, barrier). Every other list of message types in the project is
derived from it. The unions below name the same groups as types, so that
`match` statements over them can end in `assert_never` and mypy reports a
forgotten case; a test checks that unions and table agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final, TypeGuard

import crucible.protocol.messages as m


class Kind(Enum):
    NEGOTIATION = "negotiation"  # upstairs -> downstairs, before IO
    NEGOTIATION_REPLY = "negotiation reply"
    FENCING = "fencing"  # the downstairs no longer serves this upstairs
    KEEPALIVE = "keepalive"
    RECONCILE = "reconcile"  # one reconciliation step, outside the job queue
    RECONCILE_REPLY = "reconcile reply"
    JOB = "job"  # ordered by its dependencies in the downstairs' job queue
    JOB_REPLY = "job reply"
    RESERVED = "reserved"  # never sent


@dataclass(frozen=True)  # (not slotted: compiled, see scripts/compile)
class Role:
    kind: Kind
    reply: type | None = None  # a job: what answers it when it succeeds
    mutating: bool = False  # changes the region: a read-only downstairs refuses it
    live_repair: bool = False  # one of the four jobs of live repair
    resets: bool = False  # completes every job before it (flush, barrier)


_NEG = Role(Kind.NEGOTIATION)
_NEG_REPLY = Role(Kind.NEGOTIATION_REPLY)
_REC = Role(Kind.RECONCILE, mutating=True)


def _live(reply: type) -> Role:
    return Role(Kind.JOB, reply, mutating=True, live_repair=True)


ROLES: Final[dict[type, Role]] = {
    m.HereIAm: _NEG,
    m.YesItsMe: _NEG_REPLY,
    m.VersionMismatch: _NEG_REPLY,
    m.ReadOnlyMismatch: _NEG_REPLY,
    m.EncryptedMismatch: _NEG_REPLY,
    m.PromoteToActive: _NEG,
    m.YouAreNowActive: _NEG_REPLY,
    m.YouAreNoLongerActive: Role(Kind.FENCING),
    m.UuidMismatch: Role(Kind.FENCING),
    m.Ruok: Role(Kind.KEEPALIVE),
    m.Imok: Role(Kind.KEEPALIVE),
    m.ExtentClose: _REC,
    m.ExtentReopen: _REC,
    m.ExtentFlush: _REC,
    m.ExtentRepair: _REC,
    m.RepairAckId: Role(Kind.RECONCILE_REPLY),
    m.ExtentError: Role(Kind.RECONCILE_REPLY),
    m.ExtentLiveClose: _live(m.ExtentLiveCloseAck),
    m.ExtentLiveFlushClose: _live(m.ExtentLiveCloseAck),
    m.ExtentLiveRepair: _live(m.ExtentLiveRepairAckId),
    m.ExtentLiveReopen: _live(m.ExtentLiveAckId),
    m.ExtentLiveNoOp: _live(m.ExtentLiveAckId),
    m.ExtentLiveCloseAck: Role(Kind.JOB_REPLY),
    m.ExtentLiveRepairAckId: Role(Kind.JOB_REPLY),
    m.ExtentLiveAckId: Role(Kind.JOB_REPLY),
    m.RegionInfoPlease: _NEG,
    m.RegionInfo: _NEG_REPLY,
    m.ExtentVersionsPlease: _NEG,
    m.ExtentVersions: _NEG_REPLY,
    m.LastFlush: _NEG,
    m.Write: Role(Kind.JOB, m.WriteAck, mutating=True),
    m.WriteAck: Role(Kind.JOB_REPLY),
    m.Flush: Role(Kind.JOB, m.FlushAck, resets=True),
    m.FlushAck: Role(Kind.JOB_REPLY),
    m.Barrier: Role(Kind.JOB, m.BarrierAck, resets=True),
    m.BarrierAck: Role(Kind.JOB_REPLY),
    m.ReadRequest: Role(Kind.JOB, m.ReadResponse),
    m.ReadResponse: Role(Kind.JOB_REPLY),
    m.WriteUnwritten: Role(Kind.JOB, m.WriteUnwrittenAck, mutating=True),
    m.WriteUnwrittenAck: Role(Kind.JOB_REPLY),
    m.ErrorReport: Role(Kind.JOB_REPLY),
    m.Unknown: Role(Kind.RESERVED),
    m.Trim: Role(Kind.JOB, m.TrimAck, mutating=True),
    m.TrimAck: Role(Kind.JOB_REPLY),
}


def of_kind(kind: Kind) -> tuple[type, ...]:
    return tuple(cls for cls, role in ROLES.items() if role.kind is kind)


JOB_TYPES: Final = of_kind(Kind.JOB)
JOB_REPLY_TYPES: Final = frozenset(of_kind(Kind.JOB_REPLY))
NEGOTIATION_TYPES: Final = of_kind(Kind.NEGOTIATION)
MUTATING: Final = frozenset(cls for cls, role in ROLES.items() if role.mutating)
RESETS: Final = frozenset(cls for cls, role in ROLES.items() if role.resets)
LIVE_REPAIR_TYPES: Final = frozenset(cls for cls, role in ROLES.items() if role.live_repair)
REPLY_OF: Final[dict[type, type]] = {
    cls: r.reply for cls, r in ROLES.items() if r.reply is not None
}

# The same groups as types, for `match` with `assert_never`.
Job = (
    m.Write
    | m.WriteUnwritten
    | m.Trim
    | m.ReadRequest
    | m.Flush
    | m.Barrier
    | m.ExtentLiveClose
    | m.ExtentLiveFlushClose
    | m.ExtentLiveRepair
    | m.ExtentLiveReopen
    | m.ExtentLiveNoOp
)
ReconcileOp = m.ExtentFlush | m.ExtentClose | m.ExtentRepair | m.ExtentReopen
JobReply = (
    m.WriteAck
    | m.WriteUnwrittenAck
    | m.TrimAck
    | m.FlushAck
    | m.BarrierAck
    | m.ReadResponse
    | m.ErrorReport
    | m.ExtentLiveCloseAck
    | m.ExtentLiveRepairAckId
    | m.ExtentLiveAckId
)
NegotiationReply = (
    m.YesItsMe
    | m.VersionMismatch
    | m.ReadOnlyMismatch
    | m.EncryptedMismatch
    | m.YouAreNowActive
    | m.RegionInfo
    | m.ExtentVersions
)


def is_job(msg: object) -> TypeGuard[Job]:
    return type(msg) in _JOBS


def is_reconcile_op(msg: object) -> TypeGuard[ReconcileOp]:
    return type(msg) in _RECONCILE_OPS


_JOBS: Final = frozenset(JOB_TYPES)
_RECONCILE_OPS: Final = frozenset(of_kind(Kind.RECONCILE))
