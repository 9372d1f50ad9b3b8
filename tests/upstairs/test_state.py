"""The downstairs client's state table, tested directly: the paths the
upstairs takes are legal, everything else raises."""

from __future__ import annotations

import itertools

import pytest

from crucible.upstairs.client import Client
from crucible.upstairs.state import (
    ACTIVE,
    CONNECTING,
    DISABLED,
    IDLE,
    LIVE_REPAIR,
    DsState,
    IllegalTransition,
    Mode,
    Stage,
    check_transition,
)


def s(stage: Stage, mode: Mode | None = None) -> DsState:
    return DsState(stage, mode)


def walk(*states: DsState) -> None:
    for a, b in itertools.pairwise(states):
        check_transition(a, b)


NEGOTIATE = (Stage.CONNECT, Stage.HELLO, Stage.PROBE, Stage.PROMOTE, Stage.REGION)


def test_activation_with_reconciliation() -> None:
    new = [s(x, Mode.NEW) for x in NEGOTIATE]
    walk(IDLE, *new, s(Stage.VERSIONS, Mode.NEW), s(Stage.WAIT_QUORUM, Mode.NEW))
    walk(s(Stage.WAIT_QUORUM, Mode.NEW), s(Stage.RECONCILE, Mode.NEW))
    walk(s(Stage.RECONCILE, Mode.NEW), s(Stage.WAIT_QUORUM, Mode.NEW), ACTIVE)


def test_offline_and_back_by_replay() -> None:
    off = [s(x, Mode.OFFLINE) for x in NEGOTIATE]
    walk(ACTIVE, off[0], off[0], *off[1:], ACTIVE)  # retries stay offline


def test_fault_live_repair_and_back() -> None:
    for mode in (Mode.FAULTED, Mode.REPLACED):
        path = [s(x, mode) for x in (*NEGOTIATE, Stage.VERSIONS, Stage.REPAIR_READY)]
        walk(s(Stage.CONNECT, Mode.FAULTED), *path, LIVE_REPAIR, ACTIVE)
    walk(ACTIVE, s(Stage.CONNECT, Mode.FAULTED))
    walk(LIVE_REPAIR, s(Stage.CONNECT, Mode.FAULTED))
    walk(s(Stage.CONNECT, Mode.OFFLINE), s(Stage.CONNECT, Mode.FAULTED))  # held too much
    walk(s(Stage.HELLO, Mode.OFFLINE), s(Stage.CONNECT, Mode.FAULTED))
    walk(s(Stage.CONNECT, Mode.FAULTED), s(Stage.CONNECT, Mode.REPLACED))  # replace()


def test_all_faulted_start_over_as_new() -> None:
    walk(s(Stage.REPAIR_READY, Mode.FAULTED), s(Stage.WAIT_QUORUM, Mode.NEW), ACTIVE)


def test_read_only_joins_at_once() -> None:
    walk(s(Stage.VERSIONS, Mode.NEW), ACTIVE, s(Stage.CONNECT, Mode.NEW))


def test_everything_may_stop() -> None:
    every = [IDLE, ACTIVE, LIVE_REPAIR, DISABLED] + [s(x, m) for x in CONNECTING for m in Mode]
    for a in every:
        check_transition(a, IDLE)
        check_transition(a, DISABLED)
    walk(DISABLED, s(Stage.CONNECT, Mode.NEW))  # a new activation


@pytest.mark.parametrize(
    "old,new",
    [
        (IDLE, ACTIVE),
        (IDLE, s(Stage.HELLO, Mode.NEW)),
        (IDLE, s(Stage.CONNECT, Mode.OFFLINE)),  # activation always starts new
        (s(Stage.CONNECT, Mode.NEW), s(Stage.PROMOTE, Mode.NEW)),  # skips HELLO and PROBE
        (s(Stage.HELLO, Mode.NEW), s(Stage.PROMOTE, Mode.NEW)),  # skips the probe
        (s(Stage.REGION, Mode.NEW), ACTIVE),  # only an offline client resumes
        (s(Stage.VERSIONS, Mode.OFFLINE), s(Stage.REPAIR_READY, Mode.OFFLINE)),
        (s(Stage.WAIT_QUORUM, Mode.NEW), LIVE_REPAIR),
        (s(Stage.RECONCILE, Mode.NEW), ACTIVE),  # back through WAIT_QUORUM first
        (ACTIVE, LIVE_REPAIR),
        (ACTIVE, s(Stage.WAIT_QUORUM, Mode.NEW)),
        (LIVE_REPAIR, s(Stage.CONNECT, Mode.OFFLINE)),  # a repair target is not replayed
        (s(Stage.HELLO, Mode.NEW), s(Stage.PROBE, Mode.FAULTED)),  # mode changes in CONNECT
        (s(Stage.CONNECT, Mode.NEW), s(Stage.CONNECT, Mode.REPLACED)),
        (s(Stage.CONNECT, Mode.OFFLINE), s(Stage.CONNECT, Mode.NEW)),
        (ACTIVE, s(Stage.ACTIVE, Mode.NEW)),  # a mode only while connecting
        (ACTIVE, s(Stage.CONNECT)),
    ],
)
def test_illegal_moves_raise(old: DsState, new: DsState) -> None:
    with pytest.raises(IllegalTransition):
        check_transition(old, new)


def test_names_people_read() -> None:
    assert s(Stage.CONNECT, Mode.OFFLINE).name == "offline"
    assert s(Stage.CONNECT, Mode.REPLACED).name == "faulted"
    assert s(Stage.CONNECT, Mode.NEW).name == "connecting"
    assert s(Stage.PROBE, Mode.FAULTED).name == "negotiating"
    assert s(Stage.REPAIR_READY, Mode.FAULTED).name == "live-repair-ready"
    assert ACTIVE.name == "active" and IDLE.name == "new"


def test_a_client_is_named_for_its_target_and_follows_a_replacement() -> None:
    c = Client(1, ("127.0.0.1", 3810))
    assert c.name == "127.0.0.1:3810"
    c.retarget(("10.0.0.2", 3820))
    assert (c.target, c.name) == (("10.0.0.2", 3820), "10.0.0.2:3820")
    c.retarget(("fd00::2", 3830))
    assert c.name == "[fd00::2]:3830"  # as an address is written on the command line
