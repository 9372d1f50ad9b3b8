"""Traces from real processes: the seed's run to a Jaeger agent, a crutest
run to an OTLP/HTTP collector, OTLP/gRPC, and endpoints that do not work."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from crucible.cli_util import stop_process
from crucible.observe.batcher import BATCH, MAX_QUEUE, Batcher
from crucible.observe.spans import SpanRecord
from crucible.observe.tracers import job_ids
from crucible.observe.tracing import TraceError, Tracing, parse_endpoint
from tests.observe.jaeger_agent import JaegerAgent, JSpan
from tests.observe.otlp_receiver import OSpan, OtlpGrpcReceiver, OtlpHttpReceiver
from tests.support import DOWNSTAIRS, Cluster, free_port, run_tool, wait_listening

WAIT = 60.0  # seconds a span may take to arrive, at most (they are sent every 0.5 s)


def _loopback_name() -> str:
    """`localhost`, as the seed writes it, where it means 127.0.0.1 here."""
    first = socket.getaddrinfo("localhost", 6831, type=socket.SOCK_DGRAM)[0][4][0]
    return "localhost" if first == "127.0.0.1" else "127.0.0.1"


def _by_region(agent: JaegerAgent) -> dict[str, list[JSpan]]:
    """Downstairs spans by the region their process serves."""
    out: dict[str, list[JSpan]] = {}
    for b in agent.batches():
        if b.service == "crucible-downstairs":
            out.setdefault(str(b.process_tags.get("crucible.region")), []).extend(b.spans)
    return out


@pytest.mark.slow
def test_seed_run_sends_spans_to_a_jaeger_agent(tmp_path: Path) -> None:
    with JaegerAgent() as agent:
        endpoint = f"{_loopback_name()}:{agent.port}"
        ports = [free_port() for _ in range(3)]
        logs = [open(tmp_path / f"{p}.log", "wb") for p in ports]  # noqa: SIM115
        procs = [
            subprocess.Popen(
                [
                    DOWNSTAIRS,
                    "-c",
                    "-p",
                    str(p),
                    "-d",
                    str(tmp_path / str(p)),
                    "--trace-endpoint",
                    endpoint,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            for p, log in zip(ports, logs, strict=True)
        ]
        try:
            for p, proc in zip(ports, procs, strict=True):
                wait_listening(p, proc)
            targets = [a for p in reversed(ports) for a in ("-t", f"127.0.0.1:{p}")]
            r = run_tool("crucible", *targets, "--trace-endpoint", endpoint)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "all Tests done" in r.stdout

            # The client sent its spans before it exited; the downstairs send theirs
            # every half second.
            def complete() -> bool:
                ours = [s for s in agent.spans() if s.service == "crucible"]
                writes = [s for s in ours if s.operation == "gw-write"]
                regions = _by_region(agent)
                return (
                    bool(writes)
                    and len(regions) == 3
                    and all(
                        any(s.operation == "submit-write" for s in spans)
                        for spans in regions.values()
                    )
                )

            assert agent.wait_for(complete, WAIT), [s.operation for s in agent.spans()]
        finally:
            for proc in procs:
                stop_process(proc)
            for log in logs:
                log.close()
        assert agent.bad == 0
        ours = [s for s in agent.spans() if s.service == "crucible"]
        names = {s.operation for s in ours}
        assert {"activate", "gw-write", "gw-flush", "gw-read", "ds-write-client"} <= names
        write = next(s for s in ours if s.operation == "gw-write")
        job = write.tags["crucible.job_id"]
        # Each downstairs' span of that job continues the client's trace.
        for region, spans in _by_region(agent).items():
            mine = [s for s in spans if s.tags.get("crucible.job_id") == job]
            assert len(mine) == 1, region
            assert mine[0].operation == "submit-write"
            assert mine[0].trace_id == write.trace_id
            assert mine[0].parent_span_id == write.span_id
            assert mine[0].tags["crucible.session_id"] == write.tags["crucible.session_id"]
            assert {name for _, f in mine[0].logs for name in [f.get("event")]} >= {
                "os-write-start",
                "os-write-done",
            }
        # Each client's part of the job is a child of the job's span.
        clients = [
            s for s in ours if s.operation == "ds-write-client" and s.tags["crucible.job_id"] == job
        ]
        assert sorted(int(str(s.tags["crucible.client"])) for s in clients) == [0, 1, 2]
        assert all(s.parent_span_id == write.span_id for s in clients)


@pytest.mark.slow
def test_crutest_spans_reach_an_otlp_http_collector(tmp_path: Path) -> None:
    with OtlpHttpReceiver() as collector:
        endpoint = f"http://127.0.0.1:{collector.port}"
        c = Cluster(tmp_path, "--extent-size", "64", "--extent-count", "8")
        try:
            c.stop()
            # Metrics on too: their handlers share the probes the spans are made from.
            for i in range(3):
                c.start(i, "--trace-endpoint", endpoint, "--metrics", f"127.0.0.1:{free_port()}")
            r = run_tool(
                "crutest", "rand", *c.target_args(), "--count", "20", "--seed", "1",
                "--trace-endpoint", endpoint, "--metrics", f"127.0.0.1:{free_port()}",
            )  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr

            def joined() -> bool:
                return _joined(collector.spans()) is not None

            assert collector.wait_for(joined, WAIT), {s.name for s in collector.spans()}
        finally:
            c.stop()
        up, downs = _joined(collector.spans()) or (None, [])
        assert up is not None and len(downs) == 3
        for d in downs:
            assert d.trace_id == up.trace_id and d.parent_span_id == up.span_id
            assert d.attributes["crucible.upstairs_id"] == up.attributes["crucible.upstairs_id"]
            assert d.attributes["crucible.extent"] == up.attributes["crucible.extent"]
        assert len({d.resource["crucible.region"] for d in downs}) == 3


def _joined(spans: list[OSpan]) -> tuple[OSpan, list[OSpan]] | None:
    """An upstairs write job and the three downstairs spans of the same job id."""
    downs: dict[tuple[str, int], list[OSpan]] = {}
    for s in spans:
        if s.service == "crucible-downstairs" and s.name == "submit-write":
            key = (s.attributes["crucible.session_id"], s.attributes["crucible.job_id"])
            downs.setdefault(key, []).append(s)
    for s in spans:
        if s.service == "crutest" and s.name == "gw-write":
            key = (s.attributes["crucible.session_id"], s.attributes["crucible.job_id"])
            if len(downs.get(key, [])) == 3:
                return s, downs[key]
    return None


def test_otlp_grpc_endpoint() -> None:
    with OtlpGrpcReceiver() as collector:
        t = Tracing(f"grpc://127.0.0.1:{collector.port}", 1.0, "test-service")
        up, sess = uuid.uuid4(), uuid.uuid4()
        trace_id, span_id = job_ids(up, sess, 1000)
        now = time.time_ns()
        t.batcher.add(
            SpanRecord(
                "gw-write", trace_id, span_id, None, now, now + 1000, {"crucible.job_id": 1000}
            )
        )
        t.shutdown()  # sends what is queued
        assert collector.wait_for(lambda: bool(collector.spans()), WAIT)
        (s,) = collector.spans()
        assert (s.service, s.name, s.trace_id, s.span_id) == (
            "test-service", "gw-write", trace_id, span_id,
        )  # fmt: skip


def test_endpoints_parse() -> None:
    assert parse_endpoint("localhost:6831") == ("jaeger", "localhost", 6831, "")
    assert parse_endpoint("jaeger://[::1]:6831") == ("jaeger", "::1", 6831, "")
    assert parse_endpoint("http://h:4318") == ("http", "h", 4318, "")
    assert parse_endpoint("grpc://h:4317") == ("grpc", "h", 4317, "")
    for bad in ("nonsense", "ftp://h:1", "http://h", "h:0", "h:99999", "http://:4318"):
        with pytest.raises(TraceError):
            parse_endpoint(bad)


def test_sampling_agrees_on_both_sides() -> None:
    """The decision is the trace id's: any two processes with the same ratio agree."""
    a = Tracing("127.0.0.1:9", 0.25, "a")
    b = Tracing("127.0.0.1:9", 0.25, "b")
    up, sess = uuid.uuid4(), uuid.uuid4()
    picks = [a.sampled(job_ids(up, sess, j)[0]) for j in range(4000)]
    assert picks == [b.sampled(job_ids(up, sess, j)[0]) for j in range(4000)]
    assert 800 < sum(picks) < 1200  # a quarter, give or take (ids are hashes)
    every, none = Tracing("127.0.0.1:9", 1.0, "c"), Tracing("127.0.0.1:9", 0.0, "d")
    ids = [job_ids(up, sess, j)[0] for j in range(99)]
    assert all(every.sampled(i) for i in ids) and not any(none.sampled(i) for i in ids)
    for t in (a, b, every, none):
        t.shutdown()


def test_a_full_queue_drops_spans_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    def stuck(records: list[SpanRecord]) -> bool:
        release.wait(WAIT)  # a collector that does not answer
        return True

    b = Batcher(stuck, "127.0.0.1:9")
    rec = SpanRecord("x", 1, 2, None, 0, 1, {})
    try:
        for _ in range(MAX_QUEUE + BATCH + 5):  # the sender holds at most one batch
            b.add(rec)
    finally:
        release.set()
        b.close(WAIT)
    assert 5 <= b.dropped <= BATCH + 5
    warnings = [r for r in caplog.records if "dropping new ones" in r.getMessage()]
    assert len(warnings) == 1
    assert b.sent + b.dropped == MAX_QUEUE + BATCH + 5
