"""Asking a downstairs' repair server over HTTP: what it supports, and which
blocks hold data.

Not compiled with mypyc (scripts/compile), unlike the rest of the upstairs'
IO path: a compiled coroutine cancelled while it awaits aiohttp makes
asyncio's task step fail with "TypeError: invalid exception object", and the
task then never ends (a loop that waits for it at shutdown hangs).
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import aiohttp

from crucible.common.address import http_url
from crucible.protocol.capabilities import ALLOCATION_PATH, CAPABILITIES_PATH, NONE, Capabilities
from crucible.protocol.wire import SocketAddr

PROBE_TIMEOUT = 5.0
ALLOCATION_TIMEOUT = 60.0
MAX_ALLOCATION_BYTES = 256 << 20  # a map of runs, at worst one per other block


async def fetch_allocation(
    addr: SocketAddr, total_blocks: int, tls: ssl.SSLContext | None = None
) -> list[tuple[int, int]] | None:
    """Which blocks hold data, from the repair server at `addr`: sorted,
    disjoint runs within the volume; None when it cannot say or says
    something malformed."""
    timeout = aiohttp.ClientTimeout(total=ALLOCATION_TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(http_url(addr, ALLOCATION_PATH, tls is not None), ssl=tls or True) as resp,
        ):
            if resp.status != 200:
                return None
            body = await resp.content.read(MAX_ALLOCATION_BYTES + 1)
            if len(body) > MAX_ALLOCATION_BYTES:
                return None
            obj = json.loads(body)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None
    return valid_runs(obj, total_blocks)


def valid_runs(obj: Any, total_blocks: int) -> list[tuple[int, int]] | None:
    """The runs of an allocation answer, if they are sorted, disjoint and
    within the volume; else None."""
    runs = obj.get("runs") if isinstance(obj, dict) else None
    if not isinstance(runs, list):
        return None
    out: list[tuple[int, int]] = []
    end = 0
    for run in runs:
        if not (isinstance(run, list) and len(run) == 2 and all(type(v) is int for v in run)):
            return None
        start, count = run
        if start < end or count <= 0 or start + count > total_blocks:
            return None
        out.append((start, count))
        end = start + count
    return out


async def fetch_capabilities(addr: SocketAddr, tls: ssl.SSLContext | None = None) -> Capabilities:
    """What the downstairs whose repair server is at `addr` supports; none
    when it does not say (a Rust downstairs answers 404), or cannot be asked."""
    url = http_url(addr, CAPABILITIES_PATH, tls is not None)
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, ssl=tls or True) as resp,
        ):
            if resp.status != 200:
                return NONE
            return Capabilities.from_json(json.loads(await resp.content.read(1 << 12)))
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return NONE
