"""Four hosts, each a network namespace with its own address: three storage
hosts running crucible-agent, one compute host running crucible-volume and
crucible-nbd, and qemu-io as the guest. Then real network faults, under IO:

* one storage host's link down longer than the fault threshold: the volume
  keeps going on two, and live repair brings the third back;
* the compute host cut off from two storage hosts: a write fails with EIO
  instead of being acked, and IO works again once the routes are back;
* a storage host's agent SIGKILLed: its downstairs keep serving, and the
  restarted agent adopts them.

At the end every pattern written is read back, and `crucible-downstairs dump`
finds the three replicas identical."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crucible.cli_util import stop_process
from tests.agent import netns
from tests.agent.agents import Agent, replicas_agree, serving, wait_for
from tests.agent.netns import Host, Network, entered
from tests.support import BIN, qemu_io, wait_get

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MIB = 1 << 20
SLOTS = 16  # 1 MiB each, of the 32 MiB volume
NBD_PORT, CONTROL_PORT, AGENT_PORT = 10809, 9999, 17000


@pytest.fixture
def hosts() -> Iterator[tuple[Network, list[Host], Host]]:
    why = netns.available()
    if why is not None:
        pytest.skip(why)
    net = Network()
    try:
        storage = [net.add_host(f"s{i}") for i in range(3)]
        yield net, storage, net.add_host("c")
    finally:
        net.close()


class Guest:
    """qemu-io on the compute host, writing a pattern to a random 1 MiB slot
    again and again on a thread of its own (bounded), and remembering the
    last pattern each slot got."""

    def __init__(self, compute: Host, rng: random.Random) -> None:
        self.compute = compute
        self.rng = rng
        self.slots: dict[int, int] = {}
        self.ops = 0
        self.errors: list[str] = []
        self.stop_ = threading.Event()
        self.thread: threading.Thread | None = None

    def write(self, slot: int, pattern: int, *more: str) -> None:
        qemu_io(NBD_PORT, f"write -P {pattern} {slot * MIB} 1M", *more, prefix=self.compute.prefix)
        self.slots[slot] = pattern

    def start(self) -> None:
        self.stop_.clear()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        for _ in range(2000):
            if self.stop_.is_set():
                return
            try:
                self.write(self.rng.randrange(SLOTS - 1), self.rng.randrange(1, 256))
            except AssertionError as e:
                self.errors.append(str(e))
                return
            self.ops += 1

    def stop(self) -> None:
        self.stop_.set()
        assert self.thread is not None
        self.thread.join(300)
        assert not self.thread.is_alive()
        assert not self.errors, self.errors

    def running_on(self) -> None:
        """Wait until a few more writes are done: IO goes on."""
        base = self.ops
        wait_for(lambda: self.ops >= base + 3 or self.errors, "writes to go on")
        assert not self.errors, self.errors

    def verify(self) -> None:
        reads = [f"read -P {p} {s * MIB} 1M" for s, p in sorted(self.slots.items())]
        qemu_io(NBD_PORT, *reads, prefix=self.compute.prefix)


def info(compute: Host, want: Any) -> dict[str, Any]:
    with entered(compute.ns):
        return wait_get(CONTROL_PORT, "/info", want)


def states(i: dict[str, Any]) -> list[str]:
    return [d["state"] for d in i["downstairs"]]


def healthy(i: dict[str, Any]) -> bool:
    return states(i) == ["active"] * 3 and i.get("live_repair") is None


def test_a_volume_across_three_hosts_with_network_faults(
    tmp_path: Path, hosts: tuple[Network, list[Host], Host], rng: random.Random
) -> None:
    net, storage, compute = hosts
    agents: list[Agent] = []
    nbd = None
    try:
        for i, h in enumerate(storage):
            agents.append(Agent(tmp_path / f"agent{i}", host=h.ip, port=AGENT_PORT,
                                ports=(19000, 19009), netns=h.ns))  # fmt: skip
        vcr = tmp_path / "volume.json"
        r = subprocess.run(
            [*compute.prefix, str(BIN / "crucible-volume"), "create", "--agents",
             ",".join(f"{h.ip}:{AGENT_PORT}" for h in storage), "--size", "32M",
             "--block-size", "4096", "-o", str(vcr)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        targets = json.loads(vcr.read_text())["sub_volumes"][0]["opts"]["target"]
        assert targets == [f"{h.ip}:19000" for h in storage]
        rids = [a.client.regions()[0]["id"] for a in agents]

        log = open(tmp_path / "nbd.log", "wb")  # noqa: SIM115 - closed below
        nbd = subprocess.Popen(
            [*compute.prefix, str(BIN / "crucible-nbd"), "--vcr", str(vcr), "-p", str(NBD_PORT),
             "--control", f"127.0.0.1:{CONTROL_PORT}", "--verify-rate", "0"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        with entered(compute.ns):
            wait_for(lambda: nbd.poll() is None and serving("127.0.0.1", NBD_PORT), "the export")
        guest = Guest(compute, rng)
        for s in range(SLOTS):
            guest.write(s, s + 1)

        # 1. A storage host's link down under IO, past the fault threshold.
        guest.start()
        net.link(storage[0], up=False)
        info(compute, lambda i: states(i)[0] == "faulted")
        guest.running_on()  # on two
        net.link(storage[0], up=True)
        info(compute, healthy)  # reconnected, live-repaired
        guest.running_on()
        guest.stop()
        guest.verify()

        # 2. The compute host cut off from two storage hosts: nothing is acked.
        for h in storage[1:]:
            net.cut(compute, h)
        with pytest.raises(AssertionError, match="Input/output error"):
            qemu_io(NBD_PORT, f"write -P 7 {(SLOTS - 1) * MIB} 1M", "flush",
                    prefix=compute.prefix)  # fmt: skip
        now = info(compute, lambda i: states(i)[1:] == ["faulted", "faulted"])
        assert states(now)[0] == "active"
        said = (tmp_path / "nbd.log").read_text()
        assert "request failed: " in said and "of 3 downstairs" in said, said[-3000:]
        for h in storage[1:]:
            net.cut(compute, h, cut=False)
        info(compute, healthy)
        guest.write(SLOTS - 1, 8, "flush")  # IO again
        guest.verify()

        # 3. An agent SIGKILLed under IO: its downstairs keep serving; adopted.
        pid = agents[2].downstairs_pid(rids[2])
        guest.start()
        agents[2].kill()
        guest.running_on()
        assert healthy(info(compute, lambda i: True))
        agents[2].start()
        assert "adopted its running downstairs" in agents[2].log()
        assert agents[2].downstairs_pid(rids[2]) == pid
        guest.running_on()
        guest.stop()
        guest.verify()

        assert stop_process(nbd, signal.SIGTERM, timeout=60) == 0
        nbd = None
        log.close()
        replicas_agree(agents, rids)
    finally:
        if nbd is not None:
            stop_process(nbd, timeout=60)
        for a in agents:
            a.close()
