"""Random and mutated frames, and sequences of well-framed messages, sent to
a live downstairs before and after negotiation never crash it nor grow it
without bound, and the region stays consistent."""

from __future__ import annotations

import itertools
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crucible.protocol import codec
from crucible.protocol import messages as m
from tests.protocol.strategies import messages
from tests.support import Client, Downstairs, create_region, pattern, rss, run_cli

pytestmark = pytest.mark.slow

GENS = itertools.count(10)
BASE_RSS: dict[int, int] = {}
RSS_ROOM = 128 << 20  # what the fuzzing may add to the server's memory, at most


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Downstairs]:
    region: Path = tmp_path_factory.mktemp("fuzz") / "region"
    create_region(region, "--extent-count", "4")
    d = Downstairs(region, "--quiet")
    c = Client(d.port, gen=next(GENS))
    c.negotiate()
    c.write(0, pattern(0, 1))
    c.flush(1)
    c.close()
    BASE_RSS[d.proc.pid] = rss(d.proc.pid)
    yield d
    assert d.alive(), d.output()
    assert d.stop() == 0
    r = run_cli("verify", "-d", str(region))
    assert r.returncode == 0, r.stdout


def _valid_frames(c: Client) -> list[bytes]:
    return [
        codec.encode(c.write_msg(1, pattern(1, 2))),
        codec.encode(m.ReadRequest(c.upstairs_id, c.session_id, 1, [], 0, 2)),
        codec.encode(m.Flush(c.upstairs_id, c.session_id, 2, [1], 5, c.gen, None, None)),
    ]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    mode=st.sampled_from(["random", "mutated", "message", "sequence"]),
    negotiate=st.booleans(),
    data=st.data(),
)
def test_fuzz_live_server(
    live: Downstairs, mode: str, negotiate: bool, data: st.DataObject
) -> None:
    c = Client(live.port, gen=next(GENS))
    if negotiate:
        c.negotiate()
    if mode == "random":
        payload = data.draw(st.binary(min_size=1, max_size=300))
    elif mode == "message":
        payload = codec.encode(data.draw(messages))
    elif mode == "sequence":
        payload = b"".join(codec.encode(x) for x in data.draw(st.lists(messages, max_size=20)))
        payload = payload or b"\0"
    else:
        frame = bytearray(data.draw(st.sampled_from(_valid_frames(c))))
        for _ in range(data.draw(st.integers(1, 6))):
            frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
        payload = bytes(frame[: data.draw(st.integers(1, len(frame)))])
    try:
        c.send_raw(payload)
        c.sock.shutdown(socket.SHUT_WR)
        c.closed_by_peer()
    except OSError:
        pass
    c.close()
    # The server is alive and serves a fresh upstairs.
    probe = Client(live.port, gen=next(GENS), upstairs_id=uuid.uuid4())
    probe.negotiate()
    r = probe.read(0, 1)
    assert isinstance(r, m.ReadResponse) and bytes(r.data) == pattern(0, 1)
    probe.close()
    assert rss(live.proc.pid) < BASE_RSS[live.proc.pid] + RSS_ROOM
