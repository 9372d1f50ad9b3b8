"""Bad NBD input gets the protocol's error replies or a clean disconnect, and
the server keeps serving every other client."""

from __future__ import annotations

import socket
import struct
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from crucible.nbd import protocol as p
from tests.nbd.conftest import Nbd
from tests.support import free_port, rss, wait_reading_begun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


class Raw:
    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
        assert flags & p.FLAG_FIXED_NEWSTYLE

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.s.recv(n - len(out))
            if not chunk:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def closed(self) -> bool:
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True

    def option(self, opt: int, data: bytes = b"") -> tuple[int, bytes]:
        self.s.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)) + data)
        magic, ropt, rep, length = struct.unpack(">QIII", self.recv(20))
        assert magic == p.REPLY_MAGIC and ropt == opt
        return rep, self.recv(length)

    def go(self, send_flags: bool = True) -> None:
        if send_flags:
            self.s.sendall(struct.pack(">I", p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        rep, _ = self.option(p.Opt.GO, struct.pack(">IH", 0, 0))
        while rep == p.Rep.INFO:
            _, _, rep, length = struct.unpack(">QIII", self.recv(20))
            self.recv(length)
        assert rep == p.Rep.ACK

    def request(
        self, cmd: int, offset: int, length: int, flags: int = 0, data: bytes = b"", cookie: int = 7
    ) -> int:
        self.s.sendall(header(cmd, offset, length, flags, cookie) + data)
        error = self.reply(cookie)
        if cmd == p.Cmd.READ and not error:
            self.recv(length)
        return error

    def reply(self, cookie: int) -> int:
        """The error of the next simple reply, which must be for `cookie`."""
        magic, error, got = struct.unpack(">IIQ", self.recv(16))
        assert magic == p.SIMPLE_REPLY_MAGIC and got == cookie
        return int(error)


def header(cmd: int, offset: int, length: int, flags: int = 0, cookie: int = 7) -> bytes:
    return p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def still_serves(nbd: Nbd) -> None:
    r = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x7 0 4k", "-c", "read -P 0x7 0 4k", nbd.uri],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr


def test_a_write_whose_last_byte_comes_late_is_taken(nbd: Nbd) -> None:
    """crucible-nbd asks the kernel to wake it once the rest of a large write
    payload has arrived (SO_RCVLOWAT), and must lower that as each receive
    takes part of it: a client that sends the last byte only after the
    server read the others is answered."""
    c = Raw(nbd.port)
    c.go()
    data = bytes(range(256)) * 4096  # 1 MiB
    head = header(p.Cmd.WRITE, 0, len(data), cookie=9)
    c.s.sendall(head + data[:-1])
    wait_reading_begun(c.s, len(head) + len(data) - 1)
    c.s.sendall(data[-1:])
    assert c.reply(9) == 0  # (a stall: the timeout fails it)
    c.s.sendall(header(p.Cmd.READ, 0, len(data), cookie=10))
    assert c.reply(10) == 0
    assert c.recv(len(data)) == data


def test_small_requests_after_large_payloads_are_answered(nbd: Nbd) -> None:
    """A payload's last receive must leave crucible-nbd's receive mark at 1:
    a mark left at what was owed before it would never let the 28 bytes of
    a flush that follows wake the server. Pipelined writes, each payload
    filling its buffer exactly, end uvloop's run of receives (32 at most)
    on a payload's end now and then; a write sent in two parts ends on a
    large receive."""
    c = Raw(nbd.port)
    c.go()
    payload = bytes(range(256)) * 1024  # 256 KiB
    write = header(p.Cmd.WRITE, 0, len(payload), cookie=1) + payload
    for _ in range(6):
        c.s.sendall(write * 16)
        for _ in range(16):
            assert c.reply(1) == 0
        assert c.request(p.Cmd.FLUSH, 0, 0, cookie=2) == 0  # (a stall: the timeout fails it)
    big = header(p.Cmd.WRITE, 0, 1 << 20, cookie=3) + bytes(1 << 20)
    c.s.sendall(big[: 300 << 10])
    wait_reading_begun(c.s, 300 << 10)
    c.s.sendall(big[300 << 10 :])
    assert c.reply(3) == 0
    assert c.request(p.Cmd.FLUSH, 0, 0, cookie=4) == 0


def test_bad_handshakes(nbd: Nbd) -> None:
    c = Raw(nbd.port)
    c.s.sendall(b"\xff\xff\xff\xff")  # unknown client flags
    assert c.closed()
    c = Raw(nbd.port)
    c.s.sendall(struct.pack(">I", p.FLAG_FIXED_NEWSTYLE) + b"NOTMAGIC" + bytes(8))
    assert c.closed()
    c = Raw(nbd.port)
    c.s.sendall(
        struct.pack(">I", p.FLAG_FIXED_NEWSTYLE) + p.OPTION_HEADER.pack(p.IHAVEOPT, 99, 1 << 30)
    )  # absurd option length
    assert c.closed()
    c = Raw(nbd.port)
    c.s.sendall(struct.pack(">I", p.FLAG_FIXED_NEWSTYLE) + b"\x01\x02")  # truncated
    c.s.shutdown(socket.SHUT_WR)
    assert c.closed()
    still_serves(nbd)


def test_option_errors(nbd: Nbd) -> None:
    c = Raw(nbd.port)
    c.s.sendall(struct.pack(">I", p.FLAG_FIXED_NEWSTYLE))
    assert c.option(99)[0] == p.Rep.ERR_UNSUP
    assert c.option(p.Opt.STARTTLS)[0] == p.Rep.ERR_POLICY
    assert c.option(p.Opt.LIST, b"junk")[0] == p.Rep.ERR_INVALID
    assert c.option(p.Opt.GO, b"\x00\x00\x00\xff")[0] == p.Rep.ERR_INVALID
    assert c.option(p.Opt.INFO, struct.pack(">I", 4) + b"nope" + b"\x00\x00")[0] == (
        p.Rep.ERR_UNKNOWN
    )
    meta = struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">I", 15) + b"base:allocation"
    assert c.option(p.Opt.SET_META_CONTEXT, meta)[0] == p.Rep.ERR_INVALID  # needs structured
    rep, _ = c.option(p.Opt.LIST)
    assert rep == p.Rep.SERVER
    assert c.recv(20)[12:16] == struct.pack(">I", p.Rep.ACK)
    assert c.option(p.Opt.ABORT)[0] == p.Rep.ACK
    still_serves(nbd)


def test_handshake_burst_larger_than_the_receive_buffer(nbd: Nbd) -> None:
    """Options sent faster than they are answered (here 640 KiB of them) wait in
    the socket, not in unbounded memory, and each still gets its reply."""
    c = Raw(nbd.port)
    junk = p.OPTION_HEADER.pack(p.IHAVEOPT, 99, 64 << 10) + bytes(64 << 10)
    c.s.sendall(struct.pack(">I", p.FLAG_FIXED_NEWSTYLE) + junk * 10)
    for _ in range(10):
        magic, opt, rep, length = struct.unpack(">QIII", c.recv(20))
        assert (magic, opt, rep) == (p.REPLY_MAGIC, 99, p.Rep.ERR_UNSUP)
        c.recv(length)
    c.go(send_flags=False)
    assert c.request(p.Cmd.READ, 0, 4096) == 0
    still_serves(nbd)


def test_transmission_errors(nbd: Nbd) -> None:
    c = Raw(nbd.port)
    c.go()
    size = 32 * 4096 * 512
    assert c.request(p.Cmd.READ, size - 10, 20) == p.EINVAL
    assert c.request(p.Cmd.WRITE, size - 10, 20, data=bytes(20)) == p.ENOSPC
    assert c.request(p.Cmd.TRIM, size, 512) == p.EINVAL
    assert c.request(99, 0, 512) == p.EINVAL  # unknown command
    assert c.request(p.Cmd.READ, 0, 512, flags=p.CMD_FLAG_NO_HOLE) == p.EINVAL
    assert c.request(p.Cmd.BLOCK_STATUS, 0, 512) == p.EINVAL  # no context negotiated
    no_hole_fast = p.CMD_FLAG_FAST_ZERO | p.CMD_FLAG_NO_HOLE
    assert c.request(p.Cmd.WRITE_ZEROES, 0, 4096, flags=no_hole_fast) == p.ENOTSUP
    assert c.request(p.Cmd.WRITE_ZEROES, 0, 4096, flags=p.CMD_FLAG_FAST_ZERO) == 0
    assert c.request(p.Cmd.READ, 0, 512) == 0
    # A write payload over the maximum cannot be skipped safely: disconnect.
    c.s.sendall(header(p.Cmd.WRITE, 0, (32 << 20) + 1, cookie=1))
    assert c.closed()
    c = Raw(nbd.port)
    c.go()
    c.s.sendall(b"\x00" * 28)  # bad request magic
    assert c.closed()
    still_serves(nbd)


def test_read_only_export_refuses_writes(tmp_path: Path) -> None:
    n = Nbd(tmp_path, read_only=True)
    try:
        r = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x7 0 4k", n.uri],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode != 0 and "Permission denied" in r.stderr  # qemu sees READ_ONLY
        r = subprocess.run(
            ["qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 4k", n.uri],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0 and "verification failed" not in r.stdout
        info = subprocess.run(["nbdinfo", n.uri], capture_output=True, text=True, timeout=60)
        assert "is_read_only: true" in info.stdout
        c = Raw(n.port)
        c.go()
        assert c.request(p.Cmd.WRITE, 0, 512, data=bytes(512)) == p.EPERM
        assert c.request(p.Cmd.TRIM, 0, 512) == p.EPERM
        assert c.request(p.Cmd.READ, 0, 512) == 0
    finally:
        assert n.stop() == 0, n.output()


def test_requests_past_the_in_flight_caps_wait(nbd: Nbd) -> None:
    """100 reads of 32 MiB sent at once (2.8 KB of requests) and never read
    back: what is in flight stays within the caps, memory stays bounded,
    and another client is served meanwhile."""
    base = rss(nbd.proc.pid)
    hog = Raw(nbd.port)
    hog.go()
    size = 32 << 20
    reqs = b"".join(header(p.Cmd.READ, (i % 2) * size, size, cookie=i) for i in range(100))
    hog.s.sendall(reqs)
    other = Raw(nbd.port)
    other.go()
    assert other.request(p.Cmd.READ, 0, 4) == 0  # served while the hog waits
    still_serves(nbd)
    # In flight: at most 128 MiB of reads for the hog, each read held three
    # times (one reply per replica), plus the reply backlog; far from 3.2 GiB.
    assert rss(nbd.proc.pid) < base + (1 << 30)
    hog.s.close()


def test_handshake_timeout_and_connection_cap(tmp_path: Path) -> None:
    nbd = Nbd(tmp_path, nbd_args=("--handshake-timeout", "2", "--max-connections", "4"))
    try:
        idle = [Raw(nbd.port) for _ in range(4)]  # greeted, then silent
        extra = socket.create_connection(("127.0.0.1", nbd.port), timeout=60)
        assert extra.recv(1) == b"", "a fifth client was let in"
        for c in idle:
            assert c.closed()
        out = nbd.output()
        assert "refused: 4 clients already" in out and "no handshake in 2 s" in out
        still_serves(nbd)
    finally:
        assert nbd.stop() == 0, nbd.output()


def test_unknown_commands_share_one_metrics_label(tmp_path: Path) -> None:
    """A client cannot make the metrics grow a series per command number it invents."""
    metrics = free_port()
    n = Nbd(tmp_path, nbd_args=("--metrics", f"127.0.0.1:{metrics}"))
    try:
        c = Raw(n.port)
        c.go()
        for cmd in (99, 100, 1000, 65535):
            assert c.request(cmd, 0, 512) == p.EINVAL
        assert c.request(p.Cmd.READ, 0, 512) == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        assert n.stop() == 0, n.output()
    counts = {
        s.labels["command"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "crucible_nbd_requests_total"
    }
    assert counts == {"unknown": 4, "read": 1}
