"""A small client for the agent's local API (Unix socket by default).

The CLI uses it to talk to a running `agent-machine serve`. Errors come back
as `ApiError` carrying the server's own message, or `AgentNotRunning` when
nothing listens on the socket.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import httpx


class AgentNotRunning(ConnectionError):
    pass


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


class AgentClient:
    def __init__(self, socket_path: str | Path | None = None, *, base_url: str | None = None,
                 token: str | None = None, timeout: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if base_url is not None:
            self.where = base_url
            self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)
        else:
            if socket_path is None:
                from nodeagent.paths import resolve_paths

                socket_path = resolve_paths().api_socket
            self.where = str(socket_path)
            self._socket = Path(socket_path)
            transport = httpx.HTTPTransport(uds=str(socket_path))
            self._http = httpx.Client(transport=transport, base_url="http://agent-machine",
                                      headers=headers, timeout=timeout)

    @classmethod
    def from_env(cls) -> "AgentClient":
        """AGENT_MACHINE_URL for TCP, else the default socket; AGENT_MACHINE_TOKEN on either.

        On the socket no token is needed (its owner is admin); a tenant's token
        there binds the requests to that tenant, as on TCP.
        """
        url = os.environ.get("AGENT_MACHINE_URL")
        token = os.environ.get("AGENT_MACHINE_TOKEN") or None
        if url:
            return cls(base_url=url, token=token)
        return cls(token=token)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentNotRunning(
                f"no agent answering at {self.where}: start it with `agent-machine serve` "
                f"(or set AGENT_MACHINE_URL for a TCP endpoint)") from exc
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise ApiError(response.status_code, _message(body), body)
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=json, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    def stream_lines(self, path: str) -> Iterator[str]:
        try:
            with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError(response.status_code, _message(response.json()), response.json())
                yield from (line for line in response.iter_lines() if line)
        except httpx.ConnectError as exc:
            raise AgentNotRunning(f"no agent answering at {self.where}") from exc


def _message(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("detail", "error", "message"):
            value = body.get(key)
            if isinstance(value, str):
                return value
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return value["message"]
            if isinstance(value, list) and value:
                return "; ".join(str(v.get("msg", v)) if isinstance(v, dict) else str(v) for v in value)
    return str(body)[:500]
