"""The upstairs' control API and crucible-stat against a real volume under
dsc: /info follows a downstairs stopped and started again, the documents
validate and describe what is served, and crucible-stat counts what fio did."""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from crucible.cli_util import stop_process
from tests.support import (
    BIN,
    dsc_fleet,
    free_port,
    get,
    qemu_io,
    run_tool,
    wait_get,
    wait_listening,
)

pytestmark = pytest.mark.slow


def wait_info(port: int, want: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    return wait_get(port, "/info", want)


def conforms(doc: dict[str, Any], schema: str, body: Any) -> None:
    """`body` is what the OpenAPI document says `schema` is."""
    target = {**doc["components"]["schemas"][schema], "components": doc["components"]}
    OAS30Validator(target).validate(body)


@contextlib.contextmanager
def nbd_with_control(base: Path, targets: list[str]) -> Iterator[tuple[int, int]]:
    """crucible-nbd on the targets: (NBD port, control port)."""
    port, control = free_port(), free_port()
    log = open(base / "nbd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(BIN / "crucible-nbd"), *targets, "-p", str(port), "--verify-rate", "0",
         "--control", f"127.0.0.1:{control}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_listening(port, proc, timeout=60)
        yield port, control
    finally:
        stop_process(proc, timeout=60)
        log.close()


def states(info: dict[str, Any]) -> list[str]:
    return [d["state"] for d in info["downstairs"]]


def test_info_follows_a_downstairs_stopped_and_started(tmp_path: Path) -> None:
    with dsc_fleet(tmp_path) as (dsc, targets), nbd_with_control(tmp_path, targets) as (port, ctl):
        doc = get(ctl, "/openapi.json")
        validate(doc)
        info = wait_info(ctl, lambda i: states(i) == ["active"] * 3)
        conforms(doc, "UpstairsStats", info)
        assert info["state"] == "active"
        assert info["ds_state"] == [{"type": "active"}] * 3
        qemu_io(port, "write -P 1 0 1M", "flush")
        # The guest's flush is acked before the third downstairs may have
        # answered it; its jobs retire once all three have.
        work = wait_get(ctl, "/work", lambda w: len(w["completed"]) > 0)
        conforms(doc, "DownstairsWork", work)
        assert {j["job_type"] for j in work["jobs"] + work["completed"]} >= {"Write", "Flush"}
        assert 0 < len(work["completed"]) <= 8

        r = run_tool("dsc", "cmd", "--control", dsc, "stop", "1")
        assert r.returncode == 0, r.stderr
        qemu_io(port, "write -P 2 0 1M", "flush")  # while it is away
        info = wait_info(ctl, lambda i: states(i)[1] in ("offline", "faulted"))
        conforms(doc, "UpstairsStats", info)
        assert info["ds_state"][1]["type"] == "connecting"
        assert info["ds_state"][1]["value"]["mode"] in ("offline", "faulted")
        assert states(info)[0] == states(info)[2] == "active"

        r = run_tool("dsc", "cmd", "--control", dsc, "start", "1")
        assert r.returncode == 0, r.stderr
        info = wait_info(ctl, lambda i: states(i) == ["active"] * 3)
        assert info["ds_state"] == [{"type": "active"}] * 3
        qemu_io(port, "read -P 2 0 1M")

        # A snapshot on all three, and errors as JSON.
        url = f"http://127.0.0.1:{ctl}/snapshot"
        req = urllib.request.Request(url, data=b'{"name": "s1"}', method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read()) == {"name": "s1"}
        made = sorted(tmp_path.glob("*/.snapshot/s1/region.json"))
        assert len(made) == 3, made
        req = urllib.request.Request(url, data=b'{"name": "../x"}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400
        conforms(doc, "Error", json.loads(e.value.read()))
        dsc_doc = get(int(dsc.rpartition(":")[2]), "/openapi.json")
        validate(dsc_doc)
        conforms(dsc_doc, "Downstairs", get(int(dsc.rpartition(":")[2]), "/state/cid/0"))


def test_crucible_stat_counts_what_fio_did(tmp_path: Path) -> None:
    ios = 3 * 4096  # three passes over the 16 MiB: many intervals, so the edge ones count little
    with dsc_fleet(tmp_path) as (_, targets), nbd_with_control(tmp_path, targets) as (port, ctl):
        wait_info(ctl, lambda i: states(i) == ["active"] * 3)
        stat = subprocess.Popen(
            [str(BIN / "crucible-stat"), "--json", "--interval", "0.1", f"127.0.0.1:{ctl}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert stat.stdout is not None
            first = json.loads(stat.stdout.readline())  # polled before fio starts
            r = subprocess.run(
                ["fio", "--name", "w", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/",
                 "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=16M", "--loops=3",
                 "--randrepeat=0", "--output-format=json"],
                capture_output=True,
                text=True,
                timeout=300,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            job = json.loads(r.stdout[r.stdout.index("{") :])["jobs"][0]
            done = wait_info(ctl, lambda i: i["guest"]["write"]["ops"] >= ios)
            lines = [first]
            while lines[-1].get("write_ops", -1) < done["guest"]["write"]["ops"]:
                lines.append(json.loads(stat.stdout.readline()))
        finally:
            stat.send_signal(signal.SIGINT)
            stat.communicate(timeout=30)
        assert stat.returncode == 0
    assert job["write"]["total_ios"] == ios
    samples = [x for x in lines if "error" not in x]
    # What crucible-stat counted over the run is what fio did.
    assert samples[-1]["write_ops"] - samples[0]["write_ops"] == ios
    assert samples[-1]["write_bytes"] - samples[0]["write_bytes"] == ios * 4096
    # And its rate while fio ran agrees with fio's IOPS (edges of the run included).
    busy = [(p, x) for p, x in itertools.pairwise(samples) if x["write_ops"] > p["write_ops"]]
    seconds = sum(x["time"] - p["time"] for p, x in busy)
    mean = ios / seconds
    assert 0.5 < mean / job["write"]["iops"] < 2.0, (mean, job["write"]["iops"])
