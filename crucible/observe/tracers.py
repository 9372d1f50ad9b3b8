"""The spans of the upstairs and of a downstairs, made from the probes
(probes.py) and handed to tracing.py's sender.

With every job traced these handlers run several times per guest IO, so
this module is compiled with the IO path (scripts/compile).

How a downstairs' span joins the upstairs' trace: the V13 wire format has
no room for a trace context and must stay byte-compatible with Crucible, so
both sides derive the ids of a job's trace from what they share, the
upstairs id, the session id and the job id: the trace id is their 128-bit
XXH3, the id of the upstairs' job span their 64-bit XXH3. A downstairs' span
names that job span as its parent. Sampling decides on the trace id the
same way on both sides, so a sampled job is sampled everywhere.
"""

from __future__ import annotations

import random
import struct
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any, Final

import xxhash
from opentelemetry.trace import SpanKind

from crucible.observe.probes import DS, DS_DISK, DS_JOBS, DS_LIVE, DS_OPS, GW_OPS, UP
from crucible.observe.spans import Child, SpanRecord, sampled
from crucible.observe.tracing import Tracing

MAX_OPEN: Final = 100_000  # spans begun and not yet ended, at most
_SESSIONS_KEPT: Final = 64
# (Compiled, a Final is a C static: calling these looks nothing up.)
_now: Final = time.time_ns
_xxh128: Final = xxhash.xxh3_128_intdigest
_xxh64: Final = xxhash.xxh3_64_intdigest
_u64: Final = struct.Struct("<Q").pack

_CLIENT: Final = SpanKind.CLIENT
_SERVER: Final = SpanKind.SERVER
# A client's part's own attributes (shared by every such span: never changed).
_CLIENT_ATTRS: Final = [{"crucible.client": cid} for cid in range(3)]


def random_id(bits: int) -> int:
    # (the random module's generator: a span id needs to be unique, not secret)
    return random.getrandbits(bits) or 1


def job_ids(upstairs_id: uuid.UUID, session_id: uuid.UUID, job_id: int) -> tuple[int, int]:
    """(trace id, id of the upstairs' job span) of a job: both sides compute it."""
    return _ids(_session(upstairs_id.int, session_id.int)[0], job_id)


def _ids(session_key: bytes, job_id: int) -> tuple[int, int]:
    key = session_key + _u64(job_id)
    return _xxh128(key) or 1, _xxh64(key) or 1


_sessions: Final[dict[tuple[int, int], tuple[bytes, dict[str, Any]]]] = {}


def _session(upstairs_id: int, session_id: int) -> tuple[bytes, dict[str, Any]]:
    """A session's key for job ids, and the span attributes naming it (not to
    be changed: copy it). Keyed by the ids' ints, which hash without Python."""
    known = _sessions.get((upstairs_id, session_id))
    if known is not None:
        return known
    if len(_sessions) >= _SESSIONS_KEPT:
        _sessions.clear()
    up, sess = uuid.UUID(int=upstairs_id), uuid.UUID(int=session_id)
    made = (
        up.bytes + sess.bytes,
        {
            "crucible.upstairs_id": str(up),
            "crucible.session_id": str(sess),
        },
    )
    _sessions[(upstairs_id, session_id)] = made
    return made


class _Job:
    """A traced upstairs job, from queued to done on every downstairs."""

    def __init__(
        self, start: int, op: str, nbytes: int, attrs: dict[str, Any], trace_id: int, span_id: int
    ) -> None:
        self.start = start
        self.op = op
        self.nbytes = nbytes
        self.attrs = attrs
        self.acked = 0  # ns
        self.trace_id = trace_id
        self.span_id = span_id
        self.children: list[Child] = []  # each client's part
        self.sent: list[int] = [0, 0, 0]  # ns each client was sent it (0: not yet)


class UpstairsTracer:
    """Spans of the upstairs: a job ("gw-write": queued to done on every
    downstairs, with the guest's ack as an event), each downstairs' part of it
    ("ds-write-client": sent to answered), activation, reconciliation and
    each live-repair extent."""

    def __init__(
        self,
        tracing: Tracing,
        session: Callable[[], tuple[uuid.UUID, uuid.UUID]],
    ) -> None:
        self.add: Callable[[SpanRecord], None] = tracing.batcher.add
        self.bound: int = tracing.bound
        self.session = session
        self._up: uuid.UUID | None = None  # the session of the last job begun
        self._sess: uuid.UUID | None = None
        self._key = b""
        self._named: dict[str, Any] = {}
        self.jobs: dict[int, _Job] = {}
        self.extents: dict[int, int] = {}  # extent under live repair -> start ns
        self.activation: tuple[int, int, int] | None = None  # (trace, span, start ns)
        self.reconcile: tuple[int, int] | None = None  # (start ns, extents)
        for op in GW_OPS:
            UP.attach(f"gw__{op}__start", partial(self.begin, op))
            UP.attach(f"gw__{op}__done", self._job_acked)
        for op in DS_OPS:
            UP.attach(f"ds__{op}__client__start", self._client_start)
            UP.attach(f"ds__{op}__client__done", partial(self.client_done, f"ds-{op}-client"))
        for op in DS_LIVE:
            UP.attach(f"ds__{op}__start", self._client_start)
            UP.attach(f"ds__{op}__done", partial(self.client_done, f"ds-{op}"))
            UP.attach(f"gw__{op}__start", partial(self.live_start, op))
            UP.attach(f"gw__{op}__done", self._job_acked)
        UP.attach("gw__reopen__done", self._extent_done)
        UP.attach("up__job__finished", self._job_finished)
        UP.attach("up__activate__start", self._activate_start)
        UP.attach("up__activate__done", self._activate_done)
        UP.attach("up__reconcile__start", self._reconcile_start)
        UP.attach("up__reconcile__done", self._reconcile_done)

    def begin(self, op: str, jid: int, nbytes: int, guest: bool, extent: int | None) -> None:
        """gw__OP__start: a job to trace if its trace is sampled (its ids are
        worked out once)."""
        up, sess = self.session()
        if up is not self._up or sess is not self._sess:  # (a new session: rare)
            self._up, self._sess = up, sess
            self._key, self._named = _session(up.int, sess.int)
        key, named = self._key, self._named
        trace_id, span_id = _ids(key, jid)
        if not sampled(trace_id, self.bound):
            return
        if len(self.jobs) > MAX_OPEN:  # jobs never finished (a session that ended)
            self.jobs.clear()
        attrs = dict(named)
        attrs["crucible.job_id"] = jid
        if extent is not None:
            attrs["crucible.extent"] = extent
        self.jobs[jid] = _Job(_now(), op, nbytes, attrs, trace_id, span_id)

    def _job_acked(self, jid: int, *_: Any) -> None:
        job = self.jobs.get(jid)
        if job is not None:
            job.acked = _now()

    def _job_finished(self, jid: int) -> None:
        job = self.jobs.get(jid)
        if job is None:  # not sampled
            return
        del self.jobs[jid]  # (get and del: compiled, dict.pop is a generic method call)
        attrs = job.attrs
        if job.nbytes:
            attrs["crucible.bytes"] = job.nbytes
        events: tuple[tuple[str, int, dict[str, Any] | None], ...] = ()
        if job.acked:
            events = (("acked", job.acked, None),)
        self.add(
            SpanRecord(
                "gw-" + job.op, job.trace_id, job.span_id, None, job.start, _now(),
                attrs, events, children=tuple(job.children),
            )
        )  # fmt: skip

    def _client_start(self, jid: int, cid: int) -> None:
        job = self.jobs.get(jid)
        if job is not None:  # (else not sampled)
            job.sent[cid] = _now()

    def client_done(self, name: str, jid: int, cid: int, err: Any, *_: Any) -> None:
        """ds__OP__client__done (or a live-repair job's ds__OP__done): the
        client's part, a span called `name`."""
        job = self.jobs.get(jid)
        if job is None:
            return
        start = job.sent[cid]
        if not start:
            return
        job.sent[cid] = 0
        error = None if err is None else str(err)
        job.children.append(
            Child(name, random_id(64), start, _now(), _CLIENT_ATTRS[cid], error, _CLIENT)
        )

    def live_start(self, op: str, jid: int, extent: int | None) -> None:
        self.begin(op, jid, 0, False, extent)
        if op == "close" and extent is not None:
            self.extents[extent] = _now()

    def _extent_done(self, jid: int, extent: int | None) -> None:
        start = self.extents.pop(extent, None) if extent is not None else None
        if start is None:
            return
        up, _ = self.session()
        trace_id = random_id(128)
        if sampled(trace_id, self.bound):
            attrs: dict[str, Any] = {"crucible.upstairs_id": str(up), "crucible.extent": extent}
            self.add(
                SpanRecord(
                    "live-repair-extent", trace_id, random_id(64), None, start, _now(),
                    attrs,
                )
            )  # fmt: skip

    def _activate_start(self, gen: int) -> None:
        self.activation = (random_id(128), random_id(64), _now())

    def _activate_done(self, gen: int, error: str | None) -> None:
        if self.activation is None:
            return
        trace_id, span_id, start = self.activation
        self.activation = None
        up, sess = self.session()
        attrs = dict(_session(up.int, sess.int)[1])
        attrs["crucible.generation"] = gen
        self.add(
            SpanRecord("activate", trace_id, span_id, None, start, _now(), attrs,
                       error=error)
        )  # fmt: skip

    def _reconcile_start(self, needed: int) -> None:
        self.reconcile = (_now(), needed)

    def _reconcile_done(self, done: int, needed: int) -> None:
        if self.reconcile is None or self.activation is None:
            return
        start, _ = self.reconcile
        self.reconcile = None
        trace_id, parent, _ = self.activation
        attrs: dict[str, Any] = {
            "crucible.extents_repaired": done,
            "crucible.extents_needed": needed,
        }
        self.add(SpanRecord("reconcile", trace_id, random_id(64), parent, start, _now(), attrs))


class _Open:
    """A downstairs job begun: when, and the region's work on it so far."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.events: list[tuple[str, int, dict[str, Any] | None]] = []


class DownstairsTracer:
    """A span per job ("submit-write": received to answered), in the trace of
    the upstairs' job, with the region's work as events."""

    def __init__(self, tracing: Tracing, extent_size: int) -> None:
        self.add: Callable[[SpanRecord], None] = tracing.batcher.add
        self.bound: int = tracing.bound
        self.extent_size = extent_size
        self.begun: dict[int, _Open] = {}  # id(message) -> the job's record so far
        dones: set[str] = set()  # (live-repair jobs share done probes)
        for op, (start, done) in DS_JOBS.items():
            DS.attach(start, self._start)
            if done not in dones:
                dones.add(done)
                DS.attach(done, partial(self.done, f"submit-{op.replace('_', '-')}"))
        for op in DS_DISK:
            DS.attach(f"os__{op}__start", partial(self.event, f"os-{op}-start"))
            DS.attach(f"os__{op}__done", partial(self.event, f"os-{op}-done"))

    def _start(self, jid: int, msg: Any) -> None:
        if len(self.begun) > MAX_OPEN:  # jobs of connections that went away
            self.begun.clear()
        self.begun[id(msg)] = _Open(_now())

    def event(self, name: str, jid: int, msg: Any, *_: Any) -> None:
        """os__OP__start/done: an event called `name` on the job's span."""
        rec = self.begun.get(id(msg))
        if rec is not None:
            rec.events.append((name, _now(), None))

    def done(self, name: str, jid: int, msg: Any, err: Any, nbytes: int) -> None:
        """submit__OP__done: the job's span, called `name`."""
        ident = id(msg)
        rec = self.begun.get(ident)
        if rec is None:
            return
        del self.begun[ident]
        key, named = _session(msg.upstairs_id.int, msg.session_id.int)
        trace_id, job_span = _ids(key, jid)
        if not sampled(trace_id, self.bound):
            return
        attrs = dict(named)
        attrs["crucible.job_id"] = jid
        start = getattr(msg, "start", None)
        if start is not None and self.extent_size:
            attrs["crucible.extent"] = start // self.extent_size
        if nbytes:
            attrs["crucible.bytes"] = nbytes
        error = None if err is None else str(err)
        self.add(
            SpanRecord(
                name, trace_id, random_id(64), job_span, rec.start, _now(), attrs,
                tuple(rec.events), error=error, kind=_SERVER,
            )
        )  # fmt: skip
