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


def format_host_port(addr: tuple[str, int]) -> str:
    """HOST:PORT ([ADDR]:PORT for IPv6), as host_port reads it."""
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def http_url(addr: tuple[str, int], path: str, tls: bool = False) -> str:
    """The URL of `path` on the HTTP server at `addr` (https with TLS)."""
    return f"{'https' if tls else 'http'}://{format_host_port(addr)}{path}"


def is_loopback(host: str) -> bool:
    """A listen address only this machine can reach."""
    return host in ("localhost", "::1") or host.startswith("127.")
