"""crucible-stat: the pure parts (parsing /info, rates, the columns) directly, and
the command itself against a small /info server in a thread."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from crucible.tools import stat
from crucible.tools.stat import BadInfo, Rates, Sample

SESSION = "a666a8bd-1b2c-4d5e-8f90-0123456789ab"


def info(
    reads: int = 10,
    writes: int = 5,
    unwritten: int = 0,
    flushes: int = 1,
    states: tuple[str, str, str] = ("active", "active", "active"),
    live_repair: dict[str, Any] | None = None,
    reconcile: tuple[int, int] = (0, 0),
    session: str = SESSION,
) -> dict[str, Any]:
    """An /info answer as an upstairs gives it, 4 KiB per read and write."""
    return {
        "state": "active",
        "session_id": session,
        "upstairs_id": "c0b9e2e4-0000-4000-8000-000000000000",
        "generation": 3,
        "downstairs": [
            {
                "target": f"127.0.0.1:{8810 + 10 * i}",
                "state": s,
                "mode": "new",
                "jobs_in_flight": i + 1,
                "bytes_in_flight": 4096 * (i + 1),
                "connections": 1,
                "last_error": "",
            }
            for i, s in enumerate(states)
        ],
        "guest": {
            "read": {"ops": reads, "bytes": 4096 * reads},
            "write": {"ops": writes, "bytes": 4096 * writes},
            "write_unwritten": {"ops": unwritten, "bytes": 4096 * unwritten},
            "flush": {"ops": flushes, "bytes": 0},
        },
        "live_repair": live_repair,
        "reconcile_done": reconcile[0],
        "reconcile_needed": reconcile[1],
    }


REPAIR = {
    "source": 0,
    "targets": [2],
    "extent": 5,
    "extent_count": 64,
    "repaired": 3,
    "confirmed": 2,
    "aborting": None,
}


# -- parsing -----------------------------------------------------------------


def test_parse_sample_reads_the_fields_it_shows() -> None:
    s = stat.parse_sample(info(writes=5, unwritten=2, live_repair=REPAIR), 100.0)
    assert s.time == 100.0
    assert s.session_id == SESSION
    assert s.ds_state == ["active", "active", "active"]
    assert s.jobs_in_flight == [1, 2, 3]
    assert (s.read_ops, s.read_bytes) == (10, 40960)
    assert (s.write_ops, s.write_bytes) == (7, 7 * 4096)  # write + write_unwritten
    assert s.flush_ops == 1
    assert s.live_repair == REPAIR
    assert (s.reconcile_done, s.reconcile_needed) == (0, 0)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1, 2], "no session_id"),
        ({"session_id": 7}, "session_id is not a string"),
        ({**info(), "guest": {}}, "no guest.read"),
        ({**info(), "reconcile_done": True}, "reconcile_done is not an integer"),
        ({**info(), "downstairs": [{"state": 1}]}, "downstairs[0].state is not a string"),
        ({**info(), "live_repair": {"extent": 1}}, "no extent_count"),
    ],
)
def test_parse_sample_refuses_what_is_not_info(doc: Any, message: str) -> None:
    with pytest.raises(BadInfo, match=message.replace("[", r"\[").replace("]", r"\]")):
        stat.parse_sample(doc, 0.0)


# -- rates -------------------------------------------------------------------


def test_rates_are_counter_growth_over_the_time_between_samples() -> None:
    a = stat.parse_sample(info(reads=10, writes=5, unwritten=1, flushes=1), 100.0)
    b = stat.parse_sample(info(reads=60, writes=25, unwritten=3, flushes=3), 100.5)
    r = stat.rates(a, b)
    assert r == Rates(
        read_iops=100.0,  # 50 reads in 0.5 s
        read_mbps=50 * 4096 / 0.5 / 1e6,
        write_iops=44.0,  # 20 writes + 2 write_unwritten
        write_mbps=22 * 4096 / 0.5 / 1e6,
        flush_iops=4.0,
    )


def test_no_rates_without_a_meaningful_difference() -> None:
    a = stat.parse_sample(info(reads=10), 100.0)
    assert stat.rates(None, a) is None  # the first sample only primes
    assert stat.rates(a, stat.parse_sample(info(reads=20), 100.0)) is None  # no time passed
    assert stat.rates(a, stat.parse_sample(info(reads=5), 101.0)) is None  # restarted
    other = stat.parse_sample(info(reads=20, session="another"), 101.0)
    assert stat.rates(a, other) is None
    idle = stat.rates(a, stat.parse_sample(info(reads=10), 102.0))
    assert idle == Rates(0.0, 0.0, 0.0, 0.0, 0.0)


# -- columns -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "short"),
    [
        ("active", "ACT"),
        ("wait-quorum", "WQ"),
        ("reconcile", "REC"),
        ("live-repair-ready", "LRR"),
        ("new", "NEW"),
        ("faulted", "FLT"),
        ("offline", "OFL"),
        ("live-repair", "LR"),
        ("replaced", "RPL"),
        ("disabled", "DIS"),
        ("connect", "CON"),
        ("connecting", "CON"),
        ("hello", "NEG"),
        ("probe", "NEG"),
        ("promote", "NEG"),
        ("region", "NEG"),
        ("versions", "NEG"),
        ("negotiating", "NEG"),
        ("something-new", "something-new"),
    ],
)
def test_states_are_abbreviated(state: str, short: str) -> None:
    assert stat.abbreviate_state(state) == short


@pytest.mark.parametrize(
    ("doc", "column"),
    [
        (info(), "-"),
        (info(live_repair=REPAIR, states=("active", "active", "live-repair")), "LR 5/64"),
        (info(states=("reconcile",) * 3, reconcile=(2, 7)), "REC 2/7"),
        (info(states=("reconcile",) * 3), "REC 0/0"),  # comparing, nothing found yet
        (info(states=("connecting",) * 3, reconcile=(2, 7)), "REC 2/7"),  # cut short
        (info(reconcile=(7, 7)), "-"),  # finished: the counts stay, the column clears
    ],
)
def test_repair_column(doc: dict[str, Any], column: str) -> None:
    assert stat.repair_column(stat.parse_sample(doc, 0.0)) == column


def _sample(**kw: Any) -> Sample:
    return stat.parse_sample(info(**kw), 0.0)


def test_rows_line_up_under_the_header() -> None:
    width = len("127.0.0.1:7890")
    head = stat.header(width)
    s = _sample(states=("active", "wait-quorum", "faulted"), live_repair=REPAIR)
    row = stat.format_row("127.0.0.1:7890", s, Rates(120.0, 0.4915, 50.0, 0.2048, 1.0), width)
    assert row == (
        "127.0.0.1:7890  a666a8bd ACT  WQ FLT    1    2    3"
        "    120.0   0.49     50.0   0.20     1.0 LR 5/64"
    )
    # Every column's value ends where its (right-aligned) title ends.
    for title, value in [("DS1", "WQ"), ("IP2", "3"), ("R/s", "120.0"), ("F/s", "1.0")]:
        end = head.index(title) + len(title)
        assert row[end - len(value) : end] == value
    assert row.index("LR 5/64") == head.index("REPAIR")
    primed = stat.format_row("127.0.0.1:7890", _sample(), None, width)
    assert primed.split()[8:] == ["-", "-", "-", "-", "-", "-"]
    assert len(primed) == len(stat.format_row("127.0.0.1:7890", _sample(), None, width))


def test_an_unreachable_url_is_one_line() -> None:
    reason = stat.describe_error(BadInfo("the answer is not JSON"))
    assert reason == "not an upstairs /info: the answer is not JSON"
    assert stat.format_error("h:1", reason, 8) == f"h:1       unreachable: {reason}"
    assert stat.describe_error(TimeoutError()) == "no answer within 2 s"
    long = stat.describe_error(RuntimeError("a\nb " * 200))
    assert "\n" not in long and len(long) == stat.REASON_MAX and long.endswith("...")


def test_json_records() -> None:
    a = stat.parse_sample(info(reads=10), 100.0)
    b = stat.parse_sample(info(reads=20, live_repair=REPAIR, reconcile=(3, 3)), 101.0)
    first = stat.json_record("http://h:1", a, stat.rates(None, a))
    assert first["read_iops"] is None and first["flush_iops"] is None
    rec = json.loads(json.dumps(stat.json_record("http://h:1", b, stat.rates(a, b))))
    assert rec == {
        "url": "http://h:1",
        "time": 101.0,
        "session_id": SESSION,
        "ds_state": ["active", "active", "active"],
        "jobs_in_flight": [1, 2, 3],
        "read_ops": 20,
        "read_bytes": 20 * 4096,
        "write_ops": 5,
        "write_bytes": 5 * 4096,
        "flush_ops": 1,
        "read_iops": 10.0,
        "read_mbps": 10 * 4096 / 1e6,
        "write_iops": 0.0,
        "write_mbps": 0.0,
        "flush_iops": 0.0,
        "live_repair": REPAIR,
        "reconcile": [3, 3],
    }
    assert stat.error_record("http://h:1", 5.0, "connection refused") == {
        "url": "http://h:1",
        "time": 5.0,
        "error": "connection refused",
    }


# -- arguments ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("127.0.0.1:7890", "http://127.0.0.1:7890"),
        ("http://127.0.0.1:7890/", "http://127.0.0.1:7890"),
        ("https://host/api/", "https://host/api"),
        ("[::1]:7890", "http://[::1]:7890"),
    ],
)
def test_urls(text: str, url: str) -> None:
    assert stat.normalize_url(text) == url
    assert stat.build_parser().parse_args([text]).url == [url]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: URL"),
        (["h:1", "--interval", "0"], "0 must be a finite number above 0"),
        (["h:1", "--interval", "nan"], "must be a finite number above 0"),
        (["h:1", "--interval", "soon"], "'soon' is not a number"),
        (["h:1", "--count", "0"], "0 must be at least 1"),
        (["h:port"], "the port is not a number"),
        (["ftp://h:1"], "only http and https URLs"),
        (["http://:80"], "names no host"),
    ],
)
def test_bad_arguments_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        stat.build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and f"{stat.PROG}: error:" in err


# -- the command -------------------------------------------------------------

READS, WRITES, UNWRITTEN, FLUSHES = 7, 3, 1, 1  # the guest's IO between two requests


class InfoServer:
    """An upstairs' /info in a thread of its own; every request finds the guest
    counters grown by READS, WRITES, UNWRITTEN and FLUSHES."""

    def __init__(self) -> None:
        self.requests = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),))

    async def _info(self, request: web.Request) -> web.Response:
        n = self.requests = self.requests + 1
        doc = info(
            reads=1000 + READS * n,
            writes=500 + WRITES * n,
            unwritten=UNWRITTEN * n,
            flushes=FLUSHES * n,
            states=("active", "active", "live-repair"),
            live_repair=REPAIR,
        )
        return web.json_response(doc)

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/info", self._info)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.SockSite(runner, self.sock).start()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> InfoServer:
        self._thread.start()
        self._ready.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
        self._loop.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: a connection to it is refused, and no
    one else can take it while the test runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


JSON_3_FAST = ["--json", "--count", "3", "--interval", "0.2"]


@pytest.mark.slow
def test_command_polls_every_url(closed_port: int) -> None:
    with InfoServer() as server:
        good = f"http://127.0.0.1:{server.port}"
        bad = f"127.0.0.1:{closed_port}"  # HOST:PORT: http:// is added
        r = subprocess.run(
            [sys.executable, "-m", "crucible.tools.stat", good, bad, *JSON_3_FAST],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    records = [json.loads(line) for line in r.stdout.splitlines()]
    ok = [x for x in records if x["url"] == good]
    errors = [x for x in records if x["url"] == f"http://{bad}"]
    assert len(ok) == 3 and len(errors) == 3 and len(records) == 6
    assert server.requests == 3

    assert [x.get("error") for x in errors] == ["connection refused"] * 3
    assert all(set(x) == {"url", "time", "error"} for x in errors)

    first = ok[0]
    assert first["read_iops"] is None and first["write_mbps"] is None
    assert first["read_ops"] == 1000 + READS  # cumulative, as read
    assert all(x["session_id"] == SESSION for x in ok)
    assert all(x["ds_state"] == ["active", "active", "live-repair"] for x in ok)
    assert all(x["live_repair"] == REPAIR and x["reconcile"] == [0, 0] for x in ok)
    pairs = list(itertools.pairwise(ok))
    assert all(b["time"] > a["time"] for a, b in pairs)

    def grown(rate: str, scale: float = 1.0) -> int:
        """What rate * dt adds up to over the rated samples: a count again."""
        return round(float(sum(b[rate] * (b["time"] - a["time"]) * scale for a, b in pairs)))

    assert grown("read_iops") == ok[-1]["read_ops"] - first["read_ops"] == 2 * READS
    assert grown("read_mbps", 1e6) == ok[-1]["read_bytes"] - first["read_bytes"]
    assert grown("write_iops") == 2 * (WRITES + UNWRITTEN)
    assert grown("write_mbps", 1e6) == 2 * (WRITES + UNWRITTEN) * 4096
    assert grown("flush_iops") == 2 * FLUSHES
