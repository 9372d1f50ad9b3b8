"""crutest's fault workloads against downstairs run by dsc: a downstairs
killed and restarted 20 times under IO, one stopped until it is faulted and
live-repaired, one replaced by an empty region. Every read is checked against
the verify log, and at the end the replicas are identical."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.support import GEOMETRY, Downstairs, create_region, dsc_fleet, run_tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def crutest(rng: random.Random, *args: str) -> str:
    """crutest with a seed drawn from the test's own (printed if it fails)."""
    r = run_tool("crutest", *args, "-q", "--seed", str(rng.randrange(1 << 32)), timeout=500)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def dump_matches(*regions: Path) -> None:
    args = [a for r in regions for a in ("-d", str(r))]
    r = run_tool("crucible-downstairs", "dump", *args)
    assert r.returncode == 0 and "all match" in r.stdout, r.stdout + r.stderr


def test_kill_restart_repair_and_replace_under_io(tmp_path: Path, rng: random.Random) -> None:
    vlog = str(tmp_path / "verify.json")
    with dsc_fleet(tmp_path) as (control, targets):
        regions = sorted(p for p in tmp_path.iterdir() if (p / "region.json").exists())
        crutest(rng, "generic", *targets, "-c", "300", "--verify-out", vlog)

        # 20 cycles: a random downstairs SIGKILLed mid-IO and restarted; reads verified.
        crutest(
            rng, "replay", *targets, "--dsc", control, "--kill", "-c", "20",
            "--verify-in", vlog, "--verify-out", vlog,
        )  # fmt: skip
        dump_matches(*regions)

        out = crutest(
            rng, "repair", *targets, "--dsc", control, "-c", "2",
            "--verify-in", vlog, "--verify-out", vlog,
        )  # fmt: skip
        assert "live repairs: 2" in out
        dump_matches(*regions)

        # The last target swapped for an empty region at a new address, under IO.
        fresh = tmp_path / "fresh"
        create_region(fresh, *GEOMETRY)
        new = Downstairs(fresh)
        try:
            out = crutest(
                rng, "replace", *targets, "--replacement", f"127.0.0.1:{new.port}",
                "--verify-in", vlog, "--verify-out", vlog,
            )  # fmt: skip
            assert "replaced" in out
            moved = [*targets[:-1], f"127.0.0.1:{new.port}"]
            crutest(rng, "verify", *moved, "--verify-in", vlog)
        finally:
            new.stop()
        dump_matches(regions[0], regions[1], fresh)


def test_fault_workloads_need_their_options() -> None:
    targets = ["-t", "127.0.0.1:1", "-t", "127.0.0.1:2", "-t", "127.0.0.1:3"]
    for workload, needs in (("replay", "--dsc"), ("repair", "--dsc"), ("replace", "--replacement")):
        r = run_tool("crutest", workload, *targets)
        assert r.returncode == 2 and f"{workload} needs {needs}" in r.stderr, r.stderr
