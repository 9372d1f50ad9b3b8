"""JaegerAgentExporter against a stand-in agent that decodes datagrams on its own."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator, Sequence

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from crucible.observe.jaeger import JaegerAgentExporter
from crucible.observe.spans import SpanRecord
from tests.observe.jaeger_agent import JaegerAgent

WAIT_S = 30.0  # a bound against hanging, not an expectation of speed


class HighBitIds(IdGenerator):
    """Ids with their top bit set, so that they travel as negative i64s."""

    def __init__(self) -> None:
        self._count = 0

    def generate_span_id(self) -> int:
        self._count += 1
        return (1 << 63) | self._count

    def generate_trace_id(self) -> int:
        self._count += 1
        return (1 << 127) | (0xABCD << 64) | (1 << 63) | self._count


@pytest.fixture
def agent() -> Iterator[JaegerAgent]:
    with JaegerAgent() as agent:
        yield agent


@pytest.fixture
def providers() -> Iterator[list[TracerProvider]]:
    made: list[TracerProvider] = []
    yield made
    for provider in made:
        provider.shutdown()


def make_tracer(
    providers: list[TracerProvider],
    exporter: SpanExporter | None = None,
    service: str = "jaeger-test",
) -> tuple[Tracer, InMemorySpanExporter]:
    """A tracer whose finished spans go to `exporter`, if any, and to the returned memory."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service, "host.name": "h1"}),
        id_generator=HighBitIds(),
        shutdown_on_exit=False,
    )
    providers.append(provider)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("crucible.test", "1.0"), memory


def finished(tracer: Tracer, memory: InMemorySpanExporter, *names: str) -> Sequence[ReadableSpan]:
    for name in names:
        with tracer.start_as_current_span(name):
            pass
    return memory.get_finished_spans()


def test_spans_arrive_with_ids_tags_times_and_service(
    agent: JaegerAgent, providers: list[TracerProvider]
) -> None:
    exporter = JaegerAgentExporter("127.0.0.1", agent.port)
    tracer, memory = make_tracer(providers, exporter)
    attributes: dict[str, AttributeValue] = {
        "s": "text",
        "b": True,
        "i": -5,
        "big": 1 << 62,
        "f": 1.5,
        "names": ("a", "b"),
        "counts": (1, 2, 3),
    }
    with tracer.start_as_current_span("linked") as linked:
        pass
    with (
        tracer.start_as_current_span("parent", kind=SpanKind.SERVER),
        tracer.start_as_current_span(
            "child", links=[Link(linked.get_span_context())], attributes=attributes
        ) as child,
    ):
        child.add_event("retry", {"attempt": 2, "why": "busy"})
        child.set_status(Status(StatusCode.ERROR, "disk on fire"))

    assert agent.wait_for(lambda: len(agent.spans()) == 3, WAIT_S)
    sent = {span.name: span for span in memory.get_finished_spans()}
    got = {span.operation: span for span in agent.spans()}
    assert got.keys() == {"linked", "parent", "child"}
    for name, span in sent.items():
        assert span.start_time is not None and span.end_time is not None
        assert got[name].trace_id == span.context.trace_id
        assert got[name].span_id == span.context.span_id
        assert got[name].parent_span_id == (span.parent.span_id if span.parent else 0)
        assert got[name].flags == 1
        assert got[name].start_us == span.start_time // 1000
        assert got[name].duration_us == (span.end_time - span.start_time) // 1000
        assert got[name].service == "jaeger-test"
    assert got["child"].trace_id >> 127 == 1  # the high half went over the wire negative
    assert got["child"].parent_span_id == got["parent"].span_id
    assert got["parent"].parent_span_id == 0

    scope = {"otel.scope.name": "crucible.test", "otel.scope.version": "1.0"}
    assert got["child"].tags == {
        "s": "text",
        "b": True,
        "i": -5,
        "big": 1 << 62,
        "f": 1.5,
        "names": '["a", "b"]',
        "counts": "[1, 2, 3]",
        "error": True,
        "otel.status_description": "disk on fire",
        **scope,
    }
    assert got["parent"].tags == {"span.kind": "server", **scope}
    linked_ctx = sent["linked"].context
    assert got["child"].references == [(1, linked_ctx.trace_id, linked_ctx.span_id)]
    assert got["parent"].references == []
    (event,) = sent["child"].events
    assert got["child"].logs == [
        (event.timestamp // 1000, {"event": "retry", "attempt": 2, "why": "busy"})
    ]

    batch = agent.batches()[0]
    assert batch.service == "jaeger-test"
    assert batch.process_tags["host.name"] == "h1"
    assert "service.name" not in batch.process_tags
    assert agent.bad == 0


def test_many_spans_split_into_few_full_datagrams(
    agent: JaegerAgent, providers: list[TracerProvider]
) -> None:
    max_packet = 8192
    exporter = JaegerAgentExporter("127.0.0.1", agent.port, max_packet=max_packet)
    tracer, memory = make_tracer(providers)
    spans = finished(tracer, memory, *(f"op-{i}" for i in range(2000)))

    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert agent.wait_for(lambda: len(agent.spans()) >= 2000, WAIT_S)
    batches = agent.batches()
    assert len(batches) > 1
    assert all(batch.size <= max_packet for batch in batches)
    assert sorted(s.span_id for s in agent.spans()) == sorted(s.context.span_id for s in spans)
    assert len({batch.seq_no for batch in batches}) == len(batches)
    # As few as fit: every datagram but one was filled until the next span (~100 bytes) did not.
    assert all(size > max_packet - 400 for size in sorted(b.size for b in batches)[1:])
    assert exporter.dropped == 0
    assert agent.bad == 0


def test_span_too_large_alone_is_dropped_and_counted(
    agent: JaegerAgent, providers: list[TracerProvider]
) -> None:
    exporter = JaegerAgentExporter("127.0.0.1", agent.port, max_packet=4096)
    tracer, memory = make_tracer(providers)
    for name, blob in [("before", "x"), ("huge", "x" * 5000), ("after", "y")]:
        with tracer.start_as_current_span(name, attributes={"blob": blob}):
            pass

    assert exporter.export(memory.get_finished_spans()) is SpanExportResult.SUCCESS
    assert agent.wait_for(lambda: len(agent.spans()) >= 2, WAIT_S)
    assert exporter.dropped == 1
    assert sorted(span.operation for span in agent.spans()) == ["after", "before"]


def test_resources_go_in_separate_batches(
    agent: JaegerAgent, providers: list[TracerProvider]
) -> None:
    exporter = JaegerAgentExporter("127.0.0.1", agent.port)
    spans = [
        *finished(*make_tracer(providers, service="one"), "a", "b"),
        *finished(*make_tracer(providers, service="two"), "c"),
    ]

    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert agent.wait_for(lambda: len(agent.spans()) >= 3, WAIT_S)
    by_service = {b.service: sorted(s.operation for s in b.spans) for b in agent.batches()}
    assert by_service == {"one": ["a", "b"], "two": ["c"]}


def test_absent_agent_never_raises(providers: list[TracerProvider]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exporter = JaegerAgentExporter("127.0.0.1", port)
    spans = finished(*make_tracer(providers), "lost")

    # The port unreachable answering one datagram surfaces as ECONNREFUSED on a later send.
    for _ in range(3):
        result = exporter.export(spans)
        assert result in (SpanExportResult.SUCCESS, SpanExportResult.FAILURE)


def test_unresolvable_host_fails(providers: list[TracerProvider]) -> None:
    exporter = JaegerAgentExporter("nonexistent.invalid", 6831)
    spans = finished(*make_tracer(providers), "nowhere")

    assert exporter.export(spans) is SpanExportResult.FAILURE
    assert exporter.export(spans) is SpanExportResult.FAILURE  # without asking DNS again


def test_shutdown(agent: JaegerAgent, providers: list[TracerProvider]) -> None:
    exporter = JaegerAgentExporter("127.0.0.1", agent.port)
    spans = finished(*make_tracer(providers), "late")
    assert exporter.force_flush()
    exporter.shutdown()
    assert exporter.export(spans) is SpanExportResult.FAILURE


class ClosedPort:
    """A connected UDP socket to a port nobody listens on, as the kernel runs
    it: a datagram sent there leaves a refusal that the next send reports
    (and that datagram is then not sent)."""

    def __init__(self) -> None:
        self.open = False  # the agent is there
        self.pending = False
        self.delivered = 0

    def send(self, data: bytes) -> int:
        if self.pending:
            self.pending = False
            raise ConnectionRefusedError(111, "Connection refused")
        if self.open:
            self.delivered += 1
        else:
            self.pending = True  # the port unreachable comes back
        return len(data)

    def close(self) -> None:
        pass


def test_an_absent_agent_fails_every_export_not_every_other() -> None:
    exporter = JaegerAgentExporter("127.0.0.1", 9)
    port = ClosedPort()
    exporter._sock = port  # type: ignore[assignment]  # noqa: SLF001
    record = SpanRecord("x", 1, 2, None, 0, 1000, {"k": 1})
    resource = Resource.create({"service.name": "test"})
    assert exporter.export_records([record], resource)  # (nothing has come back yet)
    for _ in range(5):  # every later export meets the refusal its predecessor left
        with pytest.raises(ConnectionRefusedError):
            exporter.export_records([record], resource)
    port.open = True  # the agent starts: the datagram sent after the refusal reaches it
    with pytest.raises(ConnectionRefusedError):
        exporter.export_records([record], resource)
    assert port.delivered == 1
    for _ in range(3):
        assert exporter.export_records([record], resource)
    assert port.delivered == 4


def test_ids_times_and_numbers_of_every_size_arrive_as_they_were(agent: JaegerAgent) -> None:
    # The encoder works 64-bit ids in 32-bit halves and varints in pieces:
    # the thrift library's reader (in the agent) must read back every value,
    # at the edges of each piece and at random (seeded).
    seed = 20261205
    rng = random.Random(seed)
    edges = [0, 1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 56) - 1, 1 << 56,
             (1 << 62) - 1, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]  # fmt: skip
    ids = edges + [rng.getrandbits(rng.randint(1, 64)) for _ in range(300)]
    numbers = [-(1 << 63), -1, (1 << 61) - 1, 1 << 61, (1 << 63) - 1, 0, 300]
    records = []
    for i, span_id in enumerate(ids):
        trace_id = (ids[-1 - i] << 64) | ids[(i * 7) % len(ids)] or 1
        start = 1_764_950_000_000_000_000 + rng.getrandbits(40)
        records.append(
            SpanRecord(
                f"s{i}", trace_id, span_id or 1, ids[(i * 3) % len(ids)] or None, start,
                start + rng.getrandbits(rng.randint(1, 40)) * 1000,
                {"n": numbers[i % len(numbers)], "i": i},
                ((f"e{i}", start + 5000, None),),
            )
        )  # fmt: skip
    exporter = JaegerAgentExporter("127.0.0.1", agent.port)
    assert exporter.export_records(records, Resource.create({"service.name": "ids"}))
    assert agent.wait_for(lambda: len(agent.spans()) == len(records), WAIT_S), f"seed {seed}"
    got = {s.operation: s for s in agent.spans()}
    for i, r in enumerate(records):
        s = got[r.name]
        assert (s.trace_id, s.span_id) == (r.trace_id, r.span_id), f"seed {seed}, span {i}"
        assert s.parent_span_id == (r.parent_id or 0), f"seed {seed}, span {i}"
        assert (s.start_us, s.duration_us) == (r.start_ns // 1000, (r.end_ns - r.start_ns) // 1000)
        assert s.tags["n"] == r.attrs["n"] and s.tags["i"] == i
        assert s.logs == [((r.start_ns + 5000) // 1000, {"event": f"e{i}"})]
