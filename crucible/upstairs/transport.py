"""The asyncio side of one downstairs: its TCP connection, which turns bytes
into messages for the upstairs' loop, and the probe of its repair server."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import cast

import aiohttp

from crucible.netio import OutputBatcher
from crucible.protocol import messages as m
from crucible.protocol.capabilities import CAPABILITIES_PATH, NONE, Capabilities
from crucible.protocol.framing import FrameDecoder
from crucible.protocol.wire import ProtocolError, SocketAddr

PROBE_TIMEOUT = 5.0


class Connection(asyncio.BufferedProtocol):
    """Frames are received in place; each decoded message goes to `on_message`
    while the connection is the current one (`current()`), a bad frame to
    `on_bad_frame`, the end of the connection to `on_lost`."""

    def __init__(
        self,
        current: Callable[[Connection], bool],
        on_message: Callable[[m.Message], None],
        on_bad_frame: Callable[[str], None],
        on_lost: Callable[[Connection], None],
    ) -> None:
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.out: OutputBatcher | None = None
        self._current = current
        self._on_message = on_message
        self._on_bad_frame = on_bad_frame
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.out = OutputBatcher(self.transport)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()  # frames are received in place

    def buffer_updated(self, nbytes: int) -> None:
        self.decoder.advance(nbytes)
        try:
            while (msg := self.decoder.next_message()) is not None:
                if not self._current(self):
                    return
                self._on_message(msg)
        except ProtocolError as e:
            self._on_bad_frame(str(e))

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def fetch_capabilities(addr: SocketAddr) -> Capabilities:
    """What the downstairs whose repair server is at `addr` supports; none
    when it does not say (a Rust downstairs answers 404), or cannot be asked."""
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    url = f"http://{host}:{addr[1]}{CAPABILITIES_PATH}"
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url) as resp,
        ):
            if resp.status != 200:
                return NONE
            return Capabilities.from_json(json.loads(await resp.content.read(1 << 12)))
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return NONE
