"""The upstairs' HTTP control API (`--control ADDR:PORT` on crucible-nbd,
crutest and crucible): Crucible's `GET /info` and `GET /work`, with our own
fields after Crucible's, and `/openapi.json`."""

from __future__ import annotations

import dataclasses
import logging
import ssl
from typing import Any

from aiohttp import web

from crucible.common.errors import CrucibleError
from crucible.region.snapshot import check_name
from crucible.tools.http_api import (
    ERROR_SCHEMA,
    ListenError,
    Serving,
    error,
    json_app,
    json_content,
    schema_ref,
    start,
)
from crucible.upstairs import report
from crucible.upstairs.guest import Upstairs
from crucible.volume.volume import Volume

log = logging.getLogger("crucible.control")


def make_app(up: Upstairs, volume: Volume | None = None) -> web.Application:
    """The control API of `up`; with `volume` (the one `up` is the first
    region of), also what the volume as a whole does, and snapshots of all of it."""

    async def info(request: web.Request) -> web.Response:
        return web.json_response(report.info(up.info()))

    async def work(request: web.Request) -> web.Response:
        return web.json_response(up.work())

    async def snapshot(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "BadRequest", 'the body must be JSON: {"name": ...}')
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return error(400, "BadRequest", 'the body must be {"name": "SNAPSHOT"}')
        name = body["name"]
        try:
            check_name(name)
        except CrucibleError as e:
            return error(400, "BadRequest", e.detail or str(e))
        try:
            # Every downstairs of every region records it, or the flush fails.
            await (volume or up).flush(snapshot=name)
        except CrucibleError as e:
            return error(503, "SnapshotFailed", e.detail or str(e))
        return web.json_response({"name": name})

    async def volume_status(request: web.Request) -> web.Response:
        if volume is None:
            return error(404, "NotFound", "this upstairs serves no volume of several parts")
        s = volume.scrub_status()
        scrub = None if volume.parent_blocks == 0 else dataclasses.asdict(s)
        body = {
            "block_size": volume.block_size,
            "total_blocks": volume.total_blocks,
            "sub_volumes": len(volume.subs),
            "scrub": scrub,
        }
        return web.json_response(body)

    routes = [web.get("/info", info), web.get("/work", work), web.post("/snapshot", snapshot)]
    return json_app([*routes, web.get("/volume", volume_status)], OPENAPI)


async def serve(
    up: Upstairs,
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
    volume: Volume | None = None,
) -> Serving | None:
    """Start the control API (over mutual TLS with a server context); a
    busy port is said once and the volume runs without it."""
    try:
        runner = await start(make_app(up, volume), host, port, tls, "control API")
    except ListenError as e:
        log.warning("--control: %s; running without it", e)
        return None
    scheme = "https" if tls else "http"
    log.info("control API at %s://%s:%d/ (OpenAPI document at /openapi.json)", scheme, host, port)
    return runner


_INT = {"type": "integer", "format": "uint64", "minimum": 0}
_INT3 = {"type": "array", "items": _INT, "minItems": 3, "maxItems": 3}
_STR = {"type": "string"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "Crucible Control",
        "version": "0.0.1",
        "description": "An upstairs' state: Crucible's fields first, then this "
        "implementation's own (which Crucible's tools ignore).",
    },
    "paths": {
        "/info": {
            "get": {
                "summary": "The upstairs and its three downstairs",
                "operationId": "upstairs_fill_info",
                "responses": {"200": json_content(schema_ref("UpstairsStats"))},
            }
        },
        "/work": {
            "get": {
                "summary": "Jobs in flight and the last 8 retired",
                "operationId": "downstairs_work_queue",
                "responses": {"200": json_content(schema_ref("DownstairsWork"))},
            }
        },
        "/volume": {
            "get": {
                "summary": "The volume this upstairs is the first region of: its size, "
                "sub-volumes and the copy of its read-only parent",
                "operationId": "volume_status",
                "responses": {
                    "200": json_content(schema_ref("VolumeStatus")),
                    "404": json_content(schema_ref("Error"), "no volume of several parts"),
                },
            }
        },
        "/snapshot": {
            "post": {
                "summary": "A flush that every downstairs records as snapshot NAME",
                "operationId": "take_snapshot",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": _STR},
                            }
                        }
                    },
                },
                "responses": {
                    "200": json_content(
                        {"type": "object", "required": ["name"], "properties": {"name": _STR}},
                        "taken on all three downstairs",
                    ),
                    "400": json_content(schema_ref("Error"), "a bad request body or name"),
                    "503": json_content(schema_ref("Error"), "not taken on all three"),
                },
            }
        },
    },
    "components": {
        "schemas": {
            "Error": ERROR_SCHEMA,
            "VolumeStatus": {
                "type": "object",
                "required": ["block_size", "total_blocks", "sub_volumes", "scrub"],
                "properties": {
                    "block_size": _INT,
                    "total_blocks": _INT,
                    "sub_volumes": _INT,
                    "scrub": {
                        "type": "object",
                        "nullable": True,
                        "description": "null: the volume has no read-only parent",
                        "required": ["point", "total", "done", "error"],
                        "properties": {
                            "point": _INT,
                            "total": _INT,
                            "done": {"type": "boolean"},
                            "error": _STR,
                        },
                    },
                },
            },
            "DsState": {
                "type": "object",
                "description": "Crucible's DsState, adjacently tagged",
                "required": ["type"],
                "properties": {
                    "type": {
                        "type": "string",
                        "enum": ["active", "live_repair", "connecting", "stopping"],
                    },
                    "value": {"type": "object"},
                },
            },
            "Downstairs": {
                "type": "object",
                "required": ["target", "state", "mode", "jobs_in_flight", "bytes_in_flight"],
                "properties": {
                    "target": _STR,
                    "state": _STR,
                    "mode": {"type": "string", "enum": ["new", "offline", "faulted", "replaced"]},
                    "jobs_in_flight": _INT,
                    "bytes_in_flight": _INT,
                    "last_error": _STR,
                    "connections": _INT,
                    "trim": {"type": "boolean", "nullable": True},
                    "live_repairs": _INT,
                    "live_repairs_aborted": _INT,
                    "extents_repaired": _INT,
                    "extents_confirmed": _INT,
                },
            },
            "GuestCount": {
                "type": "object",
                "required": ["ops", "bytes"],
                "properties": {"ops": _INT, "bytes": _INT},
            },
            "UpstairsStats": {
                "type": "object",
                "required": [
                    "state",
                    "ds_state",
                    "up_jobs",
                    "ds_jobs",
                    "reconcile_done",
                    "reconcile_needed",
                    "extents_repaired",
                    "extents_confirmed",
                    "extent_limit",
                    "live_repair_completed",
                    "live_repair_aborted",
                ],
                "properties": {
                    "state": {
                        "type": "string",
                        "enum": ["initializing", "active", "deactivating"],
                    },
                    "ds_state": {
                        "type": "array",
                        "items": schema_ref("DsState"),
                        "minItems": 3,
                        "maxItems": 3,
                    },
                    "up_jobs": _INT,
                    "ds_jobs": _INT,
                    "reconcile_done": _INT,
                    "reconcile_needed": _INT,
                    "extents_repaired": _INT3,
                    "extents_confirmed": _INT3,
                    "extent_limit": {
                        "type": "array",
                        "items": {**_INT, "nullable": True},
                        "minItems": 3,
                        "maxItems": 3,
                    },
                    "live_repair_completed": _INT3,
                    "live_repair_aborted": _INT3,
                    "upstairs_state": _STR,
                    "upstairs_id": _STR,
                    "session_id": _STR,
                    "generation": _INT,
                    "downstairs": {"type": "array", "items": schema_ref("Downstairs")},
                    "guest": {
                        "type": "object",
                        "additionalProperties": schema_ref("GuestCount"),
                    },
                    "live_repair": {"type": "object", "nullable": True},
                    "verify": {"type": "object"},
                    "integrity_errors": _INT,
                    "reads_retried": _INT,
                    "blocks_rewritten": _INT,
                    "next_job_id": _INT,
                    "retired": _INT,
                },
            },
            "WorkSummary": {
                "type": "object",
                "required": [
                    "id",
                    "replay",
                    "job_type",
                    "num_blocks",
                    "deps",
                    "ack_status",
                    "state",
                ],
                "properties": {
                    "id": _INT,
                    "replay": {"type": "boolean"},
                    "job_type": {
                        "type": "string",
                        "enum": [
                            "Read",
                            "Write",
                            "WriteU",
                            "Flush",
                            "Barrier",
                            "FClose",
                            "Repair",
                            "Reopen",
                            "NoOp",
                            "Trim",
                        ],
                    },
                    "num_blocks": _INT,
                    "deps": {"type": "array", "items": _INT},
                    "ack_status": {"type": "string", "enum": ["not_acked", "ack_ready", "acked"]},
                    "state": {
                        "type": "array",
                        "items": {"type": "string", "enum": ["Sent", "Done", "Skip", " Err"]},
                        "minItems": 3,
                        "maxItems": 3,
                    },
                },
            },
            "DownstairsWork": {
                "type": "object",
                "required": ["jobs", "completed"],
                "properties": {
                    "jobs": {"type": "array", "items": schema_ref("WorkSummary")},
                    "completed": {"type": "array", "items": schema_ref("WorkSummary")},
                },
            },
        }
    },
}
