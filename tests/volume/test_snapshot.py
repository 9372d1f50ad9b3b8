"""Snapshots with real processes: taken through the control API while fio
writes elsewhere on the volume, a snapshot holds exactly what was flushed
before it; served read-only it reads back the old data after the volume
moved on; a new disk with it as read-only parent reads the same before and
after its scrub; list, delete and the refusals."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from crucible.cli_util import stop_process
from crucible.region.layout import extent_path
from crucible.region.region import Region
from tests.support import (
    BIN,
    Cluster,
    create_region,
    free_port,
    qemu_io,
    run_cli,
    run_tool,
    wait_listening,
)
from tests.volume.test_volume import GEOMETRY, MIB, image_of, serving, vcr_create

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HALF = MIB // 2


def post_snapshot(port: int, name: str) -> dict[str, str]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/snapshot", data=json.dumps({"name": name}).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        body: dict[str, str] = json.loads(r.read())
        return body


def test_a_snapshot_under_load_holds_what_was_flushed(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "v", *GEOMETRY)
    port, ctl = free_port(), free_port()
    log = open(tmp_path / "nbd.log", "wb")  # noqa: SIM115 - closed below
    nbd = subprocess.Popen(
        [str(BIN / "crucible-nbd"), *c.target_args(), "-p", str(port), "--control",
         f"127.0.0.1:{ctl}"], stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_listening(port, nbd, timeout=60)
        uri = f"nbd://127.0.0.1:{port}/"
        qemu_io(uri, f"write -P 0xa1 0 {HALF}", "flush")
        # fio writes the other half the whole time the snapshot is taken.
        fio = subprocess.Popen(
            ["fio", "--name=load", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
             "--bs=4k", "--iodepth=8", f"--offset={HALF}", f"--size={HALF}",
             "--time_based", "--runtime=3", "--randrepeat=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert post_snapshot(ctl, "s1") == {"name": "s1"}
        assert fio.wait(timeout=120) == 0, fio.stderr.read() if fio.stderr else ""
        qemu_io(uri, f"write -P 0xb2 0 {HALF}", "flush")  # the volume moves on
        assert post_snapshot(ctl, "s1") == {"name": "s1"}  # the same name: kept as it was
    finally:
        stop_process(nbd, timeout=60)
        log.close()
        c.stop()

    for region in c.regions:
        r = run_cli("snapshot", "list", "-d", str(region), "--json")
        assert r.returncode == 0 and [s["name"] for s in json.loads(r.stdout)] == ["s1"]

    # The three snapshots served read-only: the old half, exactly.
    snaps = Cluster(tmp_path / "v", regions=c.regions, run_args=("--snapshot", "s1"))
    try:
        svcr = vcr_create(tmp_path / "snap.json", *snaps.target_args(), "--read-only")
        with serving(tmp_path, svcr, "--read-only") as n:
            data = image_of(n.uri, tmp_path / "snap.raw")
        assert data[:HALF] == b"\xa1" * HALF

        # A new disk over the snapshot: the same before its scrub and after.
        new = Cluster(tmp_path / "new", *GEOMETRY)
        try:
            vcr = vcr_create(tmp_path / "new.json", *new.target_args(), "--parent-vcr", str(svcr))
            with serving(tmp_path, vcr, "--scrub-delay", "3600") as n:
                assert image_of(n.uri, tmp_path / "before.raw") == data
            with serving(tmp_path, vcr) as n:
                n.said("the parent is dropped")
                assert image_of(n.uri, tmp_path / "after.raw") == data
        finally:
            new.stop()

        # Clones of the three snapshots: a new volume at generation 1.
        clones = [tmp_path / f"clone{i}" for i in range(3)]
        for d, s in zip(clones, snaps.ds, strict=True):
            assert s is not None
            r = run_cli("clone", "-d", str(d), "--source", f"127.0.0.1:{s.repair_port}")
            assert r.returncode == 0, r.stderr
        # One cut short after two extents (its marker says so, and the later
        # extents are still as created, empty): run again, it finishes.
        first = snaps.ds[0]
        assert first is not None
        source = f"127.0.0.1:{first.repair_port}"
        (clones[0] / ".clone").write_text(json.dumps({"source": source, "done": [0, 1]}))
        create_region(tmp_path / "blank", *GEOMETRY)
        for eid in (2, 3):
            blank = extent_path(tmp_path / "blank", eid).read_bytes()
            extent_path(clones[0], eid).write_bytes(blank)
        r = run_cli("clone", "-d", str(clones[0]), "--source", source)
        assert r.returncode == 0, r.stderr
        copies = []
        for d in clones[:2]:
            opened = Region.open(d, read_only=True)
            copies.append((opened.read(128, 128), opened.extent_versions()))
            opened.close()
        assert copies[0] == copies[1]  # extents 2 and 3 fetched again; all at gen 0
        r = run_cli("clone", "-d", str(clones[0]), "--source", source)
        assert r.returncode == 1 and "holds a region already" in r.stderr
        cl = Cluster(tmp_path / "c", regions=clones)
        try:
            cvcr = vcr_create(tmp_path / "clone.json", *cl.target_args())
            with serving(tmp_path, cvcr) as n:
                assert image_of(n.uri, tmp_path / "clone.raw") == data
                assert "with generation 1 " in n.log_path.read_text()
        finally:
            cl.stop()
        r = run_cli("clone", "-d", str(tmp_path / "x"), "--source", f"127.0.0.1:{free_port()}")
        assert r.returncode == 1 and "cannot ask the source" in r.stderr
    finally:
        snaps.stop()

    r = run_cli("snapshot", "delete", "s1", "-d", str(c.regions[0]))
    assert r.returncode == 0, r.stderr
    assert run_cli("snapshot", "list", "-d", str(c.regions[0])).stdout == ""
    r = run_tool("crucible-downstairs", "run", "-d", str(c.regions[0]), "--snapshot", "s1")
    assert r.returncode == 1 and "no snapshot 's1'" in r.stderr
    r = run_cli("snapshot", "delete", "s1", "-d", str(c.regions[0]))
    assert r.returncode == 1 and "no snapshot 's1'" in r.stderr


def test_crutests_snapshot_workload(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "v", *GEOMETRY)
    try:
        r = run_tool("crutest", "snapshot", *c.target_args(), "--count", "3", "-q", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        c.stop()
        for region in c.regions:
            listed = run_cli("snapshot", "list", "-d", str(region), "--json")
            assert len(json.loads(listed.stdout)) == 3, listed.stdout
    finally:
        c.stop()


def test_a_read_only_volume_takes_no_snapshot(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "v", *GEOMETRY, run_args=("--mode", "ro"))
    port, ctl = free_port(), free_port()
    nbd = subprocess.Popen(
        [str(BIN / "crucible-nbd"), *c.target_args(), "-p", str(port), "--read-only",
         "--control", f"127.0.0.1:{ctl}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(port, nbd, timeout=60)
        wait_listening(ctl, nbd, timeout=60)
        with pytest.raises(urllib.error.HTTPError) as e:
            post_snapshot(ctl, "s1")
        assert e.value.code == 503
        assert "read-only volume takes no snapshot" in json.loads(e.value.read())["message"]
    finally:
        stop_process(nbd, timeout=60)
        c.stop()
