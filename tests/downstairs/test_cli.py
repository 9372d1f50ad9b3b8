"""crucible-downstairs commands as a user runs them: create, import, export,
dump, verify, and one clear line for each kind of bad input."""

from __future__ import annotations

import json
import os
import random
import resource
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from crucible.region.layout import ExtentLayout, extent_path
from tests.support import DOWNSTAIRS, Client, downstairs, free_port, pattern, run_cli

pytestmark = pytest.mark.slow


def one_line_error(proc: object, *needles: str) -> None:
    out = proc.stderr  # type: ignore[attr-defined]
    assert proc.returncode != 0  # type: ignore[attr-defined]
    assert "Traceback" not in out, out
    lines = [x for x in out.strip().splitlines() if x]
    assert len(lines) == 1 or proc.returncode == 2, out  # type: ignore[attr-defined]
    for n in needles:
        assert n in out, out


def test_create_writes_region_json(tmp_path: Path) -> None:
    r = run_cli(
        "create",
        "-d",
        str(tmp_path / "r"),
        "-u",
        "12345678-1234-5678-1234-567812345678",
        "--block-size",
        "4096",
        "--extent-size",
        "64",
        "--extent-count",
        "3",
    )
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "r" / "region.json").read_text())
    assert d == {
        "block_size": 4096,
        "extent_size": {"value": 64, "shift": 12},
        "extent_count": 3,
        "uuid": "12345678-1234-5678-1234-567812345678",
        "encrypted": False,
        "database_read_version": 1,
        "database_write_version": 1,
    }
    assert extent_path(tmp_path / "r", 2).stat().st_size == 64 * 4096 + 96 * 64 + 8 + 32


def test_create_refuses_existing(tmp_path: Path) -> None:
    assert run_cli("create", "-d", str(tmp_path / "r")).returncode == 0
    before = (tmp_path / "r" / "region.json").read_text()
    one_line_error(run_cli("create", "-d", str(tmp_path / "r")), "already exists")
    assert (tmp_path / "r" / "region.json").read_text() == before


@pytest.mark.parametrize(
    "args",
    [
        ["--block-size", "1000"],
        ["--block-size", "65536"],
        ["--block-size", "256"],
        ["--extent-size", "0"],
        ["--extent-count", "-1"],
        ["--extent-size", "x"],
        ["-u", "not-a-uuid"],
    ],
)
def test_bad_create_options_caught_by_parser(tmp_path: Path, args: list[str]) -> None:
    r = run_cli("create", "-d", str(tmp_path / "r"), *args)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()


def test_import_export_round_trip(tmp_path: Path, rng: random.Random) -> None:
    image = tmp_path / "image.raw"
    payload = rng.randbytes(512 * 250 + 100)  # not a whole number of blocks or extents
    image.write_bytes(payload)
    r = run_cli("create", "-d", str(tmp_path / "r"), "-i", str(image), "--extent-size", "100")
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "r" / "region.json").read_text())
    assert d["extent_count"] == 3  # 251 blocks round up to whole extents
    out = tmp_path / "out.raw"
    r = run_cli("export", "-d", str(tmp_path / "r"), "-e", str(out))
    assert r.returncode == 0, r.stderr
    exported = out.read_bytes()
    assert exported[: len(payload)] == payload
    assert exported[len(payload) :] == bytes(300 * 512 - len(payload))
    r = run_cli("export", "-d", str(tmp_path / "r"), "-e", str(out), "--skip", "10", "--count", "5")
    assert r.returncode == 0 and out.read_bytes() == payload[10 * 512 : 15 * 512]
    one_line_error(
        run_cli(
            "export", "-d", str(tmp_path / "r"), "-e", str(out), "--skip", "299", "--count", "5"
        ),
        "past the region",
    )
    # The import left the region flushed: every extent clean at flush 1.
    assert run_cli("verify", "-d", str(tmp_path / "r")).returncode == 0
    dump = run_cli("dump", "-d", str(tmp_path / "r"))
    assert dump.returncode == 0 and "3 extents, all match" in dump.stdout


def test_import_missing_file(tmp_path: Path) -> None:
    one_line_error(
        run_cli("create", "-d", str(tmp_path / "r"), "-i", str(tmp_path / "nope")), "does not exist"
    )


def test_dump_marks_differences(tmp_path: Path) -> None:
    dirs = [tmp_path / n for n in ("a", "b", "c")]
    for p in dirs:
        assert run_cli("create", "-d", str(p), "--extent-count", "3").returncode == 0
    r = run_cli("dump", *[a for p in dirs for a in ("-d", str(p))])
    assert r.returncode == 0 and "all match" in r.stdout
    with downstairs(dirs[1]) as d:
        c = Client(d.port)
        c.negotiate()
        c.write(150, pattern(150, 1))
        c.flush(3)
    r = run_cli("dump", *[a for p in dirs for a in ("-d", str(p))])
    assert r.returncode == 1
    row = next(line for line in r.stdout.splitlines() if line.strip().startswith("1 "))
    assert "differs" in row
    r = run_cli("dump", "-d", str(dirs[0]), "-d", str(dirs[1]), "-e", "1")
    assert r.returncode == 1
    assert any(line.split()[:2] == ["50", "AB"] for line in r.stdout.splitlines()), r.stdout
    r = run_cli("dump", "-d", str(dirs[0]), "-d", str(dirs[1]), "-b", "150")
    assert "copies differ" in r.stdout and "region 1: slot B hash" in r.stdout
    one_line_error(run_cli("dump", "-d", str(dirs[0]), "-e", "1"), "at least two")


def test_verify_detects_corruption(tmp_path: Path) -> None:
    region = tmp_path / "r"
    assert run_cli("create", "-d", str(region), "--extent-count", "2").returncode == 0
    with downstairs(region) as d:
        c = Client(d.port)
        c.negotiate()
        c.write(7, pattern(7, 1))
        c.flush(1)
    assert run_cli("verify", "-d", str(region)).returncode == 0
    with open(extent_path(region, 0), "r+b") as f:
        f.seek(7 * 512 + 3)
        f.write(b"X")
    r = run_cli("verify", "-d", str(region))
    assert r.returncode == 1
    assert "extent 0 block 7 (region block 7): data does not match its context hash" in r.stdout


def test_verify_lists_every_bad_context_slot(tmp_path: Path) -> None:
    region = tmp_path / "r"
    es = 16
    assert run_cli("create", "-d", str(region), "--extent-size", str(es)).returncode == 0
    with downstairs(region) as d:
        c = Client(d.port)
        c.negotiate()
        for b in (es + 2, es + 5):
            c.write(b, pattern(b, 1))
        c.flush(1)
    layout = ExtentLayout(es, 512)
    with open(extent_path(region, 1), "r+b") as f:
        for block in (2, 5):
            for slot in (0, 1):
                f.seek(layout.slot_offset(slot, block))
                f.write(b"\x07")  # not a slot tag
    r = run_cli("verify", "-d", str(region))
    assert r.returncode == 1
    for block in (2, 5):
        line = f"extent 1 block {block} (region block {es + block}): bad context slot"
        assert line in r.stdout, r.stdout + r.stderr
    assert "2 problems" in r.stdout


def test_run_missing_region(tmp_path: Path) -> None:
    one_line_error(run_cli("run", "-d", str(tmp_path / "none"), "-p", "0"), "does not exist")


def test_run_corrupt_region_json(tmp_path: Path) -> None:
    assert run_cli("create", "-d", str(tmp_path / "r")).returncode == 0
    (tmp_path / "r" / "region.json").write_text('{"block_size": ')
    one_line_error(
        run_cli("run", "-d", str(tmp_path / "r"), "-p", "0"), "region.json", "not valid JSON"
    )


def test_run_truncated_extent(tmp_path: Path) -> None:
    assert run_cli("create", "-d", str(tmp_path / "r")).returncode == 0
    path = extent_path(tmp_path / "r", 4)
    os.truncate(path, 1000)
    one_line_error(run_cli("run", "-d", str(tmp_path / "r"), "-p", "0"), "truncated", "004")


def _open_files_limit(soft: int, hard: int) -> Callable[[], None]:
    def limit() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit


def test_a_region_of_more_extents_than_the_soft_open_files_limit(tmp_path: Path) -> None:
    """Every extent file is held open: the downstairs raises its soft limit
    to the hard one, and past the hard one says what to do."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"a hard open-files limit of {hard}")
    r = tmp_path / "r"
    made = run_cli("create", "-d", str(r), "--extent-size", "8", "--extent-count", "300")
    assert made.returncode == 0, made.stderr

    def verify(soft: int, hard: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DOWNSTAIRS, "verify", "-d", str(r)],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_open_files_limit(soft, hard),
        )

    served = verify(128, hard)
    assert served.returncode == 0, served.stderr
    one_line_error(verify(128, 128), "Too many open files", "300 extent files", "ulimit -n")


@pytest.mark.parametrize("which", ["downstairs", "repair"])
def test_run_port_in_use_says_which(tmp_path: Path, which: str) -> None:
    assert run_cli("create", "-d", str(tmp_path / "r")).returncode == 0
    port = free_port()
    taken = port if which == "downstairs" else port + 4000
    with socket.socket() as s:
        s.bind(("127.0.0.1", taken))
        s.listen()
        one_line_error(
            run_cli("run", "-d", str(tmp_path / "r"), "-p", str(port), "-a", "127.0.0.1"),
            f"{which} port {taken} on 127.0.0.1 is already in use",
        )


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"\xff\xfe\x00garbage", "not UTF-8 text"),
        (b"[]", "must be a JSON object, not list"),
        (b"{}", "field extent_size is missing"),
    ],
)
def test_run_bad_region_json_names_the_file(tmp_path: Path, content: bytes, says: str) -> None:
    assert run_cli("create", "-d", str(tmp_path / "r")).returncode == 0
    (tmp_path / "r" / "region.json").write_bytes(content)
    r = run_cli("run", "-d", str(tmp_path / "r"), "-p", "0")
    one_line_error(r, str(tmp_path / "r" / "region.json"), says)


def test_run_refuses_a_definition_that_does_not_match_the_extents(tmp_path: Path) -> None:
    args = ("--extent-size", "64", "--extent-count", "4")
    assert run_cli("create", "-d", str(tmp_path / "r"), *args).returncode == 0
    path = tmp_path / "r" / "region.json"
    obj = json.loads(path.read_text())
    path.write_text(json.dumps({**obj, "extent_count": 2}))  # the data beyond would vanish
    r = run_cli("run", "-d", str(tmp_path / "r"), "-p", "0")
    one_line_error(r, "says 2 extents, but 2 more extent files", "does not match")


def test_run_second_downstairs_on_a_region_refused(tmp_path: Path) -> None:
    assert run_cli("create", "-d", str(tmp_path / "r")).returncode == 0
    with downstairs(tmp_path / "r") as ds:
        r = run_cli("run", "-d", str(tmp_path / "r"), "-p", str(free_port()))
        one_line_error(r, "in use by another process")
        assert ds.alive()


@pytest.mark.parametrize("args", [["-p", "70000"], ["-p", "x"], ["--mode", "rx"], []])
def test_run_bad_options(tmp_path: Path, args: list[str]) -> None:
    r = run_cli("run", *args) if not args else run_cli("run", "-d", str(tmp_path), *args)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_seed_form_needs_port(tmp_path: Path) -> None:
    r = run_cli("-c", "-d", str(tmp_path / "r"))
    assert r.returncode == 2 and "-p" in r.stderr
