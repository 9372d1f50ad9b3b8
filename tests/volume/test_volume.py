"""Volumes built from VCRs, with real processes and real clients: two
sub-volumes served as one disk, and read-only parents (a raw file, a
read-only region) seen through, copied in by the scrub without ever
overwriting the guest's writes, then dropped."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crucible.cli_util import stop_process
from tests.support import BIN, Cluster, free_port, image_server, qemu_io, run_tool, wait_listening

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

GEOMETRY = ("--block-size", "4096", "--extent-size", "64", "--extent-count", "4")  # 1 MiB
MIB = 1 << 20
BS = 4096


def vcr_create(out: Path, *args: str) -> Path:
    r = run_tool("crucible-vcr", "create", *args, "-o", str(out), timeout=60)
    assert r.returncode == 0, r.stderr
    return out


class Nbd:
    def __init__(self, base: Path, vcr: Path, *extra: str) -> None:
        self.port = free_port()
        self.log_path = base / f"nbd-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "crucible-nbd"), "--vcr", str(vcr), "-p", str(self.port), *extra],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_listening(self.port, self.proc, timeout=60)
        self.uri = f"nbd://127.0.0.1:{self.port}/"

    def said(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_path.read_text():
            assert self.proc.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, self.log_path.read_text()
            time.sleep(0.05)

    def stop(self) -> None:
        assert stop_process(self.proc, timeout=60) == 0, self.log_path.read_text()
        self._log.close()


@contextlib.contextmanager
def serving(base: Path, vcr: Path, *extra: str) -> Iterator[Nbd]:
    n = Nbd(base, vcr, *extra)
    try:
        yield n
    finally:
        if n.proc.poll() is None:
            n.stop()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def image_of(uri: str, path: Path) -> bytes:
    subprocess.run(["nbdcopy", uri, str(path)], check=True, timeout=120)
    return path.read_bytes()


def test_two_sub_volumes_are_one_disk(tmp_path: Path, rng: random.Random) -> None:
    a, b = Cluster(tmp_path / "a", *GEOMETRY), Cluster(tmp_path / "b", *GEOMETRY)
    try:
        vcr = vcr_create(tmp_path / "vol.json", *a.target_args(), *b.target_args())
        img = tmp_path / "img.raw"
        img.write_bytes(rng.randbytes(2 * MIB))
        with serving(tmp_path, vcr) as n:
            r = subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                                str(img), n.uri], capture_output=True, text=True)  # fmt: skip
            assert r.returncode == 0, r.stderr
            r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), n.uri],
                               capture_output=True, text=True)  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr
        a.stop()
        b.stop()
        data = img.read_bytes()
        assert a.replica_blocks(0, 256) == [data[:MIB]] * 3  # each holds exactly its half
        assert b.replica_blocks(0, 256) == [data[MIB:]] * 3
    finally:
        a.stop()
        b.stop()


def test_a_file_parent_is_seen_through_copied_in_and_dropped(
    tmp_path: Path, rng: random.Random
) -> None:
    c = Cluster(tmp_path / "v", *GEOMETRY[:4], "--extent-count", "8")  # 2 MiB
    try:
        parent = tmp_path / "base.raw"
        base = rng.randbytes(3 * MIB // 2)  # 1.5 MiB under a 2 MiB volume
        parent.write_bytes(base)
        vcr = vcr_create(tmp_path / "vol.json", *c.target_args(), "--parent-file", str(parent))
        expect = bytearray(base + bytes(MIB // 2))

        # No scrub yet: reads come from the parent where nothing was written.
        with serving(tmp_path, vcr, "--scrub-delay", "3600") as n:
            assert image_of(n.uri, tmp_path / "a.raw") == expect
            qemu_io(n.uri, "write -P 0x5a 400k 200k", "write -P 0x6b 1600k 100k", "flush")
            expect[400 << 10 : 600 << 10] = b"\x5a" * (200 << 10)
            expect[1600 << 10 : 1700 << 10] = b"\x6b" * (100 << 10)
            assert image_of(n.uri, tmp_path / "b.raw") == expect

        # The scrub, slowed down, with a write going on while it runs: it
        # never overwrites what the guest wrote, before it or meanwhile.
        ctl, metrics = free_port(), free_port()
        watch = ("--control", f"127.0.0.1:{ctl}", "--metrics", f"127.0.0.1:{metrics}")
        with serving(tmp_path, vcr, "--scrub-pause", "0.2", *watch) as n:
            qemu_io(n.uri, "write -P 0x7c 1200k 64k", "flush")
            expect[1200 << 10 : 1264 << 10] = b"\x7c" * (64 << 10)
            n.said("the parent is dropped")
            n.said("no longer names the read-only parent")
            status = get_json(f"http://127.0.0.1:{ctl}/volume")
            assert status["scrub"] == {"point": 384, "total": 384, "done": True, "error": ""}
            assert status["total_blocks"] == 512 and status["sub_volumes"] == 1
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics").read().decode()
            assert "crucible_volume_scrub_done 1.0" in text
            assert "crucible_volume_scrub_point_blocks 384.0" in text
            parent.unlink()  # gone for good: reads must not need it
            assert image_of(n.uri, tmp_path / "c.raw") == expect
        # The VCR no longer names the parent: the volume opens without it.
        assert json.loads(vcr.read_text())["read_only_parent"] is None
        with serving(tmp_path, vcr) as n:
            assert image_of(n.uri, tmp_path / "e.raw") == expect
            assert "scrub" not in n.log_path.read_text()
        c.stop()
        copies = c.replica_blocks(0, 512)
        assert copies == [bytes(expect)] * 3

        # A file alone is a read-only disk of its size.
        parent.write_bytes(base)
        alone = tmp_path / "file.json"
        alone.write_text(json.dumps(
            {"type": "file", "id": str(uuid.uuid4()), "block_size": BS, "path": str(parent)}
        ))  # fmt: skip
        with serving(tmp_path, alone, "--read-only") as n:
            assert image_of(n.uri, tmp_path / "d.raw") == base
    finally:
        c.stop()


def test_a_read_only_region_parent(tmp_path: Path, rng: random.Random) -> None:
    """A parent that is a read-only region (as a snapshot is served): seen
    through, scrubbed in, and its downstairs may go away afterwards."""
    p = Cluster(tmp_path / "p", *GEOMETRY)
    v = Cluster(tmp_path / "v", *GEOMETRY)
    try:
        data = rng.randbytes(MIB)
        pvcr = vcr_create(tmp_path / "parent-rw.json", *p.target_args())
        with serving(tmp_path, pvcr) as n:
            img = tmp_path / "data.raw"
            img.write_bytes(data)
            subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                            str(img), n.uri], check=True, capture_output=True)  # fmt: skip
        p.stop()
        p.start(None, "--mode", "ro")
        ro = vcr_create(tmp_path / "parent.json", *p.target_args(), "--read-only")
        vcr = vcr_create(tmp_path / "vol.json", *v.target_args(), "--parent-vcr", str(ro))
        with serving(tmp_path, vcr) as n:
            n.said("the parent is dropped")
            p.stop()  # the parent's downstairs are gone: nothing reads them now
            assert image_of(n.uri, tmp_path / "out.raw") == data
    finally:
        p.stop()
        v.stop()


def test_bad_vcrs_are_one_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.json"
    f.write_text('{"type": "volume", "id": "x", "block_size": 512, "sub_volumes": []}')
    for tool in ("crucible-nbd", "crutest", "crucible"):
        args = ("generic",) if tool == "crutest" else ()
        r = run_tool(tool, *args, "--vcr", str(f), timeout=60)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].endswith("id: 'x' is not a UUID"), r.stderr
    gone = {"type": "file", "id": str(uuid.uuid4()), "block_size": BS, "path": "/nonexistent.raw"}
    f.write_text(json.dumps(gone))
    r = run_tool("crucible-nbd", "--vcr", str(f), "--read-only", "-p", str(free_port()))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("/nonexistent.raw: No such file or directory")
    r = run_tool("crucible-vcr", "check", str(tmp_path / "missing.json"))
    assert r.returncode == 1 and "No such file" in r.stderr
    r = run_tool("crucible-nbd", "--vcr", str(f), "-t", "127.0.0.1:1")
    assert r.returncode == 2 and "give -t or --vcr, not both" in r.stderr


def test_a_url_parent(tmp_path: Path, rng: random.Random) -> None:
    """A raw image over HTTP as the parent: read with ranged GETs before the
    scrub, copied in, and not needed after (its server goes away)."""
    image = rng.randbytes(MIB)
    c = Cluster(tmp_path / "v", *GEOMETRY)
    try:
        with image_server(image) as (url, gets):
            vcr = vcr_create(tmp_path / "vol.json", *c.target_args(), "--parent-url", url)
            with serving(tmp_path, vcr, "--scrub-delay", "3600") as n:
                assert image_of(n.uri, tmp_path / "a.raw") == image
            assert gets[0] > 0
            n = Nbd(tmp_path, vcr)
            n.said("the parent is dropped")
        try:
            assert image_of(n.uri, tmp_path / "b.raw") == image
        finally:
            n.stop()
    finally:
        c.stop()
