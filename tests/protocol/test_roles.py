"""The message role table: complete, and in agreement with the unions that
`match` statements are checked against."""

from __future__ import annotations

from typing import get_args

from crucible.protocol import messages as m
from crucible.protocol import roles
from crucible.protocol.roles import ROLES, Kind


def test_every_message_has_a_role() -> None:
    assert set(ROLES) == set(m.MESSAGE_TYPES)


def test_unions_match_the_table() -> None:
    assert set(get_args(roles.Job)) == set(roles.of_kind(Kind.JOB))
    assert set(get_args(roles.JobReply)) == set(roles.of_kind(Kind.JOB_REPLY))
    assert set(get_args(roles.ReconcileOp)) == set(roles.of_kind(Kind.RECONCILE))
    assert set(get_args(roles.NegotiationReply)) == set(roles.of_kind(Kind.NEGOTIATION_REPLY))


def test_every_job_names_its_reply() -> None:
    for cls in roles.JOB_TYPES:
        reply = ROLES[cls].reply
        assert reply is not None and ROLES[reply].kind is Kind.JOB_REPLY, cls
    assert all(ROLES[c].kind is Kind.JOB for c in roles.REPLY_OF)
    assert {m.Flush, m.Barrier} == roles.RESETS
    assert roles.LIVE_REPAIR_TYPES <= roles.MUTATING
