"""The `info` of the pantry's volume status is Crucible's VolumeInfo: a tree
of `volume` nodes (sub-volumes, read-only parent) with an `upstairs` at each
region, as crucible-client-types serializes it, and it matches the pantry's
OpenAPI document. Checked here on volumes built from VCRs and not connected:
every upstairs is initializing and every downstairs waits to connect."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

from openapi_schema_validator import OAS30Validator

from crucible.pantry.server import OPENAPI, volume_info
from crucible.upstairs.guest import Upstairs
from crucible.volume import vcr as v
from crucible.volume.build import build

KEY = base64.b64encode(bytes(range(32))).decode()


def region(host: str, port: int, read_only: bool = False, key: str | None = None) -> v.RegionVcr:
    targets = tuple((host, port + i) for i in range(3))
    return v.RegionVcr(512, 100, 10, 3, v.RegionOpts(uuid.uuid4(), targets, key=key,
                                                     read_only=read_only))  # fmt: skip


def upstairs(r: v.RegionVcr, read_only: bool = False, encrypted: bool = False) -> Any:
    """An upstairs not yet activated, as Crucible reports one."""
    host = r.opts.target[0][0]
    addr = f"[{host}]" if ":" in host else host
    return {"upstairs": {
        "state": "initializing", "block_size": None, "upstairs_id": str(r.opts.id),
        "session_id": "?", "generation": 0, "read_only": read_only, "encrypted": encrypted,
        "reconcile_in_progress": False, "live_repair_in_progress": False,
        "targets": [
            {"region_id": None, "target_addr": f"{addr}:{port}", "repair_addr": None,
             "state": {"type": "connecting", "state": "wait_connect", "mode": "new"}}
            for _, port in r.opts.target
        ],
    }}  # fmt: skip


def info_of(request: v.Vcr) -> Any:
    async def activate(up: Upstairs, gen: int) -> int:
        raise AssertionError("nothing is activated here")

    info = volume_info(build(request, activate).volume, request)
    status = {"active": False, "seen_active": False, "num_job_handles": 0, "info": info}
    check_status(OPENAPI, status)
    return _no_sessions(info)


def check_status(doc: Any, status: Any) -> None:
    """A volume status checked against the pantry's OpenAPI document."""
    schema = {"$ref": "#/components/schemas/VolumeStatus", **_optional_refs(doc)}
    OAS30Validator(schema).validate(status)


def _optional_refs(schema: Any) -> Any:
    """Dropshot writes an optional reference as {nullable, allOf: [ref]}, as
    the pantry's document does after it; a strict OAS 3.0.3 validator takes
    nullable only beside a type. Read it as dropshot's clients do."""
    if isinstance(schema, list):
        return [_optional_refs(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("nullable") is True and "allOf" in schema and "type" not in schema:
        return {"anyOf": [*_optional_refs(schema["allOf"]), {"type": "object", "nullable": True,
                                                              "enum": [None]}]}  # fmt: skip
    return {k: _optional_refs(value) for k, value in schema.items()}


def _no_sessions(node: Any) -> Any:
    """The tree with each session id (random) as "?"."""
    if "upstairs" in node:
        uuid.UUID(node["upstairs"]["session_id"])
        return {"upstairs": {**node["upstairs"], "session_id": "?"}}
    vol = node["volume"]
    parent = vol["read_only_parent"]
    subs = [_no_sessions(s) for s in vol["sub_volumes"]]
    return {"volume": {"sub_volumes": subs, "read_only_parent": parent and _no_sessions(parent)}}


def test_sub_volumes_and_a_region_parent() -> None:
    a, b = region("127.0.0.1", 3810), region("::1", 3820, key=KEY)
    parent = region("127.0.0.1", 3830, read_only=True)
    request = v.VolumeVcr(uuid.uuid4(), 512, (a, b), parent)
    assert info_of(request) == {"volume": {
        "sub_volumes": [upstairs(a), upstairs(b, encrypted=True)],
        "read_only_parent": upstairs(parent, read_only=True),  # a region: its upstairs itself
    }}  # fmt: skip


def test_a_volume_parent_is_a_tree_and_a_file_has_no_upstairs(tmp_path: Path) -> None:
    a, p = region("127.0.0.1", 3810), region("127.0.0.1", 3830, read_only=True)
    image = v.FileVcr(uuid.uuid4(), 512, tmp_path / "image.raw")
    parent = v.VolumeVcr(uuid.uuid4(), 512, (p,), image)
    request = v.VolumeVcr(uuid.uuid4(), 512, (a,), parent)
    assert info_of(request) == {"volume": {
        "sub_volumes": [upstairs(a)],
        "read_only_parent": {"volume": {
            "sub_volumes": [upstairs(p, read_only=True)],
            "read_only_parent": {"volume": {"sub_volumes": [], "read_only_parent": None}},
        }},
    }}  # fmt: skip


def test_a_region_alone_is_a_volume_of_one() -> None:
    """As Crucible's pantry wraps a region VCR in a volume."""
    a = region("127.0.0.1", 3810)
    assert info_of(a) == {"volume": {"sub_volumes": [upstairs(a)], "read_only_parent": None}}
