"""The repair HTTP server (port + 4000) that peers copy extents from, and its client.
It also tells an upstairs which extensions this downstairs takes (capabilities.py).

Paths take integers only; an extent id is range-checked and turned into a
path by layout.extent_path, so nothing a client sends names a file.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import urllib.error
import urllib.request
from typing import Any, BinaryIO

from aiohttp import web

from crucible.common.address import http_url
from crucible.common.buffer import is_zeros
from crucible.common.definition import RegionDefinition, RegionError
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.observe.probes import DS
from crucible.protocol.capabilities import (
    ALLOCATION_PATH,
    CAPABILITIES_PATH,
    NONE,
    OURS,
    Capabilities,
)
from crucible.protocol.wire import SocketAddr
from crucible.region.allocation import allocated_runs
from crucible.region.layout import extent_path, extent_relpath
from crucible.region.region import Region

REPAIR_PORT_OFFSET = 4000
TIMEOUT = 15.0


def make_app(region: Region, capabilities: Capabilities = OURS) -> web.Application:
    def extent_id(request: web.Request) -> int:
        eid = int(request.match_info["eid"])
        if eid >= region.definition.extent_count:
            raise web.HTTPBadRequest(text=f"extent {eid} does not exist\n")
        return eid

    async def files(request: web.Request) -> web.Response:
        path = extent_path(region.dir, extent_id(request))
        if not path.is_file() or path.is_symlink():
            raise web.HTTPBadRequest(text="EBADF: extent data file missing\n")
        return web.json_response([path.name])

    async def data(request: web.Request) -> web.StreamResponse:
        path = extent_path(region.dir, extent_id(request))
        if not path.is_file() or path.is_symlink():
            raise web.HTTPBadRequest(text="EBADF: extent data file missing\n")
        if DS.on:
            DS.fire("repair__served", extent_id(request), path.stat().st_size)
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    async def repair_ready(request: web.Request) -> web.Response:
        eid = extent_id(request)
        return web.json_response(region.read_only or region.is_closed(eid))

    async def closed(request: web.Request) -> web.Response:
        eid = extent_id(request)
        # A read-only region's extents never change: they may be copied as
        # they are (a clone copies a snapshot's).
        return web.json_response(0 if region.read_only else region.closed_since(eid))

    async def region_info(request: web.Request) -> web.Response:
        return web.json_response(region.definition.to_json())

    async def region_mode(request: web.Request) -> web.Response:
        return web.json_response(region.read_only)

    async def capabilities_of(request: web.Request) -> web.Response:
        return web.json_response(capabilities.to_json())

    async def allocation(request: web.Request) -> web.Response:
        runs = await asyncio.to_thread(allocated_runs, region.dir, region.definition)
        return web.json_response({"runs": runs})

    app = web.Application(client_max_size=1024)
    app.add_routes(
        [
            web.get(r"/extent/{eid:\d{1,10}}/files", files),
            web.get(r"/newextent/{eid:\d{1,10}}/data", data),
            web.get(r"/extent/{eid:\d{1,10}}/repair-ready", repair_ready),
            web.get(r"/extent/{eid:\d{1,10}}/closed", closed),
            web.get("/region-info", region_info),
            web.get("/region-mode", region_mode),
        ]
    )
    if capabilities != NONE:  # a plain V13 downstairs has no such pages
        app.add_routes([web.get(CAPABILITIES_PATH, capabilities_of)])
    if capabilities.allocation:
        app.add_routes([web.get(ALLOCATION_PATH, allocation)])
    return app


def get_json(addr: SocketAddr, path: str, tls: ssl.SSLContext | None, what: str) -> Any:
    """A JSON document from a repair server (over TLS with a client context);
    ValueError naming `what` when it cannot be had."""
    url = http_url(addr, path, tls is not None)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=tls) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ValueError(f"cannot ask {what} ({url}): {e}") from None


def ask_region(addr: SocketAddr, tls: ssl.SSLContext | None, what: str) -> RegionDefinition:
    """The region a repair server's downstairs serves; ValueError if it
    cannot be had or is not a region."""
    try:
        return RegionDefinition.from_json(get_json(addr, "/region-info", tls, what))
    except RegionError as e:
        raise ValueError(f"{what} answered something that is not a region: {e}") from None


def _open(addr: SocketAddr, path: str, tls: ssl.SSLContext | None) -> Any:
    url = http_url(addr, path, tls is not None)
    return urllib.request.urlopen(url, timeout=TIMEOUT, context=tls)


def _get(addr: SocketAddr, path: str, tls: ssl.SSLContext | None) -> bytes:
    try:
        with _open(addr, path, tls) as r:
            body: bytes = r.read()
            return body
    except (urllib.error.URLError, OSError) as e:
        raise CrucibleError(ErrorKind.RepairRequestError, f"GET {path}: {e}") from None


SPARSE_PIECE = 64 << 10


def copy_sparse(src: BinaryIO, out: BinaryIO) -> None:
    """Copy a stream, leaving holes where it holds zeros: a copied extent
    keeps its never-written blocks as holes (what block status reports)."""
    size = 0
    while chunk := src.read(1 << 20):
        view = memoryview(chunk)
        for off in range(0, len(view), SPARSE_PIECE):
            piece = view[off : off + SPARSE_PIECE]
            if is_zeros(piece):
                out.seek(len(piece), os.SEEK_CUR)
            else:
                out.write(piece)
        size += len(chunk)
    out.truncate(size)


def fetch_extent(
    addr: SocketAddr, eid: int, out: BinaryIO, tls: ssl.SSLContext | None = None
) -> None:
    """Copy one extent file from a peer's repair server (blocking; over TLS
    with a client context). The source must keep the extent closed for the
    whole copy: a copy that overlapped a reopen (new writes mid-file, new
    metadata at the end) is refused."""
    names = json.loads(_get(addr, f"/extent/{eid}/files", tls))
    expected = extent_relpath(eid).name
    if names != [expected]:
        raise CrucibleError(ErrorKind.RepairFilesInvalid, f"source lists {names!r}")
    before = json.loads(_get(addr, f"/extent/{eid}/closed", tls))
    if before is None:
        raise CrucibleError(ErrorKind.RepairRequestError, f"source extent {eid} is not closed")
    try:
        with _open(addr, f"/newextent/{eid}/data", tls) as r:
            copy_sparse(r, out)
    except (urllib.error.URLError, OSError) as e:
        raise CrucibleError(ErrorKind.RepairStreamError, f"extent {eid}: {e}") from None
    if json.loads(_get(addr, f"/extent/{eid}/closed", tls)) != before:
        raise CrucibleError(
            ErrorKind.RepairRequestError, f"source extent {eid} was reopened during the copy"
        )
