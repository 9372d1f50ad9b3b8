"""Prometheus metrics, fed by the probes (probes.py) and served as text at
/metrics (`--metrics ADDR:PORT`).

Event metrics (IO counts, bytes, latency) move as the probes fire; state
(each downstairs' state, jobs in flight, repair progress) comes from the
upstairs' once-a-second `up__status` record, so a scrape never reads the
upstairs' tables from the server's thread.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from crucible.observe.probes import DS, DS_DISK, DS_LIVE, DS_OPS, GW_OPS, NBD, UP

# From 50 us (a job answered from the page cache) to 10 s (a stalled downstairs).
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class MetricsError(Exception):
    """The metrics server cannot start (one line for the command to print)."""


def serve(host: str, port: int, registry: CollectorRegistry) -> None:
    """Serve /metrics on a thread of its own (prometheus_client's server)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # (a *_created per series)
    try:
        start_http_server(port, host, registry)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise MetricsError(f"--metrics: port {port} on {host} is already in use") from None
        raise MetricsError(f"--metrics: cannot listen on {host}:{port}: {e.strerror}") from None


def _timer(
    observe: Callable[[float], None], key: Callable[..., Any]
) -> tuple[Callable[..., None], Callable[..., None]]:
    """Handlers that time start -> done of the same key."""
    begun: dict[Any, float] = {}
    clock = time.perf_counter

    def on_start(*args: Any) -> None:
        begun[key(*args)] = clock()

    def on_done(*args: Any) -> None:
        t0 = begun.pop(key(*args), None)
        if t0 is not None:
            observe(clock() - t0)

    return on_start, on_done


class UpstairsMetrics:
    """crucible_upstairs_*: attach once per process (the probes are global)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ops = Counter(
            "crucible_upstairs_guest_ops", "Guest jobs acked, by kind", ["op"], registry=registry
        )
        self.bytes = Counter(
            "crucible_upstairs_guest_bytes",
            "Guest bytes read or written (acked)",
            ["op"],
            registry=registry,
        )
        self.latency = Histogram(
            "crucible_upstairs_guest_latency_seconds",
            "Guest job, queued to acked",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ds_latency = Histogram(
            "crucible_upstairs_downstairs_job_latency_seconds",
            "A job on one downstairs, sent to answered",
            ["client", "op"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ds_errors = Counter(
            "crucible_upstairs_downstairs_errors",
            "Jobs a downstairs answered with an error",
            ["client"],
            registry=registry,
        )
        self.faults = Counter(
            "crucible_upstairs_faults", "Downstairs faulted", ["client"], registry=registry
        )
        self.replays = Counter(
            "crucible_upstairs_replays",
            "Downstairs back from offline, their jobs replayed",
            ["client"],
            registry=registry,
        )
        self.replayed = Counter(
            "crucible_upstairs_replayed_jobs", "Jobs replayed", ["client"], registry=registry
        )
        self.activations = Counter(
            "crucible_upstairs_activations", "Activations that succeeded", registry=registry
        )
        self.status = StatusCollector()
        registry.register(self.status)
        self._attach()

    def _attach(self) -> None:
        for op in GW_OPS:
            self._attach_guest(op)
        for op in DS_OPS:
            for client in range(3):
                self._attach_client(op, client)
        for op in DS_LIVE:
            for client in range(3):
                self._attach_client(op, client, live=True)
        UP.attach("up__fault", lambda cid, why: self.faults.labels(str(cid)).inc())
        UP.attach("up__replay", self._replayed)
        UP.attach("up__activate__done", self._activated)
        UP.attach("up__status", self.status.update)

    def _attach_guest(self, op: str) -> None:
        ops, nbytes = self.ops.labels(op), self.bytes.labels(op)
        on_start, on_done = _timer(self.latency.labels(op).observe, lambda jid: jid)

        def start(jid: int, n: int, guest: bool, extent: int | None) -> None:
            if guest:
                on_start(jid)

        def done(jid: int, n: int, guest: bool) -> None:
            if guest:
                on_done(jid)
                ops.inc()
                nbytes.inc(n)

        UP.attach(f"gw__{op}__start", start)
        UP.attach(f"gw__{op}__done", done)

    def _attach_client(self, op: str, client: int, live: bool = False) -> None:
        name = f"ds__{op}" if live else f"ds__{op}__client"
        errors = self.ds_errors.labels(str(client))
        observe = self.ds_latency.labels(str(client), op).observe
        on_start, on_done = _timer(observe, lambda jid, cid, *_: jid)

        def start(jid: int, cid: int) -> None:
            if cid == client:
                on_start(jid, cid)

        def done(jid: int, cid: int, err: object) -> None:
            if cid == client:
                on_done(jid, cid)
                if err is not None:
                    errors.inc()

        UP.attach(f"{name}__start", start)
        UP.attach(f"{name}__done", done)

    def _replayed(self, cid: int, jobs: int) -> None:
        self.replays.labels(str(cid)).inc()
        self.replayed.labels(str(cid)).inc(jobs)

    def _activated(self, gen: int, error: str | None) -> None:
        if error is None:
            self.activations.inc()


class StatusCollector(Collector):
    """The upstairs' state from its latest up__status record (probes.py)."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] | None = None

    def update(self, kind: str, record: dict[str, Any], status: dict[str, Any]) -> None:
        self.latest = status  # (one reference swap: the scraping thread sees old or new)

    def collect(self) -> Iterator[Metric]:
        s = self.latest
        if s is None:
            return
        g = GaugeMetricFamily
        c = CounterMetricFamily
        up = g("crucible_upstairs_state", "1 for the upstairs' state", labels=["state"])
        up.add_metric([s["state"]], 1)
        yield up
        yield g("crucible_upstairs_generation", "Generation it activated with", s["generation"])
        ds = s["downstairs"]
        state = g(
            "crucible_upstairs_downstairs_state",
            "1 for each downstairs' state",
            labels=["client", "target", "state"],
        )
        per_client = {
            "jobs_in_flight": ("Jobs sent and not yet answered", g),
            "bytes_in_flight": ("Write bytes sent and not yet answered", g),
            "connections": ("Connections made", c),
            "live_repairs": ("Live repairs of it finished", c),
            "live_repairs_aborted": ("Live repairs of it aborted", c),
            "extents_repaired": ("Extents copied to it by live repair", c),
            "extents_confirmed": ("Extents live repair found matching", c),
        }
        fams = {
            k: kind(f"crucible_upstairs_downstairs_{k}", doc, labels=["client"])
            for k, (doc, kind) in per_client.items()
        }
        for i, d in enumerate(ds):
            state.add_metric([str(i), d["target"], d["state"]], 1)
            for k, fam in fams.items():
                fam.add_metric([str(i)], d[k])
        yield state
        yield from fams.values()
        totals = {
            "integrity_errors": "Blocks that failed their check on a replica",
            "reads_retried": "Reads sent to another replica after one failed them",
            "blocks_rewritten": "Bad blocks rewritten from a good copy",
            "live_repairs": "Live repairs finished",
            "live_repairs_aborted": "Live repairs aborted",
            "retired": "Jobs retired",
        }
        for k, doc in totals.items():
            yield c(f"crucible_upstairs_{k}", doc, s[k])
        gauges = {
            "jobs": "Jobs in the table",
            "guest_jobs_waiting": "Guest jobs not yet acked",
            "reconcile_needed": "Extents the latest reconciliation had to repair",
            "reconcile_done": "Of those, repaired",
        }
        for k, doc in gauges.items():
            yield g(f"crucible_upstairs_{k}", doc, s[k])
        rep = s["live_repair"]
        yield g(
            "crucible_upstairs_live_repair_extent",
            "Extent live repair is at (-1: none running)",
            -1 if rep is None else rep["extent"],
        )
        v = s["verify"]
        yield g(
            "crucible_upstairs_verify_position", "Next block the verify compares", v["position"]
        )
        yield c("crucible_upstairs_verify_passes", "Whole verify passes", v["passes"])
        yield c("crucible_upstairs_verify_divergent", "Blocks found differing", v["divergent"])


class DownstairsMetrics:
    """crucible_downstairs_*."""

    def __init__(self, registry: CollectorRegistry, dirty_extents: Callable[[], int]) -> None:
        self.connections = Gauge(
            "crucible_downstairs_connections", "Upstairs connected now", registry=registry
        )
        self.connects = Counter(
            "crucible_downstairs_connects", "Upstairs connections accepted", registry=registry
        )
        self.jobs = Counter(
            "crucible_downstairs_jobs", "Jobs answered, by kind", ["op"], registry=registry
        )
        self.errors = Counter(
            "crucible_downstairs_errors", "Jobs answered with an error", ["op"], registry=registry
        )
        self.read_bytes = Counter(
            "crucible_downstairs_read_bytes", "Bytes read for upstairs", registry=registry
        )
        self.write_bytes = Counter(
            "crucible_downstairs_write_bytes", "Bytes written for upstairs", registry=registry
        )
        self.latency = Histogram(
            "crucible_downstairs_job_latency_seconds",
            "A job, received to answered",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.disk = Histogram(
            "crucible_downstairs_disk_latency_seconds",
            "The region's read, write or flush of a job",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.repair_bytes = Counter(
            "crucible_downstairs_repair_bytes_served",
            "Extent bytes served to other downstairs for repair",
            registry=registry,
        )
        dirty = Gauge(
            "crucible_downstairs_dirty_extents",
            "Extents written since their last flush",
            registry=registry,
        )
        dirty.set_function(dirty_extents)
        self._attach()

    def _attach(self) -> None:
        for op in ["read", "write", "writeunwritten", "flush", "barrier", "trim"]:
            self._attach_job(op)
        for op in DS_DISK:
            start, done = _timer(self.disk.labels(op).observe, lambda jid, msg: id(msg))
            DS.attach(f"os__{op}__start", start)
            DS.attach(f"os__{op}__done", done)
        DS.attach("connection__open", self._opened)
        DS.attach("connection__close", lambda cid, peer: self.connections.dec())
        DS.attach("repair__served", lambda extent, n: self.repair_bytes.inc(n))

    def _attach_job(self, op: str) -> None:
        jobs, errors = self.jobs.labels(op), self.errors.labels(op)
        on_start, on_done = _timer(self.latency.labels(op).observe, lambda jid, msg, *_: id(msg))
        counted = self.read_bytes if op == "read" else self.write_bytes

        def done(jid: int, msg: Any, err: object, nbytes: int) -> None:
            on_done(jid, msg)
            jobs.inc()
            if err is not None:
                errors.inc()
            elif nbytes:
                counted.inc(nbytes)

        DS.attach(f"submit__{op}__start", on_start)
        DS.attach(f"submit__{op}__done", done)

    def _opened(self, cid: int, peer: str) -> None:
        self.connections.inc()
        self.connects.inc()


class NbdMetrics:
    """crucible_nbd_*."""

    def __init__(self, registry: CollectorRegistry) -> None:
        conns = Gauge("crucible_nbd_connections", "NBD clients connected now", registry=registry)
        total = Counter("crucible_nbd_connects", "NBD clients accepted", registry=registry)
        requests = Counter(
            "crucible_nbd_requests", "NBD requests, by command", ["command"], registry=registry
        )
        nbytes = Counter(
            "crucible_nbd_request_bytes",
            "Bytes NBD requests asked for, by command",
            ["command"],
            registry=registry,
        )

        def opened(peer: str) -> None:
            conns.inc()
            total.inc()

        def request(command: str, length: int) -> None:
            requests.labels(command).inc()
            nbytes.labels(command).inc(length)

        NBD.attach("nbd__connection__open", opened)
        NBD.attach("nbd__connection__close", lambda peer: conns.dec())
        NBD.attach("nbd__request", request)
