"""The asyncio side of one downstairs: its TCP connection, which turns bytes
into messages for the upstairs' loop, and the probe of its repair server."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from typing import Any, Protocol, cast

import aiohttp

from crucible.common.address import http_url
from crucible.netio import OutputBatcher
from crucible.protocol import messages as m
from crucible.protocol.capabilities import ALLOCATION_PATH, CAPABILITIES_PATH, NONE, Capabilities
from crucible.protocol.framing import FrameDecoder
from crucible.protocol.wire import ProtocolError, SocketAddr

PROBE_TIMEOUT = 5.0
ALLOCATION_TIMEOUT = 60.0
MAX_ALLOCATION_BYTES = 256 << 20  # a map of runs, at worst one per other block


class Sink(Protocol):
    """Where a connection's events go."""

    def received(self, conn: Connection, msg: m.Message) -> bool:
        """Take a message; False once this connection is no longer wanted."""

    def bad_frame(self, conn: Connection, why: str, first: bytes | None) -> None:
        """`first`: what the peer sent, if it never sent a valid message."""

    def lost(self, conn: Connection) -> None: ...


class Connection(asyncio.BufferedProtocol):
    """One downstairs connection of an upstairs (`cid`: the client). Frames
    are received in place; each decoded message goes to the sink."""

    def __init__(self, cid: int, sink: Sink) -> None:
        self.cid = cid
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.out: OutputBatcher | None = None
        self._sink = sink
        # What arrives before the owner has registered the connection waits.
        self._attached = False
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.out = OutputBatcher(self.transport)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()  # frames are received in place

    def attach(self) -> None:
        """The owner is ready: hand over what arrived meanwhile, then the rest."""
        self._attached = True
        self._deliver()
        if self._lost:
            self._sink.lost(self)

    def buffer_updated(self, nbytes: int) -> None:
        self.decoder.advance(nbytes)
        if self._attached:
            self._deliver()

    def _deliver(self) -> None:
        sink = self._sink
        try:
            while (msg := self.decoder.next_message()) is not None:
                if not sink.received(self, msg):
                    return
        except ProtocolError as e:
            sink.bad_frame(
                self, str(e), None if self.decoder.greeted else self.decoder.first_bytes()
            )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._attached:
            self._sink.lost(self)
        else:
            self._lost = True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


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
