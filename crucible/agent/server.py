"""The agent's HTTP API: Crucible's paths and bodies under /crucible/0,
errors as dropshot words them, and its OpenAPI document at /openapi.json.

Crucible's agent wants an `api-version` header; this one takes requests
without it too (curl), and refuses one that names a version it does not
speak."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from crucible.agent.agent import Agent
from crucible.agent.model import AgentError, bad_request, parse_create
from crucible.tools.http_api import (
    ERROR_SCHEMA,
    error,
    json_app,
    object_schema,
    operation,
    schema_ref,
)

BASE = "/crucible/0"
API_VERSION = "1.0.0"
MAX_BODY = 10 << 10  # a CreateRegion with its three PEMs (Crucible's limit)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _version_ok(text: str) -> bool:
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return False
    return tuple(map(int, parts)) <= tuple(map(int, API_VERSION.split(".")))


def answers(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        version = request.headers.get("api-version")
        if version is not None and not _version_ok(version):
            why = f"api-version {version!r}: this agent speaks up to {API_VERSION}"
            return error(400, "BadRequest", why)
        try:
            return await handler(request)
        except AgentError as e:
            return error(e.status, e.code, e.message)

    return wrapped


def make_app(agent: Agent) -> web.Application:
    a = agent

    def rid(request: web.Request) -> str:
        return request.match_info["id"]

    async def list_regions(request: web.Request) -> web.Response:
        return web.json_response([a.region_json(r) for r in a.list_regions()])

    async def create(request: web.Request) -> web.Response:
        try:
            obj = await request.json()
        except ValueError:
            raise bad_request("the body must be JSON") from None
        return web.json_response(a.region_json(a.create_region(parse_create(obj))))

    async def get(request: web.Request) -> web.Response:
        return web.json_response(a.region_json(a.get_region(rid(request))))

    async def delete(request: web.Request) -> web.Response:
        a.delete_region(rid(request))
        return web.Response(status=204)

    async def snapshots(request: web.Request) -> web.Response:
        return web.json_response(a.snapshots(rid(request)))

    async def snapshot(request: web.Request) -> web.Response:
        return web.json_response(a.snapshot(rid(request), request.match_info["name"]))

    async def delete_snapshot(request: web.Request) -> web.Response:
        a.delete_snapshot(rid(request), request.match_info["name"])
        return web.Response(status=204)

    async def run_snapshot(request: web.Request) -> web.Response:
        return web.json_response(a.run_snapshot(rid(request), request.match_info["name"]).to_json())

    async def stop_snapshot(request: web.Request) -> web.Response:
        a.stop_snapshot(rid(request), request.match_info["name"])
        return web.Response(status=204)

    one = f"{BASE}/regions/{{id}}"
    snap = f"{one}/snapshots/{{name}}"
    routes = [
        web.get(f"{BASE}/regions", list_regions),
        web.post(f"{BASE}/regions", create),
        web.get(one, get),
        web.delete(one, delete),
        web.get(f"{one}/snapshots", snapshots),
        web.get(snap, snapshot),
        web.delete(snap, delete_snapshot),
        web.post(f"{snap}/run", run_snapshot),
        web.delete(f"{snap}/run", stop_snapshot),
    ]
    routes = [web.route(r.method, r.path, answers(r.handler)) for r in routes]
    return json_app(routes, OPENAPI, MAX_BODY)


# ---- the OpenAPI document ---------------------------------------------------------------

_S = {"type": "string"}
_NS = {"type": "string", "nullable": True}
_N = {"type": "integer", "minimum": 0}
_B = {"type": "boolean"}
_STATE = {"type": "string", "enum": ["requested", "created", "tombstoned", "destroyed", "failed"]}


def _with_optional(schema: dict[str, Any], **props: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "properties": {**schema["properties"], **props}}


_CREATE = _with_optional(
    object_schema(id=_S, block_size=_N, extent_size=_N, extent_count=_N, encrypted=_B),
    cert_pem=_NS, key_pem=_NS, root_pem=_NS, source=_NS,
)  # fmt: skip
_REGION = _with_optional(
    object_schema(id=_S, state=_STATE, block_size=_N, extent_size=_N, extent_count=_N,
                  encrypted=_B, port_number=_N),
    cert_pem=_NS, key_pem=_NS, root_pem=_NS, source=_NS, read_only=_B, address=_S, error=_NS,
)  # fmt: skip
_SNAPSHOT = object_schema(name=_S, created={"type": "string", "format": "date-time"})
_RUNNING = _with_optional(object_schema(id=_S, name=_S, port_number=_N, state=_STATE), error=_NS)

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "Crucible Agent", "version": API_VERSION},
    "paths": {
        f"{BASE}/regions": {
            "get": operation("Every region, destroyed ones too", "region_list",
                             reply={"type": "array", "items": schema_ref("Region")}),
            "post": operation("Create a region (idempotent on its id)", "region_create",
                              schema_ref("CreateRegion"), schema_ref("Region")),
        },
        f"{BASE}/regions/{{id}}": {
            "get": operation("One region", "region_get", reply=schema_ref("Region")),
            "delete": operation("Destroy a region (its snapshots first)", "region_delete",
                                empty=True),
        },
        f"{BASE}/regions/{{id}}/snapshots": {"get": operation(
            "A region's snapshots, and which are running", "region_get_snapshots",
            reply=object_schema(
                snapshots={"type": "array", "items": schema_ref("Snapshot")},
                running_snapshots={"type": "object",
                                   "additionalProperties": schema_ref("RunningSnapshot")},
            ))},
        f"{BASE}/regions/{{id}}/snapshots/{{name}}": {
            "get": operation("One snapshot", "region_get_snapshot", reply=schema_ref("Snapshot")),
            "delete": operation("Delete a snapshot (not while running)",
                                "region_delete_snapshot", empty=True),
        },
        f"{BASE}/regions/{{id}}/snapshots/{{name}}/run": {
            "post": operation("Serve a snapshot read-only", "region_run_snapshot",
                              reply=schema_ref("RunningSnapshot")),
            "delete": operation("Stop serving a snapshot", "region_delete_running_snapshot",
                                empty=True),
        },
    },
    "components": {"schemas": {
        "Error": ERROR_SCHEMA, "CreateRegion": _CREATE, "Region": _REGION,
        "Snapshot": _SNAPSHOT, "RunningSnapshot": _RUNNING,
    }},
}  # fmt: skip

_PARAMS = {
    "id": {"name": "id", "in": "path", "required": True, "schema": _S},
    "name": {"name": "name", "in": "path", "required": True, "schema": _S},
}
for _path, _item in OPENAPI["paths"].items():
    _item["parameters"] = [p for k, p in _PARAMS.items() if f"{{{k}}}" in _path]
