"""The downstairs protocol state machine, sans-IO.

Theory of operation: the driver feeds it connection events (`connected`,
`received`, `disconnected`) and results of work it ran (`finished`); it answers
with actions: messages to send, connections to drop, work to run against the
region, lines to log. It never touches sockets or disks, so every rule here
(negotiation, one active read-write upstairs and generation takeover, the
dependency-ordered job queue) is testable with plain method calls.

Per connection:  START --HereIAm--> NEGOTIATED --PromoteToActive--> PROMOTED
--RegionInfoPlease--> REGION_INFO --ExtentVersionsPlease | LastFlush--> RUNNING.
Ruok is answered in every phase.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, assert_never

import crucible.protocol.messages as m
from crucible.common.definition import RegionDefinition
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.downstairs.probing import JOB_PROBES
from crucible.downstairs.work import WorkQueue
from crucible.observe.probes import DS
from crucible.protocol.capabilities import OURS, Capabilities
from crucible.protocol.roles import (
    MUTATING,
    REPLY_OF,
    ROLES,
    Job,
    Kind,
    ReconcileOp,
    is_job,
    is_reconcile_op,
)
from crucible.protocol.wire import SocketAddr

NIL_UUID = uuid.UUID(int=0)


class Phase(Enum):
    START = "start"
    NEGOTIATED = "negotiated"
    PROMOTED = "promoted"
    REGION_INFO = "region-info"
    RUNNING = "running"


# Work that is not a queued job but still runs in order with the disk work.
Work = Job | ReconcileOp | m.ExtentVersionsPlease


@dataclass(slots=True, init=False)
class Send:
    conn: int
    msg: m.Message

    # Not the dataclass's __init__: compiled with mypyc, that one runs
    # interpreted, and a Send is made for every reply.
    def __init__(self, conn: int, msg: m.Message) -> None:
        self.conn = conn
        self.msg = msg


@dataclass(slots=True)
class Disconnect:
    conn: int
    reason: str


@dataclass(slots=True, init=False)
class Execute:
    conn: int
    work: Work

    def __init__(self, conn: int, work: Work) -> None:  # made per job: as Send's
        self.conn = conn
        self.work = work


@dataclass(slots=True)
class Log:
    text: str


@dataclass(slots=True)
class JobLog:
    """A job arrived: one console line (`describe`), built only if it is shown."""

    job: Job


Action = Send | Disconnect | Execute | Log | JobLog


@dataclass(slots=True)
class Conn:
    id: int
    peer: str
    phase: Phase = Phase.START
    upstairs_id: uuid.UUID = NIL_UUID
    session_id: uuid.UUID = NIL_UUID
    gen: int = 0
    work: WorkQueue = field(default_factory=WorkQueue)
    load: int = 0  # bytes its accepted, unanswered jobs hold or will send back


REPLY_BLOCK_OVERHEAD: Final = 64  # a block's context in a ReadResponse, with room to spare
REPLY_HEADER: Final = 4096
JOB_OVERHEAD: Final = 512  # what a queued job costs besides its data, roughly

# Work that stamps a generation on extents: never above the negotiated one.
_STAMPS_GEN = (m.Flush, m.ExtentLiveFlushClose, m.ExtentFlush)


class DownstairsCore:
    def __init__(
        self,
        definition: RegionDefinition,
        read_only: bool,
        repair_addr: SocketAddr,
        capabilities: Capabilities = OURS,
    ) -> None:
        self.definition = definition
        self._block_size = definition.block_size  # (read per job: a plain field)
        self.capabilities = capabilities
        self.read_only = read_only
        self.repair_addr = repair_addr
        self.conns: dict[int, Conn] = {}
        self.active: set[int] = set()  # read-write: at most one
        self.log_jobs = True
        # Its data plus each block's context (at most REPLY_BLOCK_OVERHEAD), in one frame.
        per_block = definition.block_size + REPLY_BLOCK_OVERHEAD
        self.max_read_blocks = (m.MAX_FRAME_LEN - REPLY_HEADER) // per_block

    # ---- queries for the driver ---------------------------------------------------

    def promoted(self, cid: int) -> bool:
        """The connection is a promoted upstairs (negotiation is done)."""
        c = self.conns.get(cid)
        return c is not None and c.phase not in (Phase.START, Phase.NEGOTIATED)

    def load(self, conn_id: int) -> int:
        """Bytes the connection's accepted, unanswered jobs hold (write data)
        or will send back (read data): the driver stops reading it past a limit."""
        c = self.conns.get(conn_id)
        return 0 if c is None else c.load

    def stuck(self, conn_id: int) -> int:
        """How many jobs wait on dependencies while none runs: jobs that only
        a job never sent could start."""
        c = self.conns.get(conn_id)
        if c is None or c.work.started:
            return 0
        return len(c.work.waiting)

    def wants(self, conn_id: int) -> bool:
        """Should work queued for this connection still run? False once it has
        been dropped or replaced by a newer upstairs: fencing."""
        return conn_id in self.active

    # ---- events ---------------------------------------------------------------------

    def connected(self, conn_id: int, peer: str) -> list[Action]:
        self.conns[conn_id] = Conn(conn_id, peer)
        if DS.on:
            DS.fire("connection__open", conn_id, peer)
        # (the seed's console line, two spaces and all)
        return [Log(f"connection from {peer}  connections count:{len(self.conns)}")]

    def disconnected(self, conn_id: int) -> list[Action]:
        conn = self.conns.pop(conn_id, None)
        self.active.discard(conn_id)
        if conn is None:
            return []
        if DS.on:
            DS.fire("connection__close", conn_id, conn.peer)
        dropped = len(conn.work)
        if not dropped:
            return [Log(f"OK: connection({conn_id}): all done")]
        return [Log(f"connection({conn_id}) from {conn.peer} closed, {dropped} jobs dropped")]

    def received(self, conn_id: int, msg: m.Message) -> list[Action]:
        conn = self.conns.get(conn_id)
        if conn is None:
            return []
        if isinstance(msg, m.Ruok):
            return [Send(conn_id, m.Imok())]
        if conn.phase is Phase.RUNNING:
            return self._running(conn, msg)
        return self._negotiate(conn, msg)

    def finished(self, conn_id: int, work: Work, outcome: Any) -> list[Action]:
        """Work ran against the region; `outcome` is its result or a CrucibleError."""
        conn = self.conns.get(conn_id)
        if conn is None or conn_id not in self.active:
            return []  # fenced or gone: the reply would go nowhere
        failed = isinstance(outcome, CrucibleError)
        if DS.on:
            p = JOB_PROBES.get(type(work))
            if p is not None:
                p.answered(work, outcome, outcome if failed else None)
        acts: list[Action] = [Send(conn_id, self._reply(conn, work, outcome))]
        if failed:
            acts.append(Log(f"{type(work).__name__} {work_id(work)} failed: {outcome}"))
        if is_job(work):
            conn.load -= self._cost(work)
            for job in conn.work.finish(work, not failed):
                acts.append(Execute(conn_id, job))
        return acts

    # ---- negotiation ----------------------------------------------------------------

    def _negotiate(self, conn: Conn, msg: m.Message) -> list[Action]:
        cid = conn.id
        if isinstance(msg, m.HereIAm) and conn.phase is Phase.START:
            v = m.CRUCIBLE_MESSAGE_VERSION
            if msg.version != v and v not in msg.alternate_versions:
                return [
                    Send(cid, m.VersionMismatch(v)),
                    Disconnect(cid, f"upstairs speaks version {msg.version}, we speak {v}"),
                ]
            if msg.read_only != self.read_only:
                return [
                    Send(cid, m.ReadOnlyMismatch(self.read_only)),
                    Disconnect(cid, f"upstairs read_only={msg.read_only}, region mode differs"),
                ]
            if msg.encrypted != self.definition.encrypted:
                return [
                    Send(cid, m.EncryptedMismatch(self.definition.encrypted)),
                    Disconnect(cid, _encryption_mismatch(self.definition.encrypted)),
                ]
            conn.upstairs_id, conn.session_id, conn.gen = msg.upstairs_id, msg.session_id, msg.gen
            conn.phase = Phase.NEGOTIATED
            return [
                Log(
                    f"upstairs {msg.upstairs_id} session {msg.session_id} gen {msg.gen} "
                    f"on connection {cid}"
                ),
                Send(cid, m.YesItsMe(v, self.repair_addr)),
            ]
        if isinstance(msg, m.PromoteToActive) and conn.phase is Phase.NEGOTIATED:
            if not _same_ids(msg, conn):
                return [
                    Send(cid, m.UuidMismatch(conn.upstairs_id)),
                    Disconnect(cid, "PromoteToActive ids differ from HereIAm"),
                ]
            conn.gen = msg.gen
            acts = self._promote(conn)
            if conn.id in self.active:
                conn.phase = Phase.PROMOTED
                acts.append(
                    Send(cid, m.YouAreNowActive(conn.upstairs_id, conn.session_id, conn.gen))
                )
            return acts
        if isinstance(msg, m.RegionInfoPlease) and conn.phase is Phase.PROMOTED:
            conn.phase = Phase.REGION_INFO
            return [Send(cid, m.RegionInfo(self.definition))]
        if isinstance(msg, m.ExtentVersionsPlease) and conn.phase is Phase.REGION_INFO:
            conn.phase = Phase.RUNNING
            conn.work = WorkQueue()
            return [Execute(cid, msg)]
        if isinstance(msg, m.LastFlush) and conn.phase is Phase.REGION_INFO:
            conn.phase = Phase.RUNNING
            conn.work = WorkQueue(msg.last_flush_number)
            return [Log(f"connection {cid} resumes after flush {msg.last_flush_number}")]
        if ROLES[type(msg)].kind is Kind.NEGOTIATION:
            return [
                Disconnect(cid, f"{type(msg).__name__} out of order in phase {conn.phase.value}")
            ]
        return [Log(f"connection {cid}: ignored {type(msg).__name__} in phase {conn.phase.value}")]

    def _promote(self, conn: Conn) -> list[Action]:
        """Activation rules: read-only serves one session per upstairs id;
        read-write serves one upstairs, and only a higher generation takes over."""
        acts: list[Action] = []
        for other_id in sorted(self.active):
            other = self.conns[other_id]
            if self.read_only:
                if other.upstairs_id == conn.upstairs_id:
                    acts.append(Disconnect(other_id, "replaced by a new session of its upstairs"))
                    self.active.discard(other_id)
                continue
            same = (other.upstairs_id, other.session_id, other.gen) == (
                conn.upstairs_id,
                conn.session_id,
                conn.gen,
            )
            if conn.gen < other.gen or (conn.gen == other.gen and not same):
                return [
                    Disconnect(
                        conn.id,
                        f"generation {conn.gen} refused: upstairs "
                        f"{other.upstairs_id} is active with gen {other.gen}",
                    )
                ]
            self.active.discard(other_id)
            acts.append(
                Send(other_id, m.YouAreNoLongerActive(conn.upstairs_id, conn.session_id, conn.gen))
            )
            acts.append(
                Disconnect(other_id, f"taken over by upstairs {conn.upstairs_id} gen {conn.gen}")
            )
        self.active.add(conn.id)
        acts.append(
            Log(f"upstairs {conn.upstairs_id} gen {conn.gen} is active on connection {conn.id}")
        )
        return acts

    # ---- running --------------------------------------------------------------------

    def _running(self, conn: Conn, msg: m.Message) -> list[Action]:
        cid = conn.id
        if isinstance(msg, _STAMPS_GEN) and msg.gen_number > conn.gen:
            # Stored, it would outrank every later activation: the region would be lost.
            why = f"generation {msg.gen_number} is above the session's {conn.gen}"
            err = CrucibleError(ErrorKind.GenerationNumberInvalid, why)
            work_id = msg.repair_id if isinstance(msg, m.ExtentFlush) else msg.job_id
            return [
                Send(cid, m.ErrorReport(conn.upstairs_id, conn.session_id, work_id, err)),
                Disconnect(cid, f"{type(msg).__name__} {work_id}: {why}"),
            ]
        if is_job(msg):
            return self._job(conn, msg)
        if is_reconcile_op(msg):
            if self.read_only:
                return self._refuse_change(conn, msg, msg.repair_id)
            return [
                Log(f"{type(msg).__name__} rep_id:{msg.repair_id} eid:{msg.extent_id}"),
                Execute(cid, msg),
            ]
        if ROLES[type(msg)].kind is Kind.NEGOTIATION:
            return [Disconnect(cid, f"{type(msg).__name__} after negotiation")]
        return [Log(f"connection {cid}: ignored unexpected {type(msg).__name__}")]

    def _job(self, conn: Conn, job: Job) -> list[Action]:
        cid = conn.id
        if isinstance(job, m.Trim) and not self.capabilities.trim:
            # As a plain V13 downstairs, which cannot decode the message.
            return [Disconnect(cid, "Trim is not supported here")]
        if not _same_ids(job, conn):
            return [
                Send(cid, m.UuidMismatch(conn.upstairs_id)),
                Log(f"connection {cid}: job {job.job_id} from a foreign upstairs or session"),
            ]
        if self.read_only and type(job) in MUTATING:
            return self._refuse_change(conn, job, job.job_id)
        if isinstance(job, m.ReadRequest) and job.count > self.max_read_blocks:
            err = CrucibleError(
                ErrorKind.IoError,
                f"a read of {job.count} blocks would not fit in one reply "
                f"(at most {self.max_read_blocks})",
            )
            return [
                Send(cid, m.ErrorReport(conn.upstairs_id, conn.session_id, job.job_id, err)),
                Disconnect(cid, f"read {job.job_id}: {err.detail}"),
            ]
        if isinstance(job, _WRITES):
            bad = self._bad_write(job)
            if bad:
                return [
                    Send(cid, m.ErrorReport(conn.upstairs_id, conn.session_id, job.job_id, bad)),
                    Disconnect(cid, f"malformed write {job.job_id}: {bad}"),
                ]
        if conn.work.knows(job.job_id):
            return [Log(f"connection {cid}: duplicate job {job.job_id} ignored")]
        conn.load += self._cost(job)
        if DS.on:
            JOB_PROBES[type(job)].taken(job)
        acts: list[Action] = [Execute(cid, j) for j in conn.work.add(job)]
        if self.log_jobs:
            acts.insert(0, JobLog(job))
        return acts

    def _cost(self, job: Job) -> int:
        if isinstance(job, _WRITES):
            return JOB_OVERHEAD + len(job.data)
        if isinstance(job, m.ReadRequest):
            return JOB_OVERHEAD + job.count * self._block_size
        return JOB_OVERHEAD

    def _refuse_change(self, conn: Conn, msg: Job | ReconcileOp, work_id: int) -> list[Action]:
        err = CrucibleError(ErrorKind.ModifyingReadOnlyRegion)
        return [
            Send(conn.id, m.ErrorReport(conn.upstairs_id, conn.session_id, work_id, err)),
            Disconnect(conn.id, f"{type(msg).__name__} on a read-only region"),
        ]

    def _bad_write(self, msg: m.Write | m.WriteUnwritten) -> CrucibleError | None:
        bs = self.definition.block_size
        if len(msg.data) % bs:
            return CrucibleError(ErrorKind.DataLenUnaligned)
        if len(msg.data) // bs != len(msg.contexts):
            return CrucibleError(
                ErrorKind.InvalidNumberOfBlocks,
                f"{len(msg.contexts)} contexts for {len(msg.data) // bs} blocks",
            )
        return None

    def describe(self, job: Job) -> str:
        es = self.definition.extent_size
        deps = f"dep:{list(job.dependencies)}"
        match job:
            case m.Write() | m.WriteUnwritten():
                name = "Write" if isinstance(job, m.Write) else "WriteUnwritten"
                eid, bo = divmod(job.start, es)
                return f"{name} rn:{job.job_id} eid:{eid} {deps} bo:{bo} n:{len(job.contexts)}"
            case m.ReadRequest() | m.Trim():
                name = "Read" if isinstance(job, m.ReadRequest) else "Trim"
                eid, bo = divmod(job.start, es)
                return f"{name} rn:{job.job_id} eid:{eid} {deps} bo:{bo} n:{job.count}"
            case m.Flush():
                lim = "" if job.extent_limit is None else f" lim:{job.extent_limit}"
                fl = f"fln:{job.flush_number} gen:{job.gen_number}{lim}"
                return f"flush rn:{job.job_id} {deps} {fl}"
            case m.Barrier():
                return f"barrier rn:{job.job_id} {deps}"
            case (
                m.ExtentLiveClose()
                | m.ExtentLiveFlushClose()
                | m.ExtentLiveRepair()
                | m.ExtentLiveReopen()
            ):
                return f"{type(job).__name__} rn:{job.job_id} eid:{job.extent_id} {deps}"
            case m.ExtentLiveNoOp():
                return f"{type(job).__name__} rn:{job.job_id} {deps}"
            case _:
                assert_never(job)

    # ---- replies ---------------------------------------------------------------------

    def _reply(self, conn: Conn, work: Work, outcome: Any) -> m.Message:
        """What answers finished work: its reply type (ROLES), or ErrorReport
        for a failed job that is not part of live repair (whose replies carry
        the error themselves)."""
        up, sess = conn.upstairs_id, conn.session_id
        err = outcome if isinstance(outcome, CrucibleError) else None
        match work:  # the bulk of all replies first (reads: one test, not five)
            case m.ReadRequest():
                if err:
                    return m.ErrorReport(up, sess, work.job_id, err)
                ctxs, data = outcome
                return m.ReadResponse(up, sess, work.job_id, ctxs, data)
            case m.Write() | m.WriteUnwritten() | m.Trim() | m.Flush() | m.Barrier():
                if err:
                    return m.ErrorReport(up, sess, work.job_id, err)
                reply: m.Message = REPLY_OF[type(work)](up, sess, work.job_id, None)
                return reply
            case m.ExtentLiveClose() | m.ExtentLiveFlushClose():
                return m.ExtentLiveCloseAck(up, sess, work.job_id, outcome)
            case m.ExtentLiveRepair() | m.ExtentLiveReopen() | m.ExtentLiveNoOp():
                live: m.Message = REPLY_OF[type(work)](up, sess, work.job_id, err)
                return live
            case m.ExtentVersionsPlease():
                if err:
                    return m.ErrorReport(up, sess, 0, err)
                return m.ExtentVersions(*outcome)
            case m.ExtentFlush() | m.ExtentClose() | m.ExtentRepair() | m.ExtentReopen():
                if err:
                    return m.ExtentError(work.repair_id, work.extent_id, err)
                return m.RepairAckId(work.repair_id)
            case _:
                assert_never(work)


_WRITES = (m.Write, m.WriteUnwritten)


def _same_ids(msg: Job | m.PromoteToActive, conn: Conn) -> bool:
    """The message names the connection's upstairs and session. Identity
    first: decoding gives equal ids one object, and compiled code compares
    a pair of UUIDs by calling UUID.__eq__, which is Python."""
    up, sess = msg.upstairs_id, msg.session_id
    return (up is conn.upstairs_id or up == conn.upstairs_id) and (
        sess is conn.session_id or sess == conn.session_id
    )


def work_id(work: Work) -> int:
    """The id a log line or an error report names work by."""
    match work:
        case m.ExtentFlush() | m.ExtentClose() | m.ExtentRepair() | m.ExtentReopen():
            return work.repair_id
        case m.ExtentVersionsPlease():
            return 0
        case _:
            return work.job_id


def _encryption_mismatch(region_encrypted: bool) -> str:
    if region_encrypted:
        return "the upstairs has no key, and this region is encrypted"
    return "the upstairs has a key, and this region is not encrypted"
