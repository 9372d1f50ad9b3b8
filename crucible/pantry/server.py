"""The pantry's HTTP API, Crucible's paths and bodies (`/crucible/pantry/0/...`),
errors as dropshot words them, and its OpenAPI document at /openapi.json."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from crucible.common.errors import CrucibleError
from crucible.pantry.service import CHUNK, Pantry, PantryError, crucible_error, decode_data
from crucible.tools.http_api import (
    ERROR_SCHEMA,
    error,
    json_app,
    object_schema,
    operation,
)

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
        info = [
            {"upstairs_id": str(up.session_ids()[0]), "state": up.info().state,
             "downstairs": [d.state for d in up.info().downstairs]}
            for up, _ in a.parts.regions
        ]  # fmt: skip
        return web.json_response(
            {
                "active": a.active,
                "seen_active": a.seen_active,
                "num_job_handles": len([j for j in a.jobs if j in p.jobs]),
                "info": {"volumes": info},
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


_S = {"type": "string"}
_N = {"type": "integer", "minimum": 0}
_VCR = {"type": "object", "description": "a VolumeConstructionRequest"}
_DIGEST = object_schema(sha256=_S)
_JOB = object_schema(job_id=_S)

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "Crucible Pantry", "version": "0.0.1"},
    "paths": {
        BASE: {"get": operation(
            "Attached volumes and job handles", "pantry_status",
            reply=object_schema(volumes={"type": "array", "items": _S}, num_job_handles=_N))},
        f"{BASE}/volume/{{id}}": {
            "get": operation("An attached volume", "volume_status"),
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
    "components": {"schemas": {"Error": ERROR_SCHEMA}},
}  # fmt: skip

_ID = {"name": "id", "in": "path", "required": True, "schema": _S}
for _path, _item in OPENAPI["paths"].items():
    if "{id}" in _path:
        _item["parameters"] = [_ID]
