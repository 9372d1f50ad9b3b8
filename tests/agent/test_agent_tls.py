"""Mutual TLS with the agent: its API refuses a client without a certificate
and serves crucible-volume with one; a region asked for with PEMs gets a
downstairs that serves only over TLS with them."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from crucible.tls import TlsFiles
from tests.agent.agents import Agent, serving, wait_for
from tests.support import run_tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def files(certs: Path, host: str) -> TlsFiles:
    d = certs / host
    return TlsFiles(d / "cert.pem", d / "key.pem", d / "root.pem")


def tls_flags(certs: Path, host: str) -> tuple[str, ...]:
    f = files(certs, host)
    return ("--cert-pem", str(f.cert), "--key-pem", str(f.key), "--root-cert-pem", str(f.root))


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-s", "--max-time", "20", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_agents_over_mutual_tls(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    r = run_tool("crucible-certs", str(certs), "--hosts", ",".join(HOSTS))
    assert r.returncode == 0, r.stderr
    agents: list[Agent] = []
    try:
        for h in HOSTS:
            agents.append(Agent(tmp_path / h, host=h, tls=files(certs, h)))
        first = agents[0]
        url = f"https://{first.host}:{first.port}/crucible/0/regions"
        plain = curl("--cacert", str(certs / "root.pem"), url)
        assert plain.returncode != 0 and plain.stdout == ""  # no client certificate
        wait_for(lambda: "no client certificate" in first.log(), "the refusal logged")
        out = tmp_path / "vcr.json"
        names = ",".join(f"{a.host}:{a.port}" for a in agents)
        v = run_tool("crucible-volume", "create", "--agents", names, "--size", "8M",
                     "-o", str(out), *tls_flags(certs, HOSTS[0]))  # fmt: skip
        assert v.returncode == 0, v.stdout + v.stderr
        assert len(json.loads(out.read_text())["sub_volumes"][0]["opts"]["target"]) == 3

        # A region with PEMs: its downstairs (and repair server) speak TLS only.
        d = certs / first.host
        rid = str(uuid.uuid4())
        pems = {"cert_pem": (d / "cert.pem").read_text(), "key_pem": (d / "key.pem").read_text(),
                "root_pem": (d / "root.pem").read_text()}  # fmt: skip
        first.client.create({"id": rid, "block_size": 4096, "extent_size": 256,
                             "extent_count": 4, "encrypted": False, **pems})  # fmt: skip
        port = first.wait_state(rid, "created")["port_number"]
        wait_for(lambda: serving(first.host, port + 4000), "the region's repair server")
        info = f"https://{first.host}:{port + 4000}/region-info"
        ok = curl("--cacert", str(d / "root.pem"), "--cert", str(d / "cert.pem"),
                  "--key", str(d / "key.pem"), info)  # fmt: skip
        assert json.loads(ok.stdout)["uuid"] == rid, ok.stdout + ok.stderr
        assert curl(f"http://{first.host}:{port + 4000}/region-info").stdout == ""
        key = first.data / "regions" / rid / "key.pem"
        assert key.stat().st_mode & 0o777 == 0o600

        # Its snapshot served read-only (over TLS too), and a clone of that
        # made over TLS with the new region's own certificate.
        region_dir = first.data / "regions" / rid
        snap = region_dir / ".snapshot" / "s1"
        shutil.copytree(region_dir, snap, ignore=shutil.ignore_patterns(".snapshot", "*.pem"))
        sport = first.client.call("POST", f"/regions/{rid}/snapshots/s1/run")["port_number"]
        wait_for(lambda: serving(first.host, sport + 4000), "the snapshot's repair server")
        clone = str(uuid.uuid4())
        first.client.create({"id": clone, "block_size": 4096, "extent_size": 256,
                             "extent_count": 4, "encrypted": False, **pems,
                             "source": f"{first.host}:{sport + 4000}"})  # fmt: skip
        assert first.wait_state(clone, "created")["read_only"] is True
        same = run_tool("crucible-downstairs", "dump", "-d", str(snap),
                        "-d", str(first.data / "regions" / clone))  # fmt: skip
        assert same.returncode == 0, same.stdout + same.stderr
    finally:
        for a in agents:
            a.close()
