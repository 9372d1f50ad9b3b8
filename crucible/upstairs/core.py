"""The upstairs state machine, sans-IO: a dispatcher over its rooms.

Theory of operation. The driver (guest.py) feeds in guest requests
(activate, read, write, flush, deactivate, ...), connection events, decoded
messages and probe results, each with the current time, and calls
`tick(now)` for timers. Every call returns actions (actions.py): connect,
send, drop, probe, complete a guest request, log. Nothing here blocks or
touches a socket, so every rule can be tested under a simulated network.

The rooms, each with its rules at its top:
  client.py      one downstairs: connection, negotiation, keepalive, reconnect
  state.py       the states a client moves through, as one checked table
  downstairs.py  the three as one store: jobs out, replies in, acks, faults
  job_table.py   ids, dependencies and the life of each job
  activation.py  quorum, generations and reconciliation at activation
  live_repair.py bringing back a downstairs that missed writes
This module routes each event to its room and keeps the volume's own state:
initializing, activating, active, deactivating or disabled.

Timers: a flush after `flush_timeout` idle with unflushed work; a barrier
when the finished-but-unretired backlog grows; Ruok every 5 s; a client
silent for 45 s is dropped; with fewer than two clients active, one that
holds jobs for too long is faulted.
"""

from __future__ import annotations

import dataclasses
import uuid

import crucible.protocol.messages as m
from crucible.common.buffer import Buffer
from crucible.common.definition import RegionDefinition
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.observe.probes import UP
from crucible.protocol.capabilities import Capabilities
from crucible.protocol.integrity import block_hashes, plain_contexts
from crucible.protocol.roles import JOB_REPLY_TYPES
from crucible.protocol.wire import SocketAddr
from crucible.upstairs.actions import Action, Complete, Drop, Log
from crucible.upstairs.activation import Activation
from crucible.upstairs.client import Client, Negotiated, NegotiationFailed, Session
from crucible.upstairs.downstairs import Downstairs
from crucible.upstairs.jobs import BarrierOp, FlushOp, ReadOp, TrimOp, WriteOp, zero_fill
from crucible.upstairs.options import Options
from crucible.upstairs.state import (
    DISABLED,
    IDLE,
    TAKES_IO,
    Mode,
    Stage,
    UpState,
)
from crucible.upstairs.status import UpstairsStatus

MAX_GEN = (1 << 64) - 1  # generations are u64 on the wire


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
        self.ds = Downstairs(targets, self.opts)
        self.ds.session = self._session(upstairs_id or uuid.uuid4(), 0)
        self.activation = Activation()
        self.deactivate_token: object | None = None
        self.disabled_error: CrucibleError | None = None

    def _session(self, upstairs_id: uuid.UUID, gen: int) -> Session:
        """Who this upstairs is for a new activation (a new session id)."""
        encrypted = self.opts.cipher is not None
        return Session(upstairs_id, uuid.uuid4(), gen, self.opts.read_only, encrypted)

    # ---- what the rooms hold, by name -------------------------------------------------

    @property
    def state(self) -> UpState:
        return self.ds.up_state

    @property
    def clients(self) -> list[Client]:
        return self.ds.clients

    @property
    def region(self) -> RegionDefinition | None:
        return self.ds.region

    @property
    def gen(self) -> int:
        return self.ds.session.gen

    @property
    def upstairs_id(self) -> uuid.UUID:
        return self.ds.session.upstairs_id

    def _set_state(self, state: UpState) -> None:
        self.ds.up_state = state

    # ---- guest requests ------------------------------------------------------------

    def activate(self, token: object, gen: int, now: float) -> list[Action]:
        if self.state is UpState.ACTIVE:
            if gen == self.gen:
                return [Complete(token, None)]
            why = f"already active with generation {self.gen}, not {gen}"
            return [Complete(token, CrucibleError(ErrorKind.GenerationNumberInvalid, why))]
        if self.state is UpState.GO_ACTIVE:
            return [Complete(token, CrucibleError(ErrorKind.UpstairsActivateInProgress))]
        if self.state is UpState.DEACTIVATING:
            return [Complete(token, CrucibleError(ErrorKind.UpstairsDeactivating))]
        if gen < 1:
            err = CrucibleError(ErrorKind.GenerationNumberInvalid, "generation 0 is not allowed")
            return [Complete(token, err)]
        if gen > MAX_GEN:
            why = f"generation {gen} is above the highest there is ({MAX_GEN})"
            return [Complete(token, CrucibleError(ErrorKind.GenerationNumberInvalid, why))]
        self._set_state(UpState.GO_ACTIVE)
        # A fresh session: the downstairs know none of our earlier job ids.
        self.ds.session = self._session(self.upstairs_id, gen)
        self.ds.table.new_session()
        self.ds.repair = None
        self.ds.allocation.forget()
        self.activation.begin(token)
        self.disabled_error = None
        if UP.on:
            UP.fire("up__activate__start", gen)
        acts: list[Action] = [Log(f"upstairs {self.upstairs_id} activating with gen {gen}")]
        for c in self.clients:
            c.last_flush_done = None
            c.first_job = 0
            c.skipped.clear()
            acts += c.connect(Mode.NEW)
        return acts

    def deactivate(self, token: object, now: float) -> list[Action]:
        if self.state is not UpState.ACTIVE:
            return [Complete(token, CrucibleError(ErrorKind.UpstairsInactive))]
        self._set_state(UpState.DEACTIVATING)
        self.deactivate_token = token
        acts: list[Action] = [Log("deactivating: final flush")]
        ds = self.ds
        if ds.repair is not None and not ds.repair.aborting:
            acts += ds.abort_repair("the upstairs is deactivating", now)
        for c in self.clients:
            if c.holds_jobs:  # it cannot finish the final flush; it is repaired later
                acts += ds.fault(c, "offline at deactivation", now)
        if ds.table.need_flush or len(ds.table):
            acts += self._flush_job(None, now)
        return acts + self._maintain(now)

    def check_io(self, start: int, count: int, write: bool, need: int = 0) -> CrucibleError | None:
        """Why an IO cannot be accepted now, or None. `need`: downstairs that must
        take it (default: two for a write, one for a read)."""
        if self.state is not UpState.ACTIVE:
            if self.disabled_error is not None:
                return self.disabled_error
            return CrucibleError(ErrorKind.UpstairsInactive, f"upstairs is {self.state.value}")
        region = self.ds.region
        assert region is not None
        if write and self.opts.read_only:
            return CrucibleError(ErrorKind.ModifyingReadOnlyRegion)
        accepting = self.ds.accepting()
        need = need or (2 if write else 1)
        if accepting < need:
            return CrucibleError(
                ErrorKind.IoError, f"only {accepting} of 3 downstairs can take IO, need {need}"
            )
        if start < 0 or count < 0 or start + count > region.total_blocks:
            return CrucibleError(
                ErrorKind.OffsetInvalid,
                f"blocks {start}..{start + count} are past the end ({region.total_blocks} blocks)",
            )
        return None

    def check_write(self, start: int, nbytes: int) -> CrucibleError | None:
        """Why a write of `nbytes` at block `start` cannot be accepted now, or None."""
        bs = self.region.block_size if self.region else 1  # no region: check_io refuses
        if nbytes % bs:
            why = f"{nbytes} bytes is not a multiple of the {bs}-byte block"
            return CrucibleError(ErrorKind.DataLenUnaligned, why)
        return self.check_io(start, nbytes // bs, write=True)

    def has_room(self, nbytes: int) -> bool:
        return self.ds.has_room(nbytes)

    def read(self, token: object, start: int, count: int, now: float) -> list[Action]:
        err = self.check_io(start, count, write=False)
        if err:
            return [Complete(token, err)]
        return self.ds.enqueue(ReadOp(start, count), token, now)

    def write(
        self,
        token: object,
        start: int,
        data: Buffer,
        now: float,
        unwritten: bool = False,
    ) -> list[Action]:
        err = self.check_write(start, len(data))
        if err:
            return [Complete(token, err)]
        region = self.ds.region
        assert region is not None  # checked: the volume is active
        bs = region.block_size
        count = len(data) // bs
        cipher = self.opts.cipher
        contexts: m.Contexts
        if cipher is not None:
            data, contexts = cipher.seal(start, data, bs)
        else:
            contexts = plain_contexts(block_hashes(data, bs))
        # Fast ack: durability is promised by the next flush, not by the write.
        acts = self.ds.enqueue(WriteOp(start, contexts, data, unwritten), None, now)
        self.ds.allocation.mark(start, count, True)
        acts.append(Complete(token, None))
        return acts

    def trim(self, token: object, start: int, count: int, now: float) -> list[Action]:
        """Blocks become never-written (zeros, holes); acked when queued, like a
        write. Where a downstairs cannot trim, every copy gets zeros written
        instead, so the replicas keep saying the same about each block."""
        err = self.check_io(start, count, write=True)
        if err:
            return [Complete(token, err)]
        assert self.region is not None
        op: TrimOp | WriteOp = TrimOp(start, count)
        if not self.ds.trims():
            op = zero_fill(start, count, self.region.block_size)
        acts = self.ds.enqueue(op, None, now)
        self.ds.allocation.mark(start, count, isinstance(op, WriteOp))
        acts.append(Complete(token, None))
        return acts

    def flush(self, token: object, now: float, snapshot: str | None = None) -> list[Action]:
        err = self.check_io(0, 0, write=False, need=1 if self.opts.read_only else 2)
        if err:
            return [Complete(token, err)]
        if snapshot is not None and (self.opts.read_only or not self.ds.all_active):
            why = "a read-only volume takes no snapshot" if self.opts.read_only else ""
            why = why or "a snapshot needs all three downstairs"
            return [Complete(token, CrucibleError(ErrorKind.SnapshotFailed, why))]
        if self.opts.read_only:
            return [Complete(token, None)]
        return self._flush_job(token, now, snapshot)

    def _flush_job(self, token: object, now: float, snapshot: str | None = None) -> list[Action]:
        op = FlushOp(self.ds.table.take_flush_number(), self.gen, snapshot)
        return self.ds.enqueue(op, token, now)

    def verify_replicas(self, token: object, rate: float, now: float) -> list[Action]:
        """Compare the replicas over the whole volume at `rate` bytes/s (0: no
        limit), rewriting a replica that differs from the two others; answers
        `token` with the VerifyStatus when the pass is done."""
        if self.state is not UpState.ACTIVE:
            return [Complete(token, CrucibleError(ErrorKind.UpstairsInactive))]
        return self.ds.request_verify(token, rate, now)

    def replace(self, token: object, old: SocketAddr, new: SocketAddr, now: float) -> list[Action]:
        """Swap the downstairs at `old` for a new region at `new`; live repair fills it."""
        return self.ds.replace(token, old, new, now)

    def info(self) -> UpstairsStatus:
        r = self.region
        ds = self.ds
        rep = ds.repair
        return UpstairsStatus(
            state=self.state.value,
            generation=self.gen,
            upstairs_id=str(self.upstairs_id),
            session_id=str(ds.session.session_id),
            block_size=r.block_size if r else None,
            extent_size=r.extent_size if r else None,
            extent_count=r.extent_count if r else None,
            total_size=r.total_bytes if r else None,
            downstairs=[c.status() for c in self.clients],
            live_repair=rep.status() if rep else None,
            live_repairs=ds.live_repairs,
            live_repairs_aborted=ds.live_repairs_aborted,
            jobs=len(ds.table),
            guest_jobs_waiting=sum(1 for j in ds.table if not j.acked),
            next_job_id=ds.table.next_id,
            next_flush=ds.table.next_flush,
            reconcile_needed=self.activation.needed,
            reconcile_done=self.activation.done,
            integrity_errors=ds.integrity_errors,
            blocks_rewritten=ds.blocks_rewritten,
            reads_retried=ds.reads_retried,
            verify=ds.scrub.status(r.total_blocks if r else 0),
            retired=ds.table.retired,
            guest={k: dataclasses.replace(v) for k, v in ds.guest_counts.items()},
        )

    # ---- connection events ----------------------------------------------------------

    def connect_failed(self, cid: int, reason: str, now: float) -> list[Action]:
        return self.clients[cid].connect_failed(reason, now, self.opts)

    def connected(self, cid: int, now: float) -> list[Action]:
        return self.clients[cid].connected(self.ds.session, now)

    def probed(self, cid: int, attempt: int, caps: Capabilities, now: float) -> list[Action]:
        """What a downstairs' repair server said it supports (an answer to Probe)."""
        c = self.clients[cid]
        if c.state.stage is not Stage.PROBE or attempt != c.connects:
            return []  # an answer for a connection that is gone
        if not caps.trim:
            line = f"[{cid}] {c.name} does not take Trim: trims are written as zeros"
            return [Log(line, "warning"), *c.probed(caps, self.ds.session)]
        return c.probed(caps, self.ds.session)

    def disconnected(self, cid: int, now: float) -> list[Action]:
        c = self.clients[cid]
        prev = c.state
        stage = prev.stage
        if stage in (Stage.IDLE, Stage.DISABLED, Stage.CONNECT):
            return []  # we dropped it on purpose, or it was not connected
        ds = self.ds
        line, level = f"{c.name} disconnected ({prev.name})", "warning"
        if stage is Stage.HELLO and c.error_connect == c.connects:
            level = "debug"  # why this connection failed was said (a bad frame)
        elif stage is Stage.HELLO:  # it never answered
            hint = (
                "it may have refused this end's TLS certificate: its log says"
                if self.opts.tls
                else "a downstairs that requires TLS does that to a client without it"
            )
            line = f"{c.name} closed the connection without answering HereIAm ({hint})"
            level = "debug" if c.note_error(line) else "warning"
        acts: list[Action] = [Log(f"[{c.id}] {line}", level)]
        if stage is Stage.RECONCILE:
            acts += self.activation.abort(ds, f"downstairs {c.name} went away", now)
        elif stage in (Stage.REPAIR_READY, Stage.LIVE_REPAIR):
            if stage is Stage.REPAIR_READY and c.repair_failures:
                # It restarted while waiting to be repaired again: perhaps
                # fixed; try at once when it is back.
                c.repair_failures, c.repair_after = 0, 0.0
            acts += ds.fault(c, "disconnected during live repair", now)
        elif (
            stage is Stage.ACTIVE
            and self.state in (UpState.ACTIVE, UpState.DEACTIVATING)
            and not self.opts.read_only
        ):
            if ds.replay_impossible():
                acts += ds.fault(c, "disconnected while live repair jobs are queued", now)
            else:
                c.fall_back(now, self.opts, Mode.OFFLINE)
                c.offline_since = now
                line = f"[{c.id}] {c.name} is offline; IO continues on the others"
                acts.append(Log(line, "warning"))
                acts += ds.went_offline(c, now)
        elif (
            stage is Stage.PROMOTE
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
            c.fall_back(now, self.opts)
        else:
            c.set_state(IDLE)
            c.reconnect_at = None
        return acts + self._maintain(now)

    def bad_frame(self, cid: int, why: str, first: bytes | None) -> list[Action]:
        """A frame that does not decode; `first`: what the peer sent, when it
        never sent a valid message (then it is no downstairs at all)."""
        c = self.clients[cid]
        if first is not None:
            err = f"{c.name} does not speak the Crucible protocol (it sent {first!r})"
        else:
            err = f"bad frame from {c.name}: {why}"
        repeat = c.note_error(err)
        return [Log(f"[{cid}] {err}", "debug" if repeat else "error"), Drop(cid, err)]

    def received(self, cid: int, msg: m.Message, now: float) -> list[Action]:
        c = self.clients[cid]
        c.last_rx = now
        stage = c.state.stage
        if type(msg) in JOB_REPLY_TYPES and stage in TAKES_IO:
            return self._io_reply(c, msg, now)  # the bulk of all traffic: first
        match msg:
            case m.Imok():
                return []
            case m.YouAreNoLongerActive():
                why = (
                    f"upstairs {msg.new_upstairs_id} took over {c.name} with generation "
                    f"{msg.new_gen} (ours is {self.gen})"
                )
                return self._disable(CrucibleError(ErrorKind.NoLongerActive, why), now)
            case m.UuidMismatch():
                why = f"{c.name} expects upstairs {msg.expected_id}"
                return self._disable(CrucibleError(ErrorKind.UuidMismatch, why), now)
        if stage in (Stage.HELLO, Stage.PROBE, Stage.PROMOTE, Stage.REGION, Stage.VERSIONS):
            return self._negotiate(c, msg, now)
        if stage is Stage.RECONCILE:
            return self.activation.reply(self.ds, cid, msg, now)
        if stage in TAKES_IO:
            return self._io_reply(c, msg, now)
        return [Log(f"[{c.id}] ignored {type(msg).__name__} in state {c.state.name}")]

    def _io_reply(self, c: Client, msg: m.Message, now: float) -> list[Action]:
        finished = self.ds.table.finished
        acts = self.ds.job_reply(c, msg, now)
        # Housekeeping only when something it looks at may have changed.
        if self.ds.table.finished != finished or c.state.stage not in TAKES_IO:
            acts += self._maintain(now)
        return acts

    def _negotiate(self, c: Client, msg: m.Message, now: float) -> list[Action]:
        ds = self.ds
        serving = self.state in (UpState.ACTIVE, UpState.DEACTIVATING)
        try:
            step, acts = c.negotiate(msg, ds.session, ds.region, serving)
        except NegotiationFailed as e:
            return self._fail_activation(e.reason, now)
        if isinstance(msg, m.RegionInfo) and c.region is msg.region_def:
            ds.region = c.region  # accepted: the volume's geometry
        if step is Negotiated.RESUME:
            return acts + ds.replay(c, now)
        if step is not Negotiated.VERSIONS:
            return acts
        return acts + self.activation.placed(ds, c, now) + self._maintain(now)

    # ---- activation and its end -------------------------------------------------------

    def _fail_activation(
        self, reason: str, now: float, err: CrucibleError | None = None
    ) -> list[Action]:
        """Activation cannot succeed: say why to the caller of activate().
        `err.values` may carry details for programs; the detail text is for people."""
        err = CrucibleError(
            err.kind if err else ErrorKind.RegionAssembleError, reason, err.values if err else ()
        )
        if self.state is not UpState.GO_ACTIVE:
            return self._disable(err, now)
        self._set_state(UpState.INIT)
        if UP.on:
            UP.fire("up__activate__done", self.gen, reason)
        acts: list[Action] = [Log(f"activation failed: {reason}", "error")]
        acts += self._drop_all("activation failed")
        if self.activation.token is not None:
            acts.append(Complete(self.activation.token, err))
            self.activation.token = None
        return acts

    def _disable(self, err: CrucibleError, now: float) -> list[Action]:
        """Stop for good (until a new activation): another upstairs took over,
        or a downstairs no longer matches. Everything pending fails."""
        self._set_state(UpState.DISABLED)
        self.disabled_error = err
        acts: list[Action] = [Log(f"upstairs disabled: {err}", "error")]
        acts += self._drop_all(str(err))
        for token in (self.activation.token, self.deactivate_token):
            if token is not None:
                acts.append(Complete(token, err))
        self.activation.token = self.deactivate_token = None
        acts += self.ds.fail_all(err)
        self.ds.allocation.forget()
        for c in self.clients:
            c.set_state(DISABLED)
        return acts

    def _drop_all(self, reason: str) -> list[Action]:
        acts: list[Action] = []
        for c in self.clients:
            if c.state.stage not in (Stage.IDLE, Stage.DISABLED) and not c.is_faulted:
                acts.append(Drop(c.id, reason))
            c.set_state(IDLE)
            c.reconnect_at = None
        return acts

    # ---- timers and housekeeping ------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        acts: list[Action] = []
        opts = self.opts
        degraded = sum(1 for c in self.clients if c.takes_io) < 2
        for c in self.clients:
            acts += c.tick(now, opts)
            if (
                degraded
                and c.holds_jobs
                and c.offline_since is not None
                and now - c.offline_since >= opts.degraded_timeout
            ):
                why = f"offline {opts.degraded_timeout:g} s, fewer than two active"
                acts += self.ds.fault(c, why, now)
        if self.state is UpState.ACTIVE:
            acts += self.ds.fault_stalled(now)
            acts += self.ds.scrub_tick(now)
        table = self.ds.table
        if (
            self.state is UpState.ACTIVE
            and table.need_flush
            and now - table.last_io >= opts.flush_timeout
        ):
            acts += self._flush_job(None, now)
        return acts + self._maintain(now)

    def allocation_fetched(self, epoch: int, runs: list[tuple[int, int]] | None) -> list[Action]:
        """A downstairs' map of the blocks that hold data (None: it could not say)."""
        self.ds.allocation.loaded(epoch, runs)
        if runs is None:
            return [Log("the map of blocks holding data is not available: block status reads them")]
        return []

    def allocation(self, first: int, count: int) -> list[tuple[int, int, bool]] | None:
        """Which blocks of [first, first+count) hold data, as runs of (start,
        count, allocated); None when that is not known without reading them."""
        return self.ds.allocation.query(first, count)

    def _maintain(self, now: float) -> list[Action]:
        ds = self.ds
        opts = self.opts
        if self.state is UpState.ACTIVE and ds.all_active:
            # The steady state (checked after every finished job): nothing to
            # negotiate, fault or repair; only finished work may need a barrier.
            # (A direct call: compiled, a bound method kept in a local is an object.)
            if ds.table.needs_barrier(opts.barrier_jobs, opts.barrier_bytes):
                return ds.enqueue(BarrierOp(), None, now)
            return []
        acts, refused = self.activation.check(ds, now)
        if refused is not None:
            return acts + self._fail_activation(refused.reason, now, refused.err)
        acts += ds.fault_overfull(now)
        if self.state is UpState.ACTIVE:
            if ds.repair is None:
                acts += ds.start_repair(now)
            if all(c.state.stage is Stage.REPAIR_READY for c in self.clients):
                more, refused = self.activation.restart_all(ds, now)
                acts += more
                if refused is not None:
                    err = CrucibleError(refused.err.kind, refused.reason)
                    return acts + self._disable(err, now)
            if ds.table.needs_barrier(opts.barrier_jobs, opts.barrier_bytes):
                acts += ds.enqueue(BarrierOp(), None, now)
        if self.state is UpState.DEACTIVATING:
            if not len(ds.table):
                acts += self._finish_deactivate()
            elif not ds.table.flushes_pending:
                # A read queued again after the final flush: one more retires it.
                acts += self._flush_job(None, now)
        return acts

    def _finish_deactivate(self) -> list[Action]:
        acts: list[Action] = [Log("deactivated")]
        acts += self._drop_all("deactivated")
        self.ds.allocation.forget()
        self._set_state(UpState.INIT)
        if self.deactivate_token is not None:
            acts.append(Complete(self.deactivate_token, None))
            self.deactivate_token = None
        return acts
