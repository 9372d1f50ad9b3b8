"""Prometheus metrics, fed by the probes (probes.py) and served as text at
/metrics (`--metrics ADDR:PORT`).

Event metrics (IO counts, bytes, latency) move as the probes fire; state
(each downstairs' state, jobs in flight, repair progress) comes from the
upstairs' once-a-second `up__status` record, so a scrape never reads the
upstairs' tables from the server's thread.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from crucible.observe.probes import DS, DS_DISK, DS_IO, DS_LIVE, DS_OPS, GW_OPS, NBD, UP
from crucible.observe.tally import Cell, ClientOp, DiskOp, DsJob, GuestOp, Hist, Requests
from crucible.tls import TlsFiles


class MetricsError(Exception):
    """The metrics server cannot start (one line for the command to print)."""


def serve(host: str, port: int, registry: CollectorRegistry, tls: TlsFiles | None = None) -> None:
    """Serve /metrics on a thread of its own (prometheus_client's server);
    with TLS, only to clients whose certificate the root signed."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # (a *_created per series)
    certs: dict[str, Any] = {}
    if tls is not None:
        certs = {
            "certfile": str(tls.cert),
            "keyfile": str(tls.key),
            "client_cafile": str(tls.root),
            "client_auth_required": True,
        }
    try:
        start_http_server(port, host, registry, **certs)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise MetricsError(f"--metrics: port {port} on {host} is already in use") from None
        raise MetricsError(f"--metrics: cannot listen on {host}:{port}: {e.strerror}") from None


class Tally(Collector):
    """Families of the counters and histograms in tally.py, for a scrape."""

    def __init__(self) -> None:
        self.counters: dict[str, tuple[str, list[str], dict[tuple[str, ...], Cell]]] = {}
        self.histograms: dict[str, tuple[str, list[str], dict[tuple[str, ...], Hist]]] = {}

    def counter(self, name: str, doc: str, labels: list[str]) -> Callable[..., Cell]:
        """A counter family; call it with label values for a child."""
        children: dict[tuple[str, ...], Cell] = {}
        self.counters[name] = (doc, labels, children)

        def child(*values: str) -> Cell:
            cell = children.get(values)
            if cell is None:
                cell = children[values] = Cell()
            return cell

        return child

    def histogram(self, name: str, doc: str, labels: list[str]) -> Callable[..., Hist]:
        children: dict[tuple[str, ...], Hist] = {}
        self.histograms[name] = (doc, labels, children)

        def child(*values: str) -> Hist:
            return children.setdefault(values, Hist())

        return child

    def collect(self) -> Iterator[Metric]:
        for name, (doc, labels, counters) in self.counters.items():
            fam = CounterMetricFamily(name, doc, labels=labels)
            for values, cell in list(counters.items()):
                fam.add_metric(list(values), cell.value)
            yield fam
        for name, (doc, labels, hists) in self.histograms.items():
            hfam = HistogramMetricFamily(name, doc, labels=labels)
            for values, h in list(hists.items()):
                buckets, total = h.snapshot()
                hfam.add_metric(list(values), buckets, total)
            yield hfam


class UpstairsMetrics:
    """crucible_upstairs_*: attach once per process (the probes are global)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        t = Tally()
        self.ops = t.counter("crucible_upstairs_guest_ops", "Guest jobs acked, by kind", ["op"])
        self.bytes = t.counter(
            "crucible_upstairs_guest_bytes", "Guest bytes read or written (acked)", ["op"]
        )
        self.latency = t.histogram(
            "crucible_upstairs_guest_latency_seconds", "Guest job, queued to acked", ["op"]
        )
        self.ds_latency = t.histogram(
            "crucible_upstairs_downstairs_job_latency_seconds",
            "A job on one downstairs, queued to answered",
            ["client", "op"],
        )
        self.ds_errors = t.counter(
            "crucible_upstairs_downstairs_errors",
            "Jobs a downstairs answered with an error",
            ["client"],
        )
        self.faults = t.counter("crucible_upstairs_faults", "Downstairs faulted", ["client"])
        self.replays = t.counter(
            "crucible_upstairs_replays",
            "Downstairs back from offline, their jobs replayed",
            ["client"],
        )
        self.replayed = t.counter("crucible_upstairs_replayed_jobs", "Jobs replayed", ["client"])
        self.activations = t.counter(
            "crucible_upstairs_activations", "Activations that succeeded", []
        )()
        registry.register(t)
        self.status = StatusCollector()
        registry.register(self.status)
        self._attach()

    def _attach(self) -> None:
        for op in GW_OPS:
            self._attach_guest(op)
        for op in DS_OPS:
            self._attach_clients(f"ds__{op}__client", op)
        for op in DS_LIVE:
            self._attach_clients(f"ds__{op}", op)
        UP.attach("up__fault", self._fault)
        UP.attach("up__replay", self._replayed)
        UP.attach("up__activate__done", self._activated)
        UP.attach("up__status", self.status.update)

    def _attach_guest(self, op: str) -> None:
        h = GuestOp(self.ops(op), self.bytes(op), self.latency(op))
        UP.attach(f"gw__{op}__done", h.done)

    def _attach_clients(self, probe: str, op: str) -> None:
        errors = [self.ds_errors(str(c)) for c in range(3)]
        h = ClientOp([self.ds_latency(str(c), op) for c in range(3)], errors)
        UP.attach(f"{probe}__done", h.done)

    def _fault(self, cid: int, why: str) -> None:
        self.faults(str(cid)).value += 1

    def _replayed(self, cid: int, jobs: int) -> None:
        self.replays(str(cid)).value += 1
        self.replayed(str(cid)).value += jobs

    def _activated(self, gen: int, error: str | None) -> None:
        if error is None:
            self.activations.value += 1


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
        whole = {
            "integrity_errors": ("Blocks that failed their check on a replica", c),
            "reads_retried": ("Reads sent to another replica after one failed them", c),
            "blocks_rewritten": ("Bad blocks rewritten from a good copy", c),
            "live_repairs": ("Live repairs finished", c),
            "live_repairs_aborted": ("Live repairs aborted", c),
            "retired": ("Jobs retired", c),
            "jobs": ("Jobs in the table", g),
            "guest_jobs_waiting": ("Guest jobs not yet acked", g),
            "reconcile_needed": ("Extents the latest reconciliation had to repair", g),
            "reconcile_done": ("Of those, repaired", g),
        }
        for k, (doc, kind) in whole.items():
            yield kind(f"crucible_upstairs_{k}", doc, s[k])
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


class _Connections:
    """PREFIX_connects_total and the PREFIX_connections gauge, from the
    open and close probes of a server's connections."""

    def __init__(self, t: Tally, registry: CollectorRegistry, prefix: str, who: str) -> None:
        self.accepted = t.counter(f"{prefix}_connects", f"{who} connections accepted", [])()
        self.gone = 0
        now = Gauge(f"{prefix}_connections", f"{who} connections open now", registry=registry)
        now.set_function(lambda: self.accepted.value - self.gone)

    def opened(self, *_: Any) -> None:
        self.accepted.value += 1

    def closed(self, *_: Any) -> None:
        self.gone += 1


class DownstairsMetrics:
    """crucible_downstairs_*."""

    def __init__(self, registry: CollectorRegistry, dirty_extents: Callable[[], int]) -> None:
        t = Tally()
        self.connections = _Connections(t, registry, "crucible_downstairs", "Upstairs")
        self.jobs = t.counter("crucible_downstairs_jobs", "Jobs answered, by kind", ["op"])
        self.errors = t.counter("crucible_downstairs_errors", "Jobs answered with an error", ["op"])
        self.read_bytes = t.counter(
            "crucible_downstairs_read_bytes", "Bytes read for upstairs", []
        )()
        self.write_bytes = t.counter(
            "crucible_downstairs_write_bytes", "Bytes written for upstairs", []
        )()
        self.latency = t.histogram(
            "crucible_downstairs_job_latency_seconds", "A job, received to answered", ["op"]
        )
        self.disk = t.histogram(
            "crucible_downstairs_disk_latency_seconds",
            "The region's read, write or flush of a job",
            ["op"],
        )
        self.repair_bytes = t.counter(
            "crucible_downstairs_repair_bytes_served",
            "Extent bytes served to other downstairs for repair",
            [],
        )()
        registry.register(t)
        dirty = Gauge(
            "crucible_downstairs_dirty_extents",
            "Extents written since their last flush",
            registry=registry,
        )
        dirty.set_function(dirty_extents)
        self._attach()

    def _attach(self) -> None:
        for op in DS_IO:
            self._attach_job(op)
        for op in DS_DISK:
            DS.attach(f"os__{op}__done", DiskOp(self.disk(op)).done)
        DS.attach("connection__open", self.connections.opened)
        DS.attach("connection__close", self.connections.closed)
        DS.attach("repair__served", self._served)

    def _attach_job(self, op: str) -> None:
        moved = self.read_bytes if op == "read" else self.write_bytes
        h = DsJob(self.jobs(op), self.errors(op), moved, self.latency(op))
        DS.attach(f"submit__{op}__start", h.start)
        DS.attach(f"submit__{op}__done", h.done)

    def _served(self, extent: int, nbytes: int) -> None:
        self.repair_bytes.value += nbytes


class NbdMetrics:
    """crucible_nbd_*."""

    def __init__(self, registry: CollectorRegistry) -> None:
        t = Tally()
        connections = _Connections(t, registry, "crucible_nbd", "NBD client")
        requests = t.counter("crucible_nbd_requests", "NBD requests, by command", ["command"])
        nbytes = t.counter(
            "crucible_nbd_request_bytes", "Bytes NBD requests asked for, by command", ["command"]
        )
        registry.register(t)
        NBD.attach("nbd__connection__open", connections.opened)
        NBD.attach("nbd__connection__close", connections.closed)
        NBD.attach("nbd__request", Requests(requests, nbytes).request)
