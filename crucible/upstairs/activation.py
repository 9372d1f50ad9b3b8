"""Activation's decisions and reconciliation's steps.

When every client needed has negotiated (WAIT_QUORUM), `decide` compares
what they store: a read-write activation needs all three and a generation
above every stored one; the next flush number is one above the highest
stored. If extents differ (mend.py), the Reconciler runs the repairs one
step at a time (reconcile.py) with every client in RECONCILE; any failure
drops everyone, and the comparison starts over when they are back (extents
already fixed then match, so progress is kept). The same Reconciler brings
back a volume whose three downstairs were all faulted (`restart_all`).
"""

from __future__ import annotations

from dataclasses import dataclass

from crucible.common.errors import CrucibleError, ErrorKind
from crucible.observe.probes import UP
from crucible.protocol import messages as m
from crucible.upstairs.actions import Action, Complete, Drop, Log, Send
from crucible.upstairs.client import Client
from crucible.upstairs.downstairs import Downstairs
from crucible.upstairs.mend import (
    ExtentVersions,
    Repair,
    Unrepairable,
    generation_floor,
    mend,
    next_flush_number,
)
from crucible.upstairs.reconcile import Outcome, Reconciliation
from crucible.upstairs.state import ACTIVE, DsState, Mode, Stage, UpState


@dataclass(frozen=True, slots=True)
class Refuse:
    """Activation cannot succeed."""

    reason: str
    err: CrucibleError


@dataclass(frozen=True, slots=True)
class Proceed:
    """Go active once these extents are repaired (none: at once)."""

    repairs: list[Repair]


def decide(
    ds: Downstairs, cut_short: bool, unusable: frozenset[tuple[int, int]] = frozenset()
) -> Refuse | Proceed | None:
    """What the clients waiting in WAIT_QUORUM allow; None: not all are there.
    `cut_short`: a reconciliation of this activation ran before and was cut
    short (it stamped some extents with our own generation, which then may
    equal it). `unusable`: (extent, client) copies that cannot be a source.
    Sets the next flush number."""
    ready = [c for c in ds.clients if c.state.stage is Stage.WAIT_QUORUM]
    read_only = ds.opts.read_only
    if len(ready) < (1 if read_only else 3):
        return None
    versions = [c.versions for c in ready if c.versions is not None]
    floor = generation_floor(versions)
    gen = ds.session.gen
    if not read_only and gen <= floor and not (cut_short and gen == floor):
        return Refuse(
            f"generation {gen} is not greater than {floor}, the highest generation "
            "stored on the downstairs",
            CrucibleError(ErrorKind.GenerationNumberInvalid, values=(gen, floor)),
        )
    ds.table.next_flush = next_flush_number(versions)
    if read_only:
        return Proceed([])
    return plan(versions, unusable)


def plan(versions: list[ExtentVersions], unusable: frozenset[tuple[int, int]]) -> Refuse | Proceed:
    try:
        return Proceed(mend(versions, unusable))
    except Unrepairable as e:
        why = (
            f"extent {e.extent} cannot be reconciled: every copy holds a block torn by a "
            "crash (crucible-downstairs verify names it)"
        )
        return Refuse(why, CrucibleError(ErrorKind.RegionAssembleError))


class Activation:
    """From activate() to ACTIVE: where each negotiated client waits, the
    quorum decision, reconciliation, and the answer to the caller."""

    def __init__(self) -> None:
        self.token: object | None = None  # the caller of activate(), until answered
        self.current: Reconciliation | None = None  # the latest pass, for progress
        self.next_repair_id = 0
        self.unusable: set[tuple[int, int]] = set()  # (extent, client): not a source

    def begin(self, token: object) -> None:
        self.token = token
        self.current = None
        self.unusable.clear()

    def placed(self, ds: Downstairs, c: Client, now: float) -> list[Action]:
        """A client's extent versions are in: where it waits. While the volume
        serves, read-only joins at once and read-write needs live repair;
        otherwise it waits for the quorum."""
        if ds.up_state is UpState.ACTIVE and ds.opts.read_only:
            c.set_state(ACTIVE)  # nothing to reconcile
            return []
        if ds.up_state is UpState.ACTIVE:
            c.set_state(DsState(Stage.REPAIR_READY, c.mode))  # it missed writes
            return [Log(f"[{c.id}] {c.name} is ready for live repair ({c.mode.value})")]
        c.set_state(DsState(Stage.WAIT_QUORUM, c.mode))
        n = sum(1 for x in ds.clients if x.state.stage is Stage.WAIT_QUORUM)
        v = c.versions
        assert v is not None
        return [
            Log(
                f"[{c.id}] {c.name} extent versions: gen {_preview(v.gens)} "
                f"flush {_preview(v.flushes)} dirty {_preview(v.dirty)}"
            ),
            Log(f"#### {c.name} #### CONNECTED ######## {n}/3"),
        ]

    def check(self, ds: Downstairs, now: float) -> tuple[list[Action], Refuse | None]:
        """Once every client needed waits: refuse, reconcile or go active."""
        if ds.up_state is not UpState.GO_ACTIVE:
            return [], None
        # A reconciliation of this activation that was cut short stamped some
        # extents with our own generation: only that may equal it.
        decision = decide(ds, self.current is not None, frozenset(self.unusable))
        if decision is None:
            return [], None
        if isinstance(decision, Refuse):
            return [], decision
        return self.reconcile(ds, decision.repairs, now), None

    def reconcile(self, ds: Downstairs, repairs: list[Repair], now: float) -> list[Action]:
        if not repairs:
            return self.go_active(ds, now)
        if UP.on:
            UP.fire("up__reconcile__start", len(repairs))
        acts, done = self._start(ds, repairs, now)
        return acts + (self.go_active(ds, now) if done else [])

    def go_active(self, ds: Downstairs, now: float) -> list[Action]:
        ds.up_state = UpState.ACTIVE
        ds.table.last_io = now
        if UP.on:
            if self.needed:
                UP.fire("up__reconcile__done", self.done, self.needed)
            UP.fire("up__activate__done", ds.session.gen, None)
        for c in ds.clients:
            if c.state.stage is Stage.WAIT_QUORUM:
                c.set_state(ACTIVE)
        sess = ds.session
        line = f"upstairs {sess.upstairs_id} is active with gen {sess.gen}; "
        acts: list[Action] = [Log(line + f"next flush {ds.table.next_flush}")]
        acts += ds.ask_allocation()  # every copy holds the same blocks now
        if self.token is not None:
            acts.append(Complete(self.token, None))
            self.token = None
        return acts

    @property
    def needed(self) -> int:
        return self.current.needed if self.current else 0

    @property
    def done(self) -> int:
        return self.current.done if self.current else 0

    def _start(
        self, ds: Downstairs, repairs: list[Repair], now: float
    ) -> tuple[list[Action], bool]:
        """Begin repairing; True once everything is done (then go active)."""
        addrs = [c.repair_addr for c in ds.clients]
        # The repaired extents get the generation of this upstairs and a flush
        # number of their own, so later flushes cannot make them look alike.
        flush_no = ds.table.take_flush_number()
        rec = Reconciliation(repairs, addrs, self.next_repair_id, flush_no, ds.session.gen, now)
        self.current = rec
        self.next_repair_id = rec.next_id
        for c in ds.clients:
            c.set_state(DsState(Stage.RECONCILE, c.mode))
        acts, done = self._next_step(ds, now)
        return [Log(f"reconciliation: {len(repairs)} extents to repair"), *acts], done

    def _next_step(self, ds: Downstairs, now: float) -> tuple[list[Action], bool]:
        rec = self.current
        assert rec is not None
        sends = rec.advance()
        if sends:
            return [Send(c, msg) for c, msg in sends], False
        for c in ds.clients:
            c.set_state(DsState(Stage.WAIT_QUORUM, c.mode))
        took = now - rec.started
        return [Log(f"reconciliation done: {rec.done} extents in {took:.2f} s")], True

    def reply(self, ds: Downstairs, cid: int, msg: m.Message, now: float) -> list[Action]:
        """A client's answer to the reconciliation step in flight."""
        if self.current is None:
            return []
        c = ds.clients[cid]
        outcome, text = self.current.reply(cid, msg)
        if outcome is Outcome.FAILED:
            if self.current.bad_source is not None:
                self.unusable.add(self.current.bad_source)
            return self.abort(ds, f"{c.name} failed on {text}", now)
        if outcome is Outcome.IGNORED:
            return [Log(f"[{cid}] ignored {type(msg).__name__} during reconciliation")]
        if outcome is Outcome.WAITING:
            return []
        acts, done = self._next_step(ds, now)
        acts = ([Log(text)] if text else []) + acts
        return acts + (self.go_active(ds, now) if done else [])

    def abort(self, ds: Downstairs, reason: str, now: float) -> list[Action]:
        """Any failure: drop everyone; they reconnect and the comparison starts over."""
        if self.current is not None:
            self.current.steps.clear()
        acts: list[Action] = [Log(f"reconciliation aborted: {reason}", "warning")]
        for c in ds.clients:
            if c.state.stage is not Stage.CONNECT:
                acts.append(Drop(c.id, "reconciliation aborted"))
            c.fall_back(now, ds.opts)
        return acts

    def restart_all(self, ds: Downstairs, now: float) -> tuple[list[Action], Refuse | None]:
        """All three were faulted, so none can be a live-repair source: compare
        their extents and reconcile, as at activation (the generation is ours
        already). What an acked flush covered is on two of them, so the newest
        copy of each extent holds it."""
        err = CrucibleError(ErrorKind.IoError, "every downstairs was faulted")
        ds.allocation.forget()  # unflushed work may be gone: asked again once active
        acts: list[Action] = [
            Log("all three downstairs need repair and none is healthy: reconciling", "warning")
        ]
        for job in ds.table:  # skipped everywhere: finished, and forgotten here
            if job.guest is not None and not job.acked:
                acts.append(Complete(job.guest, err))
        ds.table.clear()
        versions = []
        for c in ds.clients:
            assert c.versions is not None
            versions.append(c.versions)
            c.set_state(DsState(Stage.WAIT_QUORUM, Mode.NEW))
            c.skipped.clear()
            c.first_job = ds.table.next_id  # new sessions everywhere
            c.inflight_jobs = c.inflight_bytes = 0
        ds.table.next_flush = max(ds.table.next_flush, next_flush_number(versions))
        decision = plan(versions, frozenset(self.unusable))
        if isinstance(decision, Refuse):
            return acts, decision
        return acts + self.reconcile(ds, decision.repairs, now), None


def _preview(values: list[int] | list[bool], limit: int = 8) -> str:
    vals = [int(v) for v in values]
    shown = ", ".join(str(v) for v in vals[:limit])
    return f"[{shown}{', ...' if len(vals) > limit else ''}]"
