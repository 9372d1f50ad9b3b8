"""Batched output and marked input for asyncio transports.

Every message a loop iteration produces for one connection goes out in one
writelines() at the end of that iteration, instead of one send() syscall per
message: under load dozens of small frames share a syscall.

A server receiving a large frame into a buffer of its own (a 1 MiB write)
says how much of it is still to come (ReceiveMark), and the kernel wakes it
once that much has arrived (SO_RCVLOWAT) instead of for each segment of it:
fewer wakeups of the receiver, each of which its sender pays for too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Final

from crucible.common.buffer import Buffer

log = logging.getLogger("crucible.netio")

# The most one wakeup waits for: even at 0.4 Mbit/s that much comes within a
# downstairs' idle timeout (45 s), which counts from the last receive.
MARK_MAX: Final = 2 << 20


class OutputBatcher:
    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport
        self._parts: list[Buffer] = []
        self._pending = 0  # bytes in _parts
        self._scheduled = False
        # Kept: asyncio.get_running_loop() makes a getpid() syscall each time.
        self._loop = asyncio.get_running_loop()

    def write(self, *parts: Buffer) -> None:
        self._parts.extend(parts)
        for p in parts:
            self._pending += len(p)  # (parts are byte buffers: len is bytes)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._parts and not self.transport.is_closing():
            self.transport.writelines(self._parts)
        self._parts = []
        self._pending = 0

    def backlog(self) -> int:
        """Bytes written and not yet sent, here or in the transport: wait for
        it to drain past a limit. (Work done in one callback can queue many
        replies before the next flush.)"""
        return self.transport.get_write_buffer_size() + self._pending


def tcp_socket(transport: asyncio.BaseTransport) -> socket.socket | None:
    """The transport's socket when it is a TCP one (IPv4 or IPv6)."""
    sock: socket.socket | None = transport.get_extra_info("socket")
    return sock if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) else None


def no_delay(transport: asyncio.BaseTransport) -> None:
    """Send small frames at once (TCP_NODELAY) on a TCP transport: replies
    and acks are batched per loop iteration already."""
    sock = tcp_socket(transport)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ReceiveMark:
    """The receive low-water mark of a plain TCP connection (none for TLS,
    whose records the socket counts, nor for other sockets).

    Set it, with `expect`, to no more than the peer has committed to send:
    the rest of a frame whose length has arrived, else 1. The owner sets it
    again after every receive: one may bring less than the mark was set
    for, or end the frame, and a mark left as it was would wait for bytes
    the peer has not committed to (asyncio's loop asks for a buffer once per
    wakeup, and uvloop's stops asking after 32 receives in a row).

    It sets the mark through a socket of its own on the connection (a
    duplicate descriptor): uvloop's transport socket builds a Python socket
    for every setsockopt, which cost a downstairs 4% of a 1 MiB write. The
    owner closes it when the connection is lost; until then the kernel
    holds the connection open."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None  # none until attached
        self._mark = 1

    def attach(self, transport: asyncio.BaseTransport) -> None:
        plain = transport.get_extra_info("ssl_object") is None
        sock = tcp_socket(transport) if plain else None
        if sock is not None:
            try:
                self._sock = socket.fromfd(sock.fileno(), sock.family, sock.type)
            except OSError as e:  # out of descriptors: serve it unmarked
                log.debug("no receive mark: %s", e)

    def close(self) -> None:
        """The connection is lost: let go of its socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def expect(self, n: int) -> None:
        """Wake the reader once n more bytes are there (1: at any byte)."""
        n = min(max(n, 1), MARK_MAX)
        if self._sock is None or n == self._mark:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
        except OSError as e:  # closing, or a kernel without it: wake at every byte
            log.debug("SO_RCVLOWAT not set: %s", e)
            self.close()
            return
        self._mark = n
