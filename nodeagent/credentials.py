"""API credentials: bearer tokens bound to a tenant (or admin), kept as hashes.

The credentials file (``api.credentials_file``, default
``<config dir>/credentials.toml``, mode 0600) lists one table per credential::

    [[credential]]
    id = "acme-3f9a1c"
    tenant = "acme"                    # or: admin = true (no tenant)
    agents = ["coder"]                 # optional: only these agents' pods
    scopes = ["private", "tenant"]     # optional: only these cache scopes in submitted context
    token_sha256 = "9f86d08..."        # sha256 (hex) of the token; the token itself is never stored
    created_at = "2025-01-02T03:04:05Z"
    revoked_at = "2025-02-01T00:00:00Z"  # set by `tokens revoke`; the entry stays for the record

`agent-machine tokens issue` generates a token (``amt_`` + 43 url-safe
characters), prints it once and appends its hash; the file is rewritten
atomically under a lock, so concurrent issuers never lose an entry.
`CredentialSet` is what the API consults: the admin token of
``api.token_file`` plus this file, re-read whenever it changes, so an issued
or revoked token applies to the next request without a restart. A file that
turns unreadable or invalid while the agent runs is logged and fails closed:
its credentials stop working (the admin token keeps working) until it is fixed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import tomllib
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from nodeagent.contracts.pod import NAME_RE, CacheScope
from nodeagent.fsutil import atomic_write_text

log = logging.getLogger("agent_machine.credentials")

TOKEN_PREFIX = "amt_"
FILE_NAME = "credentials.toml"
ADMIN_TOKEN_ID = "admin"  # the id the api.token_file token goes by
_ID_RE = re.compile(r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$")
_NAME = re.compile(NAME_RE)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_KEYS = frozenset({"id", "tenant", "admin", "agents", "scopes", "token_sha256", "created_at", "revoked_at"})
_SCOPES = tuple(scope.value for scope in CacheScope)
_HEADER = """\
# agent-machine API credentials, written by `agent-machine tokens`.
# Tokens are never stored here: token_sha256 is the sha256 (hex) of each token.
"""


class CredentialsError(ValueError):
    """The credentials file is unreadable, unsafe or invalid; the message names the file and field."""


@dataclass(frozen=True, slots=True)
class Credential:
    id: str
    token_sha256: str
    tenant: str | None  # None: an admin credential
    agents: tuple[str, ...] | None = None  # None: every agent of the tenant
    scopes: tuple[str, ...] | None = None  # None: every cache scope
    created_at: str = ""
    revoked_at: str | None = None

    @property
    def admin(self) -> bool:
        return self.tenant is None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_dict(self) -> dict[str, Any]:
        """The listing shape (`tokens ls --format json`): everything but the hash."""
        return {"id": self.id, "admin": self.admin, "tenant": self.tenant,
                "agents": list(self.agents) if self.agents is not None else None,
                "scopes": list(self.scopes) if self.scopes is not None else None,
                "createdAt": self.created_at, "revokedAt": self.revoked_at}


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def is_issued_token(token: str) -> bool:
    """Whether ``token`` has the shape `tokens issue` gives (an ``amt_`` prefix)."""
    return token.startswith(TOKEN_PREFIX)


def default_path(loaded: Any) -> Path:
    """``api.credentials_file`` when set, else ``<config dir>/credentials.toml``."""
    configured = loaded.config.api.credentials_file
    return Path(configured).expanduser() if configured else loaded.paths.config_dir / FILE_NAME


# ------------------------------------------------------------------ the file
def parse(text: str, source: str = FILE_NAME) -> list[Credential]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CredentialsError(f"{source}: {exc}") from exc
    unknown = sorted(set(data) - {"credential"})
    if unknown:
        raise CredentialsError(f"{source}: unknown top-level key {unknown[0]!r} (expected [[credential]] tables)")
    tables = data.get("credential", [])
    if not isinstance(tables, list):
        raise CredentialsError(f"{source}: credential must be an array of tables ([[credential]])")
    credentials: list[Credential] = []
    ids: set[str] = set()
    hashes: set[str] = set()
    for index, table in enumerate(tables):
        where = f"{source}: credential[{index}]"
        credential = _parse_one(table, where)
        if credential.id in ids:
            raise CredentialsError(f"{where}.id: {credential.id!r} is used twice")
        if credential.token_sha256 in hashes:
            raise CredentialsError(f"{where}.token_sha256: the same token hash is listed twice")
        ids.add(credential.id)
        hashes.add(credential.token_sha256)
        credentials.append(credential)
    return credentials


def _parse_one(table: Any, where: str) -> Credential:
    if not isinstance(table, dict):
        raise CredentialsError(f"{where or 'credential'}: must be a table")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise CredentialsError(f"{_at(where, unknown[0])}: unknown key (known: {', '.join(sorted(_KEYS))})")

    def text(key: str, *, required: bool = False) -> str | None:
        value = table.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise CredentialsError(f"{_at(where, key)}: must be a non-empty string")
        return value

    def names(key: str, allowed: Sequence[str] | None = None) -> tuple[str, ...] | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise CredentialsError(f"{_at(where, key)}: must be a non-empty list of strings")
        for item in value:
            if allowed is not None and item not in allowed:
                raise CredentialsError(f"{_at(where, key)}: {item!r} is not one of {', '.join(allowed)}")
            if allowed is None and not _NAME.match(item):
                raise CredentialsError(f"{_at(where, key)}: {item!r} is not a valid name ({NAME_RE})")
        return tuple(dict.fromkeys(value))

    ident = text("id", required=True)
    assert ident is not None
    if not _ID_RE.match(ident):
        raise CredentialsError(f"{_at(where, 'id')}: {ident!r} must be lowercase letters, digits, '-', '_' or '.'")
    digest = text("token_sha256", required=True)
    assert digest is not None
    if not _SHA256_RE.match(digest):
        raise CredentialsError(f"{_at(where, 'token_sha256')}: must be 64 lowercase hex characters")
    admin = table.get("admin", False)
    if not isinstance(admin, bool):
        raise CredentialsError(f"{_at(where, 'admin')}: must be true or false")
    tenant = text("tenant")
    if admin == (tenant is not None):
        raise CredentialsError(f"{where or 'credential'}: set exactly one of tenant = \"...\" or admin = true")
    if tenant is not None and not _NAME.match(tenant):
        raise CredentialsError(f"{_at(where, 'tenant')}: {tenant!r} is not a valid tenant name ({NAME_RE})")
    agents, scopes = names("agents"), names("scopes", _SCOPES)
    if admin and (agents is not None or scopes is not None):
        raise CredentialsError(f"{where or 'credential'}: an admin credential sees everything; "
                               "agents and scopes apply to tenants")
    return Credential(id=ident, token_sha256=digest, tenant=tenant, agents=agents, scopes=scopes,
                      created_at=text("created_at") or "", revoked_at=text("revoked_at"))


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def render(credentials: Sequence[Credential]) -> str:
    """The file text for ``credentials`` (TOML; strings are JSON-escaped, which TOML reads alike)."""
    out = [_HEADER.rstrip("\n")]
    for credential in credentials:
        out += ["", "[[credential]]"]
        out.append(f"id = {json.dumps(credential.id)}")
        if credential.admin:
            out.append("admin = true")
        else:
            out.append(f"tenant = {json.dumps(credential.tenant)}")
        for key, values in (("agents", credential.agents), ("scopes", credential.scopes)):
            if values is not None:
                out.append(f"{key} = [{', '.join(json.dumps(v) for v in values)}]")
        out.append(f"token_sha256 = {json.dumps(credential.token_sha256)}")
        if credential.created_at:
            out.append(f"created_at = {json.dumps(credential.created_at)}")
        if credential.revoked_at:
            out.append(f"revoked_at = {json.dumps(credential.revoked_at)}")
    return "\n".join(out) + "\n"


def read(path: Path) -> list[Credential]:
    """The credentials in ``path``; [] when it does not exist. Group/other access is an error."""
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"credentials file {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if info.st_mode & 0o077:
        raise CredentialsError(f"credentials file {path} is accessible by group or others (mode "
                               f"{info.st_mode & 0o777:o}); run: chmod 600 {path}")
    return parse(text, str(path))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise writers (two `tokens issue` at once must both land)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def issue(path: Path, *, tenant: str | None = None, admin: bool = False, agents: Sequence[str] | None = None,
          scopes: Sequence[str] | None = None, credential_id: str | None = None) -> tuple[Credential, str]:
    """Create a credential and append it to ``path``; returns it and the token (shown once, never stored)."""
    token = new_token()
    with _locked(path):
        existing = read(path)
        taken = {c.id for c in existing}
        if credential_id in taken:
            raise CredentialsError(f"id: a credential {credential_id!r} already exists in {path}")
        table: dict[str, Any] = {"id": credential_id or _fresh_id(tenant or "admin", taken),
                                 "token_sha256": token_sha256(token), "created_at": _now()}
        table.update({"admin": True} if admin else {"tenant": tenant})
        table.update({key: list(values) for key, values in (("agents", agents), ("scopes", scopes)) if values})
        # The parser's own checks, so what is written is exactly what serve accepts.
        candidate = _parse_one(table, "")
        atomic_write_text(path, render([*existing, candidate]), mode=0o600)
    return candidate, token


def revoke(path: Path, credential_id: str) -> Credential:
    """Mark ``credential_id`` revoked (kept for the record); its token stops working at the next request."""
    with _locked(path):
        existing = read(path)
        found = next((c for c in existing if c.id == credential_id), None)
        if found is None:
            known = ", ".join(c.id for c in existing) or "none"
            raise CredentialsError(f"no credential with id {credential_id!r} in {path} (known: {known})")
        if found.revoked:
            return found
        revoked = replace(found, revoked_at=_now())
        atomic_write_text(path, render([revoked if c.id == credential_id else c for c in existing]), mode=0o600)
    return revoked


def _fresh_id(stem: str, taken: set[str]) -> str:
    stem = re.sub(r"[^a-z0-9_.-]+", "-", stem.lower()).strip("-_.") or "token"
    while True:
        candidate = f"{stem[:54]}-{secrets.token_hex(3)}"
        if candidate not in taken:
            return candidate


# ------------------------------------------------------------------ lookup
class CredentialSet:
    """The credentials the API accepts, looked up by the presented token.

    The admin token (``api.token_file``) is compared in constant time; file
    credentials are found by the sha256 of the token. The file is stat'ed on
    each lookup and re-read when it changed.
    """

    def __init__(self, path: Path | None, admin_token: str | None = None) -> None:
        self.path = path
        self._admin = (Credential(id=ADMIN_TOKEN_ID, token_sha256=token_sha256(admin_token), tenant=None)
                       if admin_token else None)
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._by_hash: dict[str, Credential] = {}

    @classmethod
    def open(cls, path: Path | None, admin_token: str | None = None) -> "CredentialSet":
        """Load now; an invalid or unsafe file raises `CredentialsError` (serve refuses to start)."""
        credentials = cls(path, admin_token)
        if path is not None:
            credentials._load(read(path), _signature(path))
        return credentials

    @property
    def has_admin_token(self) -> bool:
        return self._admin is not None

    def resolve(self, token: str) -> Credential | None:
        """The live credential ``token`` belongs to, or None (unknown or revoked)."""
        digest = token_sha256(token)
        if self._admin is not None and hmac.compare_digest(digest, self._admin.token_sha256):
            return self._admin
        with self._lock:
            self._refresh()
            return self._by_hash.get(digest)

    def _refresh(self) -> None:
        if self.path is None:
            return
        signature = _signature(self.path)
        if signature == self._signature:
            return
        try:
            credentials = read(self.path)
        except CredentialsError as exc:
            log.error("%s; its tokens are refused until it is fixed (the admin token still works)", exc)
            credentials = []
        self._load(credentials, signature)

    def _load(self, credentials: list[Credential], signature: tuple[int, int, int] | None) -> None:
        self._by_hash = {c.token_sha256: c for c in credentials if not c.revoked}
        self._signature = signature


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    # An atomic rewrite changes the inode; an in-place edit or a chmod changes ctime.
    return (info.st_ino, info.st_ctime_ns, info.st_size)


__all__ = ["Credential", "CredentialSet", "CredentialsError", "TOKEN_PREFIX", "default_path", "is_issued_token",
           "issue", "new_token", "parse", "read", "render", "revoke", "token_sha256"]
