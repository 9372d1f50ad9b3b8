"""The probes as the upstairs and downstairs cores fire them, under the
simulated network: every start has its done, and the metrics and spans
built on them count what the work was."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from crucible.downstairs.probing import JOB_PROBES
from crucible.observe.metrics import UpstairsMetrics
from crucible.observe.probes import DS, UP, Provider
from crucible.observe.spans import SpanRecord
from crucible.observe.tracers import UpstairsTracer, job_ids
from crucible.observe.tracing import Tracing
from crucible.protocol.roles import JOB_TYPES
from tests.upstairs.sim import Sim

WRITES, READS, BS = 12, 7, 512


@pytest.fixture(autouse=True)
def isolated_probes() -> Iterator[None]:
    """Handlers attached here go away after the test (the providers are global)."""
    saved = [(p, {name: list(pr.handlers) for name, pr in p.probes.items()}) for p in (UP, DS)]
    try:
        yield
    finally:
        for p, handlers in saved:
            for name, hs in handlers.items():
                p.probes[name].handlers = hs
            p.on = any(handlers.values())


def test_every_kind_of_downstairs_job_has_its_probes() -> None:
    assert set(JOB_PROBES) == set(JOB_TYPES)


def test_a_provider_knows_its_probes() -> None:
    p = Provider("test", ["a__start"])
    assert not p.on
    with pytest.raises(KeyError):
        p.attach("b__start", print)
    seen: list[int] = []
    p.attach("a__start", seen.append)
    assert p.on and p.attached("a__start")
    p.fire("a__start", 7)
    p.detach("a__start", seen.append)
    p.fire("a__start", 8)
    assert seen == [7] and not p.on


def _record(provider: Provider) -> list[tuple[str, tuple[Any, ...]]]:
    fired: list[tuple[str, tuple[Any, ...]]] = []
    for name in provider.probes:
        provider.attach(name, lambda *args, name=name: fired.append((name, args)))
    return fired


def _workload(sim: Sim) -> None:
    sim.activate()
    for i in range(WRITES):
        data = bytes([i + 1]) * (2 * BS)
        sim.apply(sim.up.write(object(), 2 * i, data, sim.now))
        if i % 5 == 4:
            sim.apply(sim.up.flush(object(), sim.now))
        sim.settle()
    for i in range(READS):
        sim.apply(sim.up.read(object(), i, 3, sim.now))
        sim.settle()
    sim.apply(sim.up.flush(object(), sim.now))
    sim.settle()


def test_every_start_has_its_done() -> None:
    up, ds = _record(UP), _record(DS)
    with tempfile.TemporaryDirectory() as tmp:
        sim = Sim(Path(tmp))
        try:
            _workload(sim)
            guest = sim.up.info().guest
        finally:
            sim.close()
    starts = {args[0]: n for n, args in up if n.startswith("gw__") and n.endswith("__start")}
    dones = {args[0]: n for n, args in up if n.startswith("gw__") and n.endswith("__done")}
    assert starts.keys() == dones.keys()
    assert all(starts[j].replace("start", "done") == dones[j] for j in starts)
    finished = [args[0] for n, args in up if n == "up__job__finished"]
    assert sorted(finished) == sorted(starts)
    sent = Counter((args[0], args[1]) for n, args in up if n.endswith("__client__start"))
    answered = Counter((args[0], args[1]) for n, args in up if n.endswith("__client__done"))
    assert sent == answered and all(v == 1 for v in sent.values())
    writes = [args for n, args in up if n == "gw__write__done"]
    assert len(writes) == WRITES and all(a[1] == 2 * BS and a[2] for a in writes)
    # Done probes carry the seconds since the job was queued.
    timed = writes + [args for n, args in up if n.endswith("__client__done")]
    assert all(isinstance(a[-1], float) and 0 <= a[-1] < 60 for a in timed)
    assert [n for n, _ in up].count("up__activate__done") == 1
    # Each downstairs: one submit start and one done per job, writes with their bytes.
    submitted = Counter(args[0] for n, args in ds if n.startswith("submit__") and "start" in n)
    done = [(n, args) for n, args in ds if n.startswith("submit__") and "done" in n]
    assert Counter(args[0] for _, args in done) == submitted
    write_bytes = [args[3] for n, args in done if n == "submit__write__done"]
    assert write_bytes == [2 * BS] * (3 * WRITES)
    assert guest["write"].ops == WRITES and guest["write"].bytes == WRITES * 2 * BS
    assert guest["read"].ops == READS and guest["read"].bytes == READS * 3 * BS


def test_a_job_queued_before_anything_was_attached_reports_no_time() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sim = Sim(Path(tmp))
        try:
            sim.activate()
            sim.apply(sim.up.write(object(), 0, b"\x01" * BS, sim.now))
            up = _record(UP)  # attached while the write is out to the downstairs
            sim.settle()
        finally:
            sim.close()
    answered = [args for n, args in up if n == "ds__write__client__done"]
    assert len(answered) == 3 and all(a[3] == 0.0 for a in answered)


def test_metrics_and_spans_count_the_work() -> None:
    registry = CollectorRegistry()
    UpstairsMetrics(registry)
    tracing = Tracing("127.0.0.1:9", 1.0, "test")  # (nothing is sent: records kept below)
    records: list[SpanRecord] = []
    with tempfile.TemporaryDirectory() as tmp:
        sim = Sim(Path(tmp))
        ids = sim.up.ds.session
        tracer = UpstairsTracer(tracing, lambda: (ids.upstairs_id, sim.up.ds.session.session_id))
        tracer.add = records.append  # kept here instead of sent
        try:
            _workload(sim)
            session = sim.up.ds.session
        finally:
            sim.close()
            tracing.shutdown()
    value = registry.get_sample_value
    assert value("crucible_upstairs_guest_ops_total", {"op": "write"}) == WRITES
    assert value("crucible_upstairs_guest_bytes_total", {"op": "write"}) == WRITES * 2 * BS
    assert value("crucible_upstairs_guest_ops_total", {"op": "read"}) == READS
    assert value("crucible_upstairs_guest_latency_seconds_count", {"op": "read"}) == READS
    for c in "012":
        labels = {"client": c, "op": "write"}
        assert value("crucible_upstairs_downstairs_job_latency_seconds_count", labels) == WRITES
        summed = value("crucible_upstairs_downstairs_job_latency_seconds_sum", labels)
        assert summed is not None and 0 < summed < 60
    assert value("crucible_upstairs_activations_total") == 1
    writes = [r for r in records if r.name == "gw-write"]
    assert len(writes) == WRITES
    for r in writes:
        job = r.attrs["crucible.job_id"]
        assert (r.trace_id, r.span_id) == job_ids(session.upstairs_id, session.session_id, job)
        assert r.attrs["crucible.bytes"] == 2 * BS and r.attrs["crucible.extent"] is not None
        assert sorted(c.attrs["crucible.client"] for c in r.children) == [0, 1, 2]
        assert all(c.start_ns >= r.start_ns and c.end_ns <= r.end_ns for c in r.children)
    reads = [r for r in records if r.name == "gw-read"]
    assert len(reads) == READS and all(len(r.children) == 1 for r in reads)  # one replica
    assert [r.name for r in records].count("activate") == 1


def test_nothing_attached_costs_nothing_observable() -> None:
    """With no handler the cores run as before (the probes' flag stays off)."""
    assert not UP.on and not DS.on
    with tempfile.TemporaryDirectory() as tmp:
        sim = Sim(Path(tmp))
        try:
            _workload(sim)
            assert sim.up.info().guest["write"].ops == WRITES
        finally:
            sim.close()
