"""The asyncio side of one downstairs: its TCP connection, which turns bytes
into messages for the upstairs' loop, and the probe of its repair server."""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

import crucible.protocol.messages as m
from crucible.netio import OutputBatcher, no_delay
from crucible.protocol.framing import FrameDecoder
from crucible.protocol.wire import ProtocolError


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
        no_delay(self.transport)

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
