"""Mutual TLS for every port: the contexts, and a server side that says why
it refused a peer.

Both ends present a certificate and check the other's against the one root
(`--root-cert-pem`): a server takes only clients whose certificate that CA
signed, and a client checks that the server's certificate names the host it
dialled (an IP address or DNS name in its subjectAltName, as
crucible-certs makes them).

asyncio and uvloop drop a failed server handshake without a word, so a
server accepts plain TCP and upgrades it itself (`TlsAccept`): a refused
peer is then logged with the reason, and the inner protocol sees only
connections that passed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, cast

HANDSHAKE_TIMEOUT = 10.0  # a peer that connects and never finishes holds a descriptor
EARLY_LIMIT = 1 << 20  # application data taken before the handover


class TlsError(Exception):
    """Certificates or keys that cannot be loaded; says which and why."""


class TlsFiles(NamedTuple):
    cert: Path  # this end's certificate chain (PEM)
    key: Path  # its private key (PEM)
    root: Path  # the CA that signs every peer's certificate (PEM)

    def _context(self, purpose: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            why = f"cannot load the certificate {self.cert} and key {self.key}: {_why(e)}"
            raise TlsError(why) from None
        try:
            ctx.load_verify_locations(self.root)
        except (OSError, ssl.SSLError) as e:
            raise TlsError(f"cannot load the root certificate {self.root}: {_why(e)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def server_context(self) -> ssl.SSLContext:
        return self._context(ssl.PROTOCOL_TLS_SERVER)

    def client_context(self) -> ssl.SSLContext:
        ctx = self._context(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = True
        return ctx


def _why(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


def refusal(e: BaseException) -> str:
    """A failed handshake, in words."""
    if isinstance(e, TimeoutError):
        return "no TLS handshake in time"
    if isinstance(e, ssl.SSLError):
        reason = (e.reason or str(e)).lower().replace("_", " ")
        if e.reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_EOF_WHILE_READING"):
            return f"not TLS ({reason}): a peer without TLS?"
        if e.reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return f"no client certificate ({reason})"
        if e.reason == "CERTIFICATE_VERIFY_FAILED":
            detail = getattr(e, "verify_message", "") or reason
            return f"certificate refused: {detail} (signed by another CA?)"
        if "ALERT" in (e.reason or ""):
            return f"the peer refused this end's certificate ({reason})"
        return reason
    closed = f"the peer closed the connection during the handshake ({type(e).__name__})"
    return _why(e) or f"{closed}: did it refuse this end's certificate?"


class TlsAccept:
    """A protocol factory for loop.create_server: each connection does the
    TLS handshake first, then is handed to `inner`'s protocol; a refused one
    is logged (`what`: whose port) and closed."""

    def __init__(
        self,
        inner: Callable[[], asyncio.BaseProtocol],
        context: ssl.SSLContext,
        what: str,
        log: logging.Logger,
    ) -> None:
        self.inner = inner
        self.context = context
        self.what = what
        self.log = log
        self.refused = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self) -> asyncio.Protocol:
        return _Handshake(self)

    def start(self, transport: asyncio.BaseTransport, waiter: _Handshake) -> None:
        task = asyncio.get_running_loop().create_task(self._upgrade(transport, waiter))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _upgrade(self, transport: asyncio.BaseTransport, waiter: _Handshake) -> None:
        loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        handshake = asyncio.ensure_future(
            loop.start_tls(
                transport,  # type: ignore[arg-type]
                waiter,
                self.context,
                server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        )
        await asyncio.sleep(0)  # start_tls has put its protocol in place
        waiter.upgrading = True
        if waiter.raw:  # (uvloop reads before a pause in connection_made takes)
            raw = bytes(waiter.raw)
            loop.call_soon(feed, transport.get_protocol(), raw)  # after its connection_made
        try:
            tls = await handshake
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            if isinstance(e, ConnectionError) and not _why(e):
                # Closed without a word: a port check (a load balancer's, a
                # script's), or a client that went away. Not a refusal.
                self.log.info("%s: %s closed the connection before the TLS handshake ended",
                              self.what, name)  # fmt: skip
                transport.close()
                return
            self.refused += 1
            if self.refused <= 10 or self.refused % 100 == 0:  # said, not once per attempt
                self.log.warning("%s: refused %s: %s", self.what, name, refusal(e))
            transport.close()
            return
        if tls is None or waiter.lost:
            return
        proto = self.inner()
        tls.set_protocol(proto)
        proto.connection_made(tls)
        if waiter.early:  # what came with the end of the handshake
            feed(proto, bytes(waiter.early))


def feed(proto: asyncio.BaseProtocol, data: bytes) -> None:
    """Give bytes to a protocol as its transport would."""
    if hasattr(proto, "get_buffer"):  # (uvloop's are not asyncio.BufferedProtocol)
        buffered = cast(asyncio.BufferedProtocol, proto)
        view = memoryview(data)
        while view:
            buf = memoryview(buffered.get_buffer(len(view)))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            buffered.buffer_updated(n)
            view = view[n:]
    else:
        cast(asyncio.Protocol, proto).data_received(data)


class _Handshake(asyncio.Protocol):
    """Holds a connection while its handshake runs. Bytes that reach it
    before start_tls takes over (`raw`) are handed to the handshake, and
    application data that comes with the handshake's end (`early`) to the
    inner protocol; both bounded."""

    def __init__(self, accept: TlsAccept) -> None:
        self.accept = accept
        self.lost = False
        self.upgrading = False
        self.raw = bytearray()
        self.early = bytearray()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # the TCP connection (not the TLS one, later)
            self.transport = transport
            # The ClientHello is start_tls's to read, not ours.
            cast(asyncio.ReadTransport, transport).pause_reading()
            self.accept.start(transport, self)

    def data_received(self, data: bytes) -> None:
        held = self.early if self.upgrading else self.raw
        held += data
        if len(held) > EARLY_LIMIT and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def connect_error(e: BaseException, tls: bool) -> str:
    """Why dialling a server failed, in words (`tls`: it was to be over TLS)."""
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"its TLS certificate is refused: {e.verify_message} (signed by another CA?)"
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake failed: {refusal(e)}"
    closed = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)
    if tls and isinstance(e, OSError) and (e.errno is None or isinstance(e, closed)):
        return "the connection closed during the TLS handshake: does it serve TLS?"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)
