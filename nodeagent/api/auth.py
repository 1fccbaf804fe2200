"""Authentication: which credential a request carries, resolved once per request.

`Authenticate` wraps the app for one listener and leaves the request's
`Principal` (nodeagent.api.principal) in the ASGI scope; routes authorise
against it. Credentials are the admin token of ``api.token_file`` and the
tenant-bound tokens of the credentials file (nodeagent.credentials).

* TCP (``token_required``): every request but `/healthz` needs
  ``Authorization: Bearer <token>`` naming a live credential, else 401;
  ``api.metrics_without_token`` adds `/metrics` to the open paths (`open_paths`),
  for a Prometheus or a gateway's endpoint picker that scrapes without one.
* Unix socket: protected by its file mode (0600 in a 0700 directory), so a
  request without a token is the socket's owner (admin). A token presented on
  the socket binds the request to its credential, so a tenant's client on the
  socket sees what it would see on TCP. An ``amt_`` token that is unknown or
  revoked is 401 there too (never silently the owner's); any other bearer value
  is ignored, because OpenAI clients always send some ``api_key``.

Tokens are compared in constant time (the admin token) or by their sha256.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from nodeagent.api.errors import error_body, json_bytes
from nodeagent.api.principal import SCOPE_KEY, SOCKET_OWNER, Principal
from nodeagent.credentials import CredentialSet, is_issued_token

# Probes from a load balancer or systemd may hit these without a token; they reveal nothing.
UNAUTHENTICATED_PATHS = frozenset({"/healthz"})
# Opened by `api.metrics_without_token`: counts and names of models and providers, nothing of a pod.
METRICS_PATH = "/metrics"
MIN_TOKEN_LENGTH = 16
CREDENTIAL_NAME = "api-token"


class TokenError(ValueError):
    pass


def load_token(token_file: str | None, env: dict[str, str] | None = None) -> str | None:
    """The configured token: ``api.token_file``, else the systemd credential ``api-token``.

    Returns None when neither is set. A configured file that is missing, empty,
    too short or readable by others is an error (never silently "no auth").
    """
    env = dict(os.environ) if env is None else env
    path: Path | None = None
    from_credential = False
    if token_file:
        path = Path(token_file).expanduser()
    elif env.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME
        if candidate.is_file():
            path, from_credential = candidate, True
    if path is None:
        return None
    try:
        info = path.stat()
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise TokenError(f"api.token_file {path}: {exc.strerror or exc}") from exc
    if info.st_mode & 0o077 and not from_credential:
        raise TokenError(f"api.token_file {path} is readable by group or others (mode "
                         f"{info.st_mode & 0o777:o}); run: chmod 600 {path}")
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenError(f"api.token_file {path}: the token must be at least {MIN_TOKEN_LENGTH} characters "
                         f"(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def open_paths(api: Any) -> frozenset[str]:
    """The paths served without a credential under an ``[api]`` config section."""
    return UNAUTHENTICATED_PATHS | {METRICS_PATH} if api.metrics_without_token else UNAUTHENTICATED_PATHS


class Authenticate:
    """ASGI wrapper: resolve the bearer token to a `Principal`, or answer 401.

    ``paths_open`` is asked on every request (a reloaded config applies at once);
    by default only `/healthz` is open."""

    def __init__(self, app: ASGIApp, credentials: CredentialSet, *, token_required: bool,
                 paths_open: Callable[[], frozenset[str]] = lambda: UNAUTHENTICATED_PATHS) -> None:
        self.app = app
        self.credentials = credentials
        self.token_required = token_required
        self.paths_open = paths_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in self.paths_open():
            await self.app(scope, receive, send)
            return
        header = ""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        scheme, _, given = header.partition(" ")
        token = given.strip() if scheme.lower() == "bearer" else ""
        principal: Principal | None = None
        if token:
            credential = self.credentials.resolve(token)
            if credential is not None:
                principal = Principal.of(credential)
            elif not self.token_required and not is_issued_token(token):
                principal = SOCKET_OWNER  # an OpenAI client's placeholder api_key on the socket
        elif not self.token_required:
            principal = SOCKET_OWNER
        if principal is None:
            await _unauthorized(send, header, self.token_required)
            return
        scope[SCOPE_KEY] = principal
        await self.app(scope, receive, send)


async def _unauthorized(send: Send, header: str, token_required: bool) -> None:
    if not header:
        reason = "missing Authorization header: this TCP endpoint needs 'Authorization: Bearer <token>'"
    elif token_required:
        reason = "invalid bearer token: this TCP endpoint needs 'Authorization: Bearer <token>' of a live credential"
    else:
        reason = "invalid bearer token: unknown or revoked (omit the header to act as the socket's owner)"
    payload = json_bytes(error_body("unauthorized", f"{reason} (api.token_file, `agent-machine tokens issue`)",
                                    "Authorization"))
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            (b"www-authenticate", b'Bearer realm="agent-machine"')]})
    await send({"type": "http.response.body", "body": payload})
