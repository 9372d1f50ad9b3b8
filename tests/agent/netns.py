"""Hosts for tests: Linux network namespaces, each with its own address on
one bridge (in a namespace of its own, so the test machine's network is not
touched), links that can be taken down, and routes that can be cut.

Needs root and `ip`; `available()` says why not when they are missing."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def available() -> str | None:
    """None if namespaces can be made here; else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    name = f"crprobe{os.getpid()}"
    try:
        _ip("netns", "add", name)
        _ip("netns", "del", name)
    except RuntimeError as e:
        return f"cannot make a network namespace: {e}"
    return None


@dataclass(frozen=True)
class Host:
    ns: str
    ip: str
    link: str  # its veth's end on the bridge

    @property
    def prefix(self) -> tuple[str, ...]:
        """Run a command on this host."""
        return ("ip", "netns", "exec", self.ns)


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Sockets this thread makes inside are in namespace `ns`."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(there, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        try:
            yield
        finally:
            if _libc.setns(here, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(here)
        os.close(there)


class Network:
    """A bridge and the hosts on it (10.77.T.N/24); close() removes them all."""

    def __init__(self) -> None:
        self.tag = f"cr{os.getpid() % 100000}"
        self.switch = f"{self.tag}sw"
        self.hosts: list[Host] = []
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add_host(self, name: str) -> Host:
        n = len(self.hosts) + 1
        ns, link = f"{self.tag}{name}", f"v{n}"
        _ip("netns", "add", ns)
        self.hosts.append(host := Host(ns, f"10.77.0.{n}", link))
        tmp = f"{self.tag}v{n}"  # made in this namespace, then moved
        _ip("link", "add", tmp, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", tmp, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", tmp, "name", link)
        _ip("-n", self.switch, "link", "set", link, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return host

    def link(self, host: Host, up: bool) -> None:
        """Take the host's cable out (or put it back): packets are lost, not refused."""
        _ip("-n", self.switch, "link", "set", host.link, "up" if up else "down")

    def cut(self, host: Host, peer: Host, cut: bool = True) -> None:
        """Drop everything `host` sends to `peer` (and so every connection between them)."""
        _ip("-n", host.ns, "route", "add" if cut else "del", "blackhole", f"{peer.ip}/32")

    def close(self) -> None:
        for h in self.hosts:
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", h.ns)
        with contextlib.suppress(RuntimeError):
            _ip("netns", "del", self.switch)
