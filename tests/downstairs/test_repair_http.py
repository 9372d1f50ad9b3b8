"""The repair HTTP server (port + 4000): endpoints, and nothing else reachable."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from crucible.common.errors import CrucibleError
from crucible.downstairs.repair import fetch_extent
from crucible.protocol import messages as m
from crucible.region.layout import extent_path
from tests.support import Client, Downstairs

pytestmark = pytest.mark.slow


def get(ds: Downstairs, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ds.repair_port}{path}", timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_endpoints(ds: Downstairs, region: Path) -> None:
    assert get(ds, "/extent/3/files") == (200, b'["003"]')
    status, body = get(ds, "/newextent/3/data")
    assert status == 200 and body == extent_path(region, 3).read_bytes()
    assert get(ds, "/extent/3/repair-ready") == (200, b"false")
    status, body = get(ds, "/region-info")
    assert json.loads(body) == json.loads((region / "region.json").read_text())
    assert get(ds, "/region-mode") == (200, b"false")


@pytest.mark.parametrize(
    "path",
    [
        "/extent/10/files",
        "/newextent/99999/data",
        "/extent/-1/files",
        "/extent/..%2F..%2Fregion.json/files",
        "/newextent/../../region.json",
        "/newextent/3/db",
        "/extent/99999999999/files",
        "/etc/passwd",
    ],
)
def test_bad_paths_refused(ds: Downstairs, path: str) -> None:
    status, _ = get(ds, path)
    assert status in (400, 404)


def test_fetch_when_closed(ds: Downstairs) -> None:
    c = Client(ds.port)
    c.negotiate()
    c.write(250, b"\x07" * 512)
    buf = io.BytesIO()
    addr = ("127.0.0.1", ds.repair_port)
    with pytest.raises(CrucibleError, match="not closed"):
        fetch_extent(addr, 2, buf)
    c.send(m.ExtentClose(1, 2))
    c.expect(m.RepairAckId)
    assert get(ds, "/extent/2/repair-ready") == (200, b"true")
    buf = io.BytesIO()
    fetch_extent(addr, 2, buf)
    assert buf.getvalue()[50 * 512 : 51 * 512] == b"\x07" * 512


def test_fetch_refuses_a_copy_that_overlapped_a_reopen(ds: Downstairs) -> None:
    """If the source reopens (and may write) the extent mid-copy and closes it
    again, the bytes are a mix of two states: the copy must not be used."""
    c = Client(ds.port)
    c.negotiate()
    c.send(m.ExtentClose(1, 2))
    c.expect(m.RepairAckId)

    class Meddler(io.BytesIO):
        meddled = False

        def write(self, b: bytes) -> int:  # type: ignore[override]
            if not self.meddled:
                self.meddled = True
                c.send(m.ExtentReopen(2, 2))
                c.expect(m.RepairAckId)
                c.send(m.ExtentClose(3, 2))
                c.expect(m.RepairAckId)
            return super().write(b)

    with pytest.raises(CrucibleError, match="reopened during the copy"):
        fetch_extent(("127.0.0.1", ds.repair_port), 2, Meddler())
    fetch_extent(("127.0.0.1", ds.repair_port), 2, io.BytesIO())  # closed throughout: fine


def test_capabilities_page(ds: Downstairs) -> None:
    assert json.loads(get(ds, "/capabilities")[1]) == {"trim": True, "allocation": True}


def test_plain_v13_mode_has_no_extensions(region: Path) -> None:
    """--no-extensions: no capabilities page (404, as from a Rust downstairs),
    and a Trim ends the connection, as an unknown message does there."""
    d = Downstairs(region, "--no-extensions")
    try:
        assert get(d, "/capabilities")[0] == 404
        c = Client(d.port)
        c.negotiate()
        c.send(m.Trim(c.upstairs_id, c.session_id, c.job_id(), [], 0, 1))
        assert c.closed_by_peer()
        assert "Trim is not supported here" in d.output()
    finally:
        d.stop()
