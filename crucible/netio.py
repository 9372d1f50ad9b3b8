"""Output batching for asyncio transports.

Every message a loop iteration produces for one connection goes out in one
writelines() at the end of that iteration, instead of one send() syscall per
message: under load dozens of small frames share a syscall.
"""

from __future__ import annotations

import asyncio

Buffer = bytes | bytearray | memoryview


class OutputBatcher:
    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport
        self._parts: list[Buffer] = []
        self._scheduled = False

    def write(self, *parts: Buffer) -> None:
        self._parts.extend(parts)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._parts and not self.transport.is_closing():
            self.transport.writelines(self._parts)
        self._parts = []

    def backlog(self) -> int:
        """Bytes queued in the transport: wait for it to drain past a limit."""
        return self.transport.get_write_buffer_size()
