"""The receive mark: set on a plain TCP socket as asked (within MARK_MAX),
only when it changes, and never on a socket it would misread."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from crucible.netio import MARK_MAX, ReceiveMark


class _Transport:
    """What ReceiveMark asks of a transport: its socket, and whether TLS runs over it."""

    def __init__(self, sock: socket.socket, ssl_object: object = None) -> None:
        self.extra = {"socket": sock, "ssl_object": ssl_object}

    def get_extra_info(self, name: str) -> Any:
        return self.extra.get(name)


@pytest.fixture
def tcp() -> Iterator[socket.socket]:
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as client,
    ):
        yield client


def _lowat(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


class _Counting(socket.socket):
    calls = 0

    def setsockopt(self, *args: Any) -> None:
        type(self).calls += 1
        super().setsockopt(*args)


def test_the_mark_follows_what_is_expected(tcp: socket.socket) -> None:
    mark = ReceiveMark()
    mark.expect(5000)  # not attached yet: nothing to set
    assert _lowat(tcp) == 1
    mark.attach(_Transport(tcp))  # type: ignore[arg-type]
    for n, want in [(300_000, 300_000), (4096, 4096), (1, 1), (0, 1), (MARK_MAX + 1, MARK_MAX)]:
        mark.expect(n)
        assert _lowat(tcp) == want
    mark.close()


def test_the_mark_is_set_only_when_it_changes(
    tcp: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    def counting_dup(fd: int, family: int, kind: int) -> socket.socket:
        return _Counting(family, kind, fileno=os.dup(fd))

    monkeypatch.setattr(socket, "fromfd", counting_dup)
    _Counting.calls = 0
    mark = ReceiveMark()
    mark.attach(_Transport(tcp))  # type: ignore[arg-type]
    for n in (1, 1, 9000, 9000, 9000, 1, 1):
        mark.expect(n)
    assert _Counting.calls == 2 and _lowat(tcp) == 1
    mark.close()


def test_the_connection_ends_once_its_owner_and_the_mark_let_go() -> None:
    """The mark holds a descriptor of its own: closed with the connection,
    the peer sees the end (else the kernel would keep the connection open)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with peer:
            peer.settimeout(10)
            mark = ReceiveMark()
            mark.attach(_Transport(client))  # type: ignore[arg-type]
            mark.expect(9000)
            client.close()  # what the transport does
            mark.close()  # what the protocol's connection_lost does
            assert peer.recv(1) == b""


def test_no_mark_under_tls_or_off_tcp(tcp: socket.socket) -> None:
    """TLS: the socket counts record bytes, not the frame's. A Unix socket's
    poll does not heed the mark."""
    mark = ReceiveMark()
    mark.attach(_Transport(tcp, ssl_object=object()))  # type: ignore[arg-type]
    mark.expect(5000)
    assert _lowat(tcp) == 1
    a, b = socket.socketpair()
    with a, b:
        mark = ReceiveMark()
        mark.attach(_Transport(a))  # type: ignore[arg-type]
        mark.expect(5000)
        assert _lowat(a) == 1


def test_a_connection_without_a_spare_descriptor_goes_unmarked(
    tcp: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors (a peer opening many connections): the connection
    is served as before the mark, waking at every byte."""

    def no_dup(fd: int, family: int, kind: int) -> socket.socket:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(socket, "fromfd", no_dup)
    mark = ReceiveMark()
    mark.attach(_Transport(tcp))  # type: ignore[arg-type]
    mark.expect(9000)
    assert _lowat(tcp) == 1
    mark.close()
