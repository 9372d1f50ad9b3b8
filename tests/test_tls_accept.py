"""TlsAccept on the stdlib loop and on uvloop: a peer with a certificate the
root signed gets through with every byte it sent, others are refused and
logged with the reason."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from crucible.tls import TlsAccept, TlsFiles
from crucible.tools.certs import load_or_make_ca, make_host


def files(base: Path, name: str) -> TlsFiles:
    ca, key, _ = load_or_make_ca(base / name, 1)
    d = make_host(base / name, "127.0.0.1", ca, key, 1)
    return TlsFiles(d / "cert.pem", d / "key.pem", d / "root.pem")


class Echo(asyncio.BufferedProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = bytearray(1 << 16)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.transport.write(bytes(self.buf[:nbytes]))  # type: ignore[attr-defined]


async def exchange(port: int, ctx: ssl.SSLContext | None, data: bytes) -> bytes:
    r, w = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1" if ctx else None
    )
    w.write(data)
    await w.drain()
    got = b""
    try:
        while len(got) < len(data) and (chunk := await asyncio.wait_for(r.read(1 << 16), 10)):
            got += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    w.close()
    return got


RUNNERS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


@pytest.mark.parametrize("loop", list(RUNNERS))
def test_tls_accept(tmp_path: Path, loop: str, caplog: pytest.LogCaptureFixture) -> None:
    ours, other = files(tmp_path, "ca"), files(tmp_path, "other")
    log = logging.getLogger("test.tls")
    stranger = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    stranger.load_verify_locations(ours.root)  # trusts the server, has no certificate
    mixed = TlsFiles(other.cert, other.key, ours.root).client_context()

    async def main() -> None:
        accept = TlsAccept(Echo, ours.server_context(), "test server", log)
        server = await asyncio.get_running_loop().create_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        big = bytes(range(256)) * 300  # more than one TLS record, sent at once
        assert await exchange(port, ours.client_context(), big) == big
        assert await exchange(port, None, b"plain text\n" * 10) == b""
        assert await exchange(port, stranger, b"hello") == b""
        assert await exchange(port, mixed, b"hello") == b""
        server.close()
        assert accept.refused == 3

    with caplog.at_level(logging.WARNING, logger="test.tls"):
        RUNNERS[loop](main())
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3, said
    assert "not TLS" in said[0]
    assert "no client certificate" in said[1]
    assert "certificate refused" in said[2]


@pytest.mark.parametrize("loop", list(RUNNERS))
def test_a_silent_close_is_not_a_refusal(
    tmp_path: Path, loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that connects and closes without a byte (a port check) while
    the handshake waits for it is said at info level, and not counted."""
    ours = files(tmp_path, "ca")
    log = logging.getLogger("test.tls.silent")

    async def main() -> None:
        accept = TlsAccept(Echo, ours.server_context(), "test server", log)
        started = asyncio.Event()
        start = accept.start

        def start_and_tell(transport: asyncio.BaseTransport, waiter: Any) -> None:
            start(transport, waiter)
            started.set()

        accept.start = start_and_tell  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        server = await loop.create_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(started.wait(), 30)  # the handshake is waiting for us
        w.close()
        for _ in range(600):  # bounded: 30 s of polls until the server has said something
            if caplog.records:
                break
            await asyncio.sleep(0.05)
        assert await exchange(port, ours.client_context(), b"after") == b"after"
        server.close()
        assert accept.refused == 0

    with caplog.at_level(logging.INFO, logger="test.tls.silent"):
        RUNNERS[loop](main())
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(said) == 1, said
    assert said[0][0] == logging.INFO and "closed the connection before the TLS" in said[0][1]
