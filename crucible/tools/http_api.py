"""What the HTTP JSON APIs of the tools share (the upstairs' control API,
dsc's): JSON everywhere, errors included, a small request body limit, and
the OpenAPI document at /openapi.json."""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from crucible.tls import TlsAccept

log = logging.getLogger("crucible.tools")

MAX_BODY = 1024  # every request body these APIs take is tiny (as Crucible's)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, code: str, message: str) -> web.Response:
    """An error as dropshot (Crucible's HTTP servers) words it."""
    return web.json_response({"error_code": code, "message": message}, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.content_type == "application/json":
            raise
        text = e.text or e.reason
        if text.startswith(f"{e.status}: "):  # aiohttp's own "404: Not Found"
            text = text.split(": ", 1)[1]
        return error(e.status, e.reason.replace(" ", ""), text.strip())


def json_app(
    routes: list[web.RouteDef], openapi: dict[str, Any], max_body: int = MAX_BODY
) -> web.Application:
    async def document(request: web.Request) -> web.Response:
        return web.json_response(openapi)

    app = web.Application(client_max_size=max_body, middlewares=[_json_errors])
    app.add_routes([*routes, web.get("/openapi.json", document)])
    return app


class Serving:
    """An API being served; cleanup() stops it."""

    def __init__(self, runner: web.AppRunner, server: asyncio.Server | None) -> None:
        self.runner = runner
        self.server = server

    async def cleanup(self) -> None:
        if self.server is not None:
            self.server.close()
        await self.runner.cleanup()


class ListenError(ValueError):
    """The address cannot be had (one line: which, and why)."""


async def start(
    app: web.Application, host: str, port: int, tls: ssl.SSLContext | None = None, what: str = ""
) -> Serving:
    """Serve `app` (over mutual TLS with a server context: a refused client
    is logged as `what`'s); ListenError when the address cannot be had."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server = None
    try:
        if tls is None:
            await web.TCPSite(runner, host, port).start()
        else:
            assert runner.server is not None  # set up above
            accept = TlsAccept(runner.server, tls, what, log)
            server = await asyncio.get_running_loop().create_server(accept, host, port)
    except OSError as e:
        await runner.cleanup()
        in_use = e.errno == errno.EADDRINUSE
        why = "is already in use" if in_use else f"cannot be had: {e.strerror or e}"
        raise ListenError(f"port {port} on {host} {why}") from None
    return Serving(runner, server)


def schema_ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: dict[str, Any], description: str = "successful operation") -> Any:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error_code", "message"],
    "properties": {"error_code": {"type": "string"}, "message": {"type": "string"}},
}


def operation(
    summary: str,
    op_id: str,
    body: dict[str, Any] | None = None,
    reply: dict[str, Any] | None = None,
    empty: bool = False,
) -> dict[str, Any]:
    """An OpenAPI operation: a JSON body in (when given), JSON out (204 and
    nothing when `empty`), errors as ERROR_SCHEMA."""
    ok = (
        {"204": {"description": "done"}}
        if empty
        else {"200": json_content(reply or {"type": "object"})}
    )
    out: dict[str, Any] = {
        "summary": summary,
        "operationId": op_id,
        "responses": {
            **ok,
            "4XX": json_content(schema_ref("Error"), "a bad request"),
            "5XX": json_content(schema_ref("Error"), "it failed"),
        },
    }
    if body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return out


def object_schema(**props: dict[str, Any]) -> dict[str, Any]:
    """A JSON object whose properties are all required."""
    return {"type": "object", "required": list(props), "properties": props}
