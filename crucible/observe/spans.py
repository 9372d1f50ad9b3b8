"""A finished span as this package records it: plain values, cheap to make
on the IO path, turned into the exporters' forms on the sending thread.
Compiled with the IO path (scripts/compile)."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SCOPE = InstrumentationScope("crucible")


class Child:
    """A span under a SpanRecord, in its trace, with its attributes and these."""

    def __init__(
        self,
        name: str,
        span_id: int,
        start_ns: int,
        end_ns: int,
        attrs: dict[str, Any],
        error: str | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> None:
        self.name = name
        self.span_id = span_id
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.attrs = attrs
        self.error = error
        self.kind = kind


class SpanRecord:
    """A finished span (a class, not a NamedTuple: made on the IO path by
    compiled code, which builds one of these without the interpreter)."""

    def __init__(
        self,
        name: str,
        trace_id: int,
        span_id: int,
        parent_id: int | None,
        start_ns: int,
        end_ns: int,
        attrs: dict[str, Any],
        events: tuple[tuple[str, int, dict[str, Any] | None], ...] = (),
        links: tuple[tuple[int, int], ...] = (),
        error: str | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        children: tuple[Child, ...] = (),
    ) -> None:
        self.name = name
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.attrs = attrs
        self.events = events  # (name, time ns, attributes)
        self.links = links  # (trace id, span id)
        self.error = error
        self.kind = kind
        self.children = children


def sampled(trace_id: int, bound: int) -> bool:
    """Whether a trace is kept, its low 64 bits below `bound`: decided on
    its id alone, so that every process keeps the same traces."""
    return trace_id & 0xFFFFFFFFFFFFFFFF < bound


def expand(r: SpanRecord) -> list[SpanRecord]:
    """A record and its children, as records of their own."""
    alone = SpanRecord(
        r.name, r.trace_id, r.span_id, r.parent_id, r.start_ns, r.end_ns, r.attrs, r.events,
        r.links, r.error, r.kind,
    )  # fmt: skip
    return [alone, *(child_record(r, c) for c in r.children)]


def child_record(r: SpanRecord, c: Child) -> SpanRecord:
    """A child as a record of its own, its parent's attributes before its own."""
    return SpanRecord(
        c.name, r.trace_id, c.span_id, r.span_id, c.start_ns, c.end_ns, {**r.attrs, **c.attrs},
        error=c.error, kind=c.kind,
    )  # fmt: skip


def to_readable(r: SpanRecord, resource: Resource) -> ReadableSpan:
    """The SDK's form, for the OTLP exporters."""
    parent = None
    if r.parent_id is not None:
        parent = SpanContext(r.trace_id, r.parent_id, False, _SAMPLED)
    return ReadableSpan(
        name=r.name,
        context=SpanContext(r.trace_id, r.span_id, False, _SAMPLED),
        parent=parent,
        resource=resource,
        attributes=r.attrs,
        events=[Event(name, attrs, ts) for name, ts, attrs in r.events],
        links=[Link(SpanContext(t, s, False, _SAMPLED)) for t, s in r.links],
        kind=r.kind,
        status=Status(StatusCode.ERROR, r.error) if r.error else Status(StatusCode.UNSET),
        start_time=r.start_ns,
        end_time=r.end_ns,
        instrumentation_scope=_SCOPE,
    )


def from_readable(span: ReadableSpan) -> SpanRecord | None:
    """A span of the SDK's as a record (None for one never started)."""
    ctx = span.get_span_context()
    if ctx is None:
        return None
    attrs: dict[str, Any] = dict(span.attributes or {})
    events = [(e.name, e.timestamp, dict(e.attributes or {})) for e in span.events]
    error = None
    if span.status.status_code is StatusCode.ERROR:
        error = span.status.description or ""
    start = span.start_time or 0
    return SpanRecord(
        name=span.name,
        trace_id=ctx.trace_id,
        span_id=ctx.span_id,
        parent_id=span.parent.span_id if span.parent else None,
        start_ns=start,
        end_ns=span.end_time or start,
        attrs=attrs,
        events=tuple(events),
        links=tuple((lk.context.trace_id, lk.context.span_id) for lk in span.links),
        error=error,
        kind=span.kind,
    )
