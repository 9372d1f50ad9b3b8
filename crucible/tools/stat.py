"""crucible-stat: watch running upstairs through their HTTP control API, one line
per upstairs per interval, in the manner of Crucible's `upstairs_info.d` and
`perf-downstairs` DTrace scripts.

    crucible-stat URL [URL ...] [--interval SECONDS] [--count N] [--json]

Each URL is the base of an upstairs' control API (`http://127.0.0.1:7890`, or
just `127.0.0.1:7890`); every interval its `URL/info` is fetched, all URLs at
once, and shown as

    UPSTAIRS  SESSION  DS0 DS1 DS2  IP0  IP1  IP2      R/s  RMB/s      W/s  WMB/s     F/s REPAIR
    up0:7890  a666a8bd ACT ACT FLT    1    2    3    120.0   0.49     50.0   0.20     1.0 LR 5/64
    up1:7890  unreachable: connection refused

with the header repeated every 20 lines (UPSTAIRS is the URL without `http://`,
IPn the jobs in flight to downstairs n, REPAIR `LR extent/extents` or `REC
done/needed` while a live repair or a reconciliation runs). The rates are the growth of the
guest's cumulative counters between two polls over the time between them
(MB = 10^6 bytes; writes count write_unwritten too). The first answer of a URL
only primes its counters: its line is printed with `-` for the rates (null in
`--json`), so `--count N` always means N lines per URL. So is the first answer
after the counters went backwards or the session changed (a restarted
upstairs), where a difference would mean nothing. A URL that fails is shown
as `unreachable: REASON` and asked again the next interval; its last good
answer stays the base of the next rates.

`--json` prints one object per URL per interval instead (see `json_record` and
`error_record`). Ctrl-C or SIGTERM stops it, with exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from crucible.cli_util import (
    add_tls_options,
    fail,
    positive_float,
    positive_int,
    run_async,
    tls_files,
    wait_for_stop_signal,
)
from crucible.tls import TlsError

PROG = "crucible-stat"
TIMEOUT = 2.0  # seconds for one /info; an upstairs answers it from memory
HEADER_EVERY = 20  # lines between headers
MB = 1_000_000
REASON_MAX = 120  # characters of an error reason: a row stays one line

# How each downstairs state reads in a column three wide. The upstairs reports
# "connecting" and "negotiating" (status.py: DsState.name) where its stages
# are connect and hello..versions; both spellings are taken.
STATE_ABBREVIATIONS: dict[str, str] = {
    "active": "ACT",
    "wait-quorum": "WQ",
    "reconcile": "REC",
    "live-repair-ready": "LRR",
    "new": "NEW",
    "faulted": "FLT",
    "offline": "OFL",
    "live-repair": "LR",
    "replaced": "RPL",
    "disabled": "DIS",
    "connect": "CON",
    "connecting": "CON",
    "hello": "NEG",
    "probe": "NEG",
    "promote": "NEG",
    "region": "NEG",
    "versions": "NEG",
    "negotiating": "NEG",
}


class BadInfo(ValueError):
    """An answer that is not an upstairs' /info."""


@dataclass(frozen=True, slots=True)
class Sample:
    """What one /info said, and when."""

    time: float  # unix seconds, on a clock that does not jump (see Clock)
    session_id: str
    ds_state: list[str]
    jobs_in_flight: list[int]
    read_ops: int
    read_bytes: int
    write_ops: int  # write + write_unwritten
    write_bytes: int
    flush_ops: int
    live_repair: dict[str, Any] | None
    reconcile_done: int
    reconcile_needed: int


@dataclass(frozen=True, slots=True)
class Rates:
    """Per second, between two samples."""

    read_iops: float
    read_mbps: float
    write_iops: float
    write_mbps: float
    flush_iops: float


# -- pure parts: parse, compute, format --------------------------------------


def _field(doc: Any, *path: str) -> Any:
    v = doc
    for i, key in enumerate(path):
        if not isinstance(v, dict) or key not in v:
            raise BadInfo(f"no {'.'.join(path[: i + 1])}")
        v = v[key]
    return v


def _count(doc: Any, *path: str) -> int:
    v = _field(doc, *path)
    if isinstance(v, bool) or not isinstance(v, int):  # bool is an int to Python
        raise BadInfo(f"{'.'.join(path)} is not an integer")
    return v


def parse_sample(doc: Any, when: float) -> Sample:
    """The fields crucible-stat shows from an /info answer; BadInfo if it is not one."""
    session_id = _field(doc, "session_id")
    if not isinstance(session_id, str):
        raise BadInfo("session_id is not a string")
    ds = _field(doc, "downstairs")
    if not isinstance(ds, list):
        raise BadInfo("downstairs is not a list")
    states = []
    for i, d in enumerate(ds):
        s = _field(d, "state")
        if not isinstance(s, str):
            raise BadInfo(f"downstairs[{i}].state is not a string")
        states.append(s)
    repair = _field(doc, "live_repair")
    if repair is not None:
        if not isinstance(repair, dict):
            raise BadInfo("live_repair is not an object")
        _count(repair, "extent")
        _count(repair, "extent_count")
    return Sample(
        time=when,
        session_id=session_id,
        ds_state=states,
        jobs_in_flight=[_count(d, "jobs_in_flight") for d in ds],
        read_ops=_count(doc, "guest", "read", "ops"),
        read_bytes=_count(doc, "guest", "read", "bytes"),
        write_ops=_count(doc, "guest", "write", "ops")
        + _count(doc, "guest", "write_unwritten", "ops"),
        write_bytes=_count(doc, "guest", "write", "bytes")
        + _count(doc, "guest", "write_unwritten", "bytes"),
        flush_ops=_count(doc, "guest", "flush", "ops"),
        live_repair=repair,
        reconcile_done=_count(doc, "reconcile_done"),
        reconcile_needed=_count(doc, "reconcile_needed"),
    )


def rates(prev: Sample | None, cur: Sample) -> Rates | None:
    """Per-second rates from prev to cur; None when there is no meaningful
    difference: no previous sample, no time between them, another session, or a
    counter that went backwards (the upstairs restarted)."""
    if prev is None or prev.session_id != cur.session_id:
        return None
    dt = cur.time - prev.time
    deltas = (
        cur.read_ops - prev.read_ops,
        cur.read_bytes - prev.read_bytes,
        cur.write_ops - prev.write_ops,
        cur.write_bytes - prev.write_bytes,
        cur.flush_ops - prev.flush_ops,
    )
    if dt <= 0 or min(deltas) < 0:
        return None
    r_ops, r_bytes, w_ops, w_bytes, f_ops = deltas
    return Rates(
        read_iops=r_ops / dt,
        read_mbps=r_bytes / dt / MB,
        write_iops=w_ops / dt,
        write_mbps=w_bytes / dt / MB,
        flush_iops=f_ops / dt,
    )


def abbreviate_state(state: str) -> str:
    """A downstairs state in three letters or fewer; an unknown one as it is."""
    return STATE_ABBREVIATIONS.get(state, state)


def repair_column(s: Sample) -> str:
    """`LR e/N` while a live repair works on extent e of N; `REC d/n` while
    reconciling (a downstairs in reconcile, or a reconciliation left unfinished
    that the next activation resumes); `-` otherwise."""
    lr = s.live_repair
    if lr is not None:
        return f"LR {lr['extent']}/{lr['extent_count']}"
    if "reconcile" in s.ds_state or s.reconcile_done < s.reconcile_needed:
        return f"REC {s.reconcile_done}/{s.reconcile_needed}"
    return "-"


def _three(values: Sequence[object]) -> list[str]:
    # An upstairs has three downstairs; a short list still lines up.
    out = [str(v) for v in values[:3]]
    return out + ["-"] * (3 - len(out))


def header(label_width: int) -> str:
    return (
        f"{'UPSTAIRS':<{label_width}}  {'SESSION':<8} {'DS0':>3} {'DS1':>3} {'DS2':>3}"
        f" {'IP0':>4} {'IP1':>4} {'IP2':>4}"
        f" {'R/s':>8} {'RMB/s':>6} {'W/s':>8} {'WMB/s':>6} {'F/s':>7} REPAIR"
    )


def format_row(label: str, s: Sample, r: Rates | None, label_width: int) -> str:
    states = _three([abbreviate_state(x) for x in s.ds_state])
    jobs = _three(s.jobs_in_flight)
    if r is None:
        cols = ["-"] * 5
    else:
        cols = [
            f"{r.read_iops:.1f}",
            f"{r.read_mbps:.2f}",
            f"{r.write_iops:.1f}",
            f"{r.write_mbps:.2f}",
            f"{r.flush_iops:.1f}",
        ]
    return (
        f"{label:<{label_width}}  {s.session_id[:8]:<8} {states[0]:>3} {states[1]:>3}"
        f" {states[2]:>3} {jobs[0]:>4} {jobs[1]:>4} {jobs[2]:>4}"
        f" {cols[0]:>8} {cols[1]:>6} {cols[2]:>8} {cols[3]:>6} {cols[4]:>7} {repair_column(s)}"
    )


def format_error(label: str, reason: str, label_width: int) -> str:
    return f"{label:<{label_width}}  unreachable: {reason}"


def json_record(url: str, s: Sample, r: Rates | None) -> dict[str, Any]:
    return {
        "url": url,
        "time": s.time,
        "session_id": s.session_id,
        "ds_state": s.ds_state,
        "jobs_in_flight": s.jobs_in_flight,
        "read_ops": s.read_ops,
        "read_bytes": s.read_bytes,
        "write_ops": s.write_ops,
        "write_bytes": s.write_bytes,
        "flush_ops": s.flush_ops,
        "read_iops": None if r is None else r.read_iops,
        "read_mbps": None if r is None else r.read_mbps,
        "write_iops": None if r is None else r.write_iops,
        "write_mbps": None if r is None else r.write_mbps,
        "flush_iops": None if r is None else r.flush_iops,
        "live_repair": s.live_repair,
        "reconcile": [s.reconcile_done, s.reconcile_needed],
    }


def error_record(url: str, when: float, reason: str) -> dict[str, Any]:
    return {"url": url, "time": when, "error": reason}


def describe_error(e: BaseException, timeout: float = TIMEOUT) -> str:
    """A failed poll in a few words, on one line."""
    if isinstance(e, BadInfo):
        text = f"not an upstairs /info: {e}"
    elif isinstance(e, aiohttp.ClientConnectorError):
        os_error = e.os_error
        if isinstance(os_error, ConnectionRefusedError):
            text = "connection refused"
        elif isinstance(os_error, socket.gaierror):
            text = f"cannot resolve {e.host}: {os_error.strerror or os_error}"
        else:
            text = (os_error.strerror or str(os_error) or type(os_error).__name__).lower()
    elif isinstance(e, TimeoutError):  # aiohttp's timeouts are TimeoutErrors
        text = f"no answer within {timeout:g} s"
    elif isinstance(e, aiohttp.ServerDisconnectedError):
        text = "server disconnected"
    elif isinstance(e, aiohttp.ClientResponseError):
        text = f"HTTP {e.status} {e.message}".strip()
    elif isinstance(e, OSError) and e.strerror:
        text = e.strerror.lower()
    else:
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    text = " ".join(text.split())
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 3] + "..."


def normalize_url(text: str) -> str:
    """An http(s) base URL without a trailing slash; HOST:PORT gets http://."""
    url = text.strip()
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
    except ValueError as e:  # an unbalanced [IPv6] bracket
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    try:
        parts.port  # noqa: B018 - raises ValueError on a port that is not one
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the port is not a number 0..65535") from None
    if parts.scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError(f"{text!r}: only http and https URLs")
    if not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} names no host")
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"{text!r}: a base URL takes no query or fragment")
    return url.rstrip("/")


def url_label(url: str) -> str:
    """The URL as a row shows it: http:// goes without saying."""
    return url.removeprefix("http://")


# -- polling -----------------------------------------------------------------


class Clock:
    """Unix time that moves with the monotonic clock: rates use differences of
    these times, and the `time` printed with --json gives the same differences,
    whatever NTP does to the wall clock meanwhile."""

    def __init__(self) -> None:
        self._wall = time.time()
        self._mono = time.monotonic()

    def __call__(self) -> float:
        return self._wall + (time.monotonic() - self._mono)


class Watched:
    """One URL: its last good sample, the base of its next rates."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.label = url_label(url)
        self.last: Sample | None = None


async def fetch_info(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url + "/info") as resp:
        if resp.status != 200:
            raise BadInfo(f"HTTP {resp.status} {resp.reason or ''}".strip())
        body = await resp.read()
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadInfo("the answer is not JSON") from None


async def poll(
    session: aiohttp.ClientSession, w: Watched, clock: Callable[[], float]
) -> tuple[float, Sample | str, Rates | None]:
    """Ask one URL: (time, its sample, rates since the last), or (time, why not, None)."""
    try:
        doc = await fetch_info(session, w.url)
        when = clock()  # when the answer came, not when it was asked for
        s = parse_sample(doc, when)
    except (aiohttp.ClientError, OSError, BadInfo) as e:
        return clock(), describe_error(e), None
    r = rates(w.last, s)
    w.last = s
    return when, s, r


def _write(lines: list[str]) -> None:
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()  # a pipe or a file sees each interval as it happens


async def watch(
    urls: list[str],
    interval: float,
    count: int | None,
    as_json: bool,
    tls: ssl.SSLContext | None = None,
) -> None:
    watched = [Watched(u) for u in urls]
    width = max(len("UPSTAIRS"), *(len(w.label) for w in watched))
    clock = Clock()
    since_header = HEADER_EVERY
    rounds = 0
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    connector = aiohttp.TCPConnector(ssl=tls or True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.monotonic()
        while True:
            results = await asyncio.gather(*(poll(session, w, clock) for w in watched))
            lines = []
            # The header goes only between intervals, so one interval's lines stay together.
            if not as_json and since_header >= HEADER_EVERY:
                lines.append(header(width))
                since_header = 0
            for w, (when, s, r) in zip(watched, results, strict=True):
                if isinstance(s, str) and as_json:
                    lines.append(json.dumps(error_record(w.url, when, s)))
                elif isinstance(s, str):
                    lines.append(format_error(w.label, s, width))
                elif as_json:
                    lines.append(json.dumps(json_record(w.url, s, r)))
                else:
                    lines.append(format_row(w.label, s, r, width))
            since_header += len(watched)
            _write(lines)
            rounds += 1
            if count is not None and rounds >= count:
                return
            # Ticks stay on the grid start + k*interval; a round that overran
            # skips the ticks it missed rather than bunching polls together.
            now = time.monotonic()
            ticks = math.floor((now - start) / interval) + 1
            await asyncio.sleep(start + ticks * interval - now)


async def _main(args: argparse.Namespace) -> None:
    work = asyncio.ensure_future(
        watch(args.url, args.interval, args.count, args.json, args.tls_context)
    )
    stop = asyncio.ensure_future(wait_for_stop_signal())
    await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
    for t in (work, stop):
        t.cancel()
    for t in (work, stop):
        with contextlib.suppress(asyncio.CancelledError):
            await t  # re-raises what watch() died of, if it did


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Show the state, IO rates and repairs of running upstairs, "
        "polled through their HTTP control API.",
    )
    p.add_argument(
        "url",
        nargs="+",
        type=normalize_url,
        metavar="URL",
        help="an upstairs' control API: http://HOST:PORT or HOST:PORT",
    )
    p.add_argument(
        "-i",
        "--interval",
        type=positive_float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between polls (default 1)",
    )
    p.add_argument(
        "-c",
        "--count",
        type=positive_int,
        default=None,
        metavar="N",
        help="stop after N lines per URL (default: until Ctrl-C or SIGTERM)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per URL per interval")
    add_tls_options(p)
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    tls = tls_files(p, args)
    args.tls_context = None
    if tls is not None:  # a control API served with TLS: https, with this end's certificate
        try:
            args.tls_context = tls.client_context()
        except TlsError as e:
            fail(PROG, str(e))
        args.url = [re.sub(r"^http://", "https://", u) for u in args.url]
    try:
        run_async(_main(args))
    except KeyboardInterrupt:  # Ctrl-C before the loop took over SIGINT
        pass
    except BrokenPipeError:
        # `crucible-stat URL | head`: the reader has what it wanted. Point
        # stdout at /dev/null so the interpreter's final flush fails no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
