"""crucible-agent with real processes on loopback: its API through HTTP
clients (curl among them), a SIGKILL between a request and its completion,
downstairs SIGKILLed and restarted, the agent SIGKILLed and adopting its
downstairs, snapshots, and two volumes of crucible-volume on three agents
serving a real NBD client."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from crucible.agent.client import AgentCallError
from tests.agent.agents import Agent, processes_under, replicas_agree, serving, wait_for
from tests.support import BIN, free_port, qemu_io, run_tool, wait_get, wait_listening

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

METRICS = free_port()
GEOMETRY = {"block_size": 4096, "extent_size": 256, "extent_count": 8, "encrypted": False}


def new_region(**over: Any) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), **GEOMETRY, **over}


def refused(agent: Agent, method: str, path: str, body: Any = None) -> tuple[int, str]:
    with pytest.raises(AgentCallError) as e:
        agent.client.call(method, path, body)
    return e.value.status, str(e.value)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path / "agent", host="127.0.0.2", extra=("--metrics", f"127.0.0.2:{METRICS}"))
    try:
        yield a
    finally:
        a.close()


def test_region_lifecycle_through_the_api(agent: Agent) -> None:
    doc = json.loads(subprocess.run(
        ["curl", "-sf", f"http://{agent.host}:{agent.port}/openapi.json"],
        capture_output=True, check=True, timeout=30).stdout)  # fmt: skip
    validate(doc)
    assert {"region_create", "region_delete", "region_run_snapshot"} <= {
        op["operationId"] for item in doc["paths"].values() for op in item.values()
        if isinstance(op, dict) and "operationId" in op
    }  # fmt: skip

    req = new_region()
    first = agent.client.create(req)
    assert first["state"] == "requested" and first["address"] == agent.host
    assert agent.client.create(req)["port_number"] == first["port_number"]  # idempotent
    r = agent.wait_state(req["id"], "created")
    assert (agent.data / "regions" / req["id"] / "region.json").exists()
    wait_for(lambda: serving(agent.host, r["port_number"]), "the region's downstairs")
    assert [x["id"] for x in agent.client.regions()] == [req["id"]]

    # Clear refusals, each naming what is wrong.
    assert refused(agent, "POST", "/regions", {**req, "extent_count": 9})[0] == 409
    status, why = refused(agent, "POST", "/regions", new_region(block_size=1000))
    assert status == 400 and "not a power of two" in why
    st = os.statvfs(agent.data)
    too_many = st.f_bavail * st.f_frsize // (4096 * 4096) + 1  # extents of 16 MiB
    status, why = refused(agent, "POST", "/regions",
                          new_region(extent_size=4096, extent_count=too_many))  # fmt: skip
    assert status == 507 and "bytes are free" in why
    status, why = refused(agent, "GET", f"/regions/{uuid.uuid4()}")
    assert status == 404
    curl = subprocess.run(
        ["curl", "-s", "-H", "api-version: 9.0.0",
         f"http://{agent.host}:{agent.port}/crucible/0/regions"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "this agent speaks up to 1.0.0" in json.loads(curl.stdout)["message"]

    # A second region gets its own port and directory.
    other = new_region()
    agent.client.create(other)
    r2 = agent.wait_state(other["id"], "created")
    assert r2["port_number"] != r["port_number"]
    wait_for(lambda: serving(agent.host, r2["port_number"]), "the second region's downstairs")

    agent.client.delete(req["id"])
    agent.wait_state(req["id"], "destroyed")
    assert not (agent.data / "regions" / req["id"]).exists()
    assert agent.downstairs_pid(req["id"]) is None
    agent.client.delete(req["id"])  # again: nothing to do
    assert agent.client.create(req)["state"] == "destroyed"  # a retried create sees it
    assert serving(agent.host, r2["port_number"])  # the other one is untouched
    url = f"http://127.0.0.2:{METRICS}/metrics"
    scrape = subprocess.run(["curl", "-sf", url], capture_output=True, text=True, check=True,
                            timeout=30).stdout  # fmt: skip
    for line in ('crucible_agent_regions{state="created"} 1.0',
                 'crucible_agent_regions{state="destroyed"} 1.0',
                 "crucible_agent_downstairs_running 1.0"):  # fmt: skip
        assert line in scrape, scrape
    assert "Traceback" not in agent.log()


def test_agent_killed_mid_create_finishes_it_after_restart(tmp_path: Path) -> None:
    """The first create blocks (a wrapper stands in for crucible-downstairs
    and says when it is reached); the agent is SIGKILLed there. The wrapper
    dies with it, and the restarted agent makes the region whole."""
    marker = tmp_path / "create-reached"
    wrapper = tmp_path / "downstairs-wrapper"
    wrapper.write_text(
        f'#!/bin/sh\nif [ "$1" = create ]; then touch {marker}\n'
        f'  exec {sys.executable} -c "import time; time.sleep(600)" {marker}\nfi\n'
        f'exec {BIN / "crucible-downstairs"} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    a = Agent(tmp_path / "agent", host="127.0.0.2", extra=("-D", str(wrapper)))
    try:
        req = new_region()
        a.client.create(req)
        wait_for(marker.exists, "the create to begin")
        assert a.region(req["id"])["state"] == "requested"
        status, why = refused(a, "DELETE", f"/regions/{req['id']}")
        assert status == 503 and "being created" in why
        assert processes_under(marker)
        a.kill()
        wait_for(lambda: not processes_under(marker), "the create to die with the agent")
        a.extra = ()
        a.start()
        r = a.wait_state(req["id"], "created")
        wait_for(lambda: serving(a.host, r["port_number"]), "the region's downstairs")
        assert [p.name for p in (a.data / "regions").iterdir()] == [req["id"]]
        v = run_tool("crucible-downstairs", "verify", "-d", str(a.data / "regions" / req["id"]))
        assert v.returncode == 0, v.stdout + v.stderr

        # A downstairs that dies while its agent is down is started again by the next.
        a.kill()
        pid = a.downstairs_pid(req["id"])
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: a.downstairs_pid(req["id"]) is None, "the downstairs to die")
        a.start()
        wait_for(lambda: a.downstairs_pid(req["id"]) not in (None, pid), "a new downstairs")
        wait_for(lambda: serving(a.host, r["port_number"]), "it to serve")
    finally:
        a.close()


def test_snapshots_through_the_agent(agent: Agent, tmp_path: Path) -> None:
    req = new_region()
    agent.client.create(req)
    agent.wait_state(req["id"], "created")
    rid = req["id"]
    # The downstairs writes snapshots when a flush asks; this one is made the
    # same way with the region at rest, by the region's own tool.
    region_dir = agent.data / "regions" / rid
    assert agent.client.call("GET", f"/regions/{rid}/snapshots") == {
        "snapshots": [], "running_snapshots": {}}  # fmt: skip
    snap = region_dir / ".snapshot" / "s1"
    shutil.copytree(region_dir, snap, ignore=shutil.ignore_patterns(".snapshot"))
    listing = agent.client.call("GET", f"/regions/{rid}/snapshots")
    assert [s["name"] for s in listing["snapshots"]] == ["s1"]
    assert listing["snapshots"][0]["created"].endswith("Z")
    assert refused(agent, "GET", f"/regions/{rid}/snapshots/nope")[0] == 404

    running = agent.client.call("POST", f"/regions/{rid}/snapshots/s1/run")
    assert running["state"] == "requested" and running["name"] == "s1"
    port = running["port_number"]
    wait_for(lambda: serving(agent.host, port), "the snapshot's downstairs")
    info = json.loads(subprocess.run(
        ["curl", "-sf", f"http://{agent.host}:{port + 4000}/region-info"],
        capture_output=True, check=True, timeout=30).stdout)  # fmt: skip
    assert info["uuid"] == rid
    status, why = refused(agent, "DELETE", f"/regions/{rid}")
    assert status == 400 and "must delete snapshots first" in why

    # A clone: a new region filled from the running snapshot's repair server.
    clone = new_region(source=f"{agent.host}:{port + 4000}")
    agent.client.create(clone)
    c = agent.wait_state(clone["id"], "created")
    assert c["read_only"] is True
    wait_for(lambda: serving(agent.host, c["port_number"]), "the clone's downstairs")
    cloned = agent.data / "regions" / clone["id"]
    same = run_tool("crucible-downstairs", "dump", "-d", str(snap), "-d", str(cloned))
    assert same.returncode == 0, same.stdout + same.stderr
    agent.client.delete(clone["id"])
    agent.wait_state(clone["id"], "destroyed")
    status, why = refused(agent, "DELETE", f"/regions/{rid}/snapshots/s1")
    assert status == 409 and "stop it first" in why

    agent.client.call("DELETE", f"/regions/{rid}/snapshots/s1/run")
    path = f"/regions/{rid}/snapshots"
    wait_for(lambda: agent.client.call("GET", path)["running_snapshots"]["s1"]["state"]
             == "destroyed", "the snapshot to stop")  # fmt: skip
    assert not serving(agent.host, port)
    agent.client.call("DELETE", f"/regions/{rid}/snapshots/s1")
    agent.client.call("DELETE", f"/regions/{rid}/snapshots/s1")  # again: fine
    assert not snap.exists()
    agent.client.delete(rid)
    agent.wait_state(rid, "destroyed")


# ---- volumes on three agents ------------------------------------------------------------


def volume_create(agents: list[Agent], out: Path, *extra: str) -> dict[str, Any]:
    names = ",".join(f"{a.host}:{a.port}" for a in agents)
    r = run_tool("crucible-volume", "create", "--agents", names, "--size", "16M",
                 "--block-size", "4096", "-o", str(out), *extra)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def region_ids(agent: Agent, vcr: dict[str, Any]) -> str:
    """The id of the region `agent` holds for the volume."""
    targets = vcr["sub_volumes"][0]["opts"]["target"]
    for r in agent.client.regions():
        if f"{r['address']}:{r['port_number']}" in targets and r["state"] == "created":
            return str(r["id"])
    raise AssertionError(f"agent {agent.host} holds no region of the volume")


class NbdExport:
    def __init__(self, base: Path, vcr: Path) -> None:
        self.port, self.control = free_port(), free_port()
        self.log = open(base / "nbd.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "crucible-nbd"), "--vcr", str(vcr), "-p", str(self.port), "--control",
             f"127.0.0.1:{self.control}", "--verify-rate", "0"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_listening(self.port, self.proc, timeout=60)

    def states(self) -> list[str]:
        info = wait_get(self.control, "/info", lambda i: True)
        return [d["state"] for d in info["downstairs"]]

    def wait_all_active(self) -> None:
        wait_get(self.control, "/info", lambda i: [d["state"] for d in i["downstairs"]]
                 == ["active"] * 3 and i.get("live_repair") is None)  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(60) == 0
        self.log.close()


def test_volumes_on_three_agents(tmp_path: Path) -> None:
    agents = [Agent(tmp_path / f"agent{i}", host=f"127.0.0.{i + 2}") for i in range(3)]
    nbd = None
    try:
        v1 = volume_create(agents, tmp_path / "v1.json")
        v2 = volume_create(agents, tmp_path / "v2.json", "--encrypted")
        t1, t2 = (v["sub_volumes"][0]["opts"]["target"] for v in (v1, v2))
        assert len({t.rpartition(":")[0] for t in t1}) == 3  # one replica per host
        assert not set(t1) & set(t2)
        assert v2["sub_volumes"][0]["opts"]["key"] and not v1["sub_volumes"][0]["opts"]["key"]
        ids1 = [region_ids(a, v1) for a in agents]
        ids2 = [region_ids(a, v2) for a in agents]
        assert not set(ids1) & set(ids2)

        nbd = NbdExport(tmp_path, tmp_path / "v1.json")
        qemu_io(nbd.port, "write -P 1 0 4M")

        # A downstairs SIGKILLed: its agent starts it again, the volume takes it back.
        old = agents[0].downstairs_pid(ids1[0])
        assert old is not None
        os.kill(old, signal.SIGKILL)
        new = wait_for(lambda: (p := agents[0].downstairs_pid(ids1[0])) != old and p,
                       "the agent to restart the downstairs")  # fmt: skip
        qemu_io(nbd.port, "write -P 2 4M 4M")
        nbd.wait_all_active()
        assert "was killed by SIGKILL" in agents[0].log()

        # The agent SIGKILLed: its downstairs keep serving; restarted, it adopts
        # them, even those it had started but not recorded yet (as if it died
        # in between: found by their command lines).
        serving_pids = [agents[1].downstairs_pid(rid) for rid in (ids1[1], ids2[1])]
        agents[1].kill()
        with sqlite3.connect(agents[1].data / "agent.sqlite3") as db:
            db.execute("DELETE FROM processes WHERE key = ?", (ids2[1],))
        qemu_io(nbd.port, "write -P 3 8M 4M")
        agents[1].start()
        assert agents[1].log().count("adopted its running downstairs") == 2
        assert [agents[1].downstairs_pid(rid) for rid in (ids1[1], ids2[1])] == serving_pids
        nbd.wait_all_active()
        assert agents[0].downstairs_pid(ids1[0]) == new

        # Deleting the other volume leaves this one serving.
        r = run_tool("crucible-volume", "delete", str(tmp_path / "v2.json"), "--agents",
                     ",".join(f"{a.host}:{a.port}" for a in agents))  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        for a, rid in zip(agents, ids2, strict=True):
            assert a.region(rid)["state"] == "destroyed"
        qemu_io(nbd.port, "read -P 1 0 4M", "read -P 2 4M 4M", "read -P 3 8M 4M")
        nbd.wait_all_active()
        nbd.stop()
        nbd = None
        replicas_agree(agents, ids1)
    finally:
        if nbd is not None:
            nbd.stop()
        for a in agents:
            a.close()
