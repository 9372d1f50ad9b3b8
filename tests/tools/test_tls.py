"""Mutual TLS with real processes and real clients (curl): a volume whose
every port takes only peers with a certificate from its CA, reconciliation
fetching extents from another downstairs' repair server over it, and every
stranger refused, with the reason in the log of both sides."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from crucible.region.region import Region
from tests.support import (
    BIN,
    Cluster,
    Downstairs,
    contexts_for,
    create_region,
    free_port,
    run_tool,
    wait_listening,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def make_certs(base: Path, name: str) -> list[str]:
    """A CA under base/name and a certificate for 127.0.0.1: the three flags."""
    r = run_tool("crucible-certs", str(base / name), "--hosts", "127.0.0.1")
    assert r.returncode == 0, r.stderr
    d = base / name / "127.0.0.1"
    return [
        "--cert-pem",
        f"{d}/cert.pem",
        "--key-pem",
        f"{d}/key.pem",
        "--root-cert-pem",
        f"{d}/root.pem",
    ]


def said(d: Downstairs | None, text: str, timeout: float = 30) -> str:
    """The downstairs' log once it has `text` in it."""
    assert d is not None
    deadline = time.monotonic() + timeout
    while text not in (out := d.output()):
        assert time.monotonic() < deadline, out
        time.sleep(0.05)
    return out


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args], capture_output=True, text=True, timeout=60
    )


def test_a_volume_over_mutual_tls_reconciles_through_its_repair_servers(tmp_path: Path) -> None:
    tls = make_certs(tmp_path, "ca")
    c = Cluster(tmp_path, run_args=tuple(tls))
    try:
        r = run_tool("crucible", *c.target_args(), *tls, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        # Replica 2 gets a newer block 500: activation copies its extent to the
        # two others, which fetch it from replica 2's repair server over TLS.
        c.stop(2)
        region = Region.open(c.regions[2])
        data = b"only on replica 2 ".ljust(512, b"!")
        region.write(500, contexts_for(data), data)
        _, flushes, _ = region.extent_versions()
        region.flush(max(flushes) + 1, 1)
        region.close()
        c.start(2)
        r = run_tool("crucible", *c.target_args(), *tls, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "reconciliation: 1 extents to repair" in r.stdout, r.stdout
        for d in c.ds:
            assert d is not None and "refused" not in d.output()
        # A VCR: crucible-vcr asks the downstairs over TLS and writes the PEMs
        # in (as Crucible's VCRs carry them), mode 0600; one without PEMs of
        # its own takes the command line's.
        vcr = tmp_path / "vcr.json"
        r = run_tool("crucible-vcr", "create", *c.target_args(), "-o", str(vcr))
        assert r.returncode != 0 and "cannot ask" in r.stderr  # no client certificate
        r = run_tool("crucible-vcr", "create", *c.target_args(), "-o", str(vcr), *tls)
        assert r.returncode == 0, r.stderr
        assert vcr.stat().st_mode & 0o777 == 0o600
        r = run_tool("crucible", "--vcr", str(vcr), timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        doc = json.loads(vcr.read_text())
        for sub in doc["sub_volumes"]:
            sub["opts"].update(cert_pem=None, key_pem=None, root_cert_pem=None)
        vcr.write_text(json.dumps(doc))
        r = run_tool("crucible", "--vcr", str(vcr), *tls, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        c.stop()
        for path in c.regions:
            region = Region.open(path, read_only=True)
            ctxs, got = region.read(500, 1)
            region.close()
            assert got == data and ctxs == [contexts_for(data)[0].hash]
    finally:
        c.stop()


def test_strangers_are_refused_and_both_sides_say_why(tmp_path: Path) -> None:
    tls = make_certs(tmp_path, "ca")
    other = make_certs(tmp_path, "other")
    c = Cluster(tmp_path, run_args=tuple(tls))
    try:
        short = ("--activate-timeout", "3")
        # No TLS at all.
        r = run_tool("crucible", *c.target_args(), *short, timeout=60)
        assert r.returncode != 0 and "without answering HereIAm" in r.stderr, r.stderr
        said(c.ds[0], "not TLS")
        # A downstairs whose certificate another CA signed.
        r = run_tool("crucible", *c.target_args(), *short, *other, timeout=60)
        assert r.returncode != 0 and "its TLS certificate is refused" in r.stderr, r.stderr
        # This end's certificate from another CA, the downstairs' trusted.
        mixed = [*other[:4], "--root-cert-pem", tls[5]]
        r = run_tool("crucible", *c.target_args(), *short, *mixed, timeout=60)
        assert r.returncode != 0 and "refused this end's TLS certificate" in r.stderr, r.stderr
        said(c.ds[0], "certificate refused")

        # The repair server: curl without TLS, without a certificate, with one.
        d = c.ds[1]
        assert d is not None
        url = f"https://127.0.0.1:{d.repair_port}/region-info"
        assert curl(f"http://127.0.0.1:{d.repair_port}/region-info").returncode != 0
        assert curl("--cacert", tls[5], url).returncode != 0
        said(d, "no client certificate")
        r = curl("--cacert", tls[5], "--cert", tls[1], "--key", tls[3], url)
        assert r.returncode == 0 and json.loads(r.stdout)["block_size"] == 512, r.stdout + r.stderr
        r = curl("--cacert", tls[5], "--cert", other[1], "--key", other[3], url)
        assert r.returncode != 0
    finally:
        c.stop()


def test_control_api_and_metrics_over_tls(tmp_path: Path) -> None:
    tls = make_certs(tmp_path, "ca")
    c = Cluster(tmp_path, run_args=tuple(tls))
    port, control, metrics = free_port(), free_port(), free_port()
    log = open(tmp_path / "nbd.log", "wb")  # noqa: SIM115 - closed below
    nbd = subprocess.Popen(
        [str(BIN / "crucible-nbd"), *c.target_args(), *tls, "-p", str(port),
         "--control", f"127.0.0.1:{control}", "--metrics", f"127.0.0.1:{metrics}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_listening(port, nbd, timeout=60)
        cert = ["--cacert", tls[5], "--cert", tls[1], "--key", tls[3]]
        r = curl(*cert, f"https://127.0.0.1:{control}/info")
        assert r.returncode == 0 and json.loads(r.stdout)["state"] == "active", r.stdout + r.stderr
        assert curl("--cacert", tls[5], f"https://127.0.0.1:{control}/info").returncode != 0
        assert curl(f"http://127.0.0.1:{control}/info").returncode != 0
        r = curl(*cert, f"https://127.0.0.1:{metrics}/metrics")
        assert r.returncode == 0 and "crucible_" in r.stdout, r.stderr
        assert curl("--cacert", tls[5], f"https://127.0.0.1:{metrics}/metrics").returncode != 0
        r = run_tool("crucible-stat", f"127.0.0.1:{control}", "-c", "1", "--json", *tls, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        row = json.loads(r.stdout)
        assert row["url"].startswith("https://") and row["ds_state"] == ["active"] * 3, row
    finally:
        nbd.terminate()
        nbd.wait(60)
        log.close()
        c.stop()
    assert "refused" in (tmp_path / "nbd.log").read_text()  # curl without a certificate


def test_listening_in_the_open_without_tls_warns_and_bad_files_are_one_line(tmp_path: Path) -> None:
    region = tmp_path / "r"
    create_region(region)
    warning = "without TLS: anyone who can reach"
    d = Downstairs(region, "-a", "0.0.0.0")
    try:
        assert said(d, "listening on").count(warning) == 1
    finally:
        d.stop()
    d = Downstairs(region)  # loopback: only this machine
    try:
        assert warning not in said(d, "listening on")
    finally:
        d.stop()
    missing = ["--cert-pem", "/nonexistent/cert.pem", "--key-pem", "/nonexistent/key.pem",
               "--root-cert-pem", "/nonexistent/root.pem"]  # fmt: skip
    r = run_tool("crucible-downstairs", "run", "-d", str(region), "-p", str(free_port()), *missing)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln] == [
        "crucible-downstairs: error: cannot load the certificate /nonexistent/cert.pem and key "
        "/nonexistent/key.pem: No such file or directory"
    ], r.stderr
    r = run_tool(
        "crucible", "-t", "127.0.0.1:1", "-t", "127.0.0.1:2", "-t", "127.0.0.1:3", *missing
    )
    assert r.returncode != 0 and "cannot load the certificate" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_tool("crucible-downstairs", "run", "-d", str(region), "--cert-pem", "x")
    assert r.returncode == 2 and "go together" in r.stderr
