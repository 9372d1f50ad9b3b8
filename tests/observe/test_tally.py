"""The numbers behind the metrics: histogram buckets as Prometheus counts
them, timers, and the handlers' counting."""

from __future__ import annotations

from crucible.observe.tally import (
    LATENCY_BUCKETS,
    MAX_OPEN,
    Cell,
    ClientOp,
    DiskOp,
    DsJob,
    GuestOp,
    Hist,
    Requests,
    Timer,
)


def _cumulative(h: Hist) -> dict[str, float]:
    return dict(h.snapshot()[0])


def test_a_value_on_a_bound_counts_in_that_bucket() -> None:
    # Prometheus buckets are "less than or equal": 0.001 belongs in le="0.001".
    h = Hist()
    for v in (0.001, 0.0010001, 0.0, 11.0, LATENCY_BUCKETS[-1]):
        h.observe(v)
    got = _cumulative(h)
    assert got["5e-05"] == 1  # 0.0
    assert got["0.001"] == 2  # and 0.001
    assert got["0.0025"] == 3  # and 0.0010001
    assert got["10.0"] == 4
    assert got["+Inf"] == 5  # and 11.0
    assert abs(h.snapshot()[1] - (0.001 + 0.0010001 + 11.0 + 10.0)) < 1e-9
    assert list(got) == [*(repr(b) for b in LATENCY_BUCKETS), "+Inf"]


def test_a_timer_observes_only_what_it_saw_start_and_stays_bounded() -> None:
    h = Hist()
    t = Timer(h)
    t.done(1)  # never started: nothing
    t.start(1)
    t.done(1)
    t.done(1)  # done twice: counted once
    assert _cumulative(h)["+Inf"] == 1
    for k in range(MAX_OPEN + 10):  # starts whose done never comes
        t.start(k)
    assert len(t.begun) <= MAX_OPEN + 1


def test_handlers_count_what_the_probes_say() -> None:
    ops, nbytes, lat = Cell(), Cell(), Hist()
    g = GuestOp(ops, nbytes, lat)
    g.done(7, 4096, True, 0.0003)
    g.done(8, 4096, False, 0.0002)  # the upstairs' own job: not the guest's IO
    assert (ops.value, nbytes.value, _cumulative(lat)["0.0005"], lat.sum) == (1, 4096, 1, 0.0003)

    hists, errors = [Hist() for _ in range(3)], [Cell() for _ in range(3)]
    c = ClientOp(hists, errors)
    c.done(9, 0, None, 0.002)
    c.done(9, 2, "an error", 0.02)
    assert [_cumulative(h)["+Inf"] for h in hists] == [1, 0, 1]
    assert [h.sum for h in hists] == [0.002, 0.0, 0.02]
    assert [e.value for e in errors] == [0, 0, 1]

    disk = DiskOp(Hist())
    disk.done(3, object(), 0.0001)
    assert _cumulative(disk.latency)["0.0001"] == 1

    jobs, errs, moved = Cell(), Cell(), Cell()
    d = DsJob(jobs, errs, moved, Hist())
    msg, bad = object(), object()
    d.start(1, msg)
    d.start(2, bad)
    d.done(1, msg, None, 512)
    d.done(2, bad, "failed", 512)
    assert (jobs.value, errs.value, moved.value) == (2, 1, 512)

    cells: dict[str, Cell] = {}
    r = Requests(lambda cmd: cells.setdefault(f"n-{cmd}", Cell()),
                 lambda cmd: cells.setdefault(f"b-{cmd}", Cell()))  # fmt: skip
    r.request("write", 4096)
    r.request("write", 512)
    r.request("flush", 0)
    assert {k: v.value for k, v in cells.items()} == {
        "n-write": 2, "b-write": 4608, "n-flush": 1, "b-flush": 0,
    }  # fmt: skip
