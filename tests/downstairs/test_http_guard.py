"""The repair server's guard, over real sockets: a client that sends no
request head in time is closed, one past the connection cap is refused, and
requests that arrive whole are served as before."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web

from crucible.downstairs.http_guard import GuardedFactory


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def _serve(guard_args: dict[str, float]) -> tuple[web.AppRunner, asyncio.Server, int]:
    app = web.Application()
    app.add_routes([web.get("/", hello)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    factory = GuardedFactory(runner.server, **guard_args)  # type: ignore[arg-type]
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return runner, server, port


async def _get(port: int, head: list[bytes]) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    for part in head:  # a head split across writes is still one head
        w.write(part)
        await w.drain()
    data = await r.read()
    w.close()
    return data


def test_silent_client_is_closed_and_whole_requests_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        runner, server, port = await _serve({"head_timeout": 0.2})
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(r.read(), 60) == b""  # closed by the server
            w.close()
            head = [b"GET / HTTP/1.1\r\nHost: x\r", b"\nConnection: close\r\n", b"\r\n"]
            reply = await asyncio.wait_for(_get(port, head), 60)
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"hello")
        finally:
            server.close()
            await runner.cleanup()

    with caplog.at_level(logging.WARNING, "crucible.downstairs.repair"):
        asyncio.run(main())
    assert "sent no request in 0.2 s" in caplog.text


def test_connections_past_the_cap_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        runner, server, port = await _serve({"max_connections": 3})
        try:
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            r, w = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(r.read(), 60) == b""  # refused
            w.close()
            for _, hw in held:
                hw.close()
                await hw.wait_closed()
            # The slots come back once the held connections are gone.
            head = [b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"]
            for _ in range(600):
                reply = await _get(port, head)
                if reply:
                    break
                await asyncio.sleep(0.01)
            assert reply.endswith(b"hello"), reply
        finally:
            server.close()
            await runner.cleanup()

    with caplog.at_level(logging.WARNING, "crucible.downstairs.repair"):
        asyncio.run(main())
    assert "refused" in caplog.text and "3 connections open" in caplog.text
