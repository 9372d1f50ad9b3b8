"""HOST:PORT, as every command line and endpoint writes an address."""

from __future__ import annotations


def host_port(text: str, what: str = "HOST:PORT", port_zero: bool = False) -> tuple[str, int]:
    """(host, port) from HOST:PORT ([ADDR]:PORT for IPv6); ValueError saying
    what is wrong. Port 0 (any free port) only where `port_zero`."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ValueError(f"{text!r} is not {what}")
    if not port.isdigit():
        raise ValueError(f"{text!r}: port {port!r} is not a number")
    p = int(port)
    if not (0 if port_zero else 1) <= p < 65536:
        raise ValueError(f"{text!r}: port {p} is out of range")
    return host, p
