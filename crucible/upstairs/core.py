"""The upstairs state machine, sans-IO.

Theory of operation. The driver feeds in guest requests (activate, read,
write, flush, deactivate), connection events and decoded messages, each with
the current time, and calls `tick(now)` for timers. Every call returns actions
(actions.py): connect, send, drop, complete a guest request, log. Nothing here
blocks or touches a socket, so the rules below can be tested under a simulated
network.

* Activation: every client connects and negotiates (HereIAm, PromoteToActive,
  RegionInfoPlease, ExtentVersionsPlease) to WAIT_QUORUM. Read-write needs all
  three; the generation must exceed every stored generation; extents that
  differ are reconciled (mend.py) one step at a time; then all go ACTIVE.
  Read-only goes active with the first downstairs and never reconciles.
* IO: each guest request becomes a job with an id from 1000 and dependencies
  from the blocks it touches (deps.py); it is sent to every ACTIVE client at
  once (the downstairs enforces order), held for an OFFLINE one, skipped for
  the rest. Writes are acked when queued; reads on the first reply that
  verifies; flushes when two clients are done (three with a snapshot).
* Retirement: jobs leave the table only when a flush or barrier has finished
  on all three; until then they are kept for replay to a client that drops
  and comes back (it resumes with LastFlush and gets every later job again).
* Faults: a client that holds too much while offline, fails a write or
  flush, or is replaced, is FAULTED: its jobs are skipped. It reconnects, and
  live repair (live_repair.py) copies what it missed extent by extent while
  guest IO goes on; then it is ACTIVE again.
* Timers: a flush after `flush_timeout` idle with unflushed work; a barrier
  when the finished-but-unretired backlog grows; Ruok every 5 s; a client
  silent for 45 s is dropped.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import xxhash

from crucible.common.definition import RegionDefinition
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.protocol import messages as m
from crucible.protocol.wire import SocketAddr
from crucible.upstairs import live_repair, negotiation
from crucible.upstairs.actions import Action, Complete, Connect, Drop, Log, Send
from crucible.upstairs.deps import BlockMap
from crucible.upstairs.jobs import (
    LIVE_OPS,
    BarrierOp,
    FlushOp,
    IOState,
    Job,
    Op,
    ReadOp,
    TrimOp,
    WriteOp,
)
from crucible.upstairs.live_repair import LiveRepair
from crucible.upstairs.mend import (
    Repair,
    generation_floor,
    mend,
    next_flush_number,
)
from crucible.upstairs.reconcile import Outcome, Reconciliation
from crucible.upstairs.state import Client, CState, Mode, UpState
from crucible.upstairs.verify import check_read_reply, first_difference

FIRST_JOB_ID = 1000
MAX_IO_BLOCKS_BYTES = 1 << 20
# Connected states: pinged, and dropped when silent too long.
LIVE_STATES = (
    CState.NEGOTIATING,
    CState.WAIT_QUORUM,
    CState.RECONCILE,
    CState.ACTIVE,
    CState.REPAIR_READY,
    CState.LIVE_REPAIR,
)


@dataclass
class Options:
    read_only: bool = False
    flush_timeout: float = 0.5
    ping_interval: float = 5.0
    timeout: float = 45.0
    reconnect_delay: float = 1.0
    max_jobs: int = 1500  # in flight per downstairs before the guest waits
    offline_max_jobs: int = 1000  # held for an offline downstairs before it is faulted
    offline_max_bytes: int = 50 << 20
    # Each downstairs connection may buffer its own copy of what is in flight.
    max_bytes: int = 32 << 20
    barrier_jobs: int = 500  # finished but unretired, before a barrier
    barrier_bytes: int = 64 << 20
    # With fewer than two downstairs active, how long one that went offline may
    # hold jobs before it is faulted (and flushes fail instead of waiting).
    degraded_timeout: float = 30.0
    log_jobs: bool = True  # a debug line per job (the seed's console output)


class UpstairsCore:
    def __init__(
        self,
        targets: list[SocketAddr],
        options: Options | None = None,
        upstairs_id: uuid.UUID | None = None,
    ) -> None:
        if len(targets) != 3:
            raise ValueError(f"an upstairs needs exactly three targets, got {len(targets)}")
        if len(set(targets)) != 3:
            raise ValueError("the three targets must be different")
        self.opts = options or Options()
        self.upstairs_id = upstairs_id or uuid.uuid4()
        self.session_id = uuid.uuid4()
        self.clients = [Client(i, t) for i, t in enumerate(targets)]
        self.state = UpState.INIT
        self.gen = 0
        self.region: RegionDefinition | None = None
        self.jobs: dict[int, Job] = {}
        self.blocks = BlockMap()
        self.next_id = FIRST_JOB_ID
        self.next_gw = 1
        self.next_flush = 0
        self.need_flush = False
        self.last_io = 0.0
        self.activate_token: object | None = None
        self.deactivate_token: object | None = None
        self.disabled_error: CrucibleError | None = None
        self.reconcile: Reconciliation | None = None  # the latest pass, for progress
        self.next_repair_id = 0
        self.repair: LiveRepair | None = None
        self.repair_waiters: list[object] = []  # guest flushes durable once the repair ends
        self.live_repairs = 0
        self.live_repairs_aborted = 0
        self.integrity_errors = 0
        self.retired = 0
        # Kept as counts so that no event has to walk the job table.
        self.flushes_pending = 0
        self.finished = 0  # jobs finished so far
        self.done_jobs = 0
        self.done_bytes = 0

    @property
    def reconcile_needed(self) -> int:
        return self.reconcile.needed if self.reconcile else 0

    @property
    def reconcile_done(self) -> int:
        return self.reconcile.done if self.reconcile else 0

    # ---- guest requests ----------------------------------------------------------

    def activate(self, token: object, gen: int, now: float) -> list[Action]:
        if self.state is UpState.ACTIVE:
            if gen == self.gen:
                return [Complete(token, None)]
            return [
                Complete(
                    token,
                    CrucibleError(
                        ErrorKind.GenerationNumberInvalid,
                        f"already active with generation {self.gen}, not {gen}",
                    ),
                )
            ]
        if self.state is UpState.GO_ACTIVE:
            return [Complete(token, CrucibleError(ErrorKind.UpstairsActivateInProgress))]
        if self.state is UpState.DEACTIVATING:
            return [Complete(token, CrucibleError(ErrorKind.UpstairsDeactivating))]
        if gen < 1:
            err = CrucibleError(ErrorKind.GenerationNumberInvalid, "generation 0 is not allowed")
            return [Complete(token, err)]
        self.state = UpState.GO_ACTIVE
        self.gen = gen
        self.session_id = uuid.uuid4()
        # A fresh session: the downstairs know none of our earlier job ids.
        self.blocks = BlockMap()
        self.repair = None
        self.reconcile = None
        self.disabled_error = None
        self.activate_token = token
        acts: list[Action] = [Log(f"upstairs {self.upstairs_id} activating with gen {gen}")]
        for c in self.clients:
            c.mode = Mode.NEW
            c.last_flush_done = None
            c.first_job = 0
            c.skipped.clear()
            acts += self._connect(c, now)
        return acts

    def deactivate(self, token: object, now: float) -> list[Action]:
        if self.state is not UpState.ACTIVE:
            return [Complete(token, CrucibleError(ErrorKind.UpstairsInactive))]
        self.state = UpState.DEACTIVATING
        self.deactivate_token = token
        acts: list[Action] = [Log("deactivating: final flush")]
        if self.repair is not None and not self.repair.aborting:
            acts += live_repair.abort(self, "the upstairs is deactivating", now)
        for c in self.clients:
            if c.holds_jobs:  # it cannot finish the final flush; it is repaired later
                acts += self._fault(c, "offline at deactivation", now)
        if self.need_flush or self.jobs:
            acts += self._enqueue(FlushOp(self._take_flush_number(), self.gen), None, now)
        return acts + self._maintain(now)

    def check_io(self, start: int, count: int, write: bool, need: int = 0) -> CrucibleError | None:
        """Why an IO cannot be accepted now, or None. `need`: downstairs that must
        take it (default: two for a write, one for a read)."""
        if self.state is not UpState.ACTIVE:
            if self.disabled_error is not None:
                return self.disabled_error
            return CrucibleError(ErrorKind.UpstairsInactive, f"upstairs is {self.state.value}")
        assert self.region is not None
        if write and self.opts.read_only:
            return CrucibleError(ErrorKind.ModifyingReadOnlyRegion)
        clients = self.clients
        if all(c.state is CState.ACTIVE for c in clients):
            accepting = 3
        else:
            accepting = sum(1 for c in clients if c.accepts_io)
        need = need or (2 if write else 1)
        if accepting < need:
            return CrucibleError(
                ErrorKind.IoError, f"only {accepting} of 3 downstairs can take IO, need {need}"
            )
        if start < 0 or count < 0 or start + count > self.region.total_blocks:
            return CrucibleError(
                ErrorKind.OffsetInvalid,
                f"blocks {start}..{start + count} are past the end "
                f"({self.region.total_blocks} blocks)",
            )
        return None

    def read(self, token: object, start: int, count: int, now: float) -> list[Action]:
        err = self.check_io(start, count, write=False)
        if err:
            return [Complete(token, err)]
        self.need_flush = True
        return self._enqueue(ReadOp(start, count), token, now)

    def write(
        self,
        token: object,
        start: int,
        data: bytes | bytearray | memoryview,
        now: float,
        unwritten: bool = False,
    ) -> list[Action]:
        bs = self.region.block_size if self.region else 1  # no region: check_io refuses
        if len(data) % bs:
            return [Complete(token, CrucibleError(ErrorKind.DataLenUnaligned))]
        count = len(data) // bs
        err = self.check_io(start, count, write=True)
        if err:
            return [Complete(token, err)]
        view = memoryview(data)
        contexts = [
            m.BlockContext(xxhash.xxh64_intdigest(view[i * bs : (i + 1) * bs]))
            for i in range(count)
        ]
        self.need_flush = True
        # Fast ack: durability is promised by the next flush, not by the write.
        acts = self._enqueue(WriteOp(start, contexts, data, unwritten), None, now)
        acts.append(Complete(token, None))
        return acts

    def trim(self, token: object, start: int, count: int, now: float) -> list[Action]:
        """Blocks become never-written (zeros, holes); acked when queued, like a write."""
        err = self.check_io(start, count, write=True)
        if err:
            return [Complete(token, err)]
        self.need_flush = True
        acts = self._enqueue(TrimOp(start, count), None, now)
        acts.append(Complete(token, None))
        return acts

    def flush(self, token: object, now: float, snapshot: str | None = None) -> list[Action]:
        err = self.check_io(0, 0, write=False, need=1 if self.opts.read_only else 2)
        if err:
            return [Complete(token, err)]
        if snapshot is not None and any(c.state is not CState.ACTIVE for c in self.clients):
            return [
                Complete(
                    token,
                    CrucibleError(
                        ErrorKind.SnapshotFailed, "a snapshot needs all three downstairs"
                    ),
                )
            ]
        if self.opts.read_only:
            return [Complete(token, None)]
        return self._enqueue(FlushOp(self._take_flush_number(), self.gen, snapshot), token, now)

    def info(self) -> dict[str, Any]:
        r = self.region
        return {
            "state": self.state.value,
            "generation": self.gen,
            "upstairs_id": str(self.upstairs_id),
            "session_id": str(self.session_id),
            "block_size": r.block_size if r else None,
            "extent_size": r.extent_size if r else None,
            "extent_count": r.extent_count if r else None,
            "total_size": r.total_bytes if r else None,
            "downstairs": [
                {
                    "target": c.name,
                    "state": c.state.value,
                    "mode": c.mode.value,
                    "jobs_in_flight": c.inflight_jobs,
                    "bytes_in_flight": c.inflight_bytes,
                    "last_error": c.last_error,
                    "connections": c.connects,
                }
                for c in self.clients
            ],
            "live_repair": self.repair.progress() if self.repair else None,
            "live_repairs": self.live_repairs,
            "live_repairs_aborted": self.live_repairs_aborted,
            "jobs": len(self.jobs),
            "guest_jobs_waiting": sum(1 for j in self.jobs.values() if not j.acked),
            "next_job_id": self.next_id,
            "next_flush": self.next_flush,
            "reconcile_needed": self.reconcile_needed,
            "reconcile_done": self.reconcile_done,
            "integrity_errors": self.integrity_errors,
            "retired": self.retired,
        }

    def replace(self, token: object, old: SocketAddr, new: SocketAddr, now: float) -> list[Action]:
        """Swap the downstairs at `old` for a new region at `new`; live repair fills it."""

        def refuse(why: str) -> list[Action]:
            return [Complete(token, CrucibleError(ErrorKind.ReplaceRequestInvalid, why))]

        if self.state is not UpState.ACTIVE:
            return [Complete(token, CrucibleError(ErrorKind.UpstairsInactive))]
        if self.opts.read_only:
            return refuse("a read-only upstairs does not replace downstairs")
        by_target = {c.target: c for c in self.clients}
        if new in by_target:
            if old in by_target:
                return refuse(f"{_addr(new)} is already a downstairs here, as is {_addr(old)}")
            return [Complete(token, None)]  # asked again: already under way or done
        c = by_target.get(old)
        if c is None:
            return refuse(f"{_addr(old)} is not one of this upstairs' downstairs")
        busy = [x for x in self.clients if x is not c and x.state is not CState.ACTIVE]
        if busy or self.repair is not None:
            who = busy[0] if busy else c
            return refuse(
                f"downstairs {who.name} is {who.state.value}: only one may be out at a time"
            )
        acts = self._fault(c, f"replaced by {_addr(new)}", now)
        c.target = new
        c.mode = Mode.REPLACED
        c.region_uuid = None
        c.reconnect_at = now  # no reason to wait
        acts.append(Log(f"[{c.id}] replacing {_addr(old)} with {_addr(new)}", "warning"))
        return [*acts, Complete(token, None)]

    def has_room(self, nbytes: int) -> bool:
        """Backpressure: may a guest IO of this size be queued now? (What is held
        for an offline downstairs is bounded by its fault thresholds instead.)"""
        for c in self.clients:
            if c.state not in (CState.ACTIVE, CState.LIVE_REPAIR):
                continue
            if c.inflight_jobs >= self.opts.max_jobs:
                return False
            if c.inflight_bytes and c.inflight_bytes + nbytes > self.opts.max_bytes:
                return False
        return True

    # ---- connection events --------------------------------------------------------------

    def _connect(self, c: Client, now: float) -> list[Action]:
        c.state = CState.CONNECTING
        c.phase = ""
        c.reconnect_at = None
        return [Log(f"[{c.id}] connecting to {c.name}"), Connect(c.id, c.target)]

    def connect_failed(self, cid: int, reason: str, now: float) -> list[Action]:
        c = self.clients[cid]
        err = f"cannot connect to {c.name}: {reason}"
        repeat = err == c.last_error  # said once; a downstairs may stay down for long
        c.last_error = err
        if c.state is not CState.CONNECTING:
            return []
        c.reconnect_at = now + self.opts.reconnect_delay
        return [Log(f"[{c.id}] {err}; retrying", "debug" if repeat else "warning")]

    def connected(self, cid: int, now: float) -> list[Action]:
        c = self.clients[cid]
        if c.state is not CState.CONNECTING:
            return [Drop(cid, "connection no longer wanted")]
        c.state = CState.NEGOTIATING
        c.phase = "hello"
        c.last_rx = c.last_ping = now
        c.connects += 1
        return [
            Log(f"[{c.id}] ok, connected to {c.name}"),
            Send(
                cid,
                m.HereIAm(
                    m.CRUCIBLE_MESSAGE_VERSION,
                    self.upstairs_id,
                    self.session_id,
                    self.gen,
                    self.opts.read_only,
                    False,
                    [],
                ),
            ),
        ]

    def disconnected(self, cid: int, now: float) -> list[Action]:
        c = self.clients[cid]
        prev = c.state
        if prev in (CState.IDLE, CState.DISABLED, CState.FAULTED):
            return []  # we dropped it on purpose
        acts: list[Action] = [Log(f"[{c.id}] {c.name} disconnected ({prev.value})", "warning")]
        if prev is CState.RECONCILE:
            acts += self._abort_reconcile(f"downstairs {c.name} went away", now)
            return acts + self._maintain(now)
        if prev in (CState.REPAIR_READY, CState.LIVE_REPAIR):
            acts += self._fault(c, "disconnected during live repair", now)
            return acts + self._maintain(now)
        if (
            prev is CState.ACTIVE
            and self.state in (UpState.ACTIVE, UpState.DEACTIVATING)
            and not self.opts.read_only
        ):
            if self._replay_impossible():
                acts += self._fault(c, "disconnected while live repair jobs are queued", now)
                return acts + self._maintain(now)
            c.state = CState.OFFLINE
            c.mode = Mode.OFFLINE
            c.offline_since = now
            acts.append(Log(f"[{c.id}] {c.name} is offline; IO continues on the others", "warning"))
        elif prev is CState.OFFLINE:
            pass
        elif (
            prev is CState.NEGOTIATING
            and c.phase == "promote"
            and c.mode is not Mode.OFFLINE
            and self.state is UpState.GO_ACTIVE
        ):
            # The downstairs closes on a PromoteToActive it refuses.
            return acts + self._fail_activation(
                f"downstairs {c.name} refused generation {self.gen}: an upstairs with an "
                "equal or higher generation is active there",
                now,
            )
        elif self.state in (UpState.GO_ACTIVE, UpState.ACTIVE):
            c.state = CState.CONNECTING
        else:
            c.state = CState.IDLE
            return acts + self._maintain(now)
        c.reconnect_at = now + self.opts.reconnect_delay
        return acts + self._maintain(now)

    def received(self, cid: int, msg: m.Message, now: float) -> list[Action]:
        c = self.clients[cid]
        c.last_rx = now
        if type(msg) in _JOB_REPLIES and c.state in _TAKES_IO:
            return self._io_reply(c, msg, now)  # the bulk of all traffic: first
        if isinstance(msg, m.Imok):
            return []
        if isinstance(msg, m.YouAreNoLongerActive):
            return self._disable(
                CrucibleError(
                    ErrorKind.NoLongerActive,
                    f"upstairs {msg.new_upstairs_id} took over {c.name} with generation "
                    f"{msg.new_gen} (ours is {self.gen})",
                ),
                now,
            )
        if isinstance(msg, m.UuidMismatch):
            return self._disable(
                CrucibleError(
                    ErrorKind.UuidMismatch, f"{c.name} expects upstairs {msg.expected_id}"
                ),
                now,
            )
        if c.state is CState.NEGOTIATING:
            return negotiation.negotiate(self, c, msg, now)
        if c.state is CState.RECONCILE:
            return self._reconcile_reply(c, msg, now)
        if c.state in _TAKES_IO:
            return self._io_reply(c, msg, now)
        return [Log(f"[{c.id}] ignored {type(msg).__name__} in state {c.state.value}")]

    def _io_reply(self, c: Client, msg: m.Message, now: float) -> list[Action]:
        finished = self.finished
        acts = self._job_reply(c, msg, now)
        # Housekeeping only when something it looks at may have changed.
        if self.finished != finished or c.state not in _TAKES_IO:
            acts += self._maintain(now)
        return acts

    def _fail_activation(
        self, reason: str, now: float, err: CrucibleError | None = None
    ) -> list[Action]:
        """Activation cannot succeed: say why to the caller of activate().
        `err.values` may carry details for programs; the detail text is for people."""
        err = CrucibleError(
            err.kind if err else ErrorKind.RegionAssembleError, reason, err.values if err else ()
        )
        if self.state is UpState.GO_ACTIVE:
            self.state = UpState.INIT
            acts: list[Action] = [Log(f"activation failed: {reason}", "error")]
            acts += self._drop_all("activation failed")
            if self.activate_token is not None:
                acts.append(Complete(self.activate_token, err))
                self.activate_token = None
            return acts
        return self._disable(err, now)

    def _disable(self, err: CrucibleError, now: float) -> list[Action]:
        """Stop for good (until a new activation): another upstairs took over,
        or a downstairs no longer matches. Everything pending fails."""
        self.state = UpState.DISABLED
        self.disabled_error = err
        acts: list[Action] = [Log(f"upstairs disabled: {err}", "error")]
        acts += self._drop_all(str(err))
        for token in (self.activate_token, self.deactivate_token):
            if token is not None:
                acts.append(Complete(token, err))
        self.activate_token = self.deactivate_token = None
        for job in self.jobs.values():
            if job.guest is not None and not job.acked:
                job.acked = True
                acts.append(Complete(job.guest, err))
        acts += [Complete(w, err) for w in self.repair_waiters]  # flushes parked for a repair
        self.repair_waiters = []
        self.repair = None
        self.jobs.clear()
        self.flushes_pending = self.done_jobs = self.done_bytes = 0
        self.blocks = BlockMap()
        for c in self.clients:
            c.state = CState.DISABLED
            c.inflight_jobs = c.inflight_bytes = 0
            c.skipped.clear()
        return acts

    def _drop_all(self, reason: str) -> list[Action]:
        acts: list[Action] = []
        for c in self.clients:
            if c.state not in (CState.IDLE, CState.DISABLED, CState.FAULTED):
                acts.append(Drop(c.id, reason))
            c.state = CState.IDLE
            c.phase = ""
            c.reconnect_at = None
        return acts

    # ---- quorum and reconciliation ----------------------------------------------------------

    def _check_quorum(self, now: float) -> list[Action]:
        if self.state is not UpState.GO_ACTIVE:
            return []
        ready = [c for c in self.clients if c.state is CState.WAIT_QUORUM]
        if len(ready) < (1 if self.opts.read_only else 3):
            return []
        versions = [c.versions for c in ready if c.versions is not None]
        floor = generation_floor(versions)
        # A reconciliation of this activation that was cut short stamped some
        # extents with our own generation: only that may equal it.
        ours = self.reconcile is not None and self.gen == floor
        if not self.opts.read_only and self.gen <= floor and not ours:
            return self._fail_activation(
                f"generation {self.gen} is not greater than {floor}, the highest generation "
                "stored on the downstairs",
                now,
                CrucibleError(ErrorKind.GenerationNumberInvalid, values=(self.gen, floor)),
            )
        self.next_flush = next_flush_number(versions)
        if self.opts.read_only:
            return self._go_active(now)
        repairs = mend(versions)
        if not repairs:
            return self._go_active(now)
        return self._start_reconcile(repairs, now)

    def _start_reconcile(self, repairs: list[Repair], now: float) -> list[Action]:
        addrs = [c.repair_addr for c in self.clients]
        # The repaired extents get the generation of this upstairs and a flush
        # number of their own, so later flushes cannot make them look alike.
        self.reconcile = Reconciliation(
            repairs, addrs, self.next_repair_id, self._take_flush_number(), self.gen, now
        )
        self.next_repair_id = self.reconcile.next_id
        for c in self.clients:
            c.state = CState.RECONCILE
        return [Log(f"reconciliation: {len(repairs)} extents to repair"), *self._next_step(now)]

    def _next_step(self, now: float) -> list[Action]:
        rec = self.reconcile
        assert rec is not None
        sends = rec.advance()
        if sends:
            return [Send(c, msg) for c, msg in sends]
        for c in self.clients:
            c.state = CState.WAIT_QUORUM
        took = now - rec.started
        return [
            Log(f"reconciliation done: {rec.done} extents in {took:.2f} s"),
            *self._go_active(now),
        ]

    def _reconcile_reply(self, c: Client, msg: m.Message, now: float) -> list[Action]:
        if self.reconcile is None:
            return []
        outcome, text = self.reconcile.reply(c.id, msg)
        if outcome is Outcome.FAILED:
            return self._abort_reconcile(f"{c.name} failed on {text}", now)
        if outcome is Outcome.IGNORED:
            return [Log(f"[{c.id}] ignored {type(msg).__name__} during reconciliation")]
        if outcome is Outcome.WAITING:
            return []
        return ([Log(text)] if text else []) + self._next_step(now)

    def _abort_reconcile(self, reason: str, now: float) -> list[Action]:
        """Any failure: drop everyone; they reconnect and the comparison starts over
        (extents already fixed now match, so progress is kept)."""
        if self.reconcile is not None:
            self.reconcile.steps.clear()
        acts: list[Action] = [Log(f"reconciliation aborted: {reason}", "warning")]
        for c in self.clients:
            if c.state in (CState.RECONCILE, CState.WAIT_QUORUM, CState.NEGOTIATING):
                acts.append(Drop(c.id, "reconciliation aborted"))
            c.state = CState.CONNECTING
            c.reconnect_at = now + self.opts.reconnect_delay
        return acts

    def _reconcile_all(self, now: float) -> list[Action]:
        """All three were faulted, so none can be a live-repair source: compare
        their extents and reconcile, as at activation (the generation is ours
        already). What an acked flush covered is on two of them, so the newest
        copy of each extent holds it."""
        err = CrucibleError(ErrorKind.IoError, "every downstairs was faulted")
        acts: list[Action] = [
            Log("all three downstairs need repair and none is healthy: reconciling", "warning")
        ]
        for job in self.jobs.values():  # skipped everywhere: finished, and forgotten here
            if job.guest is not None and not job.acked:
                acts.append(Complete(job.guest, err))
        self.jobs.clear()
        self.blocks = BlockMap()
        self.flushes_pending = self.done_jobs = self.done_bytes = 0
        versions = []
        for c in self.clients:
            assert c.versions is not None
            versions.append(c.versions)
            c.state = CState.WAIT_QUORUM
            c.mode = Mode.NEW
            c.skipped.clear()
            c.first_job = self.next_id  # new sessions everywhere
            c.inflight_jobs = c.inflight_bytes = 0
        self.next_flush = max(self.next_flush, next_flush_number(versions))
        repairs = mend(versions)
        if not repairs:
            return acts + self._go_active(now)
        return acts + self._start_reconcile(repairs, now)

    def _go_active(self, now: float) -> list[Action]:
        self.state = UpState.ACTIVE
        self.last_io = now
        for c in self.clients:
            if c.state is CState.WAIT_QUORUM:
                c.state = CState.ACTIVE
        acts: list[Action] = [
            Log(
                f"upstairs {self.upstairs_id} is active with gen {self.gen}; "
                f"next flush {self.next_flush}"
            )
        ]
        if self.activate_token is not None:
            acts.append(Complete(self.activate_token, None))
            self.activate_token = None
        return acts

    # ---- jobs -----------------------------------------------------------------------------

    def _take_flush_number(self) -> int:
        n = self.next_flush
        self.next_flush += 1
        return n

    def _enqueue(self, op: Op, token: object | None, now: float) -> list[Action]:
        jid = self.next_id
        self.next_id += 1
        if isinstance(op, WriteOp):
            deps = self.blocks.add_write(jid, op.start, len(op.contexts))
        elif isinstance(op, TrimOp):
            deps = self.blocks.add_write(jid, op.start, op.count)
        elif isinstance(op, ReadOp):
            deps = self.blocks.add_read(jid, op.start, op.count)
        else:
            deps = self.blocks.add_barrier(jid)
            self.need_flush = False
        gw = 0
        if token is not None or isinstance(op, WriteOp | TrimOp):
            gw = self.next_gw
            self.next_gw += 1
        job = Job(jid, op, deps, [IOState.SKIPPED] * 3, token, gw)
        job.nbytes = len(op.data) if isinstance(op, WriteOp) else 0
        self.last_io = now
        acts = self._add_job(job, now)
        if self.opts.log_jobs:
            acts.append(
                Log(f"gw_id:{gw} {job.kind} {_describe(op)} ds_id:{jid} deps:{deps}", "debug")
            )
        return acts

    def _add_job(self, job: Job, now: float) -> list[Action]:
        """Put a job in the table and send it to every client that takes it."""
        self.jobs[job.id] = job
        if job.is_flush_like:
            self.flushes_pending += 1
        rep = self.repair
        acts: list[Action] = []
        shared: m.Message | None = None  # one message object when deps agree: encoded once
        over: list[Client] = []  # offline ones holding too much: faulted once the job is placed
        for c in self.clients:
            if c.state is CState.ACTIVE or (
                c.state is CState.LIVE_REPAIR and rep is not None and rep.sends_to_target(job.op)
            ):
                job.state[c.id] = IOState.IN_PROGRESS
                c.inflight_jobs += 1
                c.inflight_bytes += job.nbytes
                if c.state is CState.LIVE_REPAIR or c.skipped or isinstance(job.op, LIVE_OPS):
                    limit = rep.flush_limit(job.op) if rep and c.id in rep.targets else None
                    deps = self._deps_for(c, job)
                    msg = job.message(self.upstairs_id, self.session_id, deps, c.id, limit)
                else:
                    if shared is None:
                        shared = job.message(self.upstairs_id, self.session_id, job.deps)
                    msg = shared
                acts.append(Send(c.id, msg))
            elif c.holds_jobs:
                job.state[c.id] = IOState.IN_PROGRESS
                c.inflight_jobs += 1
                c.inflight_bytes += job.nbytes
                if self._held_too_much(c):
                    over.append(c)
            else:
                c.skipped.add(job.id)
        if rep is not None and isinstance(job.op, FlushOp):
            job.partial = tuple(rep.targets)
        for c in over:
            acts += self._fault_held(c, now)
        if job.complete and not job.finished:
            acts += self._finish(job, now)
        return acts

    def _deps_for(self, c: Client, job: Job) -> list[int]:
        """A job's dependencies as this client sees them: a job it skipped stands
        for that job's own dependencies (so order through it is kept), and jobs
        from before its session began are gone."""
        skipped, floor = c.skipped, c.first_job
        if not skipped and not floor:
            return job.deps
        out: set[int] = set()
        seen: set[int] = set()
        todo = list(job.deps)
        while todo:
            d = todo.pop()
            if d < floor or d in seen:
                continue
            seen.add(d)
            if d in skipped:
                dj = self.jobs.get(d)
                if dj is not None:
                    todo.extend(dj.deps)
            else:
                out.add(d)
        return sorted(out)

    def _job_reply(self, c: Client, msg: m.Message, now: float) -> list[Action]:
        jid = getattr(msg, "job_id", None)
        job = self.jobs.get(jid) if jid is not None else None
        if job is None or job.state[c.id] is not IOState.IN_PROGRESS:
            return [Log(f"[{c.id}] reply for unknown or finished job {jid}", "debug")]
        acts: list[Action] = []
        err: CrucibleError | None = None
        if isinstance(msg, m.ReadResponse):
            err = self._check_read(c, job, msg)
        elif isinstance(msg, _ACKS):
            err = msg.result
        elif isinstance(msg, m.ErrorReport):
            err = msg.error
        elif isinstance(msg, m.ExtentLiveCloseAck):
            if isinstance(msg.result, CrucibleError):
                err = msg.result
            else:
                job.closed[c.id] = msg.result
        else:
            return [Drop(c.id, f"unexpected {type(msg).__name__} for job {jid}")]
        c.inflight_jobs -= 1
        c.inflight_bytes -= job.nbytes
        if err is not None:
            job.state[c.id] = IOState.ERROR
            job.errors.append(f"{c.name}: {err}")
            acts.append(Log(f"[{c.id}] job {jid} ({job.kind}) failed on {c.name}: {err}", "error"))
            if not isinstance(job.op, ReadOp):
                acts += self._fault(c, f"{job.kind} {jid} failed: {err}", now)
        else:
            job.state[c.id] = IOState.DONE
            if isinstance(job.op, FlushOp):
                c.last_flush_done = max(c.last_flush_done or 0, job.id)
            acts += self._maybe_ack(job)
        if job.complete and not job.finished:
            acts += self._finish(job, now)
        return acts

    def _check_read(self, c: Client, job: Job, msg: m.ReadResponse) -> CrucibleError | None:
        """Verify a read reply; keep the first good one, compare later ones with it."""
        assert isinstance(job.op, ReadOp) and self.region is not None
        if isinstance(msg.blocks, CrucibleError):
            return msg.blocks
        err = check_read_reply(
            job.op.start, job.op.count, self.region.block_size, c.name, msg.blocks, msg.data
        )
        if err is not None:
            if err.kind is not ErrorKind.InvalidNumberOfBlocks:
                self.integrity_errors += 1
            return err
        if job.read_contexts is None:
            job.read_contexts = list(msg.blocks)
            job.read_data = msg.data  # a view into its frame, which nothing reuses
            return None
        bad = first_difference(job.read_contexts, msg.blocks)
        if bad is not None:
            self.integrity_errors += 1
            job.errors.append(f"{c.name} disagrees at block {job.op.start + bad}")
        return None

    def _flush_need(self, op: FlushOp) -> int:
        return 3 if op.snapshot is not None or self.state is UpState.DEACTIVATING else 2

    def _durable_on(self, job: Job) -> int:
        """Clients done with this flush that hold every block (not mid-repair)."""
        return sum(1 for i, s in enumerate(job.state) if s is IOState.DONE and i not in job.partial)

    def _maybe_ack(self, job: Job) -> list[Action]:
        if job.acked:
            return []
        op = job.op
        if isinstance(op, ReadOp):
            if job.read_data is None:
                return []
            job.acked = True
            result = (job.read_data, job.read_contexts)
            # The job stays until a flush retires it; its data is the guest's now
            # (later replies are compared by their contexts).
            job.read_data = b""
            return [Complete(job.guest, result)] if job.guest is not None else []
        if isinstance(op, FlushOp) and self._durable_on(job) >= self._flush_need(op):
            job.acked = True
            return [Complete(job.guest, None)] if job.guest is not None else []
        return []

    def _finish(self, job: Job, now: float) -> list[Action]:
        """Every client has answered (or been skipped) for this job."""
        acts: list[Action] = []
        if job.errors and isinstance(job.op, ReadOp) and job.read_data is not None:
            acts.append(Log(f"INTEGRITY: read job {job.id}: {'; '.join(job.errors)}", "error"))
        if not job.acked:
            job.acked = True
            bad = job.count(IOState.SKIPPED) + job.count(IOState.ERROR)
            result: object = None
            op = job.op
            if isinstance(op, ReadOp):
                result = CrucibleError(
                    ErrorKind.IoError, "read failed on every downstairs: " + "; ".join(job.errors)
                )
            elif isinstance(op, FlushOp) and job.guest is not None and self._park_flush(job):
                job.guest = None  # completed when the repair finishes
            elif (
                self._durable_on(job) < 2 or (op.snapshot and bad)
                if isinstance(op, FlushOp)
                else bad > 1
            ):
                result = CrucibleError(
                    ErrorKind.IoError,
                    f"{job.kind} {job.id} reached only {self._durable_on(job)} of 3 downstairs "
                    "holding all data: " + ("; ".join(job.errors) or "the others are out"),
                )
            if job.guest is not None:
                acts.append(Complete(job.guest, result))
        job.finished = True
        self.finished += 1
        self.done_jobs += 1
        self.done_bytes += job.nbytes
        if job.is_flush_like:
            self.flushes_pending -= 1
            acts += self._retire(job.id)
        if isinstance(job.op, LIVE_OPS) or (self.repair and job.id == self.repair.final_flush):
            acts += live_repair.step(self, job, now)
        return acts

    def _park_flush(self, job: Job) -> bool:
        """A flush done on only one full copy but also on clients being repaired:
        it is durable on two once their repair is done, so it is acked then."""
        rep = self.repair
        if rep is None or rep.aborting:
            return False
        full = self._durable_on(job)
        partial = sum(1 for i in job.partial if job.state[i] is IOState.DONE)
        if full < 1 or full + partial < 2:
            return False
        self.repair_waiters.append(job.guest)
        return True

    def _retire(self, upto: int) -> list[Action]:
        gone = [jid for jid, j in self.jobs.items() if jid <= upto and j.complete and j.acked]
        for jid in gone:
            job = self.jobs.pop(jid)
            self.done_jobs -= 1
            self.done_bytes -= job.nbytes
        for c in self.clients:
            if c.skipped:
                c.skipped = {j for j in c.skipped if j > upto}
        self.retired += len(gone)
        if not gone or not self.opts.log_jobs:
            return []
        return [Log(f"retired {len(gone)} jobs up to {upto}", "debug")]

    def _fault(self, c: Client, reason: str, now: float) -> list[Action]:
        """Stop using a downstairs whose copy can no longer be trusted; it is
        reconnected and live-repaired."""
        if c.state is CState.FAULTED:
            return []
        was = c.state
        c.state = CState.FAULTED
        c.last_error = reason
        c.mode = Mode.FAULTED
        c.offline_since = None
        c.reconnect_at = now + self.opts.reconnect_delay if self.state is UpState.ACTIVE else None
        acts: list[Action] = [Log(f"[{c.id}] {c.name} faulted: {reason}", "error")]
        if was not in (CState.IDLE, CState.DISABLED, CState.OFFLINE):
            acts.append(Drop(c.id, reason))
        rep = self.repair
        if rep is not None and not rep.aborting and (c.id == rep.source or c.id in rep.targets):
            acts += live_repair.abort(self, f"{c.name} faulted: {reason}", now)
        finished = []
        for job in self.jobs.values():
            if job.state[c.id] is IOState.IN_PROGRESS:
                job.state[c.id] = IOState.SKIPPED
                c.skipped.add(job.id)
                acts += self._maybe_ack(job)
                if job.complete and not job.finished:
                    finished.append(job)
        c.inflight_jobs = c.inflight_bytes = 0
        for job in finished:
            if not job.finished:
                acts += self._finish(job, now)
        return acts

    def _replay_impossible(self) -> bool:
        """Live-repair jobs were queued out of id order: a replay cannot be trusted."""
        return self.repair is not None or any(
            isinstance(j.op, LIVE_OPS) for j in self.jobs.values()
        )

    # ---- timers and housekeeping ---------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        acts: list[Action] = []
        degraded = (
            sum(1 for c in self.clients if c.state in (CState.ACTIVE, CState.LIVE_REPAIR)) < 2
        )
        for c in self.clients:
            if (
                c.reconnect_at is not None
                and now >= c.reconnect_at
                and c.state in (CState.CONNECTING, CState.OFFLINE, CState.FAULTED)
            ):
                acts += self._connect(c, now)
            if c.state in LIVE_STATES:
                if now - c.last_rx > self.opts.timeout:
                    c.last_error = f"no message for {self.opts.timeout:g} s"
                    acts.append(Drop(c.id, c.last_error))
                elif now - c.last_ping >= self.opts.ping_interval:
                    c.last_ping = now
                    acts.append(Send(c.id, m.Ruok()))
            if (
                degraded
                and c.holds_jobs
                and c.offline_since is not None
                and now - c.offline_since >= self.opts.degraded_timeout
            ):
                why = f"offline {self.opts.degraded_timeout:g} s, fewer than two active"
                acts += self._fault(c, why, now)
        if (
            self.state is UpState.ACTIVE
            and self.need_flush
            and now - self.last_io >= self.opts.flush_timeout
        ):
            acts += self._enqueue(FlushOp(self._take_flush_number(), self.gen), None, now)
        return acts + self._maintain(now)

    def _maintain(self, now: float) -> list[Action]:
        if self.state is UpState.ACTIVE and all(c.state is CState.ACTIVE for c in self.clients):
            # The steady state (checked after every finished job): nothing to
            # negotiate, fault or repair; only finished work may need a barrier.
            return self._enqueue(BarrierOp(), None, now) if self._needs_barrier() else []
        acts = self._check_quorum(now)
        for c in self.clients:
            if c.holds_jobs and self._held_too_much(c):
                acts += self._fault_held(c, now)
        if self.state is UpState.ACTIVE:
            if self.repair is None:
                acts += live_repair.start(self, now)
            if all(c.state is CState.REPAIR_READY for c in self.clients):
                acts += self._reconcile_all(now)
            if self._needs_barrier():
                acts += self._enqueue(BarrierOp(), None, now)
        if self.state is UpState.DEACTIVATING and not self.jobs:
            acts += self._finish_deactivate()
        return acts

    def _held_too_much(self, c: Client) -> bool:
        return (
            c.inflight_jobs > self.opts.offline_max_jobs
            or c.inflight_bytes > self.opts.offline_max_bytes
        )

    def _fault_held(self, c: Client, now: float) -> list[Action]:
        why = f"offline with {c.inflight_jobs} jobs ({c.inflight_bytes} bytes) outstanding"
        return self._fault(c, why, now)

    def _needs_barrier(self) -> bool:
        """Finished work piles up (no flush lately): a barrier lets it retire."""
        if self.flushes_pending:
            return False
        return (
            self.done_jobs >= self.opts.barrier_jobs or self.done_bytes >= self.opts.barrier_bytes
        )

    def _finish_deactivate(self) -> list[Action]:
        acts: list[Action] = [Log("deactivated")]
        acts += self._drop_all("deactivated")
        self.state = UpState.INIT
        if self.deactivate_token is not None:
            acts.append(Complete(self.deactivate_token, None))
            self.deactivate_token = None
        return acts


_TAKES_IO = (CState.ACTIVE, CState.LIVE_REPAIR)
_ACKS = (
    m.WriteAck,
    m.WriteUnwrittenAck,
    m.FlushAck,
    m.BarrierAck,
    m.TrimAck,
    m.ExtentLiveRepairAckId,
    m.ExtentLiveAckId,
)
_JOB_REPLIES = frozenset((m.ReadResponse, *_ACKS))


def _addr(a: SocketAddr) -> str:
    return f"{a[0]}:{a[1]}"


def _describe(op: Op) -> str:
    if isinstance(op, WriteOp):
        return f"block:{op.start} n:{len(op.contexts)}"
    if isinstance(op, ReadOp | TrimOp):
        return f"block:{op.start} n:{op.count}"
    if isinstance(op, FlushOp):
        return f"fln:{op.flush_number} gen:{op.gen}"
    return ""
