"""The pantry's HTTP API, Crucible's paths and bodies (`/crucible/pantry/0/...`),
errors as dropshot words them, and its OpenAPI document at /openapi.json."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from crucible.common.address import format_host_port
from crucible.common.errors import CrucibleError
from crucible.pantry.service import CHUNK, Pantry, PantryError, crucible_error, decode_data
from crucible.tools.http_api import (
    ERROR_SCHEMA,
    error,
    json_app,
    object_schema,
    operation,
    schema_ref,
)
from crucible.upstairs.guest import Upstairs
from crucible.upstairs.state import NEGOTIATING, Stage
from crucible.volume import vcr as v
from crucible.volume.sources import DeviceSource, Source
from crucible.volume.volume import Volume

BASE = "/crucible/pantry/0"
# A bulk write's body: 512 KiB as base64, and the JSON around it.
MAX_BODY = CHUNK * 4 // 3 + 4096

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def answers(handler: Handler) -> Handler:
    """Pantry and Crucible errors as JSON with their status."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except PantryError as e:
            return error(e.status, e.code, e.message)
        except CrucibleError as e:
            p = crucible_error(e)
            return error(p.status, p.code, p.message)

    return wrapped


async def body(request: web.Request, *fields: str) -> dict[str, Any]:
    try:
        obj = await request.json()
    except ValueError:
        raise PantryError(400, "BadRequest", "the body must be JSON") from None
    if not isinstance(obj, dict):
        raise PantryError(400, "BadRequest", "the body must be a JSON object")
    missing = [f for f in fields if f not in obj]
    if missing:
        raise PantryError(400, "BadRequest", f"missing {', '.join(missing)}")
    return obj


def uint(obj: dict[str, Any], name: str) -> int:
    v = obj.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise PantryError(400, "BadRequest", f"{name} must be a non-negative integer")
    return v


def sha256_of(obj: Any) -> str | None:
    if obj is None:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("sha256"), str):
        raise PantryError(400, "BadRequest", 'expected_digest must be {"sha256": HEX}')
    return str(obj["sha256"])


def make_app(pantry: Pantry) -> web.Application:
    p = pantry

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"volumes": sorted(p.volumes), "num_job_handles": len(p.jobs)})

    async def volume_status(request: web.Request) -> web.Response:
        vid = request.match_info["id"]
        a = p.volumes.get(vid)
        if a is None:
            raise PantryError(404, "NotFound", f"no volume {vid} is attached")
        return web.json_response(
            {
                "active": a.active,
                "seen_active": a.seen_active,
                "num_job_handles": len([j for j in a.jobs if j in p.jobs]),
                "info": volume_info(a.parts.volume, v.parse(a.request)),
            }
        )

    async def attach(request: web.Request) -> web.Response:
        b = await body(request, "volume_construction_request")
        await p.attach(request.match_info["id"], b["volume_construction_request"])
        return web.json_response({})

    async def attach_background(request: web.Request) -> web.Response:
        b = await body(request, "volume_construction_request", "job_id")
        p.attach_in_background(request.match_info["id"], b["volume_construction_request"],
                               str(b["job_id"]))  # fmt: skip
        return web.json_response({})

    async def replace(request: web.Request) -> web.Response:
        b = await body(request, "volume_construction_request")
        await p.replace(request.match_info["id"], b["volume_construction_request"])
        return web.json_response({})

    async def import_from_url(request: web.Request) -> web.Response:
        b = await body(request, "url")
        url, digest = b["url"], sha256_of(b.get("expected_digest"))
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise PantryError(400, "BadRequest", "url must be an http(s) URL")
        jid = p.volume_job(request.match_info["id"], "import",
                           lambda a, job: p.import_from_url(a, job, url, digest))  # fmt: skip
        return web.json_response({"job_id": jid})

    async def snapshot(request: web.Request) -> web.Response:
        b = await body(request, "snapshot_id")
        await p.snapshot(request.match_info["id"], str(b["snapshot_id"]))
        return web.json_response({})

    async def bulk_write(request: web.Request) -> web.Response:
        b = await body(request, "offset", "base64_encoded_data")
        data = decode_data(b["base64_encoded_data"])
        await p.bulk_write(request.match_info["id"], uint(b, "offset"), data)
        return web.json_response({})

    async def bulk_read(request: web.Request) -> web.Response:
        b = await body(request, "offset", "size")
        data = await p.bulk_read(request.match_info["id"], uint(b, "offset"), uint(b, "size"))
        return web.json_response({"base64_encoded_data": base64.b64encode(data).decode()})

    async def scrub(request: web.Request) -> web.Response:
        jid = p.volume_job(request.match_info["id"], "scrub", p.scrub)
        return web.json_response({"job_id": jid})

    async def validate(request: web.Request) -> web.Response:
        b = await body(request, "expected_digest")
        digest = sha256_of(b["expected_digest"])
        assert digest is not None
        size = None if b.get("size_to_validate") is None else uint(b, "size_to_validate")
        jid = p.volume_job(request.match_info["id"], "validate",
                           lambda a, job: p.validate(a, job, digest, size))  # fmt: skip
        return web.json_response({"job_id": jid})

    async def detach(request: web.Request) -> web.Response:
        await p.detach(request.match_info["id"])
        return web.json_response({})

    async def is_finished(request: web.Request) -> web.Response:
        job = p.job(request.match_info["id"])
        return web.json_response({"job_is_finished": job.finished, "progress": job.progress,
                                  "total": job.total})  # fmt: skip

    async def ok(request: web.Request) -> web.Response:
        job = await p.wait_job(request.match_info["id"])
        if job.error is not None:
            return error(500, "JobFailed", f"job {job.id} ({job.what}) failed: {job.error}")
        return web.json_response({"job_result_ok": True})

    vol = f"{BASE}/volume/{{id}}"
    routes = [
        web.get(BASE, status),
        web.get(vol, volume_status),
        web.post(vol, attach),
        web.delete(vol, detach),
        web.post(f"{vol}/background", attach_background),
        web.post(f"{vol}/replace", replace),
        web.post(f"{vol}/import-from-url", import_from_url),
        web.post(f"{vol}/snapshot", snapshot),
        web.post(f"{vol}/bulk-write", bulk_write),
        web.post(f"{vol}/bulk-read", bulk_read),
        web.post(f"{vol}/scrub", scrub),
        web.post(f"{vol}/validate", validate),
        web.get(f"{BASE}/job/{{id}}/is-finished", is_finished),
        web.get(f"{BASE}/job/{{id}}/ok", ok),
    ]
    routes = [web.route(r.method, r.path, answers(r.handler)) for r in routes]
    return json_app(routes, OPENAPI, MAX_BODY)


# ---- Crucible's VolumeInfo: the volume as a tree, an upstairs at each region ----------


def volume_info(volume: Volume, request: v.Vcr) -> dict[str, Any]:
    """Crucible's VolumeInfo of a volume built from `request`: a `volume`
    node of its sub-volumes' upstairs and its read-only parent (null once
    the scrub has copied it in and dropped it)."""
    parent = request.read_only_parent if isinstance(request, v.VolumeVcr) else request
    return {
        "volume": {
            "sub_volumes": [upstairs_info(s) for s in volume.subs if isinstance(s, Upstairs)],
            "read_only_parent": None
            if volume.parent is None
            else source_info(volume.parent, parent),
        }
    }


def source_info(source: Source, request: v.Vcr | None) -> dict[str, Any]:
    """A parent: a region is its upstairs (as Crucible reports it), a volume
    its own tree. A file or URL has no upstairs: an empty volume node (where
    Crucible's own query fails)."""
    device = source.device if isinstance(source, DeviceSource) else None
    if not isinstance(device, Volume) or request is None:
        return {"volume": {"sub_volumes": [], "read_only_parent": None}}
    if isinstance(request, v.RegionVcr) and isinstance(device.subs[0], Upstairs):
        return upstairs_info(device.subs[0])
    return volume_info(device, request)


# Crucible's names for a downstairs on its way to IO (DownstairsInfoNegotiationStatus).
_CONNECTING = {
    Stage.IDLE: "wait_connect",  # not wanted (deactivated): it would connect as new
    Stage.CONNECT: "wait_connect",
    **dict.fromkeys(NEGOTIATING, "negotiating"),
    Stage.WAIT_QUORUM: "wait_quorum",
    Stage.RECONCILE: "reconcile",
    Stage.REPAIR_READY: "live_repair_ready",
}
_TAKES_IO = {Stage.ACTIVE: "active", Stage.LIVE_REPAIR: "live_repair", Stage.DISABLED: "stopping"}


def upstairs_info(up: Upstairs) -> dict[str, Any]:
    """One region's upstairs as Crucible's VolumeInfo::Upstairs: its state,
    identity and generation, and each downstairs' state (DownstairsInfo)."""
    info = up.info()
    core = up.core
    targets = []
    for c in core.clients:
        stage = c.state.stage
        if stage in _TAKES_IO:
            state: dict[str, Any] = {"type": _TAKES_IO[stage]}
        else:
            state = {"type": "connecting", "state": _CONNECTING[stage], "mode": c.mode.value}
        targets.append(
            {
                "region_id": None if c.region_uuid is None else str(c.region_uuid),
                "target_addr": format_host_port(c.target),
                "repair_addr": None if c.repair_addr is None else format_host_port(c.repair_addr),
                "state": state,
            }
        )
    return {
        "upstairs": {
            "state": info.state.replace("-", "_"),
            "block_size": info.block_size,
            "upstairs_id": info.upstairs_id,
            "session_id": info.session_id,
            "generation": info.generation,
            "read_only": core.opts.read_only,
            "encrypted": core.opts.cipher is not None,
            "reconcile_in_progress": any(c.state.stage is Stage.RECONCILE for c in core.clients),
            "live_repair_in_progress": info.live_repair is not None,
            "targets": targets,
        }
    }


_S = {"type": "string"}
_N = {"type": "integer", "minimum": 0}
_VCR = {"type": "object", "description": "a VolumeConstructionRequest"}
_DIGEST = object_schema(sha256=_S)
_JOB = object_schema(job_id=_S)
_BOOL = {"type": "boolean"}
_UUID = {"type": "string", "format": "uuid"}


def _optional(schema: dict[str, Any], *names: str) -> dict[str, Any]:
    """An object schema whose properties `names` may be absent or null."""

    def nullable(p: dict[str, Any]) -> dict[str, Any]:
        return {"nullable": True, "allOf": [p]} if "$ref" in p else {**p, "nullable": True}

    props = {k: nullable(p) if k in names else p for k, p in schema["properties"].items()}
    required = [k for k in schema["required"] if k not in names]
    return {**schema, "required": required, "properties": props}


def _one_key(key: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A variant of an enum as serde writes it: {key: its fields}."""
    return {**object_schema(**{key: schema}), "additionalProperties": False}


def _tagged(tag: str, **fields: dict[str, Any]) -> dict[str, Any]:
    """A variant of an enum tagged by "type"."""
    return object_schema(type={"type": "string", "enum": [tag]}, **fields)


# Crucible's VolumeStatus and VolumeInfo (crucible-client-types), field for field.
_VOLUME_SCHEMAS: dict[str, Any] = {
    "VolumeStatus": object_schema(
        active=_BOOL, info=schema_ref("VolumeInfo"), num_job_handles=_N, seen_active=_BOOL),
    "VolumeInfo": {
        "description": "the volume as a tree: its sub-volumes' upstairs and its read-only parent",
        "oneOf": [
            _one_key("volume", _optional(object_schema(
                read_only_parent=schema_ref("VolumeInfo"),
                sub_volumes={"type": "array", "items": schema_ref("VolumeInfo")},
            ), "read_only_parent")),
            _one_key("upstairs", _optional(object_schema(
                block_size=_N, encrypted=_BOOL, generation=_N, live_repair_in_progress=_BOOL,
                read_only=_BOOL, reconcile_in_progress=_BOOL, session_id=_UUID,
                state=schema_ref("UpstairsInfoStatus"),
                targets={"type": "array", "items": schema_ref("DownstairsInfo")},
                upstairs_id=_UUID,
            ), "block_size")),
        ],
    },
    "DownstairsInfo": _optional(object_schema(
        region_id=_UUID, repair_addr=_S, state=schema_ref("DownstairsInfoStatus"),
        target_addr=_S,
    ), "region_id", "repair_addr", "target_addr"),
    "DownstairsInfoStatus": {"oneOf": [
        _tagged("connecting", mode=schema_ref("DownstairsInfoConnectionMode"),
                state=schema_ref("DownstairsInfoNegotiationStatus")),
        _tagged("active"), _tagged("live_repair"), _tagged("stopping"),
    ]},
    "DownstairsInfoNegotiationStatus": {"type": "string", "enum": [
        "wait_connect", "negotiating", "wait_quorum", "reconcile", "live_repair_ready"]},
    "DownstairsInfoConnectionMode": {
        "type": "string", "enum": ["new", "offline", "faulted", "replaced"]},
    "UpstairsInfoStatus": {"type": "string", "enum": [
        "initializing", "go_active", "active", "deactivating", "disabled"]},
}  # fmt: skip

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "Crucible Pantry", "version": "0.0.1"},
    "paths": {
        BASE: {"get": operation(
            "Attached volumes and job handles", "pantry_status",
            reply=object_schema(volumes={"type": "array", "items": _S}, num_job_handles=_N))},
        f"{BASE}/volume/{{id}}": {
            "get": operation("An attached volume's status", "volume_status",
                             reply=schema_ref("VolumeStatus")),
            "post": operation("Attach and activate a volume", "attach",
                        object_schema(volume_construction_request=_VCR)),
            "delete": operation("Deactivate and detach a volume", "detach"),
        },
        f"{BASE}/volume/{{id}}/background": {"post": operation(
            "Attach and activate as a job", "attach_activate_background",
            object_schema(volume_construction_request=_VCR, job_id=_S))},
        f"{BASE}/volume/{{id}}/replace": {"post": operation(
            "Replace one target", "replace", object_schema(volume_construction_request=_VCR))},
        f"{BASE}/volume/{{id}}/import-from-url": {"post": operation(
            "Fill from a raw image over HTTP(S), as a job", "import_from_url",
            {**object_schema(url=_S), "properties": {"url": _S, "expected_digest": _DIGEST}},
            _JOB)},
        f"{BASE}/volume/{{id}}/snapshot": {"post": operation(
            "Snapshot on every downstairs", "snapshot", object_schema(snapshot_id=_S))},
        f"{BASE}/volume/{{id}}/bulk-write": {"post": operation(
            f"Write at most {CHUNK} bytes", "bulk_write",
            object_schema(offset=_N, base64_encoded_data=_S))},
        f"{BASE}/volume/{{id}}/bulk-read": {"post": operation(
            f"Read at most {CHUNK} bytes", "bulk_read", object_schema(offset=_N, size=_N),
            object_schema(base64_encoded_data=_S))},
        f"{BASE}/volume/{{id}}/scrub": {"post": operation(
            "Copy the read-only parent in, as a job", "scrub", reply=_JOB)},
        f"{BASE}/volume/{{id}}/validate": {"post": operation(
            "Check the volume's SHA-256, as a job", "validate",
            {**object_schema(expected_digest=_DIGEST),
             "properties": {"expected_digest": _DIGEST, "size_to_validate": _N}}, _JOB)},
        f"{BASE}/job/{{id}}/is-finished": {"get": operation(
            "Whether a job is done", "is_job_finished",
            reply=object_schema(job_is_finished={"type": "boolean"}))},
        f"{BASE}/job/{{id}}/ok": {"get": operation(
            "Wait for a job: 200 if it succeeded, 500 if not", "job_result_ok",
            reply=object_schema(job_result_ok={"type": "boolean"}))},
    },
    "components": {"schemas": {"Error": ERROR_SCHEMA, **_VOLUME_SCHEMAS}},
}  # fmt: skip

_ID = {"name": "id", "in": "path", "required": True, "schema": _S}
for _path, _item in OPENAPI["paths"].items():
    if "{id}" in _path:
        _item["parameters"] = [_ID]
