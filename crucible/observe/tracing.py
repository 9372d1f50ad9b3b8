"""Tracing: spans built from the probes (probes.py), exported in the
background to a Jaeger agent (UDP, compact thrift) or an OTLP collector
(HTTP or gRPC).

A span is recorded when its work ends, as a plain tuple (spans.py), and
queued for a thread of its own that encodes and sends them in batches: the
IO path only records times. Nothing here runs unless an endpoint is given.

How a downstairs' span joins the upstairs' trace: the V13 wire format has
no room for a trace context and must stay byte-compatible with Crucible, so
both sides derive the ids of a job's trace from what they share, the
upstairs id, the session id and the job id: the trace id is their 128-bit
XXH3, the id of the upstairs' job span their 64-bit XXH3. A downstairs' span
names that job span as its parent. Sampling decides on the trace id the
same way on both sides, so a sampled job is sampled everywhere.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import xxhash
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from crucible.common.address import host_port
from crucible.observe.jaeger import JaegerAgentExporter
from crucible.observe.probes import DS, DS_DISK, DS_JOBS, DS_LIVE, DS_OPS, GW_OPS, UP
from crucible.observe.spans import Child, SpanRecord, expand, to_readable

log = logging.getLogger("crucible.tracing")

MAX_OPEN = 100_000  # spans begun and not yet ended, at most
EXPORT_TIMEOUT = 2.0  # seconds an export may take before it counts as failed
MAX_QUEUE = 20_000  # spans waiting to be sent, at most (more are dropped, counted)
BATCH = 512  # spans sent at once, at most
SEND_EVERY = 0.5  # seconds between sends, at most, while spans wait
_LOW64 = (1 << 64) - 1


class TraceError(Exception):
    """A --trace-endpoint that cannot be used (one line for the command to print)."""


def parse_endpoint(endpoint: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path): jaeger (also bare HOST:PORT), http or grpc."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "jaeger", endpoint
    scheme = scheme.lower()
    if scheme not in ("jaeger", "http", "https", "grpc"):
        raise TraceError(
            f"--trace-endpoint {endpoint!r}: use HOST:PORT or jaeger://HOST:PORT (a Jaeger "
            "agent), http://HOST:PORT (OTLP/HTTP) or grpc://HOST:PORT (OTLP/gRPC)"
        )
    hostport, _, path = rest.partition("/")
    try:
        host, port = host_port(hostport)
    except ValueError as e:
        raise TraceError(f"--trace-endpoint {endpoint!r}: {e}") from None
    return scheme, host, port, path


def exporter_for(endpoint: str) -> SpanExporter:
    scheme, host, port, path = parse_endpoint(endpoint)
    if scheme == "jaeger":
        return JaegerAgentExporter(host, port)
    if scheme == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=f"{host}:{port}", insecure=True, timeout=EXPORT_TIMEOUT)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    url = f"{scheme}://{endpoint.partition('://')[2].partition('/')[0]}/{path or 'v1/traces'}"
    return OTLPSpanExporter(endpoint=url, timeout=EXPORT_TIMEOUT)


Send = Callable[[list[SpanRecord]], bool]


def sender_for(endpoint: str, resource: Resource) -> tuple[Send, Callable[[], None]]:
    """(send a batch of records, close): the Jaeger exporter takes our records
    as they are; the OTLP ones take the SDK's spans."""
    exporter = exporter_for(endpoint)
    if isinstance(exporter, JaegerAgentExporter):
        jaeger = exporter
        return (lambda records: jaeger.export_records(records, resource)), jaeger.shutdown

    def send(records: list[SpanRecord]) -> bool:
        spans = [to_readable(one, resource) for r in records for one in expand(r)]
        return exporter.export(spans) is SpanExportResult.SUCCESS

    return send, exporter.shutdown


class Batcher:
    """Spans queued by the IO path and sent by a thread of their own, in
    batches, every half second or sooner when a batch is full. Never raises
    and never blocks the IO path: a full queue drops spans (counted); a
    collector that is down is said once, then nothing until it answers."""

    def __init__(self, send: Send, endpoint: str) -> None:
        self.send = send
        self.endpoint = endpoint
        self.queue: deque[SpanRecord] = deque()
        self.dropped = 0  # spans the full queue turned away
        self.sent = 0  # spans the endpoint took
        self.failing = False
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="span-sender", daemon=True)
        self._thread.start()

    def add(self, record: SpanRecord) -> None:
        q = self.queue
        if len(q) >= MAX_QUEUE:
            if not self.dropped:
                log.warning(
                    "traces: %d spans wait to be sent to %s; dropping new ones while they do",
                    len(q),
                    self.endpoint,
                )
            self.dropped += 1
            return
        q.append(record)
        if len(q) == BATCH:
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(SEND_EVERY)
            self._wake.clear()
            self._drain()
            if self._stop:
                return

    def _drain(self) -> None:
        q = self.queue
        while q:
            batch = [q.popleft() for _ in range(min(BATCH, len(q)))]
            try:
                ok, why = self.send(batch), "the collector did not take them"
            except Exception as e:  # an exporter's bug or a network error it let through
                ok, why = False, str(e) or type(e).__name__
            if ok:
                self.sent += len(batch)
                if self.failing:
                    self.failing = False
                    log.info("traces reach %s again", self.endpoint)
            elif not self.failing:
                self.failing = True
                log.warning(
                    "traces are not reaching %s (%s); dropping them until it answers",
                    self.endpoint,
                    why,
                )

    def close(self, timeout: float) -> None:
        """Send what is queued, waiting at most `timeout` seconds."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)


class Tracing:
    """Where spans go, and which are kept."""

    def __init__(self, endpoint: str, sample: float, service: str, **attrs: str) -> None:
        self.endpoint = endpoint
        # The SDK's own loggers would repeat every failure with a traceback.
        for name in ("opentelemetry.sdk", "opentelemetry.exporter"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self.resource = Resource.create({"service.name": service, **attrs})
        send, self._close = sender_for(endpoint, self.resource)
        self.batcher = Batcher(send, endpoint)
        self.bound = int(min(max(sample, 0.0), 1.0) * (1 << 64))  # keep low 64 bits below it

    def sampled(self, trace_id: int) -> bool:
        return (trace_id & _LOW64) < self.bound

    def emit(
        self,
        name: str,
        trace_id: int,
        span_id: int,
        parent_id: int | None,
        start_ns: int,
        end_ns: int,
        attrs: dict[str, Any],
        events: tuple[tuple[str, int, dict[str, Any] | None], ...] = (),
        error: str | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        children: tuple[Child, ...] = (),
    ) -> None:
        self.batcher.add(
            SpanRecord(
                name,
                trace_id,
                span_id,
                parent_id,
                start_ns,
                end_ns,
                attrs,
                events,
                (),
                error,
                kind,
                children,
            )
        )

    def shutdown(self) -> None:
        """Send what is queued (within the export timeout) and stop."""
        self.batcher.close(EXPORT_TIMEOUT * 2)
        self._close()


def random_id(bits: int) -> int:
    # (the random module's generator: a span id needs to be unique, not secret)
    return random.getrandbits(bits) or 1


def job_ids(upstairs_id: uuid.UUID, session_id: uuid.UUID, job_id: int) -> tuple[int, int]:
    """(trace id, id of the upstairs' job span) of a job: both sides compute it."""
    return _ids(_session(upstairs_id.int, session_id.int)[0], job_id)


def _ids(session_key: bytes, job_id: int) -> tuple[int, int]:
    key = session_key + job_id.to_bytes(8, "little")
    return xxhash.xxh3_128_intdigest(key) or 1, xxhash.xxh3_64_intdigest(key) or 1


@functools.lru_cache(maxsize=64)
def _session(upstairs_id: int, session_id: int) -> tuple[bytes, dict[str, Any]]:
    """A session's key for job ids, and the span attributes naming it (not to
    be changed: copy it). Keyed by the ids' ints, which hash without Python."""
    up, sess = uuid.UUID(int=upstairs_id), uuid.UUID(int=session_id)
    return up.bytes + sess.bytes, {
        "crucible.upstairs_id": str(up),
        "crucible.session_id": str(sess),
    }


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
        self.t = tracing
        self.session = session
        # job id -> [start ns, op, bytes, attributes, acked ns, trace id, span id,
        # the spans of the clients' parts (Child)]
        self.jobs: dict[int, list[Any]] = {}
        self.clients: dict[tuple[int, int], int] = {}  # (job, client) -> sent ns
        self.extents: dict[int, int] = {}  # extent under live repair -> start ns
        self.activation: tuple[int, int, int] | None = None  # (trace, span, start ns)
        self.reconcile: tuple[int, int] | None = None  # (start ns, extents)
        for op in GW_OPS:
            UP.attach(f"gw__{op}__start", self._job_start(op))
            UP.attach(f"gw__{op}__done", self._job_acked)
        for op in DS_OPS:
            UP.attach(f"ds__{op}__client__start", self._client_start)
            UP.attach(f"ds__{op}__client__done", self._client_done(f"ds-{op}-client"))
        for op in DS_LIVE:
            UP.attach(f"ds__{op}__start", self._client_start)
            UP.attach(f"ds__{op}__done", self._client_done(f"ds-{op}"))
            UP.attach(f"gw__{op}__start", self._live_start(op))
            UP.attach(f"gw__{op}__done", self._job_acked)
        UP.attach("gw__reopen__done", self._extent_done)
        UP.attach("up__job__finished", self._job_finished)
        UP.attach("up__activate__start", self._activate_start)
        UP.attach("up__activate__done", self._activate_done)
        UP.attach("up__reconcile__start", self._reconcile_start)
        UP.attach("up__reconcile__done", self._reconcile_done)

    def _job_start(self, op: str) -> Callable[..., None]:
        def start(jid: int, nbytes: int, guest: bool, extent: int | None) -> None:
            self._begin(jid, op, nbytes, extent)

        return start

    def _live_start(self, op: str) -> Callable[..., None]:
        def start(jid: int, extent: int | None) -> None:
            self._begin(jid, op, 0, extent)
            if op == "close" and extent is not None:
                self.extents[extent] = time.time_ns()

        return start

    def _begin(self, jid: int, op: str, nbytes: int, extent: int | None) -> None:
        """A job to trace if its trace is sampled: its ids are worked out once."""
        up, sess = self.session()
        key, named = _session(up.int, sess.int)
        trace_id, span_id = _ids(key, jid)
        if not self.t.sampled(trace_id):
            return
        if len(self.jobs) > MAX_OPEN:  # jobs never finished (a session that ended)
            self.jobs.clear()
        attrs = {**named, "crucible.job_id": jid}
        if extent is not None:
            attrs["crucible.extent"] = extent
        self.jobs[jid] = [time.time_ns(), op, nbytes, attrs, 0, trace_id, span_id, []]

    def _job_acked(self, jid: int, *_: Any) -> None:
        rec = self.jobs.get(jid)
        if rec is not None:
            rec[4] = time.time_ns()

    def _job_finished(self, jid: int) -> None:
        rec = self.jobs.pop(jid, None)
        if rec is None:  # not sampled
            return
        start, op, nbytes, attrs, acked, trace_id, span_id, children = rec
        if nbytes:
            attrs["crucible.bytes"] = nbytes
        events = (("acked", acked, None),) if acked else ()
        self.t.emit(
            f"gw-{op}", trace_id, span_id, None, start, time.time_ns(), attrs, events,
            children=tuple(children),
        )  # fmt: skip

    def _client_start(self, jid: int, cid: int) -> None:
        if jid not in self.jobs:  # not sampled
            return
        if len(self.clients) > MAX_OPEN:  # sent to a client that went away
            self.clients.clear()
        self.clients[(jid, cid)] = time.time_ns()

    def _client_done(self, name: str) -> Callable[..., None]:
        def done(jid: int, cid: int, err: object) -> None:
            start = self.clients.pop((jid, cid), None)
            rec = self.jobs.get(jid)
            if start is None or rec is None:
                return
            error = None if err is None else str(err)
            child = Child(name, random_id(64), start, time.time_ns(), {"crucible.client": cid},
                          error, SpanKind.CLIENT)  # fmt: skip
            rec[7].append(child)

        return done

    def _extent_done(self, jid: int, extent: int | None) -> None:
        start = self.extents.pop(extent, None) if extent is not None else None
        if start is None:
            return
        up, _ = self.session()
        trace_id = random_id(128)
        if self.t.sampled(trace_id):
            attrs = {"crucible.upstairs_id": str(up), "crucible.extent": extent}
            self.t.emit(
                "live-repair-extent", trace_id, random_id(64), None, start, time.time_ns(), attrs
            )

    def _activate_start(self, gen: int) -> None:
        self.activation = (random_id(128), random_id(64), time.time_ns())

    def _activate_done(self, gen: int, error: str | None) -> None:
        if self.activation is None:
            return
        trace_id, span_id, start = self.activation
        self.activation = None
        up, sess = self.session()
        attrs = {**_session(up.int, sess.int)[1], "crucible.generation": gen}
        self.t.emit("activate", trace_id, span_id, None, start, time.time_ns(), attrs, error=error)

    def _reconcile_start(self, needed: int) -> None:
        self.reconcile = (time.time_ns(), needed)

    def _reconcile_done(self, done: int, needed: int) -> None:
        if self.reconcile is None or self.activation is None:
            return
        start, _ = self.reconcile
        self.reconcile = None
        trace_id, parent, _ = self.activation
        attrs = {"crucible.extents_repaired": done, "crucible.extents_needed": needed}
        self.t.emit("reconcile", trace_id, random_id(64), parent, start, time.time_ns(), attrs)


class DownstairsTracer:
    """A span per job ("submit-write": received to answered), in the trace of
    the upstairs' job, with the region's work as events."""

    def __init__(self, tracing: Tracing, extent_size: int) -> None:
        self.t = tracing
        self.extent_size = extent_size
        self.begun: dict[int, list[Any]] = {}  # id(message) -> [start ns, events]
        dones: set[str] = set()  # (live-repair jobs share done probes)
        for op, (start, done) in DS_JOBS.items():
            DS.attach(start, self._start)
            if done not in dones:
                dones.add(done)
                DS.attach(done, self._done(f"submit-{op.replace('_', '-')}"))
        for op in DS_DISK:
            DS.attach(f"os__{op}__start", self._event(f"os-{op}-start"))
            DS.attach(f"os__{op}__done", self._event(f"os-{op}-done"))

    def _start(self, jid: int, msg: Any) -> None:
        if len(self.begun) > MAX_OPEN:  # jobs of connections that went away
            self.begun.clear()
        self.begun[id(msg)] = [time.time_ns(), []]

    def _event(self, name: str) -> Callable[..., None]:
        def event(jid: int, msg: Any) -> None:
            rec = self.begun.get(id(msg))
            if rec is not None:
                rec[1].append((name, time.time_ns(), None))

        return event

    def _done(self, name: str) -> Callable[..., None]:
        def done(jid: int, msg: Any, err: object, nbytes: int) -> None:
            rec = self.begun.pop(id(msg), None)
            if rec is None:
                return
            key, named = _session(msg.upstairs_id.int, msg.session_id.int)
            trace_id, job_span = _ids(key, jid)
            if not self.t.sampled(trace_id):
                return
            attrs = {**named, "crucible.job_id": jid}
            start = getattr(msg, "start", None)
            if start is not None and self.extent_size:
                attrs["crucible.extent"] = start // self.extent_size
            if nbytes:
                attrs["crucible.bytes"] = nbytes
            error = None if err is None else str(err)
            self.t.emit(
                name,
                trace_id,
                random_id(64),
                job_span,
                rec[0],
                time.time_ns(),
                attrs,
                tuple(rec[1]),
                error=error,
                kind=SpanKind.SERVER,
            )

        return done
