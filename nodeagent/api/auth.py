"""Bearer-token authentication for the TCP listener.

The Unix socket is protected by its file mode (0600 in a 0700 directory): only
its owner (and root) can connect, so requests on it carry no token. TCP has no
such guard, so the daemon serves TCP only through `BearerTokenGuard`, and only
when a token is configured. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from nodeagent.api.errors import error_body, json_bytes

# Probes from a load balancer or systemd may hit these without a token; they reveal nothing.
UNAUTHENTICATED_PATHS = frozenset({"/healthz"})
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


def tokens_match(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class BearerTokenGuard:
    """ASGI wrapper: 401 unless ``Authorization: Bearer <token>`` matches."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        if not token:
            raise ValueError("BearerTokenGuard needs a non-empty token")
        self.app = app
        self._token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in UNAUTHENTICATED_PATHS:
            await self.app(scope, receive, send)
            return
        header = ""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and given and tokens_match(given.strip(), self._token):
            await self.app(scope, receive, send)
            return
        reason = "missing Authorization header" if not header else "invalid bearer token"
        payload = json_bytes(error_body("unauthorized", f"{reason}: this TCP endpoint needs "
                                        "'Authorization: Bearer <token>' (api.token_file)", "Authorization"))
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()),
                                (b"www-authenticate", b'Bearer realm="agent-machine"')]})
        await send({"type": "http.response.body", "body": payload})
