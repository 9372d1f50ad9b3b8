"""A real downstairs against peers that mean harm or are broken: each bound
asserted (memory, the connection closed with a logged reason, the region
still usable by a normal upstairs)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from crucible.protocol import codec
from crucible.protocol import messages as m
from crucible.protocol.framing import HELLO_MAX_FRAME
from tests.support import (
    Client,
    Downstairs,
    cluster,
    create_region,
    downstairs,
    rss,
    run_tool,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MiB = 1 << 20
MAX_GEN = (1 << 64) - 1


def closed(s: socket.socket) -> bool:
    """Wait until the peer closes (True) -- anything it sends is dropped."""
    s.settimeout(60)
    try:
        while s.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    return True


def rx_drained(server_port: int, client: socket.socket) -> bool:
    """The server process has read everything this client sent: its socket's
    receive queue (in /proc/net/tcp) is empty."""
    port = client.getsockname()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, remote = f[1], f[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == port:
            return int(f[4].split(":")[1], 16) == 0
    return False


def until(ok: object, what: str) -> None:
    deadline = time.monotonic() + 60
    while not ok():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_strangers_claiming_huge_frames_cost_nothing(ds: Downstairs) -> None:
    base = rss(ds.proc.pid)
    socks = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", ds.port))
        s.sendall(struct.pack("<I", 100 * MiB) + bytes(1024))
        socks.append(s)
    for s in socks:
        assert closed(s)
        s.close()
    assert "not a Crucible upstairs" in ds.output()
    assert rss(ds.proc.pid) < base + 32 * MiB
    # Before promotion, frames are held to the hello limit.
    c = Client(ds.port)
    assert isinstance(c.hello(), m.YesItsMe)
    c.send_raw(struct.pack("<I", HELLO_MAX_FRAME + 1) + bytes(16))
    assert c.closed_by_peer()


def test_negotiated_peer_claims_are_not_allocated_ahead(region: Path) -> None:
    """Read-only, so that twenty upstairs can be promoted at once."""
    with downstairs(region, "--mode", "ro") as ds:
        _claims(ds)


def _claims(ds: Downstairs) -> None:
    clients = []
    base = rss(ds.proc.pid)
    for _ in range(20):
        c = Client(ds.port, gen=1, read_only=True)
        c.negotiate()
        clients.append(c)
    for c in clients:  # the header alone, then a little of the body
        for piece in (struct.pack("<I", 100 * MiB), bytes(1024)):
            c.send_raw(piece)
            until(lambda c=c: rx_drained(ds.port, c.sock), "the server to read what was sent")
    # 20 claims of 100 MiB, 1 KiB each sent: nowhere near 2 GiB.
    assert rss(ds.proc.pid) < base + 64 * MiB
    for c in clients:
        c.close()


def test_flush_with_a_generation_above_the_session_is_refused(tmp_path: Path) -> None:
    with cluster(tmp_path) as fleet:
        ds = fleet.ds[0]
        assert ds is not None
        c = Client(ds.port, gen=1)
        c.negotiate()
        c.gen = MAX_GEN  # the Flush carries it; the session was negotiated with 1
        reply = c.flush(1)
        assert isinstance(reply, m.ErrorReport), reply
        assert c.closed_by_peer()
        assert "is above the session's 1" in ds.output()
        # The region is not poisoned: an upstairs activates it as usual.
        r = run_tool("crutest", "one", *fleet.target_args(), "-q")
        assert r.returncode == 0, r.stdout + r.stderr


def test_highest_generation_stored_gives_a_clear_error(tmp_path: Path) -> None:
    with cluster(tmp_path) as fleet:
        r = run_tool("crutest", "one", *fleet.target_args(), "-q", "--gen", str(MAX_GEN))
        assert r.returncode == 0, r.stderr
        r = run_tool("crutest", "one", *fleet.target_args(), "-q")
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "the highest there is" in lines[0], r.stderr
        assert "Traceback" not in r.stderr and "negotiating" not in r.stderr


def test_read_whose_reply_cannot_fit_is_refused(tmp_path: Path) -> None:
    region = tmp_path / "big"
    create_region(region, "--block-size", "4096", "--extent-size", "4096", "--extent-count", "8")
    with downstairs(region) as ds:
        c = Client(ds.port, gen=1)
        c.negotiate()
        reply = c.read(0, 26_000)  # a 106 MB reply: over the frame limit
        assert isinstance(reply, m.ErrorReport), reply
        assert "would not fit in one reply" in str(reply.error)
        assert c.closed_by_peer()
        # Nothing is wedged: the next upstairs does large IO at once.
        c = Client(ds.port, gen=2)
        c.negotiate()
        data = bytes(range(256)) * 4096  # 1 MiB
        assert isinstance(c.write(0, data, block_size=4096), m.WriteAck)
        r = c.read(0, 256)
        assert isinstance(r, m.ReadResponse) and bytes(r.data) == data
        c.close()


def test_idle_repair_connections_are_capped(tmp_path: Path) -> None:
    region = tmp_path / "r"
    create_region(region, "--extent-count", "4")
    with downstairs(region) as ds:
        held = [socket.create_connection(("127.0.0.1", ds.repair_port)) for _ in range(64)]
        extra = socket.create_connection(("127.0.0.1", ds.repair_port))
        assert closed(extra)
        until(lambda: "repair server: refused" in ds.output(), "the refusal logged")
        c = Client(ds.port)  # the data port is not starved
        c.negotiate()
        c.close()
        for s in held:
            s.close()

        def served() -> bool:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{ds.repair_port}/region-mode", timeout=30
                ) as r:
                    return bool(r.read() == b"false")
            except OSError:
                return False

        until(served, "the repair server to serve again")
        assert ds.alive()


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def big_region(tmp_path: Path) -> Path:
    region = tmp_path / "big"
    create_region(region, "--block-size", "4096", "--extent-size", "4096", "--extent-count", "4")
    return region


@pytest.mark.parametrize("blocks", [256, 16])  # 1 MiB (the disk thread's) and 64 KiB reads
def test_replies_a_peer_does_not_read_are_bounded(tmp_path: Path, blocks: int) -> None:
    """2 GiB of replies asked for in a few MB of requests, read only once
    the server stopped reading them: its memory stays bounded."""
    with downstairs(big_region(tmp_path)) as ds:
        c = Client(ds.port, gen=1)
        c.negotiate()
        base = rss(ds.proc.pid)
        reads = 2000 * 256 // blocks
        msgs = [
            codec.encode(
                m.ReadRequest(c.upstairs_id, c.session_id, 1 + i, [], i * blocks % 16384, blocks)
            )
            for i in range(reads)
        ]
        sender = threading.Thread(target=c.sock.sendall, args=(b"".join(msgs),), daemon=True)
        sender.start()
        until(lambda: "not read for now" in ds.output(), "the connection held")
        # Reading now lets the server go on: every reply arrives, in bounded memory.
        for i in range(reads):
            r = c.recv()
            assert isinstance(r, m.ReadResponse) and r.job_id == 1 + i, r
        sender.join(60)
        assert peak_rss(ds.proc.pid) < base + 256 * MiB
        assert ds.alive()
        c.close()


def test_peer_that_never_reads_its_replies_is_closed(tmp_path: Path) -> None:
    with downstairs(big_region(tmp_path), "--idle-timeout", "2") as ds:
        c = Client(ds.port, gen=1)
        c.negotiate()
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reads = [
            codec.encode(m.ReadRequest(c.upstairs_id, c.session_id, 1 + i, [], 0, 256))
            for i in range(200)  # 200 MiB of replies
        ]
        c.sock.sendall(b"".join(reads))
        until(lambda: "its replies were not read for 2 s" in ds.output(), "the connection closed")
        assert ds.alive()
        c.close()


def test_jobs_waiting_on_jobs_never_sent_are_bounded(tmp_path: Path) -> None:
    with downstairs(big_region(tmp_path)) as ds:
        c = Client(ds.port, gen=1)
        c.negotiate()
        base = rss(ds.proc.pid)
        data = bytes(range(256)) * 4096  # 1 MiB
        write = c.write_msg(0, data, deps=[1], block_size=4096)  # job 1 is never sent

        def send_all() -> None:
            with contextlib.suppress(OSError):
                for i in range(1500):  # 1.5 GiB, if it were all taken
                    write.job_id = 2 + i
                    c.send(write)

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        assert c.closed_by_peer()
        sender.join(60)
        assert "jobs wait on jobs that never completed" in ds.output()
        assert peak_rss(ds.proc.pid) < base + 256 * MiB
        # Its memory is given back, and the next upstairs works as usual.
        until(lambda: rss(ds.proc.pid) < base + 64 * MiB, "the memory given back")
        c = Client(ds.port, gen=2)
        c.negotiate()
        assert isinstance(c.write(0, data, block_size=4096), m.WriteAck)
        c.close()
