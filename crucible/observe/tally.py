"""Counters, latency histograms and the probe handlers that move them, kept
as plain numbers.

A handler here runs several times per guest IO, so this module is compiled
with the IO path (scripts/compile) and keeps to typed classes a compiled
caller reaches without the interpreter. prometheus_client's own metrics
take a lock and walk their buckets on every update; these are moved by one
thread only (the event loop's, where the probes fire), so they need no lock,
and metrics.py reads them for a scrape from the server's thread as they are.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Final

# From 50 us (a job answered from the page cache) to 10 s (a stalled downstairs).
# (Not Final: compiled, a Final tuple is built anew wherever it is used.)
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

MAX_OPEN: Final = 100_000  # timings begun and not yet done, at most
_clock: Final = time.perf_counter  # (compiled, a Final is a C static: no lookups)


class Cell:
    """One counter's value."""

    def __init__(self) -> None:
        self.value = 0.0


class Hist:
    """One histogram's buckets (LATENCY_BUCKETS, then +Inf) and sum."""

    def __init__(self) -> None:
        self.bounds = list(LATENCY_BUCKETS)
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # Most fall in the first few buckets: a scan beats bisect's call here.
        i = 0
        for le in self.bounds:
            if seconds <= le:
                break
            i += 1
        self.counts[i] += 1
        self.sum += seconds

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative buckets, as the text format has them."""
        out: list[tuple[str, float]] = []
        running = 0
        for le, n in zip((*LATENCY_BUCKETS, math.inf), list(self.counts), strict=True):
            running += n
            out.append(("+Inf" if le == math.inf else repr(le), float(running)))
        return out, self.sum


class Timer:
    """Times keys from start to done into a histogram."""

    def __init__(self, hist: Hist) -> None:
        self.hist = hist
        self.begun: dict[int, float] = {}

    def start(self, key: int) -> None:
        if len(self.begun) > MAX_OPEN:  # keys that never saw their done (a connection lost)
            self.begun.clear()
        self.begun[key] = _clock()

    def done(self, key: int) -> None:
        begun = self.begun
        t0 = begun.get(key)
        if t0 is not None:  # (get and del: compiled, dict.pop is a generic method call)
            del begun[key]
            self.hist.observe(_clock() - t0)


# ---- the upstairs' handlers ------------------------------------------------------------


class GuestOp:
    """gw__OP__done of one kind of job: guest jobs counted and timed from
    queued to acked (the upstairs' own jobs are not the guest's IO)."""

    def __init__(self, ops: Cell, nbytes: Cell, latency: Hist) -> None:
        self.ops = ops
        self.nbytes = nbytes
        self.latency = latency

    def done(self, jid: int, n: int, guest: bool, seconds: float) -> None:
        if guest:
            self.latency.observe(seconds)
            self.ops.value += 1
            self.nbytes.value += n


class ClientOp:
    """ds__OP__client__done: each downstairs' part of a job, timed from
    queued to answered, and its errors."""

    def __init__(self, latency: list[Hist], errors: list[Cell]) -> None:
        self.latency = latency
        self.errors = errors

    def done(self, jid: int, cid: int, err: Any, seconds: float) -> None:
        self.latency[cid].observe(seconds)
        if err is not None:
            self.errors[cid].value += 1


# ---- the downstairs' handlers ----------------------------------------------------------


class DsJob:
    """submit__OP__start/done: a job counted and timed from received to
    answered (keyed by its message: job ids are per upstairs)."""

    def __init__(self, jobs: Cell, errors: Cell, moved: Cell, latency: Hist) -> None:
        self.jobs = jobs
        self.errors = errors
        self.moved = moved
        self.timer = Timer(latency)

    def start(self, jid: int, msg: Any) -> None:
        self.timer.start(id(msg))

    def done(self, jid: int, msg: Any, err: Any, nbytes: int) -> None:
        self.timer.done(id(msg))
        self.jobs.value += 1
        if err is not None:
            self.errors.value += 1
        elif nbytes:
            self.moved.value += nbytes


class DiskOp:
    """os__OP__done: the region's part of a job, timed."""

    def __init__(self, latency: Hist) -> None:
        self.latency = latency

    def done(self, jid: int, msg: Any, seconds: float) -> None:
        self.latency.observe(seconds)


# ---- NBD --------------------------------------------------------------------------------


class Requests:
    """nbd__request: requests and the bytes they asked for, by command (each
    command's pair of counters made by `count` and `nbytes` on first use)."""

    def __init__(self, count: Callable[[str], Cell], nbytes: Callable[[str], Cell]) -> None:
        self.count = count
        self.nbytes = nbytes
        self.cells: dict[str, tuple[Cell, Cell]] = {}

    def request(self, command: str, length: int) -> None:
        cells = self.cells.get(command)
        if cells is None:
            cells = self.cells[command] = (self.count(command), self.nbytes(command))
        cells[0].value += 1
        cells[1].value += length
