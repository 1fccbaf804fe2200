"""AgentRegistryGrant: what an upstream registry (or the node's admin) lets one agent do here.

A grant is a DSSE envelope (payloadType `GRANT_PAYLOAD_TYPE`) over the RFC 8785
bytes of a `Grant` document, signed with Ed25519 by its issuer; the key id is
sha256 of the issuer's DER public key, as for receipts. The node trusts the
keys named in ``[governance] issuer_keys`` and its own admin grant key
(`admin_signer`). Verification order never interprets unauthenticated bytes:
envelope → payload type → signature by a trusted key → document schema →
revocation → validity window. `Grant.refusals(pod)` then says, field by field,
why the grant does not cover a pod (an empty list: it does).

Scopes::

    models            model names (NAME or NAME:TAG), digests (sha256:...), or "*"
    providers         provider names or kinds the agent may run on, or "*"
    cacheRead         cache scopes whose saved states its pods may restore (private, tenant, public)
    cacheWrite        cache scopes its pods may save states under
    maxContext        the most context tokens a pod may ask for (null: no bound)
    sharePublicCache  whether its pods may contribute public segments (shared with every tenant)

Revocation: a text file (``[governance] revocation_file``), one grant id or
``sha256:<hex of the envelope line>`` a line, ``#`` comments. It is re-read
when it changes; configured but unreadable, every grant is refused (fail closed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from nodeagent.contracts.names import RESOURCE_NAME
from nodeagent.contracts.receipt import rfc3339_utc
from nodeagent.fsutil import atomic_write_bytes, ensure_private_dir
from nodeagent.receipts.canonical import canonical_json
from nodeagent.receipts.dsse import EnvelopeError, parse_json_envelope, sign_envelope
from nodeagent.receipts.errors import KeyFileError
from nodeagent.receipts.keys import KeySource, PublicKey, Signer, load_signer

GRANT_PAYLOAD_TYPE = "application/vnd.agent-machine.grant+json"
GRANT_KIND = "AgentRegistryGrant"
API_VERSION = "agent-machine/v1"
CACHE_SCOPES = ("private", "tenant", "public")
ANY = "*"
GRANT_LABEL = "grant.agent-machine.dev/id"  # a pod may name the grant it runs under
_NAME = re.compile(RESOURCE_NAME)  # the pod contract's own rule for tenant/agent/session names
_ID = re.compile(r"^grant-[0-9a-f]{16,64}$")
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")


class GrantError(ValueError):
    """A grant is refused. ``check`` names the failed check (signature, expired, revoked, schema…)."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail


@dataclass(frozen=True, slots=True)
class GrantScopes:
    models: tuple[str, ...]
    providers: tuple[str, ...] = (ANY,)
    cache_read: tuple[str, ...] = CACHE_SCOPES
    cache_write: tuple[str, ...] = ("private", "tenant")
    max_context: int | None = None
    share_public_cache: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"models": list(self.models), "providers": list(self.providers), "cacheRead": list(self.cache_read),
                "cacheWrite": list(self.cache_write), "maxContext": self.max_context,
                "sharePublicCache": self.share_public_cache}


@dataclass(frozen=True, slots=True)
class Grant:
    """A verified grant (only `verify_grant` and `issue_grant` make one)."""

    id: str
    issuer: str
    issued_at: datetime
    expires_at: datetime
    tenant: str
    agent: str
    session: str | None
    scopes: GrantScopes
    key_id: str = ""  # who signed it
    envelope_digest: str = ""  # sha256:<hex> of the envelope line as received
    line: bytes = field(default=b"", repr=False)

    def document(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": GRANT_KIND, "id": self.id, "issuer": self.issuer,
                "issuedAt": rfc3339_utc(self.issued_at), "expiresAt": rfc3339_utc(self.expires_at),
                "subject": {"tenant": self.tenant, "agent": self.agent, "session": self.session},
                "scopes": self.scopes.to_wire()}

    def summary(self) -> dict[str, Any]:
        """What activation decisions and `grants ls` show: the grant without its signature."""
        return {**self.document(), "keyId": self.key_id, "envelopeDigest": self.envelope_digest}

    # ------------------------------------------------------------ the checks against a pod
    def identity_refusals(self, tenant: str, agent: str, session: str | None) -> list[str]:
        out = []
        if tenant != self.tenant:
            out.append(f"grant {self.id} is for tenant {self.tenant!r}, not {tenant!r}")
        if agent != self.agent:
            out.append(f"grant {self.id} is for agent {self.agent!r}, not {agent!r}")
        if self.session is not None and session != self.session:
            out.append(f"grant {self.id} is for session {self.session!r}, not {session!r}")
        return out

    def allows_model(self, name: str | None, digest: str | None, names: Sequence[str] = ()) -> bool:
        """``name``/``digest``: the pod's reference; ``names``: every name the store knows the model by."""
        wanted = set(self.scopes.models)
        if ANY in wanted:
            return True
        candidates = {n for n in (name, digest, *names) if n}
        for candidate in list(candidates):
            candidates.add(candidate.split(":")[0] if not candidate.startswith("sha256:") else candidate)
        if digest:
            candidates.add(digest if digest.startswith("sha256:") else f"sha256:{digest}")
        return bool(wanted & candidates)

    def allows_provider(self, name: str | None, kind: str | None = None) -> bool:
        allowed = set(self.scopes.providers)
        return ANY in allowed or bool({name, kind} & allowed)

    def refusals(self, pod: Any, *, model_names: Sequence[str] = (), model_digest: str | None = None) -> list[str]:
        """Why this grant does not cover ``pod`` (an `AgentPod`); [] when it does."""
        meta, spec = pod.metadata, pod.spec
        out = self.identity_refusals(meta.tenant, meta.agent, meta.session)
        if not self.allows_model(spec.model.name, spec.model.digest or model_digest, model_names):
            out.append(f"spec.model: grant {self.id} does not list model "
                       f"{spec.model.name or spec.model.digest!r} (it allows {', '.join(self.scopes.models)})")
        if spec.provider is not None and not self.allows_provider(spec.provider):
            out.append(f"spec.provider: grant {self.id} does not list provider {spec.provider!r}")
        limit = self.scopes.max_context
        if limit is not None and spec.model.min_context > limit:
            out.append(f"spec.model.minContext: {spec.model.min_context} exceeds the grant's maxContext {limit}")
        if spec.policy.cache_reuse:
            for index, segment in enumerate(spec.context):
                scope = segment.scope.value
                if scope not in self.scopes.cache_read:
                    out.append(f"spec.context[{index}].scope: grant {self.id} may not read the {scope} cache")
                if scope not in self.scopes.cache_write:
                    out.append(f"spec.context[{index}].scope: grant {self.id} may not write the {scope} cache")
        if not self.scopes.share_public_cache:
            for index, segment in enumerate(spec.context):
                if segment.scope.value == "public":
                    out.append(f"spec.context[{index}].scope: grant {self.id} may not share public cache")
        return out


# ------------------------------------------------------------------ parsing
def _time(value: Any, where: str) -> datetime:
    if not isinstance(value, str) or not _TIME.match(value):
        raise GrantError("schema", f"{where}: an RFC 3339 UTC time ending in Z, got {value!r}")
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _names(value: Any, where: str, allowed: Sequence[str] | None = None) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise GrantError("schema", f"{where}: a list of non-empty strings")
    if allowed is not None:
        for v in value:
            if v not in allowed:
                raise GrantError("schema", f"{where}: {v!r} is not one of {', '.join(allowed)}")
    return tuple(value)


def parse_grant_document(document: Any) -> Grant:
    """The `Grant` a document states; `GrantError("schema", …)` naming the first bad field."""
    if not isinstance(document, dict):
        raise GrantError("schema", "the grant is not a JSON object")
    expected = {"apiVersion", "kind", "id", "issuer", "issuedAt", "expiresAt", "subject", "scopes"}
    if set(document) != expected:
        missing, extra = sorted(expected - set(document)), sorted(set(document) - expected)
        raise GrantError("schema", f"fields: missing {missing}, unknown {extra}")
    if document["apiVersion"] != API_VERSION or document["kind"] != GRANT_KIND:
        raise GrantError("schema", f"apiVersion/kind must be {API_VERSION}/{GRANT_KIND}")
    if not isinstance(document["id"], str) or not _ID.match(document["id"]):
        raise GrantError("schema", f"id: grant-<16..64 hex>, got {document['id']!r}")
    if not isinstance(document["issuer"], str) or not document["issuer"]:
        raise GrantError("schema", "issuer: a non-empty string")
    subject, scopes = document["subject"], document["scopes"]
    if not isinstance(subject, dict) or set(subject) != {"tenant", "agent", "session"}:
        raise GrantError("schema", "subject: must hold tenant, agent and session (null: any session)")
    for key in ("tenant", "agent"):
        if not isinstance(subject[key], str) or not _NAME.match(subject[key]):
            raise GrantError("schema", f"subject.{key}: a resource name, got {subject[key]!r}")
    if subject["session"] is not None and (not isinstance(subject["session"], str) or not _NAME.match(subject["session"])):
        raise GrantError("schema", f"subject.session: a resource name or null, got {subject['session']!r}")
    want = {"models", "providers", "cacheRead", "cacheWrite", "maxContext", "sharePublicCache"}
    if not isinstance(scopes, dict) or set(scopes) != want:
        raise GrantError("schema", f"scopes: must hold exactly {sorted(want)}")
    max_context = scopes["maxContext"]
    if max_context is not None and (not isinstance(max_context, int) or isinstance(max_context, bool) or max_context < 1):
        raise GrantError("schema", "scopes.maxContext: a positive integer or null")
    if not isinstance(scopes["sharePublicCache"], bool):
        raise GrantError("schema", "scopes.sharePublicCache: true or false")
    issued, expires = _time(document["issuedAt"], "issuedAt"), _time(document["expiresAt"], "expiresAt")
    if expires <= issued:
        raise GrantError("schema", "expiresAt must be after issuedAt")
    return Grant(
        id=document["id"], issuer=document["issuer"], issued_at=issued, expires_at=expires,
        tenant=subject["tenant"], agent=subject["agent"], session=subject["session"],
        scopes=GrantScopes(models=_names(scopes["models"], "scopes.models"),
                           providers=_names(scopes["providers"], "scopes.providers"),
                           cache_read=_names(scopes["cacheRead"], "scopes.cacheRead", CACHE_SCOPES),
                           cache_write=_names(scopes["cacheWrite"], "scopes.cacheWrite", CACHE_SCOPES),
                           max_context=max_context, share_public_cache=scopes["sharePublicCache"]))


# ------------------------------------------------------------------ revocation
class RevocationList:
    """The revocation file, re-read when its size or mtime changes; fail closed when unreadable."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path else None
        self._signature: tuple[int, int] | None = None
        self._revoked: frozenset[str] = frozenset()
        self._error: str | None = None

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            info = self.path.stat()
            signature = (info.st_mtime_ns, info.st_size)
            if signature == self._signature and self._error is None:
                return
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self._error = f"revocation file {self.path} is unreadable ({exc}); every grant is refused"
            self._signature = None
            return
        entries = set()
        for raw in text.splitlines():
            entry = raw.split("#", 1)[0].strip()
            if entry:
                entries.add(entry.lower())
        self._revoked, self._signature, self._error = frozenset(entries), signature, None

    def check(self, grant: Grant) -> None:
        """Raises `GrantError("revoked", …)` if the list names ``grant`` (or cannot be read)."""
        self._refresh()
        if self._error is not None:
            raise GrantError("revoked", self._error)
        if grant.id.lower() in self._revoked or grant.envelope_digest.lower() in self._revoked:
            raise GrantError("revoked", f"grant {grant.id} is listed in the revocation file {self.path}")

    @staticmethod
    def add(path: str | os.PathLike[str], grant_id: str, reason: str = "") -> None:
        """Append ``grant_id`` to the revocation file (crash-safe rewrite)."""
        path = Path(path)
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        comment = f"  # {reason}" if reason else ""
        atomic_write_bytes(path, (text + f"{grant_id}{comment}\n").encode(), mode=0o644)


# ------------------------------------------------------------------ issuing and verifying
def issue_grant(signer: Signer, *, issuer: str, tenant: str, agent: str, session: str | None = None,
                models: Sequence[str], providers: Sequence[str] = (ANY,),
                cache_read: Sequence[str] = CACHE_SCOPES, cache_write: Sequence[str] = ("private", "tenant"),
                max_context: int | None = None, share_public_cache: bool = False,
                ttl: timedelta = timedelta(days=1), now: datetime | None = None) -> tuple[Grant, bytes]:
    """A new grant signed by ``signer``: the `Grant` and its envelope line."""
    now = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    document = {
        "apiVersion": API_VERSION, "kind": GRANT_KIND, "id": f"grant-{secrets.token_hex(8)}", "issuer": issuer,
        "issuedAt": rfc3339_utc(now), "expiresAt": rfc3339_utc(now + ttl),
        "subject": {"tenant": tenant, "agent": agent, "session": session},
        "scopes": GrantScopes(models=tuple(models), providers=tuple(providers), cache_read=tuple(cache_read),
                              cache_write=tuple(cache_write), max_context=max_context,
                              share_public_cache=share_public_cache).to_wire(),
    }
    grant = parse_grant_document(document)  # what we sign must parse: refuse a bad scope here, not at use
    line = sign_envelope(canonical_json(document), GRANT_PAYLOAD_TYPE, [signer])
    return _with_envelope(grant, line, signer.key_id), line


def _with_envelope(grant: Grant, line: bytes, key_id: str) -> Grant:
    from dataclasses import replace
    return replace(grant, key_id=key_id, envelope_digest="sha256:" + hashlib.sha256(line).hexdigest(), line=line)


def read_grant_text(text: str | bytes) -> bytes:
    """The envelope line from a file's or header's text: the JSON envelope, or base64 of it."""
    data = text.encode() if isinstance(text, str) else text
    data = data.strip()
    if data[:1] != b"{":
        import base64
        import binascii
        try:
            data = base64.b64decode(data + b"=" * (-len(data) % 4), altchars=b"-_" if b"-" in data or b"_" in data else None)
        except (binascii.Error, ValueError) as exc:
            raise GrantError("envelope", f"not a DSSE envelope (JSON) nor base64 of one: {exc}") from None
    return data.strip()


def verify_grant(line: bytes, keys: Mapping[str, PublicKey], *, revocations: RevocationList | None = None,
                 now: datetime | None = None, skew: timedelta = timedelta(minutes=5)) -> Grant:
    """The verified `Grant` in ``line``, or `GrantError` naming the check that failed."""
    try:
        envelope = parse_json_envelope(line)
    except EnvelopeError as exc:
        raise GrantError("envelope", exc.detail) from None
    if envelope.payload_type != GRANT_PAYLOAD_TYPE:
        raise GrantError("payload-type", f"payloadType is {envelope.payload_type!r}, expected {GRANT_PAYLOAD_TYPE!r}")
    if not keys:
        raise GrantError("signature", "no grant issuer key is trusted ([governance] issuer_keys, or the admin key)")
    good = envelope.verified_keyids(keys)
    if not good:
        known = [k for k in envelope.keyids if k in keys]
        detail = (f"the signature by trusted key {known[0][:16]}… does not verify (altered or mis-signed)" if known
                  else f"signed by {', '.join(k[:16] + '…' for k in envelope.keyids)}, no trusted issuer key")
        raise GrantError("signature", detail)
    try:
        document = json.loads(envelope.payload)
    except ValueError as exc:
        raise GrantError("schema", f"payload is not JSON: {exc}") from None
    grant = _with_envelope(parse_grant_document(document), line, good[0])
    if revocations is not None:
        revocations.check(grant)
    now = now or datetime.now(timezone.utc)
    if now >= grant.expires_at:
        raise GrantError("expired", f"grant {grant.id} expired at {rfc3339_utc(grant.expires_at)}")
    if grant.issued_at > now + skew:
        raise GrantError("not-yet-valid", f"grant {grant.id} is issued in the future ({rfc3339_utc(grant.issued_at)})")
    return grant


# ------------------------------------------------------------------ the node's grants
def admin_key_source(state_dir: Path, key_file: str | None) -> KeySource:
    if key_file:
        return KeySource("file", Path(key_file))
    return KeySource("state", Path(state_dir) / "governance" / "admin-grant.key")


def admin_signer(state_dir: Path, key_file: str | None = None, *, create: bool = True) -> Signer:
    """The node admin's grant key (created 0600 on first use unless a key file is configured)."""
    try:
        return load_signer(admin_key_source(state_dir, key_file), create=create)
    except KeyFileError as exc:
        raise GrantError("key", str(exc)) from exc


def trusted_issuers(state_dir: Path, issuer_keys: Iterable[str], admin_key_file: str | None = None) -> dict[str, PublicKey]:
    """Key id → key: the configured registries' keys and the admin grant key (if it exists)."""
    keys: dict[str, PublicKey] = {}
    for path in issuer_keys:
        try:
            key = PublicKey.load(path)
        except KeyFileError as exc:
            raise GrantError("key", f"[governance] issuer_keys: {exc}") from exc
        keys[key.key_id] = key
    source = admin_key_source(state_dir, admin_key_file)
    if source.path.exists():
        key = admin_signer(state_dir, admin_key_file, create=False).public
        keys[key.key_id] = key
    return keys


class GrantStore:
    """Grants installed on this node: ``<state>/governance/grants/<id>.dsse`` (the envelope line).

    A grant arrives by `agent-machine grants issue --install`, `grants install FILE`,
    or with an API request (header ``X-Agent-Machine-Grant``); activation finds a
    pod's grant here by the pod's label `GRANT_LABEL` or by its tenant and agent.
    """

    def __init__(self, state_dir: Path) -> None:
        self.directory = Path(state_dir) / "governance" / "grants"

    def install(self, grant: Grant) -> Path:
        ensure_private_dir(self.directory)
        path = self.directory / f"{grant.id}.dsse"
        if not path.exists() or path.read_bytes().strip() != grant.line:
            atomic_write_bytes(path, grant.line + b"\n")
        return path

    def lines(self) -> list[tuple[str, bytes]]:
        if not self.directory.is_dir():
            return []
        return [(p.stem, p.read_bytes().strip()) for p in sorted(self.directory.glob("grant-*.dsse"))]

    def remove(self, grant_id: str) -> bool:
        """Uninstall a grant (its agent's pods are then no longer held to it); False if not installed."""
        path = self.directory / f"{grant_id}.dsse"
        if not _ID.match(grant_id) or not path.is_file():
            return False
        path.unlink()
        from nodeagent.fsutil import fsync_dir
        fsync_dir(self.directory)
        return True

    def line(self, grant_id: str) -> bytes | None:
        path = self.directory / f"{grant_id}.dsse"
        return path.read_bytes().strip() if _ID.match(grant_id) and path.is_file() else None


__all__ = ["ANY", "CACHE_SCOPES", "GRANT_LABEL", "GRANT_PAYLOAD_TYPE", "Grant", "GrantError", "GrantScopes",
           "GrantStore", "RevocationList", "admin_signer", "issue_grant", "parse_grant_document", "read_grant_text",
           "trusted_issuers", "verify_grant"]
