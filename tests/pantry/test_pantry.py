"""The pantry with real processes: a volume attached by VCR, filled from a
URL served by the test (a sha256 checked; a server that answers 503 twice
first), validated and read back in bulk; an image larger than the volume,
a lower generation than a running upstairs, and a takeover are each refused
with a clear answer."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from crucible.cli_util import stop_process
from tests.pantry.test_volume_info import check_status
from tests.support import (
    BIN,
    Cluster,
    Downstairs,
    create_region,
    free_port,
    image_server,
    run_tool,
    wait_listening,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MIB = 1 << 20
GEOMETRY = ("--block-size", "4096", "--extent-size", "2048", "--extent-count", "8")  # 64 MiB


class Pantry:
    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.log = open(base / "pantry.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "crucible-pantry"), "run", "-l", f"127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_listening(self.port, self.proc)

    def call(self, method: str, path: str, body: Any = None, timeout: float = 300) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/crucible/pantry/0{path}", data=data, method=method,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def refused(self, method: str, path: str, body: Any = None) -> tuple[int, str]:
        with pytest.raises(urllib.error.HTTPError) as e:
            self.call(method, path, body)
        return e.value.code, json.loads(e.value.read())["message"]

    def stop(self) -> None:
        assert stop_process(self.proc, timeout=60) == 0
        self.log.close()


def vcr_of(c: Cluster, base: Path, gen: int) -> Any:
    out = base / f"vcr-{gen}.json"
    r = run_tool("crucible-vcr", "create", *c.target_args(), "--gen", str(gen), "-o", str(out))
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


def status_of(doc: Any, status: Any) -> Any:
    """A volume's status, checked against the pantry's OpenAPI document."""
    check_status(doc, status)
    return status


def upstairs_of(c: Cluster, sub: Any, session_id: str, gen: int, state: str, ds: str) -> Any:
    """Crucible's VolumeInfo::Upstairs of a region sub-volume of 4096-byte
    blocks whose three downstairs are all in state `ds`."""
    uuid.UUID(session_id)  # a new one at each activation: only its form is known
    targets = [
        {"region_id": json.loads((r / "region.json").read_text())["uuid"],
         "target_addr": f"127.0.0.1:{port}", "repair_addr": f"127.0.0.1:{port + 4000}",
         "state": {"type": ds}}
        for r, (_, port) in zip(c.regions, c.targets, strict=True)
    ]  # fmt: skip
    assert [t["target_addr"] for t in targets] == sub["opts"]["target"]
    return {"upstairs": {
        "state": state, "block_size": 4096, "upstairs_id": sub["opts"]["id"],
        "session_id": session_id, "generation": gen, "read_only": False, "encrypted": False,
        "reconcile_in_progress": False, "live_repair_in_progress": False, "targets": targets,
    }}  # fmt: skip


def test_the_pantry(tmp_path: Path, rng: random.Random) -> None:
    image = rng.randbytes(64 * MIB)
    digest = hashlib.sha256(image).hexdigest()
    c = Cluster(tmp_path / "v", *GEOMETRY)
    p = Pantry(tmp_path)
    try:
        doc = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{p.port}/openapi.json").read())
        validate(doc)
        vcr = vcr_of(c, tmp_path, 2)
        assert p.call("POST", "/volume/v1", {"volume_construction_request": vcr}) == {}
        assert p.call("POST", "/volume/v1", {"volume_construction_request": vcr}) == {}  # again
        assert p.call("GET", "")["volumes"] == ["v1"]
        # Crucible's VolumeStatus, its info Crucible's VolumeInfo: the volume's tree.
        status = status_of(doc, p.call("GET", "/volume/v1"))
        session = status["info"]["volume"]["sub_volumes"][0]["upstairs"]["session_id"]
        up = upstairs_of(c, vcr["sub_volumes"][0], session, 2, "active", "active")
        assert status == {
            "active": True, "seen_active": True, "num_job_handles": 0,
            "info": {"volume": {"sub_volumes": [up], "read_only_parent": None}},
        }  # fmt: skip

        with image_server(image, busy=2) as (url, gets):
            job = p.call("POST", "/volume/v1/import-from-url",
                         {"url": url, "expected_digest": {"sha256": digest}})["job_id"]  # fmt: skip
            assert p.call("GET", f"/job/{job}/ok") == {"job_result_ok": True}
            assert gets[0] == 2 + 64 * MIB // (512 << 10)  # two 503s, then every chunk once

        job = p.call("POST", "/volume/v1/validate", {"expected_digest": {"sha256": digest}})
        assert p.call("GET", f"/job/{job['job_id']}/ok") == {"job_result_ok": True}
        for off in (0, 13 * MIB, 64 * MIB - (512 << 10)):
            got = p.call("POST", "/volume/v1/bulk-read", {"offset": off, "size": 512 << 10})
            assert base64.b64decode(got["base64_encoded_data"]) == image[off : off + (512 << 10)]
        data = base64.b64encode(b"\x42" * 8192).decode()
        assert (
            p.call("POST", "/volume/v1/bulk-write", {"offset": 4096, "base64_encoded_data": data})
            == {}
        )
        got = p.call("POST", "/volume/v1/bulk-read", {"offset": 4096, "size": 8192})
        assert base64.b64decode(got["base64_encoded_data"]) == b"\x42" * 8192
        bad = p.call("POST", "/volume/v1/validate", {"expected_digest": {"sha256": digest}})
        code, why = p.refused("GET", f"/job/{bad['job_id']}/ok")
        assert code == 500 and "expected " + digest in why

        # An image larger than the volume.
        with image_server(image + b"x" * 4096) as (url, _):
            job = p.call("POST", "/volume/v1/import-from-url", {"url": url})["job_id"]
            code, why = p.refused("GET", f"/job/{job}/ok")
            assert code == 500 and "more than the volume's" in why
        code, why = p.refused("POST", "/volume/v1/bulk-read", {"offset": 1, "size": 4096})
        assert code == 400 and "multiples of 4096" in why

        # Another upstairs with a higher generation takes the regions: 410.
        port = free_port()
        nbd = subprocess.Popen(
            [str(BIN / "crucible-nbd"), *c.target_args(), "-p", str(port), "--gen", "5"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_listening(port, nbd, timeout=60)
            code, why = p.refused("POST", "/volume/v1/bulk-read", {"offset": 0, "size": 4096})
            assert code == 410 and "no longer active" in why
            up = upstairs_of(c, vcr["sub_volumes"][0], session, 2, "disabled", "stopping")
            assert status_of(doc, p.call("GET", "/volume/v1")) == {
                "active": False, "seen_active": True, "num_job_handles": 0,
                "info": {"volume": {"sub_volumes": [up], "read_only_parent": None}},
            }  # fmt: skip
            # And attaching at a generation below the running one is refused.
            code, why = p.refused(
                "POST", "/volume/v2", {"volume_construction_request": vcr_of(c, tmp_path, 3)}
            )
            assert code == 400 and "generation" in why.lower()
        finally:
            stop_process(nbd, timeout=60)
        assert p.call("DELETE", "/volume/v1") == {}
        code, _ = p.refused("GET", "/volume/v1")
        assert code == 404
    finally:
        p.stop()
        c.stop()


def test_replace_a_target_of_a_volume_with_a_region_parent(tmp_path: Path) -> None:
    """The replaced target is found among the sub-volume's regions only: the
    parent's regions are not the volume's to replace."""
    c = Cluster(tmp_path / "v", *GEOMETRY)
    parent = Cluster(tmp_path / "parent", *GEOMETRY, run_args=("--mode", "ro"))
    create_region(tmp_path / "spare", *GEOMETRY)
    spare = Downstairs(tmp_path / "spare", "--quiet")
    p = Pantry(tmp_path)
    try:
        out = tmp_path / "parent.json"
        r = run_tool("crucible-vcr", "create", *parent.target_args(), "--read-only", "-o", str(out))
        assert r.returncode == 0, r.stderr
        out = tmp_path / "v.json"
        r = run_tool("crucible-vcr", "create", *c.target_args(), "--gen", "2",
                     "--parent-vcr", str(tmp_path / "parent.json"), "-o", str(out))  # fmt: skip
        assert r.returncode == 0, r.stderr
        vcr = json.loads(out.read_text())
        assert p.call("POST", "/volume/v1", {"volume_construction_request": vcr}) == {}
        old = vcr["sub_volumes"][0]["opts"]["target"][1]
        vcr["sub_volumes"][0]["opts"]["target"][1] = f"127.0.0.1:{spare.port}"
        assert p.call("POST", "/volume/v1/replace", {"volume_construction_request": vcr}) == {}
        data = base64.b64encode(b"\x5a" * 8192).decode()
        p.call("POST", "/volume/v1/bulk-write", {"offset": 8192, "base64_encoded_data": data})
        got = p.call("POST", "/volume/v1/bulk-read", {"offset": 8192, "size": 8192})
        assert base64.b64decode(got["base64_encoded_data"]) == b"\x5a" * 8192
        # The parent is not the volume's to change.
        vcr["read_only_parent"]["sub_volumes"][0]["opts"]["target"][0] = old
        code, why = p.refused("POST", "/volume/v1/replace", {"volume_construction_request": vcr})
        assert code == 400 and "read-only parent must stay the same" in why
        assert p.call("DELETE", "/volume/v1") == {}
    finally:
        p.stop()
        spare.stop()
        parent.stop()
        c.stop()
