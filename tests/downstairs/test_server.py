"""A real downstairs process driven over TCP: negotiation, IO, takeover,
read-only mode, ordering, and bad input that must change nothing."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from crucible.common.errors import ErrorKind
from crucible.protocol import codec
from crucible.protocol import messages as m
from tests.support import (
    DOWNSTAIRS,
    Client,
    Downstairs,
    contexts_for,
    downstairs,
    drop_page_cache,
    free_port,
    pattern,
    wait_listening,
    wait_reading_begun,
)

pytestmark = pytest.mark.slow


def test_seed_command_line(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "var" / str(port)
    proc = subprocess.Popen(
        [DOWNSTAIRS, "-c", "-p", str(port), "-d", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_listening(port, proc)
        c = Client(port)
        versions = c.negotiate()
        assert len(versions.flush_numbers) == 10
        payload = pattern(99, 1) + pattern(100, 1)  # across the extent boundary
        assert isinstance(c.write(99, payload), m.WriteAck)
        assert isinstance(c.flush(1, deps=[1000]), m.FlushAck)
        r = c.read(99, 2, deps=[1001])
        assert isinstance(r, m.ReadResponse) and bytes(r.data) == payload
        c.close()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    for line in (
        "created region",
        "bs:512 es:100 ec:10",
        "current flush numbers",
        f"listening on 0.0.0.0:{port}",
        "connection from 127.0.0.1:",  # the seed's console lines
        "  connections count:1",
        "OK: connection(1): all done",
        "Write rn:1000 eid:0 dep:[] bo:99",
        "flush rn:1001 dep:[1000] fln:1",
        "Read rn:1002 eid:0 dep:[1001] bo:99",
    ):
        assert line in out, line
    # Run again: the region is reused, with its flush numbers.
    with downstairs(data) as d:
        assert isinstance(Client(d.port).negotiate(), m.ExtentVersions)
        assert "flush numbers [0..10]: [1, 1, 0" in d.output()


def test_negotiation_mismatches(ds: Downstairs) -> None:
    c = Client(ds.port)
    c.send(m.HereIAm(12, c.upstairs_id, c.session_id, 1, False, False, []))
    assert c.expect(m.VersionMismatch).version == 13
    assert c.closed_by_peer()
    c = Client(ds.port)
    c.send(m.HereIAm(99, c.upstairs_id, c.session_id, 1, False, False, [13]))
    assert isinstance(c.recv(), m.YesItsMe)  # alternate version accepted
    c = Client(ds.port, read_only=True)
    assert c.hello() == m.ReadOnlyMismatch(False)
    c = Client(ds.port)
    c.send(m.HereIAm(13, c.upstairs_id, c.session_id, 1, False, True, []))
    assert c.expect(m.EncryptedMismatch).expected is False
    c = Client(ds.port)
    c.hello()
    c.send(m.PromoteToActive(c.upstairs_id, uuid.uuid4(), 1))
    assert c.expect(m.UuidMismatch).expected_id == c.upstairs_id
    c = Client(ds.port)
    c.send(m.RegionInfoPlease())  # before HereIAm: out of order
    assert c.closed_by_peer()


def test_keepalive_in_every_phase(ds: Downstairs) -> None:
    c = Client(ds.port)
    c.send(m.Ruok())
    assert c.recv() == m.Imok()
    c.negotiate()
    c.send(m.Ruok())
    assert c.recv() == m.Imok()


def test_idle_connection_dropped(region: Path) -> None:
    with downstairs(region, "--idle-timeout", "0.5") as d:
        c = Client(d.port)
        c.negotiate()
        assert c.closed_by_peer()
        assert "no message for 0.5 s" in d.output()


def test_generation_takeover_fences_old_upstairs(ds: Downstairs) -> None:
    old = Client(ds.port, gen=1)
    old.negotiate()
    assert isinstance(old.write(0, pattern(0, 1)), m.WriteAck)
    new = Client(ds.port, gen=2)
    assert isinstance(new.hello(), m.YesItsMe)
    assert isinstance(new.promote(), m.YouAreNowActive)
    assert old.recv() == m.YouAreNoLongerActive(new.upstairs_id, new.session_id, 2)
    # Whatever the old upstairs still sends never reaches the disk.
    try:
        old.send(old.write_msg(0, pattern(0, 666)))
    except OSError:
        pass
    assert old.closed_by_peer()
    new.send(m.RegionInfoPlease())
    new.expect(m.RegionInfo)
    new.send(m.ExtentVersionsPlease())
    new.expect(m.ExtentVersions)
    r = new.read(0, 1)
    assert isinstance(r, m.ReadResponse) and bytes(r.data) == pattern(0, 1)
    # A lower or equal generation from another upstairs is refused.
    for gen in (1, 2):
        stale = Client(ds.port, gen=gen)
        assert isinstance(stale.hello(), m.YesItsMe)
        assert stale.promote() is None
    assert "refused" in ds.output()
    r = new.read(0, 1)  # the active one is undisturbed
    assert isinstance(r, m.ReadResponse) and bytes(r.data) == pattern(0, 1)


def test_takeover_drops_queued_jobs_of_old_upstairs(ds: Downstairs) -> None:
    old = Client(ds.port, gen=1)
    old.negotiate()
    # A write waiting on a job that never comes: still queued at takeover.
    old.send(old.write_msg(5, pattern(5, 9), deps=[999_999]))
    new = Client(ds.port, gen=2)
    new.negotiate()
    old.closed_by_peer()
    r = new.read(5, 1)
    assert isinstance(r, m.ReadResponse) and bytes(r.data) == bytes(512)
    assert r.blocks == [None]


def test_jobs_wait_for_their_dependencies(ds: Downstairs) -> None:
    c = Client(ds.port)
    c.negotiate()
    read = m.ReadRequest(c.upstairs_id, c.session_id, 1001, [1000], 3, 1)
    c.send(read)  # arrives first, must wait for the write
    c.send(c.write_msg(3, pattern(3, 5), job_id=1000))
    first = c.recv()
    second = c.recv()
    assert isinstance(first, m.WriteAck) and first.job_id == 1000
    assert isinstance(second, m.ReadResponse) and bytes(second.data) == pattern(3, 5)
    # A flush resets the completed set; later jobs may depend on it.
    c.send(m.Flush(c.upstairs_id, c.session_id, 1002, [1000, 1001], 1, 1, None, None))
    c.expect(m.FlushAck)
    c.send(m.Barrier(c.upstairs_id, c.session_id, 1003, [1002]))
    c.expect(m.BarrierAck)
    c.send(m.ReadRequest(c.upstairs_id, c.session_id, 1004, [1000, 1003], 3, 1))
    assert bytes(c.expect(m.ReadResponse).data) == pattern(3, 5)


def test_large_reads_in_order_from_the_cache_or_the_disk(ds: Downstairs, region: Path) -> None:
    """A large read runs on the loop when the page cache holds its data and
    goes to the disk thread when not; either way the jobs behind it wait."""
    c = Client(ds.port)
    c.negotiate()
    n = 300  # 150 KiB: over the size that always runs on the loop
    old = b"".join(pattern(b, 1) for b in range(n))
    new = b"".join(pattern(b, 2) for b in range(n))
    assert isinstance(c.write(0, old), m.WriteAck)
    assert isinstance(c.flush(1), m.FlushAck)
    for cold in (True, False, True):
        if cold:
            drop_page_cache(region)
        first, then, last = c.job_id(), c.job_id(), c.job_id()
        c.send(m.ReadRequest(c.upstairs_id, c.session_id, first, [], 0, n))
        c.send(c.write_msg(0, new, deps=[first], job_id=then))
        c.send(m.ReadRequest(c.upstairs_id, c.session_id, last, [then], 0, n))
        r1, ack, r2 = c.recv(), c.recv(), c.recv()
        assert isinstance(r1, m.ReadResponse) and r1.job_id == first and bytes(r1.data) == old
        assert isinstance(ack, m.WriteAck) and ack.job_id == then
        assert isinstance(r2, m.ReadResponse) and r2.job_id == last and bytes(r2.data) == new
        assert r2.blocks == [ctx.hash for ctx in contexts_for(new)]
        c.send(c.write_msg(0, old))  # back, for the next round
        assert isinstance(c.recv(), m.WriteAck)


def test_a_large_write_whose_last_byte_comes_late_is_taken(ds: Downstairs) -> None:
    """A downstairs asks the kernel to wake it once the rest of a large frame
    has arrived (SO_RCVLOWAT). What it asks must follow every receive: had
    it kept asking for what was owed before its last one, the last byte,
    sent after it read all the others, would never wake it."""
    c = Client(ds.port)
    c.negotiate()
    n = 600  # 300 KiB: a frame received into a buffer of its own
    data = b"".join(pattern(b, 3) for b in range(n))
    frame = codec.encode(c.write_msg(0, data))
    for cut in (len(frame) - 1, len(frame) // 2):
        c.send_raw(frame[:cut])
        wait_reading_begun(c.sock, cut)
        c.send_raw(frame[cut:])
        assert isinstance(c.recv(), m.WriteAck)  # (a stall: the socket's timeout fails it)
        frame = codec.encode(c.write_msg(0, data))
    r = c.read(0, n)
    assert isinstance(r, m.ReadResponse) and bytes(r.data) == data


def test_hash_mismatch_writes_nothing(ds: Downstairs) -> None:
    c = Client(ds.port)
    c.negotiate()
    bad = c.write_msg(7, pattern(7, 1) + pattern(8, 1))
    bad.contexts = [bad.contexts[0], m.BlockContext(bad.contexts[1].hash + 1)]
    c.send(bad)
    err = c.expect(m.ErrorReport)
    assert err.job_id == bad.job_id and err.error.kind == ErrorKind.HashMismatch
    r = c.read(7, 2)
    assert isinstance(r, m.ReadResponse) and bytes(r.data) == bytes(1024)
    assert r.blocks == [None, None]


def test_out_of_range_and_wrong_counts_refused(ds: Downstairs) -> None:
    c = Client(ds.port)
    c.negotiate()
    c.send(c.write_msg(999, pattern(999, 1) + pattern(1000, 1)))  # 1000 blocks in all
    assert c.expect(m.ErrorReport).error.kind == ErrorKind.OffsetInvalid
    r = c.read(1000, 1)
    assert isinstance(r, m.ErrorReport) and r.error.kind == ErrorKind.OffsetInvalid
    c.send(m.Flush(c.upstairs_id, c.session_id, c.job_id(), [], 1, 1, None, 10))
    assert c.expect(m.ErrorReport).error.kind == ErrorKind.InvalidExtent
    # Contexts that do not match the data length: refused and disconnected.
    w = c.write_msg(0, pattern(0, 1) + pattern(1, 1))
    w.contexts = w.contexts[:-1]
    c.send(w)
    assert c.expect(m.ErrorReport).error.kind == ErrorKind.InvalidNumberOfBlocks
    assert c.closed_by_peer()
    other = Client(ds.port, gen=2)
    other.negotiate()
    r = other.read(0, 2)
    assert isinstance(r, m.ReadResponse) and bytes(r.data) == bytes(1024)


def test_foreign_session_gets_uuid_mismatch(ds: Downstairs) -> None:
    c = Client(ds.port)
    c.negotiate()
    c.send(m.ReadRequest(c.upstairs_id, c.upstairs_id, c.job_id(), [], 0, 1))
    assert c.expect(m.UuidMismatch).expected_id == c.upstairs_id
    assert isinstance(c.read(0, 1), m.ReadResponse)  # connection still serves


def test_last_flush_resumes_running(ds: Downstairs) -> None:
    c = Client(ds.port)
    c.hello()
    c.promote()
    c.send(m.RegionInfoPlease())
    c.expect(m.RegionInfo)
    c.send(m.LastFlush(1500))
    c.send(m.ReadRequest(c.upstairs_id, c.session_id, 1501, [1400, 1500], 0, 1))
    assert isinstance(c.recv(), m.ReadResponse)


def test_read_only_serves_many_and_refuses_writes(region: Path) -> None:
    seed = Client  # fill a block first, read-write
    with downstairs(region) as d:
        c = seed(d.port)
        c.negotiate()
        c.write(4, pattern(4, 3))
        c.flush(1)
    with downstairs(region, "--mode", "ro") as d:
        readers = [Client(d.port, read_only=True) for _ in range(3)]
        for r in readers:
            r.negotiate()
        for r in readers:
            resp = r.read(4, 1)
            assert isinstance(resp, m.ReadResponse) and bytes(resp.data) == pattern(4, 3)
        w = readers[0]
        w.send(w.write_msg(4, pattern(4, 4)))
        assert w.expect(m.ErrorReport).error.kind == ErrorKind.ModifyingReadOnlyRegion
        assert w.closed_by_peer()
        resp = readers[1].read(4, 1)
        assert isinstance(resp, m.ReadResponse) and bytes(resp.data) == pattern(4, 3)


def test_malformed_frames_close_only_that_connection(ds: Downstairs, rng: random.Random) -> None:
    good = Client(ds.port)
    good.negotiate()
    bad_inputs = [
        b"\x00\x00\x00\x00garbage",  # length shorter than a header
        (m.MAX_FRAME_LEN + 10).to_bytes(4, "little"),  # oversized
        b"\x10\x00\x00\x00\xff\xff\xff\xff" + b"\0" * 8,  # unknown variant
        codec.encode(m.Ruok())[:-1] + b"\x09\x00\x00\x00",  # truncated then junk
        rng.randbytes(4096),
    ]
    for data in bad_inputs:
        for hello_first in (False, True):
            c = Client(ds.port)
            if hello_first:
                assert isinstance(c.hello(), m.YesItsMe)
            c.send_raw(data)
            c.sock.shutdown(socket.SHUT_WR)
            assert c.closed_by_peer()
    r = good.read(0, 1)
    assert isinstance(r, m.ReadResponse)
    out = ds.output()
    assert "not a Crucible upstairs (it sent b'" in out  # its first bytes are shown
    assert "malformed frame" in out and "frame length" in out


def test_repair_addr_and_reconciliation_steps(tmp_path: Path) -> None:
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    for p in (src_dir, dst_dir):
        subprocess.run(
            [DOWNSTAIRS, "create", "-d", str(p), "--extent-count", "4"],
            check=True,
            capture_output=True,
        )
    with downstairs(src_dir) as src, downstairs(dst_dir) as dst:
        s = Client(src.port, gen=3)  # an extent flush stamps at most its gen
        s.negotiate()
        s.write(101, pattern(101, 8))
        s.send(m.ExtentFlush(1, 1, 0, 7, 3))
        assert s.expect(m.RepairAckId).repair_id == 1
        s.send(m.ExtentClose(2, 1))
        s.expect(m.RepairAckId)
        d = Client(dst.port)
        d.negotiate()
        d.send(m.ExtentClose(2, 1))
        d.expect(m.RepairAckId)
        d.send(m.ExtentRepair(3, 1, 0, ("127.0.0.1", src.repair_port), [1]))
        assert d.expect(m.RepairAckId).repair_id == 3
        for c in (s, d):
            c.send(m.ExtentReopen(4, 1))
            c.expect(m.RepairAckId)
        r = d.read(101, 1)
        assert isinstance(r, m.ReadResponse) and bytes(r.data) == pattern(101, 8)
        d.send(m.ExtentVersionsPlease())  # out of order now: dropped
        assert d.closed_by_peer()
        # Repair from a source whose extent is open is refused, and changes nothing.
        d = Client(dst.port, gen=2)
        d.negotiate()
        d.send(m.ExtentClose(5, 2))
        d.expect(m.RepairAckId)
        d.send(m.ExtentRepair(6, 2, 0, ("127.0.0.1", src.repair_port), [1]))
        err = d.expect(m.ExtentError)
        assert err.repair_id == 6 and err.error.kind == ErrorKind.RepairRequestError
