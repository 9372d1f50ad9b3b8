"""Probes: named hook points with the names of Crucible's DTrace probes.

Crucible's upstairs and downstairs fire USDT probes (`gw__write__start`,
`os__read__done`, ...) that DTrace scripts watch. Linux here has no DTrace,
so a probe is a plain hook: the code fires it at the same point with the
same leading arguments (the job id, then the client id where Crucible passes
one), and whatever is attached (metrics, tracing, a test) is called in the
firing thread. Arguments after Crucible's are ours (a message, a byte count).

A probe with nothing attached costs one attribute test at its site: a site
checks its provider's `on` flag before looking a probe up or building
arguments (`if UP.on: UP.fire("up__fault", cid, why)`); a site on the IO
path holds its Probe and checks that probe's own handlers
(`if p.handlers: p.fire2(job_id, cid)`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

Handler = Callable[..., None]

# What the seconds a done probe carries are measured with: a done probe
# whose start's time its site already holds passes the time between them,
# so a handler that only times (metrics) needs neither the start probe nor
# a table of start times. (Compiled, a Final is a C static: no lookups.)
clock: Final = time.perf_counter


class Probe:
    """One probe and the handlers attached to it, called in order.

    A site on the IO path holds its probe and tests `handlers` before it
    builds any argument; fire1..fire4 then call each handler with that many
    arguments (compiled, without packing them into a tuple)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.handlers: list[Handler] = []

    def fire(self, *args: Any) -> None:
        for h in self.handlers:
            h(*args)

    def fire1(self, a: Any) -> None:
        for h in self.handlers:
            h(a)

    def fire2(self, a: Any, b: Any) -> None:
        for h in self.handlers:
            h(a, b)

    def fire3(self, a: Any, b: Any, c: Any) -> None:
        for h in self.handlers:
            h(a, b, c)

    def fire4(self, a: Any, b: Any, c: Any, d: Any) -> None:
        for h in self.handlers:
            h(a, b, c, d)


class Provider:
    """A set of probes under one name (crucible_upstairs, crucible_downstairs)."""

    def __init__(self, name: str, probes: list[str]) -> None:
        self.name = name
        self.probes = {p: Probe(p) for p in probes}
        self.on = False  # anything attached to any probe of this provider

    def probe(self, name: str) -> Probe:
        p = self.probes.get(name)
        if p is None:
            raise KeyError(f"{self.name} has no probe {name!r}")
        return p

    def attach(self, probe: str, handler: Handler) -> None:
        self.probe(probe).handlers.append(handler)
        self.on = True

    def detach(self, probe: str, handler: Handler) -> None:
        p = self.probes.get(probe)
        if p is not None and handler in p.handlers:
            p.handlers.remove(handler)
        self.on = any(p.handlers for p in self.probes.values())

    def attached(self, probe: str) -> bool:
        p = self.probes.get(probe)
        return p is not None and bool(p.handlers)

    def fire(self, probe: str, *args: Any) -> None:
        p = self.probes.get(probe)
        if p is not None:
            p.fire(*args)


def _pairs(stems: list[str], ends: tuple[str, ...] = ("start", "done")) -> list[str]:
    return [f"{s}__{e}" for s in stems for e in ends]


# Guest-work job kinds as Crucible's probes name them (the job's kind in
# upstairs/jobs.py maps onto these).
GW_OPS = ["read", "write", "write_unwritten", "flush", "barrier", "trim"]
GW_LIVE = ["close", "repair", "reopen", "noop"]
DS_OPS = ["read", "write", "write_unwritten", "flush", "barrier", "trim"]
DS_LIVE = ["close", "repair", "reopen", "noop"]

UP: Final = Provider(
    "crucible_upstairs",
    [
        "up__status",  # ("stats", the DtraceInfo-shaped dict), every second
        # a job was created (start) and acked to the guest (done): (job id, bytes
        # read or written, a guest's job or one of ours), done + seconds since
        # the start; live-repair jobs: (job id, extent)
        *_pairs([f"gw__{op}" for op in GW_OPS + GW_LIVE]),
        # queued for the three clients: (job id)
        *[f"up__to__ds__{op}__start" for op in GW_OPS],
        # the message for one client: (job id, client id); its reply handled:
        # (job id, client id, the error or None, seconds since the job was queued)
        *_pairs([f"ds__{op}__client" for op in DS_OPS]),
        *_pairs([f"ds__{op}" for op in DS_LIVE]),
        # ours: every client has answered the job (job id)
        "up__job__finished",
        # activation and its reconciliation
        "up__activate__start",  # (generation)
        "up__activate__done",  # (generation, error text or None)
        "up__reconcile__start",  # (extents to repair)
        "up__reconcile__done",  # (extents repaired, extents needed)
        "up__fault",  # (client id, reason)
        "up__replay",  # (client id, jobs replayed)
    ],
)

# Each job a downstairs takes: its submit probes (start: accepted, with (job id,
# the message); done: its reply about to be sent, with (job id, the message,
# the error or None, bytes read or written)). Live-repair jobs share done probes.
DS_IO = ["read", "write", "writeunwritten", "flush", "barrier", "trim"]
DS_JOBS: dict[str, tuple[str, str]] = {
    **{op: (f"submit__{op}__start", f"submit__{op}__done") for op in DS_IO},
    "el_close": ("submit__el__close__start", "submit__el__close__done"),
    "el_flush_close": ("submit__el__flush_close__start", "submit__el__close__done"),
    "el_repair": ("submit__el__repair__start", "submit__el__repair__done"),
    "el_reopen": ("submit__el__reopen__start", "submit__el__done"),
    "el_noop": ("submit__el__noop__start", "submit__el__done"),
}
DS_DISK = ["read", "write", "writeunwritten", "flush", "trim"]  # os__*__start/done

DS: Final = Provider(
    "crucible_downstairs",
    [
        *sorted({name for pair in DS_JOBS.values() for name in pair}),
        "work__start",  # (job id): dependencies met, about to run
        "work__done",  # (job id)
        # around the region's read, write or flush: (job id, the message), done
        # + the seconds it took
        *_pairs([f"os__{op}" for op in DS_DISK]),
        # ours
        "connection__open",  # (connection id, peer)
        "connection__close",  # (connection id, peer)
        "repair__served",  # (extent, bytes): an extent file sent to another downstairs
    ],
)

NBD: Final = Provider(
    "crucible_nbd",
    [
        "nbd__connection__open",  # (peer)
        "nbd__connection__close",  # (peer)
        "nbd__request",  # (command name, length)
    ],
)
