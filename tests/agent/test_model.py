"""The agent's rules without IO: request checks, transitions, ports, space."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from crucible.agent import model
from crucible.agent.model import AgentError, Region, RunningSnapshot, State

RID = str(uuid.UUID(int=1))


def body(**over: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"id": RID, "block_size": 512, "extent_size": 100,
                         "extent_count": 10, "encrypted": False}  # fmt: skip
    b.update(over)
    return {k: v for k, v in b.items() if v is not None}


@pytest.mark.parametrize(
    ("over", "says"),
    [
        ({"id": None}, "missing id"),
        ({"id": "x"}, "is not a UUID"),
        ({"id": "../etc"}, "is not a UUID"),
        ({"block_size": 1000}, "not a power of two"),
        ({"block_size": "512"}, "block_size must be an integer"),
        ({"extent_size": 0}, "extent_size 0 is out of range"),
        ({"extent_count": True}, "extent_count must be an integer"),
        ({"extent_count": 1 << 40}, "out of range"),
        ({"encrypted": "no"}, "encrypted must be true or false"),
        ({"cert_pem": "-----BEGIN CERTIFICATE-----"}, "give all three or none"),
        ({"key_pem": "not a pem", "cert_pem": "x", "root_pem": "y"}, "PEM"),
        ({"source": "nowhere"}, "source"),
    ],
)
def test_bad_requests_say_which_field(over: dict[str, Any], says: str) -> None:
    with pytest.raises(AgentError) as e:
        model.parse_create(body(**over))
    assert e.value.status == 400 and says in e.value.message


def test_a_request_round_trips_through_the_record() -> None:
    req = model.parse_create(body(id=RID.upper(), source="10.0.0.1:23000"))
    assert req.id == RID  # canonical, as the directory is named
    r = Region(req, State.REQUESTED, 19000)
    j = r.to_json()
    assert j["read_only"] is True and j["state"] == "requested" and j["port_number"] == 19000
    assert Region.from_json(j) == r
    s = RunningSnapshot(RID, "snap", 19001, State.CREATED)
    assert RunningSnapshot.from_json(s.to_json()) == s


def test_transitions_follow_the_table() -> None:
    r = Region(model.parse_create(body()), State.REQUESTED, 19000)
    for s in State:
        if s in model.TRANSITIONS[State.REQUESTED]:
            assert r.to(s).state is s
        else:
            with pytest.raises(ValueError):
                r.to(s)
    gone = r.to(State.TOMBSTONED).to(State.DESTROYED)
    assert gone.state is State.DESTROYED and not model.TRANSITIONS[State.DESTROYED]
    with pytest.raises(ValueError):
        gone.to(State.CREATED)


def test_ports_are_the_lowest_free_and_released_only_when_destroyed() -> None:
    req = model.parse_create(body())
    regions = [Region(req, State.CREATED, 19000), Region(req, State.DESTROYED, 19001),
               Region(req, State.FAILED, 19002)]  # fmt: skip
    snaps = [RunningSnapshot(RID, "a", 19003, State.REQUESTED)]
    held = model.held_ports(regions, snaps)
    assert held == {19000, 19002, 19003}
    assert model.pick_port(19000, 19010, held) == 19001
    assert model.pick_port(19000, 19010, held, lambda p: p != 19001) == 19004
    with pytest.raises(AgentError) as e:
        model.pick_port(19000, 19000, held)
    assert e.value.status == 503 and "no free downstairs port" in e.value.message


def test_space_promised_is_what_live_regions_have_not_yet_written() -> None:
    req = model.parse_create(body())  # 512000 bytes, 640000 reserved
    assert req.reservation == 640000
    regions = [Region(req, State.CREATED, 1), Region(req, State.DESTROYED, 2),
               Region(req, State.REQUESTED, 3)]  # fmt: skip
    assert model.outstanding(regions, {RID: 40000}) == 600000 * 2
