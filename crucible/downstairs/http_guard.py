"""Limits for the repair HTTP server that aiohttp does not set: how many
connections at once, and how long a client may take to send a request's
head. Without them, clients that open connections and never finish a
request hold file descriptors until the process runs out, and then every
new connection, an upstairs' too, is dropped.

The guard wraps aiohttp's protocol (not the transport, so file responses
still go out with sendfile); after a request's head, aiohttp's own limits
apply (a small body cap, the keep-alive timeout).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("crucible.downstairs.repair")

HEAD_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
END_OF_HEAD = b"\r\n\r\n"


class GuardedFactory:
    """A protocol factory for loop.create_server around `inner`'s."""

    def __init__(
        self,
        inner: Callable[[], asyncio.BaseProtocol],
        max_connections: int = MAX_CONNECTIONS,
        head_timeout: float = HEAD_TIMEOUT,
    ) -> None:
        self.inner = inner
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.open = 0
        self.refused = 0

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self)


class _Guarded(asyncio.Protocol):
    def __init__(self, guard: GuardedFactory) -> None:
        self.guard = guard
        self.inner: asyncio.Protocol | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""  # the last bytes seen, to find the end of a head split across reads
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        g = self.guard
        if g.open >= g.max_connections:
            g.refused += 1
            if g.refused == 1 or g.refused % 100 == 0:  # said, but not once per attempt
                peer = transport.get_extra_info("peername")
                log.warning(
                    "repair server: refused %s: %d connections open (%d refused so far)",
                    peer,
                    g.open,
                    g.refused,
                )
            transport.close()
            return
        g.open += 1
        self.transport = transport
        inner = g.inner()
        assert isinstance(inner, asyncio.Protocol)
        self.inner = inner
        inner.connection_made(transport)
        self.timer = asyncio.get_running_loop().call_later(g.head_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self.timer = None
        if self.transport is not None:
            peer = self.transport.get_extra_info("peername")
            log.warning(
                "repair server: %s sent no request in %g s; closing", peer, self.guard.head_timeout
            )
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            seen = self.tail + data
            if END_OF_HEAD in seen:
                self.timer.cancel()
                self.timer = None
            self.tail = seen[-3:]
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.inner is not None:
            self.guard.open -= 1
            self.inner.connection_lost(exc)
            self.inner = None
