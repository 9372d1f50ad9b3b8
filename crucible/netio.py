"""Output batching for asyncio transports.

Every message a loop iteration produces for one connection goes out in one
writelines() at the end of that iteration, instead of one send() syscall per
message: under load dozens of small frames share a syscall.
"""

from __future__ import annotations

import asyncio

from crucible.common.buffer import Buffer


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
