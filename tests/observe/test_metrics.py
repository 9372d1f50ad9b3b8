"""Metrics from real processes: counters that move as the work did, scraped
directly and through a real Prometheus; and flags that do not work say so
once while IO goes on."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from crucible.cli_util import stop_process
from tests.support import BIN, Cluster, free_port, wait_listening

pytestmark = pytest.mark.slow

WRITES, SIZE = 16, 64 * 1024
WAIT = 60.0


Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Scrape:
    """Every sample at http://127.0.0.1:port/metrics, by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


class Volume:
    """Three downstairs and crucible-nbd, each serving metrics."""

    def __init__(self, base: Path, *nbd_args: str) -> None:
        self.cluster = Cluster(base, "--extent-size", "256", "--extent-count", "16",
                               "--block-size", "4096")  # fmt: skip
        self.ds_metrics = [free_port() for _ in range(3)]
        self.cluster.stop()
        for i, port in enumerate(self.ds_metrics):
            self.cluster.start(i, "--metrics", f"127.0.0.1:{port}")
        self.metrics = free_port()
        self.port = free_port()
        self.log = base / "nbd.log"
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "crucible-nbd"), *self.cluster.target_args(), "-p", str(self.port),
             "--metrics", f"127.0.0.1:{self.metrics}", "--verify-rate", "0", *nbd_args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_listening(self.port, self.proc, timeout=60)
        self.uri = f"nbd://127.0.0.1:{self.port}/"

    def write(self, count: int = WRITES) -> None:
        cmds = [a for i in range(count) for a in ("-c", f"write -P {i + 1} {i * SIZE} {SIZE}")]
        r = subprocess.run(
            ["qemu-io", "-f", "raw", *cmds, "-c", "flush", self.uri],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        stop_process(self.proc, timeout=60)
        self._log.close()
        self.cluster.stop()


@contextlib.contextmanager
def volume(base: Path, *nbd_args: str) -> Iterator[Volume]:
    v = Volume(base, *nbd_args)
    try:
        yield v
    finally:
        v.stop()


def _client_latency(c: int, part: str = "count") -> tuple[str, tuple[tuple[str, str], ...]]:
    return (f"crucible_upstairs_downstairs_job_latency_seconds_{part}",
            (("client", str(c)), ("op", "write")))  # fmt: skip


def _settled(ports: list[int], ready: Callable[[list[Scrape]], bool]) -> list[Scrape]:
    """Scrapes of `ports` once `ready` holds for them, or at the deadline. (The
    guest's flush is acked at two of three: the third downstairs may still be
    finishing the writes when the guest is done.)"""
    deadline = time.monotonic() + WAIT
    while True:
        scrapes = [scrape(p) for p in ports]
        if ready(scrapes) or time.monotonic() >= deadline:
            return scrapes
        time.sleep(0.1)


def test_counters_move_as_the_work_did(tmp_path: Path) -> None:
    with volume(tmp_path) as v:
        v.write()
        op = (("op", "write"),)
        up, *dss = _settled(
            [v.metrics, *v.ds_metrics],
            lambda s: (
                all(s[0].get(_client_latency(c), 0) >= WRITES for c in range(3))
                and all(ds.get(("crucible_downstairs_jobs_total", op), 0) >= WRITES for ds in s[1:])
            ),
        )
        assert up[("crucible_upstairs_guest_ops_total", op)] == WRITES
        assert up[("crucible_upstairs_guest_bytes_total", op)] == WRITES * SIZE
        assert up[("crucible_upstairs_guest_latency_seconds_count", op)] == WRITES
        assert up[("crucible_upstairs_guest_ops_total", (("op", "flush"),))] >= 1
        cmd = (("command", "write"),)
        assert up[("crucible_nbd_requests_total", cmd)] == WRITES
        assert up[("crucible_nbd_request_bytes_total", cmd)] == WRITES * SIZE
        assert up[("crucible_nbd_connects_total", ())] == 2  # (wait_listening, then qemu-io)
        for c in range(3):
            assert up[_client_latency(c)] == WRITES
            assert 0 < up[_client_latency(c, "sum")] < 60
        for ds in dss:
            assert ds[("crucible_downstairs_jobs_total", op)] == WRITES
            assert ds[("crucible_downstairs_write_bytes_total", ())] == WRITES * SIZE
            assert ds[("crucible_downstairs_job_latency_seconds_count", op)] == WRITES
            assert ds[("crucible_downstairs_disk_latency_seconds_count", op)] == WRITES
            assert 0 < ds[("crucible_downstairs_disk_latency_seconds_sum", op)] < 60
            assert ds[("crucible_downstairs_connections", ())] == 1
            assert ds[("crucible_downstairs_errors_total", op)] == 0
        # State comes from the once-a-second status record.
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            up = scrape(v.metrics)
            if ("crucible_upstairs_state", (("state", "active"),)) in up:
                break
            time.sleep(0.2)
        assert up[("crucible_upstairs_state", (("state", "active"),))] == 1
        for c, (host, port) in enumerate(v.cluster.targets):
            labels = (("client", str(c)), ("state", "active"), ("target", f"{host}:{port}"))
            assert up[("crucible_upstairs_downstairs_state", labels)] == 1


def _prometheus(base: Path, targets: list[int]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = base / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: crucible\n    static_configs:\n"
        f"      - targets: {json.dumps([f'127.0.0.1:{t}' for t in targets])}\n"
    )
    log = open(base / "prometheus.log", "wb")  # noqa: SIM115 - the process holds it
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={base / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    wait_listening(port, proc, timeout=60)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:  # it answers 503 until its storage is open
        url = f"http://127.0.0.1:{port}/-/ready"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=10) as r:
            if r.status == 200:
                return proc, port
        time.sleep(0.2)
    stop_process(proc)
    raise TimeoutError((base / "prometheus.log").read_text())


def _query(port: int, promql: str) -> list[tuple[dict[str, str], float]]:
    q = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{q}", timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return [(x["metric"], float(x["value"][1])) for x in body["data"]["result"]]


def test_a_real_prometheus_scrapes_every_process(tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run scripts/setup")
    with volume(tmp_path) as v:
        v.write()
        prom, port = _prometheus(tmp_path, [v.metrics, *v.ds_metrics])
        try:
            want = {
                "count(up == 1)": 4.0,
                'crucible_upstairs_guest_ops_total{op="write"}': float(WRITES),
                "sum(crucible_downstairs_write_bytes_total)": float(3 * WRITES * SIZE),
                'crucible_nbd_requests_total{command="write"}': float(WRITES),
                'sum(crucible_upstairs_downstairs_state{state="active"})': 3.0,
            }
            got: dict[str, list[float]] = {}
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                got = {q: [value for _, value in _query(port, q)] for q in want}
                if all(got[q] == [value] for q, value in want.items()):
                    break
                time.sleep(0.5)
            assert got == {q: [value] for q, value in want.items()}
        finally:
            stop_process(prom)


def test_flags_that_do_not_work_are_said_once_and_io_goes_on(tmp_path: Path) -> None:
    # A collector that takes connections and drops them: every export fails.
    with socket.create_server(("127.0.0.1", 0)) as dead:
        dead_port = dead.getsockname()[1]
        busy = socket.create_server(("127.0.0.1", 0))
        busy_port = busy.getsockname()[1]
        try:
            args = ("--trace-endpoint", f"http://127.0.0.1:{dead_port}")
            with volume(tmp_path, *args, "--control", f"127.0.0.1:{busy_port}") as v:
                dead.settimeout(WAIT)
                v.write(4)
                deadline = time.monotonic() + WAIT
                while "traces are not reaching" not in v.output():
                    assert time.monotonic() < deadline, v.output()
                    time.sleep(0.1)
                dead.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    while True:  # the attempts so far, left waiting in the backlog
                        dead.accept()[0].close()
                dead.settimeout(WAIT)
                v.write(4)  # more spans: an export that fails again, and no new warning
                dead.accept()[0].close()
            out = v.output()
        finally:
            busy.close()
    assert out.count("traces are not reaching") == 1, out
    assert out.count(f"--control: port {busy_port} on 127.0.0.1 is already in use") == 1, out
    # A malformed endpoint and a busy metrics port: the volume serves all the same.
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        c = Cluster(tmp_path / "two", "--extent-size", "64", "--extent-count", "4")
        try:
            r = subprocess.run(
                [str(BIN / "crucible"), *c.target_args(), "--trace-endpoint", "nowhere",
                 "--metrics", f"127.0.0.1:{port}"],
                capture_output=True,
                text=True,
                timeout=120,
            )  # fmt: skip
        finally:
            c.stop()
    assert r.returncode == 0 and "all Tests done" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("--trace-endpoint 'nowhere'") == 1, r.stdout
    assert r.stdout.count(f"--metrics: port {port} on 127.0.0.1 is already in use") == 1
