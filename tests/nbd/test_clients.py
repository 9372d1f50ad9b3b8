"""Real NBD clients against crucible-nbd: qemu-img, qemu-io, nbdinfo, nbdcopy,
python libnbd (through Debian's interpreter) and fio."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from crucible.region.allocation import allocated_runs
from crucible.region.definition import load_definition
from tests.nbd.conftest import Nbd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SIZE = 32 * 4096 * 512  # the fixture's volume: 64 MiB


def run(
    *cmd: str, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r


def libnbd(uri: str, code: str) -> str:
    """Run Python code with a connected libnbd handle `h` (Debian's python3-libnbd)."""
    script = "import nbd\nh = nbd.NBD()\nh.add_meta_context('base:allocation')\n"
    script += f"h.connect_uri({uri!r})\n" + code
    return run("/usr/bin/python3", "-c", script).stdout


def test_qemu_img_round_trip(nbd: Nbd, tmp_path: Path, rng: random.Random) -> None:
    image = tmp_path / "in.raw"
    image.write_bytes(rng.randbytes(24 << 20) + bytes(1 << 20) + rng.randbytes(3 << 20))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), nbd.uri)
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", nbd.uri, str(out))
    assert out.stat().st_size == SIZE
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), nbd.uri)
    data = out.read_bytes()
    assert data[: image.stat().st_size] == image.read_bytes()
    assert nbd.cluster.dump().returncode == 0


def test_qemu_io_patterns_unaligned(nbd: Nbd) -> None:
    cmds = [
        "write -P 0x11 0 64k",
        "write -P 0x22 1000 3000",
        "write -P 0x33 65535 2",
        "write -P 0x44 130000 1",
        "flush",
        "read -P 0x11 0 1000",
        "read -P 0x22 1000 3000",
        "read -P 0x11 4000 61535",
        "read -P 0x33 65535 2",
        "read -P 0 65537 64463",
        "read -P 0x44 130000 1",
        "read -P 0 130001 1000",
    ]
    args = [a for c in cmds for a in ("-c", c)]
    r = run("qemu-io", "-f", "raw", *args, nbd.uri)
    assert "Pattern verification failed" not in r.stdout + r.stderr


def test_nbdinfo_and_map(nbd: Nbd) -> None:
    info = json.loads(run("nbdinfo", "--json", nbd.uri).stdout)
    export = info["exports"][0]
    assert export["export-size"] == SIZE
    assert export["block_size_minimum"] == 1 and export["block_size_maximum"] == 32 << 20
    for flag in ("can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    assert "base:allocation" in export["contexts"]
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5 1M 1M", nbd.uri)
    mapped = json.loads(run("nbdinfo", "--map", "--json", nbd.uri).stdout)
    data = [(e["offset"], e["length"]) for e in mapped if e["type"] == 0]
    assert data == [(1 << 20, 1 << 20)]
    assert sum(e["length"] for e in mapped) == SIZE


def test_nbdcopy_both_ways_multi_conn(nbd: Nbd, tmp_path: Path, rng: random.Random) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(rng.randbytes(SIZE))
    run("nbdcopy", "--connections=4", "--requests=16", str(src), nbd.uri)
    back = tmp_path / "back.raw"
    run("nbdcopy", "--connections=4", nbd.uri, str(back))
    assert back.read_bytes() == src.read_bytes()


def test_libnbd_semantics(nbd: Nbd) -> None:
    out = libnbd(
        nbd.uri,
        """
bs = 4096
h.pwrite(b'\\xaa' * 3 * bs, 0, nbd.CMD_FLAG_FUA)
assert h.pread(3 * bs, 0) == b'\\xaa' * 3 * bs
h.pwrite(b'\\x01' * 100, 10)           # unaligned
assert h.pread(120, 0) == b'\\xaa' * 10 + b'\\x01' * 100 + b'\\xaa' * 10
h.flush()
h.trim(2 * bs, 0)                        # whole blocks: zeros afterwards
assert h.pread(2 * bs, 0) == bytes(2 * bs)
assert h.pread(bs, 2 * bs) == b'\\xaa' * bs
h.zero(1000, 5 * bs + 7)                 # unaligned zero
assert h.pread(1000, 5 * bs + 7) == bytes(1000)
h.zero(bs, 4 * bs, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(bs, 4 * bs) == bytes(bs)
seen = []
def cb(meta, offset, entries, err):
    seen.append((meta, offset, list(entries)))
    return 0
h.block_status(8 * bs, 0, cb)
meta, offset, entries = seen[0]
assert meta == 'base:allocation'
total = sum(entries[0::2])
assert total >= 8 * bs, entries
pos = 0
for length, flags in zip(entries[0::2], entries[1::2]):
    if flags & 2:                        # NBD_STATE_ZERO must really read as zeros
        assert h.pread(min(length, 8 * bs - pos), pos) == bytes(min(length, 8 * bs - pos))
    pos += length
assert pos >= 8 * bs
seen.clear()
h.block_status(64 * bs, 1 << 25, cb)     # never written: a hole reading as zeros
assert seen[0][2][1] == 3, seen
h.pwrite(b'\x33' * 8 * bs, 100 * bs)
h.trim(8 * bs, 100 * bs)                 # trimmed: a hole again
seen.clear()
h.block_status(8 * bs, 100 * bs, cb)
assert seen[0][2] == [8 * bs, 3], seen
assert h.pread(8 * bs, 100 * bs) == bytes(8 * bs)
try:
    h.pread(10, h.get_size() - 5)
    raise SystemExit('read past the end did not fail')
except nbd.Error as e:
    assert e.errnum == 22, e                # EINVAL
try:
    h.pwrite(b'x' * 10, h.get_size() - 5)
    raise SystemExit('write past the end did not fail')
except nbd.Error as e:
    assert e.errnum == 28, e                # ENOSPC
print('ok', h.can_multi_conn(), h.can_fua(), h.can_trim(), h.can_zero())
""",
    )
    assert out.strip() == "ok True True True True"
    assert nbd.stop() == 0  # deactivates: the final flush
    dump = nbd.cluster.dump()
    assert dump.returncode == 0, dump.stdout  # replicas identical after trims


def test_requests_pipelined_behind_large_writes(nbd: Nbd) -> None:
    """Small requests sent right behind 1 MiB writes, before any reply: each
    is parsed whole, whatever a receive of the stream brings of it."""
    out = libnbd(
        nbd.uri,
        """
mib, bs = 1 << 20, 4096
h.pwrite(b'\x07' * bs, 8 * mib)
want = {0: b'\x01' * mib, 2 * mib: b'\x02' * bs, 3 * mib: b'\x03' * mib,
        5 * mib: b'\x04' * 100, 6 * mib: b'\x05' * mib}
cookies = []
reads = []
for off, data in want.items():
    cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off))
    buf = nbd.Buffer(bs)
    reads.append(buf)
    cookies.append(h.aio_pread(buf, 8 * mib))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
assert all(bytes(b.to_bytearray()) == b'\x07' * bs for b in reads)
for off, data in want.items():
    assert h.pread(len(data), off) == data, off
print('ok')
""",
    )
    assert out.strip() == "ok"


def test_fio_verify(nbd: Nbd, tmp_path: Path) -> None:
    job = tmp_path / "verify.fio"
    job.write_text(f"""
[global]
ioengine=nbd
uri={nbd.uri}
size=32M
bs=4k
iodepth=16
verify=crc32c
do_verify=1
verify_fatal=1

[randwrite]
rw=randwrite
""")
    r = run("fio", str(job), "--output-format=json", cwd=tmp_path)  # its state files go there
    result = json.loads(r.stdout[r.stdout.index("{") :])
    assert result["jobs"][0]["error"] == 0


def test_downstairs_killed_while_qemu_img_writes(
    nbd: Nbd, tmp_path: Path, rng: random.Random
) -> None:
    image = tmp_path / "in.raw"
    image.write_bytes(rng.randbytes(SIZE))
    cmd = ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), nbd.uri]
    copy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Once writes reach the disks, hold the copy still while downstairs 1 dies.
    region = nbd.cluster.regions[1]
    definition = load_definition(region)
    deadline = time.monotonic() + 120
    while not allocated_runs(region, definition):
        assert copy.poll() is None, "the copy ended before any write reached a disk"
        assert time.monotonic() < deadline, "no write reached downstairs 1"
        time.sleep(0.002)
    copy.send_signal(signal.SIGSTOP)
    assert copy.poll() is None, "the copy finished before the kill"
    nbd.cluster.stop(1, signal.SIGKILL)
    copy.send_signal(signal.SIGCONT)
    out, _ = copy.communicate(timeout=300)
    assert copy.returncode == 0, out
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), nbd.uri)


def test_trim_towards_a_plain_v13_downstairs(tmp_path: Path) -> None:
    """One downstairs takes no Trim (as a Rust one would not): a discard
    becomes zeros written on every copy, nothing is dropped, block status
    then reports data, and the replicas stay identical."""
    n = Nbd(tmp_path, plain_v13=(1,))
    try:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5 0 2M", n.uri)
        run("qemu-io", "-f", "raw", "-c", "discard 0 1M", n.uri)
        run("qemu-io", "-f", "raw", "-c", "read -P 0 0 1M", "-c", "read -P 0x5 1M 1M", n.uri)
        mapped = json.loads(run("nbdinfo", "--map", "--json", n.uri).stdout)
        data = [(e["offset"], e["length"]) for e in mapped if e["type"] == 0]
        assert data == [(0, 2 << 20)], mapped  # zeros written: data, not a hole
        log = n.output()
        assert "does not take Trim: trims are written as zeros" in log
        assert "disconnected" not in log, log
        ds = n.cluster.ds[1]
        assert ds is not None and "Trim is not supported" not in ds.output()
    finally:
        assert n.stop() == 0, n.output()
    dump = n.cluster.dump()
    assert dump.returncode == 0, dump.stdout
