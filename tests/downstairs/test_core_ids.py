"""The downstairs core takes jobs that name its connection's upstairs and
session, whether or not the ids are the very objects it was given."""

from __future__ import annotations

import uuid

from crucible.common.definition import RegionDefinition
from crucible.downstairs import core as dcore
from crucible.protocol import messages as m


def _negotiated() -> tuple[dcore.DownstairsCore, uuid.UUID, uuid.UUID]:
    core = dcore.DownstairsCore(
        RegionDefinition(512, 8, 2, uuid.uuid4(), False), False, ("127.0.0.1", 1)
    )
    up, sess = uuid.uuid4(), uuid.uuid4()
    core.connected(1, "127.0.0.1:1")
    core.received(1, m.HereIAm(m.CRUCIBLE_MESSAGE_VERSION, up, sess, 1, False, False, []))
    # Copies: equal ids that are other objects, as after the decoder's cache is cleared.
    core.received(1, m.PromoteToActive(uuid.UUID(str(up)), uuid.UUID(str(sess)), 1))
    assert core.promoted(1)
    core.received(1, m.RegionInfoPlease())
    core.received(1, m.LastFlush(0))
    return core, up, sess


def test_equal_ids_that_are_other_objects_are_accepted() -> None:
    core, up, sess = _negotiated()
    acts = core.received(
        1, m.ReadRequest(uuid.UUID(bytes=up.bytes), uuid.UUID(bytes=sess.bytes), 1000, [], 0, 1)
    )
    assert [type(a) for a in acts if not isinstance(a, dcore.JobLog)] == [dcore.Execute]


def test_another_session_is_refused() -> None:
    core, up, _ = _negotiated()
    acts = core.received(1, m.ReadRequest(up, uuid.uuid4(), 1000, [], 0, 1))
    sent = [a.msg for a in acts if isinstance(a, dcore.Send)]
    assert [type(x) for x in sent] == [m.UuidMismatch]
    assert not any(isinstance(a, dcore.Execute) for a in acts)
