"""The three downstairs as one replicated store: each job to the clients that
take it, their replies, the ack rules, faults, and live repair's jobs.

* A job goes at once to every ACTIVE client (the downstairs enforces order),
  to a client under live repair when the repair says so, is held for an
  OFFLINE one, and is skipped for the rest. Dependencies are rewritten per
  client: a job it skipped stands for that job's own dependencies.
* A read goes to one ACTIVE client: its *home*, picked by which MiB of the
  volume it starts in, so the same blocks are read from the same replica
  and each downstairs' page cache holds a third of the volume rather than
  all three the same blocks; the least busy client instead when the home
  has more than SPILL_JOBS jobs in flight beyond it. Three clients of one
  host (the same address) share its page cache and CPUs: spreading reads
  over them saves no memory, and a small read costs a server mostly its
  wakeup, which one server woken for them all shares. There every small
  read has one home, which spills past SHARED_SPILL_JOBS; large reads keep
  their homes per MiB, which keeps three disk reads going. A home that has
  finished nothing for half the progress timeout takes no more reads while
  another could, so a stuck one shows as stuck. When a read's reply fails
  a check or carries an error, or the client leaves, the guest's request
  is queued again as a new job for another client (a downstairs takes
  each job id once, and counts every id below a flush it finished as
  done). That read may see a write queued after the first to the same
  blocks: the two were in flight together, and either order is what a
  disk allows. With `read_all_replicas` it goes to all three and the
  replies are compared.
* Writes are acked to the guest when queued (by the caller); reads on the
  first reply that verifies (later replies must agree); flushes when two
  clients holding every block are done (three with a snapshot, or while
  deactivating).
* A fault stops using a client: its jobs in flight are skipped (which may
  finish them), a live repair it takes part in aborts, and it reconnects to
  be live-repaired.
* A trim goes as Trim only to a client that reported the capability;
  another gets the same blocks written with zeros (which read the same).
"""

from __future__ import annotations

import uuid
from typing import Final

import crucible.protocol.messages as m
from crucible.common.address import format_host_port
from crucible.common.definition import RegionDefinition
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.observe.probes import UP, clock
from crucible.protocol.wire import SocketAddr
from crucible.upstairs import acks
from crucible.upstairs.actions import Action, Complete, Drop, FetchAllocation, Log, Send
from crucible.upstairs.allocation import Allocation
from crucible.upstairs.client import Client, Session
from crucible.upstairs.deps import deps_for_client
from crucible.upstairs.job_table import JobTable
from crucible.upstairs.jobs import (
    LIVE_OPS,
    PER_CLIENT,
    FlushOp,
    IOState,
    Job,
    Op,
    ReadOp,
    TrimOp,
    WriteOp,
    zero_fill,
    zero_hash,
)
from crucible.upstairs.live_repair import LiveRepair
from crucible.upstairs.options import Options
from crucible.upstairs.probing import GUEST_OPS, extent_of, job_bytes, op_name
from crucible.upstairs.probing import Names as ProbeNames
from crucible.upstairs.probing import names as probe_names
from crucible.upstairs.rewrite import rewrites, runs, touched_after
from crucible.upstairs.scrub import Scrub, compare
from crucible.upstairs.state import ACTIVE, LIVE_REPAIR, TAKES_IO, DsState, Mode, Stage, UpState
from crucible.upstairs.status import GuestCount
from crucible.upstairs.verify import bad_blocks, check_blocks, check_read_reply, first_difference

# A failed live repair is tried again after 1, 2, 4 ... s; after
# REPAIR_ATTEMPTS failures in a row, every REPAIR_BACKOFF_MAX.
REPAIR_BACKOFF: Final = 1.0
REPAIR_BACKOFF_MAX: Final = 600.0
REPAIR_ATTEMPTS: Final = 10
_JOB_FINISHED: Final = UP.probe("up__job__finished")
READ_HOME_BYTES: Final = 1 << 20  # a read's home replica is picked per MiB of the volume
SPILL_JOBS: Final = 8  # a read leaves its home when that one has more than this many more in flight
SHARED_SPILL_JOBS: Final = 32  # the same, for small reads of three clients of one host
SHARED_HOME_MAX: Final = 64 << 10  # reads this small share one home on one host


def one_host(clients: list[Client]) -> bool:
    """Whether the clients' addresses name one host (as written)."""
    return len({c.target[0] for c in clients}) == 1


class Downstairs:
    def __init__(self, targets: list[SocketAddr], opts: Options) -> None:
        self.opts = opts
        self.clients = [Client(i, t) for i, t in enumerate(targets)]
        self.table = JobTable()
        self.session = Session(uuid.uuid4(), uuid.uuid4(), 0, opts.read_only)
        self.up_state = UpState.INIT  # the volume's state; the core changes it
        self.region: RegionDefinition | None = None
        self.repair: LiveRepair | None = None
        self.allocation = Allocation()
        self.live_repairs = 0
        self.live_repairs_aborted = 0
        self.integrity_errors = 0
        self.blocks_rewritten = 0  # bad blocks of a replica rewritten from a good copy
        self.reads_retried = 0
        self.scrub = Scrub(rate=opts.verify_rate)
        self.turn = 0  # added to every read's home: which replica serves which MiB
        self.one_host = one_host(self.clients)  # see _reader
        self.guest_counts = {op: GuestCount() for op in GUEST_OPS}

    # ---- capacity ------------------------------------------------------------------

    @property
    def all_active(self) -> bool:
        a, b, c = self.clients  # (checked after every finished job: no generator)
        active = Stage.ACTIVE
        return a.state.stage is active and b.state.stage is active and c.state.stage is active

    def accepting(self) -> int:
        """Clients that take IO now or hold it for their return."""
        if self.all_active:
            return 3
        return sum(1 for c in self.clients if c.accepts_io)

    def has_room(self, nbytes: int) -> bool:
        """Backpressure: may a guest IO of this size be queued now? (What is held
        for an offline downstairs is bounded by its fault thresholds instead.)"""
        for c in self.clients:
            if c.state.stage not in TAKES_IO:
                continue
            if c.inflight_jobs >= self.opts.max_jobs:
                return False
            if c.inflight_bytes and c.inflight_bytes + nbytes > self.opts.max_bytes:
                return False
        return True

    def ask_allocation(self) -> list[Action]:
        """The volume went active: ask one downstairs that can tell which
        blocks hold data (operations queued meanwhile are logged)."""
        self.allocation.begin()
        for c in self.clients:
            able = c.capabilities is not None and c.capabilities.allocation
            if c.state.stage is Stage.ACTIVE and able and c.repair_addr is not None:
                return [FetchAllocation(c.id, c.repair_addr, self.allocation.epoch)]
        self.allocation.forget()
        return [Log("no downstairs reports which blocks hold data: block status reads them")]

    def trims(self) -> bool:
        """Every downstairs takes Trim (as far as is known)."""
        return all(c.trims for c in self.clients)

    # ---- sending -------------------------------------------------------------------

    def enqueue(
        self, op: Op, guest: object | None, now: float, avoid: tuple[int, ...] = ()
    ) -> list[Action]:
        """A new job; a read is not sent to the clients in `avoid`."""
        job = self.table.new_job(op, guest, now)
        job.avoid = avoid
        acts = self.add_job(job, now)
        if self.opts.log_jobs:
            line = f"gw_id:{job.gw_id} {job.kind} {_describe(op)} ds_id:{job.id} deps:{job.deps}"
            acts.append(Log(line, "debug"))
        return acts

    def add_job(self, job: Job, now: float) -> list[Action]:
        """Put a job in the table and send it to every client that takes it."""
        self.table.insert(job)
        sent = None
        if UP.on:
            job.queued = clock()
            p = probe_names(job)
            self._fire_start(job, p)
            sent = p.client_start
        rep = self.repair
        sess = self.session
        acts: list[Action] = []
        shared: m.Message | None = None  # one message object when deps agree: encoded once
        over: list[Client] = []  # offline ones holding too much: faulted once the job is placed
        own = isinstance(job.op, PER_CLIENT)  # a message of its own for each client
        op = job.op
        only = op.to if isinstance(op, WriteOp) else None  # a rewrite: one client
        avoid = job.avoid
        if isinstance(op, ReadOp) and not self.opts.read_all_replicas and not op.compare:
            reader = self._reader(job, now)
            only = reader.id if reader is not None else None
        for c in self.clients:
            stage = c.state.stage
            if (only is not None and c.id != only) or c.id in avoid:
                c.skipped.add(job.id)
            elif stage is Stage.ACTIVE or (
                stage is Stage.LIVE_REPAIR and rep is not None and rep.sends_to_target(job.op)
            ):
                job.state[c.id] = IOState.IN_PROGRESS
                if not c.inflight_jobs:
                    c.last_progress = now
                c.inflight_jobs += 1
                c.inflight_bytes += job.nbytes
                if sent is not None and sent.handlers:
                    sent.fire2(job.id, c.id)
                if own or stage is Stage.LIVE_REPAIR or self._own_deps(c, job):
                    acts.append(Send(c.id, self._message_for(c, job)))
                else:
                    if shared is None:
                        shared = job.message(sess.upstairs_id, sess.session_id, job.deps)
                    acts.append(Send(c.id, shared))
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
            acts += self.fault_held(c, now)
        if job.complete and not job.finished:
            acts += self._finish(job, now)
        return acts

    def _message_for(self, c: Client, job: Job) -> m.Message:
        """The job as this client gets it: its own dependencies, a flush limited
        to what a repair has covered, zeros where it cannot trim."""
        rep = self.repair
        sess = self.session
        deps = self._deps_for(c, job)
        op = job.op
        if isinstance(op, TrimOp) and not c.trims:
            assert self.region is not None
            fill = zero_fill(op.start, op.count, self.region.block_size)
            return m.Write(sess.upstairs_id, sess.session_id, job.id, deps, *_write_args(fill))
        limit = rep.flush_limit(op) if rep and c.id in rep.targets else None
        return job.message(sess.upstairs_id, sess.session_id, deps, c.id, limit)

    def _deps_for(self, c: Client, job: Job) -> list[int]:
        return deps_for_client(job.deps, c.skipped, c.first_job, self.table.deps_of)

    @staticmethod
    def _own_deps(c: Client, job: Job) -> bool:
        """Whether this client's dependencies for the job differ from the job's."""
        deps = job.deps
        if not deps:
            return False
        return deps[0] < c.first_job or (bool(c.skipped) and not c.skipped.isdisjoint(deps))

    # ---- reads from one replica -------------------------------------------------------

    def _reader(self, job: Job, now: float) -> Client | None:
        """The ACTIVE client a read goes to, not one it avoids: its home
        unless that one has more than SPILL_JOBS (SHARED_SPILL_JOBS) jobs in
        flight beyond another, or has finished none for half the progress
        timeout (the others then show whether it alone is stuck, see
        fault_stalled); else the least busy (the nearest after the home
        among equals). A small read of one host's clients takes the first
        of them from its home on as its home."""
        op = job.op
        assert isinstance(op, ReadOp) and self.region is not None
        bs = self.region.block_size
        shared = self.one_host and op.count * bs <= SHARED_HOME_MAX
        if shared:
            home = self.turn % 3
            spill = SHARED_SPILL_JOBS
        else:
            home = (op.start * bs // READ_HOME_BYTES + self.turn) % 3
            spill = SPILL_JOBS
        avoid = job.avoid
        first: Client | None = None  # the first that may serve it, from the home on
        least: Client | None = None  # the first of those with the fewest in flight
        for k in range(3):  # (no lists: this runs for every read)
            c = self.clients[(home + k) % 3]
            if c.state.stage is not Stage.ACTIVE or c.id in avoid:
                continue
            if first is None:
                first = c
            if least is None or c.inflight_jobs < least.inflight_jobs:
                least = c
        if first is None or least is None:
            return None
        if not (shared or first is self.clients[home]):
            return least
        if first.inflight_jobs > least.inflight_jobs + spill:
            return least
        if first.inflight_jobs and now - first.last_progress >= self.opts.progress_timeout / 2:
            return least
        return first

    def _retry_read(self, job: Job, failed: Client, now: float) -> list[Action]:
        """A read not yet served that `failed` could not serve: its guest
        waits on a new read for another client, which also gets the blocks
        that verified so far. None left: the job finishes with what it has."""
        if self.opts.read_all_replicas or job.acked or job.read_data is not None:
            return []
        if isinstance(job.op, ReadOp) and job.op.compare:
            return []  # it compares what the replicas that answered said
        if job.guest is None and self.up_state is not UpState.ACTIVE:
            return []  # a mending read: not while deactivating
        avoid = (*job.avoid, failed.id)
        if not any(c.state.stage is Stage.ACTIVE and c.id not in avoid for c in self.clients):
            return []
        op = job.op
        new = self.table.new_job(op, job.guest, now)
        job.guest, job.acked = None, True  # its guest waits on the new job
        new.avoid, new.retried, new.errors = avoid, True, list(job.errors)
        new.read_pieces, job.read_pieces = job.read_pieces, None
        self.reads_retried += 1
        line = f"[{failed.id}] read {job.id} not served by {failed.name}: read {new.id} instead"
        return [Log(line, "debug"), *self.add_job(new, now)]

    def went_offline(self, c: Client, now: float) -> list[Action]:
        """An ACTIVE client was lost and holds its jobs for its return: its
        reads not yet served go to another client instead (its own are
        still replayed, and answer nobody)."""
        acts: list[Action] = []
        for job in list(self.table):
            if job.state[c.id] is IOState.IN_PROGRESS and isinstance(job.op, ReadOp):
                acts += self._retry_read(job, c, now)
        return acts

    def replay(self, c: Client, now: float) -> list[Action]:
        """Send a client back from offline every job since its last flush."""
        jobs = self.table.replay_to(c.id, c.last_flush_done)
        c.last_progress = now
        if UP.on:
            UP.fire("up__replay", c.id, len(jobs))
        for job in jobs:
            c.inflight_jobs += 1
            c.inflight_bytes += job.nbytes
        return [Send(c.id, self._message_for(c, job)) for job in jobs]

    # ---- replies --------------------------------------------------------------------

    def job_reply(self, c: Client, msg: m.Message, now: float) -> list[Action]:
        jid = getattr(msg, "job_id", None)
        job = self.table.get(jid) if jid is not None else None
        if job is None or job.state[c.id] is not IOState.IN_PROGRESS:
            return [Log(f"[{c.id}] reply for unknown or finished job {jid}", "debug")]
        err: CrucibleError | None
        bad: list[int] = []
        match msg:
            case m.ReadResponse():
                err, bad = self._check_read(c, job, msg)
            case (
                m.WriteAck()
                | m.WriteUnwrittenAck()
                | m.FlushAck()
                | m.BarrierAck()
                | m.TrimAck()
                | m.ExtentLiveRepairAckId()
                | m.ExtentLiveAckId()
            ):
                err = msg.result
            case m.ErrorReport():
                err = msg.error
            case m.ExtentLiveCloseAck():
                if isinstance(msg.result, CrucibleError):
                    err = msg.result
                else:
                    err = None
                    job.closed[c.id] = msg.result
            case _:
                return [Drop(c.id, f"unexpected {type(msg).__name__} for job {jid}")]
        c.inflight_jobs -= 1
        c.inflight_bytes -= job.nbytes
        c.last_progress = c.last_finished = now
        if UP.on:
            answered = probe_names(job).client_done
            if answered.handlers:
                answered.fire4(job.id, c.id, err, _since_queued(job))
        acts: list[Action] = []
        if err is not None:
            job.state[c.id] = IOState.ERROR
            job.errors.append(f"{c.name}: {err}")
            acts.append(Log(f"[{c.id}] job {jid} ({job.kind}) failed on {c.name}: {err}", "error"))
            if not isinstance(job.op, ReadOp):
                acts += self.fault(c, f"{job.kind} {jid} failed: {err}", now)
            elif job.read_data is not None:
                acts += self._maybe_ack(job, now)  # made whole from good blocks of several replies
            else:
                acts += self._retry_read(job, c, now)
        else:
            job.state[c.id] = IOState.DONE
            if isinstance(job.op, FlushOp):
                c.last_flush_done = max(c.last_flush_done or 0, job.id)
            acts += self._maybe_ack(job, now)
        if job.complete and not job.finished:
            acts += self._finish(job, now)
        if bad and isinstance(job.op, ReadOp) and job.op.mend is None:
            acts += self._mend(c, job.op.start, bad, now)
        return acts

    # ---- the background verify -------------------------------------------------------

    def scrub_tick(self, now: float) -> list[Action]:
        """Queue the next chunk for the replicas to be compared, if due (only
        while all three are active: a repair or replay compares for itself)."""
        scrub, r = self.scrub, self.region
        if scrub.outstanding is not None and self.table.get(scrub.outstanding) is None:
            scrub.outstanding = None  # gone with a failed volume
        if r is None or self.up_state is not UpState.ACTIVE or not self.all_active:
            return []
        chunk = scrub.next_chunk(now, r.total_blocks, r.extent_size, r.block_size)
        if chunk is None:
            return []
        scrub.outstanding = self.table.next_id
        return self.enqueue(ReadOp(*chunk, compare=True), None, now)

    def request_verify(self, token: object, rate: float, now: float) -> list[Action]:
        """A whole pass of the verify at `rate` bytes/s (0: no limit);
        `token` is answered with its VerifyStatus at the end."""
        self.scrub.request(token, rate, now)
        return self.scrub_tick(now)

    def _compared(self, job: Job, now: float) -> list[Action]:
        """Every replica answered a comparing read: rewrite a replica that
        differs from the two others, report what no majority settles."""
        op = job.op
        assert isinstance(op, ReadOp) and self.region is not None
        bs = self.region.block_size
        found = compare(job.replies, zero_hash(bs))
        replies, job.replies = job.replies, {}
        scrub = self.scrub
        acts: list[Action] = []
        # (a walk of the table: only when there is something to rewrite)
        newer = touched_after(self.table, job.id, op.start, op.count) if found.fixes else set()
        for target, sources in found.fixes.items():
            c = self.clients[target]
            scrub.divergent += len(sources)
            first = op.start + min(sources)
            line = (
                f"[{c.id}] verify: {len(sources)} blocks from {first} on {c.name} "
                "differ from the two other replicas: rewriting them"
            )
            acts.append(Log(line, "error"))
            if self.opts.read_only or c.state.stage is not Stage.ACTIVE:
                continue
            by_source: dict[int, list[int]] = {}
            for i, src in sources.items():
                if op.start + i not in newer:
                    by_source.setdefault(src, []).append(i)
            for src, indices in by_source.items():
                ctxs, data, _ = replies[src]
                for w in rewrites(op.start, ctxs, data, indices, target, bs):
                    acts += self.enqueue(w, None, now)
        if found.unresolved:
            n = len(found.unresolved)
            scrub.divergent += n
            scrub.unresolved += n
            first = op.start + found.unresolved[0]
            line = f"verify: {n} blocks from {first} differ, no two replicas agreeing: left"
            acts.append(Log(line, "error"))
        total = self.region.total_blocks
        if scrub.chunk_done(op.count, total):
            took = now - scrub.pass_started
            line = (
                f"verify pass {scrub.passes} done in {took:.1f} s: {scrub.divergent} blocks "
                f"found differing so far, {scrub.unresolved} unresolved"
            )
            acts.append(Log(line, "warning" if scrub.divergent else "info"))
            if scrub.asked_rate is not None:
                waiters, _ = scrub.end_pass()
                status = scrub.status(total)
                acts += [Complete(w, status) for w in waiters]
        return acts + self.scrub_tick(now)

    def _check_read(
        self, c: Client, job: Job, msg: m.ReadResponse
    ) -> tuple[CrucibleError | None, list[int]]:
        """Verify a read reply; keep the first good one, compare later ones
        with it. Also: the reply's blocks that failed their check."""
        assert isinstance(job.op, ReadOp) and self.region is not None
        if isinstance(msg.blocks, CrucibleError):
            return msg.blocks, []
        bs = self.region.block_size
        start, count, cipher = job.op.start, job.op.count, self.opts.cipher
        err, plain = check_read_reply(start, count, bs, c.name, msg.blocks, msg.data, cipher)
        if err is not None:
            if err.kind is ErrorKind.InvalidNumberOfBlocks:
                return err, []
            bad = self._assemble(c, job, msg)
            if job.op.compare:
                job.replies[c.id] = (list(msg.blocks), msg.data, set(bad))
            return err, bad
        if job.op.compare:
            job.replies[c.id] = (list(msg.blocks), msg.data, set())
        if job.read_contexts is None:
            job.read_contexts = list(msg.blocks)
            job.read_data = msg.data  # a view into its frame, which nothing reuses
            job.read_plain = plain
            job.read_pieces = None  # whole from one replica: pieces of others not needed
            return None, []
        if job.op.compare:
            return None, []  # compared when all are in
        differs = first_difference(job.read_contexts, msg.blocks, zero_hash(bs))
        if differs is not None:
            self.integrity_errors += 1
            job.errors.append(f"{c.name} disagrees at block {job.op.start + differs}")
        return None, []

    def _assemble(self, c: Client, job: Job, msg: m.ReadResponse) -> list[int]:
        """A reply with bad blocks: its good blocks still serve, with those of
        other replicas, so the guest gets every block that has a good copy.
        Returns the indices of the blocks whose copy on this replica is bad
        (without the key, not those it cannot decrypt: that says nothing of
        the copy)."""
        assert isinstance(job.op, ReadOp) and self.region is not None
        assert not isinstance(msg.blocks, CrucibleError)
        bs, cipher = self.region.block_size, self.opts.cipher
        bad = bad_blocks(job.op.start, bs, c.name, msg.blocks, msg.data, cipher)
        self.integrity_errors += len(bad)
        job.errors += [str(e) for _, e in bad]
        broken = {i for i, _ in bad}
        damaged = [i for i, e in bad if cipher or e.kind is not ErrorKind.DecryptionError]
        if job.read_data is not None:
            return damaged  # already served whole by another replica
        if job.read_pieces is None:
            job.read_pieces = (bytearray(msg.data), list(msg.blocks), broken)
            return damaged
        data, contexts, missing = job.read_pieces
        for i in missing - broken:
            data[i * bs : (i + 1) * bs] = msg.data[i * bs : (i + 1) * bs]
            contexts[i] = msg.blocks[i]
        missing &= broken
        if not missing:
            job.read_contexts, job.read_data = contexts, bytes(data)
            job.read_pieces = None
            if cipher is not None:  # every block verified: open the whole
                _, job.read_plain = check_blocks(job.op.start, bs, c.name, contexts, data, cipher)
        return damaged

    # ---- rewriting bad blocks ------------------------------------------------------

    def _mend(self, c: Client, start: int, bad: list[int], now: float) -> list[Action]:
        """Blocks that failed their check on `c`: read them from the others,
        to be rewritten on `c` (rewrite.py)."""
        where = f"{len(bad)} bad blocks from {start + bad[0]} on {c.name}"
        if self.opts.read_only or self.up_state is not UpState.ACTIVE:
            return [Log(f"[{c.id}] {where} left as they are: this upstairs does not write")]
        if c.state.stage is not Stage.ACTIVE:
            return []
        acts: list[Action] = [Log(f"[{c.id}] {where}: rewriting from a good copy", "warning")]
        for first, n in runs(bad):
            acts += self.enqueue(ReadOp(start + first, n, mend=c.id), None, now, (c.id,))
        return acts

    def _rewrite(self, job: Job) -> list[WriteOp]:
        """A mending read has good data: the writes that put it on the bad copy."""
        op = job.op
        assert isinstance(op, ReadOp) and op.mend is not None and self.region is not None
        if self.clients[op.mend].state.stage is not Stage.ACTIVE:
            return []  # it left: it comes back through live repair
        newer = touched_after(self.table, job.id, op.start, op.count)
        assert job.read_contexts is not None and job.read_data is not None
        keep = [i for i in range(op.count) if op.start + i not in newer]
        bs = self.region.block_size
        return rewrites(op.start, job.read_contexts, job.read_data, keep, op.mend, bs)

    # ---- acks and completion ------------------------------------------------------

    def _maybe_ack(self, job: Job, now: float) -> list[Action]:
        if job.acked:
            return []
        result = acks.early_ack(job, self.up_state is UpState.DEACTIVATING)
        if result is acks.NOT_YET:
            return []
        job.acked = True
        self._acked(job)
        acts: list[Action] = []
        if isinstance(job.op, ReadOp):
            if job.op.mend is not None:
                for w in self._rewrite(job):
                    acts += self.enqueue(w, None, now)
            # The job stays until a flush retires it; its data is the guest's now
            # (later replies are compared by their contexts).
            job.read_data, job.read_plain = b"", None
        if job.guest is not None:
            acts.append(Complete(job.guest, result))
        return acts

    def _finish(self, job: Job, now: float) -> list[Action]:
        """Every client has answered (or been skipped) for this job."""
        acts: list[Action] = []
        if job.errors and isinstance(job.op, ReadOp) and job.read_data is not None:
            acts.append(Log(f"INTEGRITY: read job {job.id}: {'; '.join(job.errors)}", "error"))
        if not job.acked:
            job.acked = True
            self._acked(job)
            rep = self.repair
            if job.guest is not None and rep and not rep.aborting and acks.parkable(job):
                self.table.parked.append(job.guest)  # acked when the repair is done
                job.guest = None
            elif job.guest is not None:
                acts.append(Complete(job.guest, acks.final_result(job)))
        self.table.mark_finished(job)
        if _JOB_FINISHED.handlers:
            _JOB_FINISHED.fire1(job.id)
        op = job.op
        if isinstance(op, ReadOp) and op.compare:
            acts += self._compared(job, now)
        if isinstance(op, WriteOp) and op.to is not None and job.state[op.to] is IOState.DONE:
            c = self.clients[op.to]
            n = len(op.contexts)
            self.blocks_rewritten += n
            line = f"[{c.id}] rewrote {n} bad blocks from {op.start} on {c.name} from a good copy"
            acts.append(Log(line, "warning"))
        if job.is_flush_like:
            acts += self._retire(job.id)
        rep = self.repair
        if rep is not None and (isinstance(job.op, LIVE_OPS) or job.id == rep.final_flush):
            acts += self._repair_step(rep, job, now)
        return acts

    def _fire_start(self, job: Job, p: ProbeNames) -> None:
        if p.gw_start.handlers:
            if p.live:
                p.gw_start.fire2(job.id, self._extent(job))
            else:
                n = job_bytes(job, self._block_size)
                p.gw_start.fire4(job.id, n, job.gw_id != 0, self._extent(job))
        if p.to_ds is not None and p.to_ds.handlers:
            p.to_ds.fire1(job.id)

    def _acked(self, job: Job) -> None:
        """A job is acked to its guest (or, for one of ours, done with)."""
        n = job_bytes(job, self._block_size)
        if job.gw_id:
            count = self.guest_counts[op_name(job)]
            count.ops += 1
            count.bytes += n
        if not UP.on:
            return
        p = probe_names(job)
        if not p.gw_done.handlers:
            return
        if p.live:
            p.gw_done.fire2(job.id, self._extent(job))
        else:
            p.gw_done.fire4(job.id, n, job.gw_id != 0, _since_queued(job))

    @property
    def _block_size(self) -> int:
        return self.region.block_size if self.region else 0

    def _extent(self, job: Job) -> int | None:
        return extent_of(job, self.region.extent_size if self.region else 0)

    def _retire(self, upto: int) -> list[Action]:
        gone = self.table.retire(upto)
        for c in self.clients:
            if c.skipped:
                c.skipped = {j for j in c.skipped if j > upto}
        if not gone or not self.opts.log_jobs:
            return []
        return [Log(f"retired {gone} jobs up to {upto}", "debug")]

    def fail_all(self, err: CrucibleError) -> list[Action]:
        """Stop for good: every guest request waiting fails with `err`."""
        acts: list[Action] = []
        for job in self.table:
            if job.guest is not None and not job.acked:
                job.acked = True
                self._acked(job)
                acts.append(Complete(job.guest, err))
        acts += [Complete(w, err) for w in self.table.parked]  # flushes parked for a repair
        self.table.parked = []
        self.repair = None
        self.table.clear()
        for c in self.clients:
            c.inflight_jobs = c.inflight_bytes = 0
            c.skipped.clear()
        return acts

    # ---- faults ----------------------------------------------------------------------

    def fault(self, c: Client, reason: str, now: float) -> list[Action]:
        """Stop using a downstairs whose copy can no longer be trusted; it is
        reconnected and live-repaired."""
        if c.is_faulted:
            return []
        was = c.state.stage
        c.set_state(DsState(Stage.CONNECT, Mode.FAULTED))
        c.last_error = reason
        c.offline_since = None
        serving = self.up_state is UpState.ACTIVE
        c.reconnect_at = now + self.opts.reconnect_delay if serving else None
        if UP.on:
            UP.fire("up__fault", c.id, reason)
        acts: list[Action] = [Log(f"[{c.id}] {c.name} faulted: {reason}", "error")]
        if was not in (Stage.IDLE, Stage.DISABLED):
            acts.append(Drop(c.id, reason))  # the connection, or a connect under way
        rep = self.repair
        if rep is not None and not rep.aborting and (c.id == rep.source or c.id in rep.targets):
            acts += self.abort_repair(f"{c.name} faulted: {reason}", now)
        finished = []
        for job in list(self.table):  # (retried reads and rewrites join the table)
            if job.state[c.id] is IOState.IN_PROGRESS:
                job.state[c.id] = IOState.SKIPPED
                c.skipped.add(job.id)
                acts += self._maybe_ack(job, now)
                if isinstance(job.op, ReadOp):
                    acts += self._retry_read(job, c, now)
                if job.complete and not job.finished:
                    finished.append(job)
        c.inflight_jobs = c.inflight_bytes = 0
        for job in finished:
            if not job.finished:
                acts += self._finish(job, now)
        return acts

    def replace(self, token: object, old: SocketAddr, new: SocketAddr, now: float) -> list[Action]:
        """Swap the downstairs at `old` for a new region at `new` (refused while
        another is out, or a repair runs); it is faulted, and live repair fills
        the new one."""

        def refuse(why: str) -> list[Action]:
            return [Complete(token, CrucibleError(ErrorKind.ReplaceRequestInvalid, why))]

        if self.up_state is not UpState.ACTIVE:
            return [Complete(token, CrucibleError(ErrorKind.UpstairsInactive))]
        if self.opts.read_only:
            return refuse("a read-only upstairs does not replace downstairs")
        by_target = {c.target: c for c in self.clients}
        old_name, new_name = format_host_port(old), format_host_port(new)
        if new in by_target:
            if old in by_target:
                return refuse(f"{new_name} is already a downstairs here, as is {old_name}")
            return [Complete(token, None)]  # asked again: already under way or done
        c = by_target.get(old)
        if c is None:
            return refuse(f"{old_name} is not one of this upstairs' downstairs")
        busy = [x for x in self.clients if x is not c and x.state.stage is not Stage.ACTIVE]
        if busy or self.repair is not None:
            who = busy[0] if busy else c
            return refuse(
                f"downstairs {who.name} is {who.state.name}: only one may be out at a time"
            )
        acts = self.fault(c, f"replaced by {new_name}", now)
        c.set_state(DsState(Stage.CONNECT, Mode.REPLACED))
        c.retarget(new)
        self.one_host = one_host(self.clients)
        c.region_uuid = None
        c.capabilities = None
        c.reconnect_at = now  # no reason to wait
        acts.append(Log(f"[{c.id}] replacing {old_name} with {new_name}", "warning"))
        return [*acts, Complete(token, None)]

    def _held_too_much(self, c: Client) -> bool:
        return (
            c.inflight_jobs > self.opts.offline_max_jobs
            or c.inflight_bytes > self.opts.offline_max_bytes
        )

    def fault_held(self, c: Client, now: float) -> list[Action]:
        why = f"offline with {c.inflight_jobs} jobs ({c.inflight_bytes} bytes) outstanding"
        return self.fault(c, why, now)

    def fault_overfull(self, now: float) -> list[Action]:
        acts: list[Action] = []
        for c in self.clients:
            if c.holds_jobs and self._held_too_much(c):
                acts += self.fault_held(c, now)
        return acts

    def fault_stalled(self, now: float) -> list[Action]:
        """Fault a downstairs that has jobs out but finished none for
        progress_timeout while another finished some since: it may answer
        pings, but the guest would wait on it (a full in-flight window, or a
        flush). When all are slow alike, none is. Nor is one still taking a
        snapshot: where the filesystem cannot clone, that is a copy of the
        whole region, which one replica may finish well before another."""
        limit = self.opts.progress_timeout
        working = [c for c in self.clients if c.state.stage in TAKES_IO]
        acts: list[Action] = []
        for c in working:
            if not c.inflight_jobs or now - c.last_progress < limit:
                continue
            if self._snapshotting(c):
                continue
            # (finished, not just sent: a client that was only sent jobs since,
            # as the reads a stuck home spills, may be stuck on the same disk)
            if any(o is not c and o.last_finished > c.last_progress for o in working):
                why = f"no job finished in {now - c.last_progress:.0f} s while the others kept on"
                acts += self.fault(c, why, now)
        return acts

    def _snapshotting(self, c: Client) -> bool:
        return any(
            isinstance(j.op, FlushOp)
            and j.op.snapshot is not None
            and j.state[c.id] is IOState.IN_PROGRESS
            for j in self.table
        )

    def replay_impossible(self) -> bool:
        """Live-repair jobs were queued out of id order: a replay cannot be trusted."""
        return self.repair is not None or self.table.has_live_repair_jobs()

    # ---- live repair ---------------------------------------------------------------

    def start_repair(self, now: float) -> list[Action]:
        """Begin a repair if a client is ready for one and a healthy source exists."""
        if self.up_state is not UpState.ACTIVE or self.repair is not None or self.opts.read_only:
            return []
        ready = [
            c for c in self.clients if c.state.stage is Stage.REPAIR_READY and c.repair_after <= now
        ]
        healthy = [c for c in self.clients if c.state.stage is Stage.ACTIVE]
        if not ready or not healthy or self.region is None:
            return []
        acts: list[Action] = []
        for c in self.clients:
            if c.holds_jobs:  # its replay would interleave with the repair's jobs
                acts += self.fault(c, "offline when live repair started", now)
        source = healthy[-1]
        assert source.repair_addr is not None
        r = self.region
        targets = [c.id for c in ready]
        self.repair = LiveRepair(
            source.id, source.repair_addr, targets, r.extent_count, r.extent_size, now
        )
        for c in ready:
            c.set_state(LIVE_REPAIR)
            c.first_job = self.table.next_id
            c.skipped.clear()
            c.inflight_jobs = c.inflight_bytes = 0
        names = ", ".join(c.name for c in ready)
        line = f"live repair of {names} from {source.name}: {r.extent_count} extents"
        acts.append(Log(line, "warning"))
        return acts + self._repair_jobs(self.repair.next_extent(self.table, self._gen, now), now)

    @property
    def _gen(self) -> int:
        return self.session.gen

    def _repair_step(self, rep: LiveRepair, job: Job, now: float) -> list[Action]:
        line = rep.progress_line(job)
        acts: list[Action] = [Log(line)] if line else []
        return acts + self._repair_jobs(rep.after(job, self.table, self._gen, now), now)

    def _repair_jobs(self, jobs: list[Job] | None, now: float) -> list[Action]:
        if jobs is None:
            return self._end_repair(now)
        acts: list[Action] = []
        for job in jobs:
            acts += self.add_job(job, now)
        return acts

    def _end_repair(self, now: float) -> list[Action]:
        """Done, or aborted: targets become active (or stay faulted); parked flushes answer."""
        rep = self.repair
        assert rep is not None
        self.repair = None
        waiters, self.table.parked = self.table.parked, []
        for t in rep.targets:
            c = self.clients[t]
            if rep.aborting:
                c.live_repairs_aborted += 1
            else:
                c.live_repairs += 1
                c.extents_repaired += rep.repaired
                c.extents_confirmed += rep.confirmed
        if rep.aborting:
            self.live_repairs_aborted += 1
            err = CrucibleError(ErrorKind.IoError, f"live repair aborted: {rep.abort_reason}")
            acts: list[Action] = [Complete(w, err) for w in waiters]
            for t in rep.targets:
                acts += self._back_off(self.clients[t], rep.abort_reason or "aborted", now)
            return acts
        for t in rep.targets:
            c = self.clients[t]
            if c.state.stage is Stage.LIVE_REPAIR:
                c.set_state(ACTIVE)
                c.last_error = ""
                c.repair_failures, c.repair_after = 0, 0.0
        self.live_repairs += 1
        took = now - rep.started
        line = (
            f"live repair done in {took:.2f} s: {rep.repaired} extents copied, "
            f"{rep.confirmed} matched"
        )
        return [Log(line, "warning"), *[Complete(w, None) for w in waiters]]

    def _back_off(self, c: Client, reason: str, now: float) -> list[Action]:
        """A failed repair is tried again later each time (a full disk does not
        empty itself in a second); after REPAIR_ATTEMPTS in a row, only every
        REPAIR_BACKOFF_MAX, or at once if the downstairs is restarted."""
        c.repair_failures += 1
        n = c.repair_failures
        delay = min(REPAIR_BACKOFF * 2 ** (n - 1), REPAIR_BACKOFF_MAX)
        if n >= REPAIR_ATTEMPTS:
            delay = REPAIR_BACKOFF_MAX
        c.repair_after = now + delay
        c.last_error = f"live repair failed {n} times in a row ({reason}); next try in {delay:g} s"
        level = "error" if n >= REPAIR_ATTEMPTS else "warning"
        line = f"[{c.id}] {c.name}: {c.last_error}"
        if n >= REPAIR_ATTEMPTS:
            line += "; restart that downstairs to try at once"
        return [Log(line, level)]

    def abort_repair(self, reason: str, now: float) -> list[Action]:
        """Fault the targets; the extent in progress still gets its jobs, as no-ops."""
        rep = self.repair
        assert rep is not None
        rep.abort_reason = reason
        acts: list[Action] = [Log(f"live repair aborted: {reason}", "error")]
        for t in rep.targets:
            acts += self.fault(self.clients[t], "live repair aborted", now)
        return acts


def _write_args(op: WriteOp) -> tuple[int, m.Contexts, m.Data]:
    return op.start, op.contexts, op.data


def _describe(op: Op) -> str:
    match op:
        case WriteOp():
            return f"block:{op.start} n:{len(op.contexts)}"
        case ReadOp() | TrimOp():
            return f"block:{op.start} n:{op.count}"
        case FlushOp():
            return f"fln:{op.flush_number} gen:{op.gen}"
        case _:
            return ""


def _since_queued(job: Job) -> float:
    """Seconds since the job was queued, for its done probes (0 for a job
    queued before anything was attached)."""
    return clock() - job.queued if job.queued else 0.0
