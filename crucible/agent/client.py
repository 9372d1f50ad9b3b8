"""Calls to a region agent's API (what crucible-volume and the tests use)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from crucible.agent.server import API_VERSION, BASE
from crucible.common.address import http_url

TIMEOUT = 30.0


class AgentCallError(Exception):
    """A call that failed: the agent's status and message, or why it could
    not be reached (status 0)."""

    def __init__(self, agent: str, status: int, message: str) -> None:
        super().__init__(f"agent {agent}: {message}")
        self.status = status


class AgentClient:
    def __init__(self, addr: tuple[str, int], tls: ssl.SSLContext | None = None) -> None:
        self.addr = addr
        self.tls = tls
        self.name = f"{addr[0]}:{addr[1]}"

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            http_url(self.addr, BASE + path, self.tls is not None), data=data, method=method,
            headers={"Content-Type": "application/json", "api-version": API_VERSION},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT, context=self.tls) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {e.code} {e.reason}"
            raise AgentCallError(self.name, e.code, message) from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", e)
            raise AgentCallError(self.name, 0, f"cannot be reached: {why}") from None
        return json.loads(raw) if raw else None

    def regions(self) -> list[dict[str, Any]]:
        return self.call("GET", "/regions")  # type: ignore[no-any-return]

    def region(self, rid: str) -> dict[str, Any]:
        return self.call("GET", f"/regions/{rid}")  # type: ignore[no-any-return]

    def create(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", "/regions", request)  # type: ignore[no-any-return]

    def delete(self, rid: str) -> None:
        self.call("DELETE", f"/regions/{rid}")
