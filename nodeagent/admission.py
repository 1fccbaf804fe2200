"""Admission policy: which tenants may run which models on which providers.

The policy is one TOML file::

    version = 1
    default = "deny"          # tenants not listed: "deny" (default) or "allow"

    [limits]                  # apply to everyone
    max_context = 32768       # prompt + completion tokens
    max_turns = 64

    [tenants.acme]
    models = ["tiny", "sha256:<64 hex>"]   # NAME[:TAG], digest, or "*"
    providers = ["*"]                      # provider names or kinds, or "*"
    max_context = 8192
    cache_scopes = ["private", "tenant"]   # scopes its segments may use; "public" shares across tenants

Fail closed: when a policy path is configured but the file is missing,
unreadable or invalid, *every* pod is refused with that reason. With no policy
configured at all the node runs single-user: everything is allowed and the
decision says so.
"""

from __future__ import annotations

import fnmatch
import hashlib
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nodeagent.contracts.pod import AgentPod, CacheScope
from nodeagent.contracts.policy import PolicyDecision

BUILT_IN = "built-in (no policy configured)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantRule(_Strict):
    models: list[str] = Field(default_factory=lambda: ["*"])
    providers: list[str] = Field(default_factory=lambda: ["*"])
    max_context: int | None = Field(default=None, ge=1)
    cache_scopes: list[CacheScope] = Field(default_factory=lambda: [CacheScope.private, CacheScope.tenant])


class Limits(_Strict):
    max_context: int | None = Field(default=None, ge=1)
    max_turns: int | None = Field(default=None, ge=1)


class PolicyDocument(_Strict):
    version: Literal[1] = 1
    default: Literal["allow", "deny"] = "deny"
    limits: Limits = Field(default_factory=Limits)
    tenants: dict[str, TenantRule] = Field(default_factory=dict)


@dataclass(frozen=True)
class AdmissionRequest:
    """What admission looks at. ``prompt_tokens`` is known only after tokenizing."""

    pod: AgentPod
    model_name: str | None = None  # resolved NAME:TAG, if any
    model_digest: str | None = None
    provider_name: str | None = None
    provider_kind: str | None = None
    prompt_tokens: int | None = None


@dataclass(frozen=True)
class Policy:
    source: str
    digest: str | None
    document: PolicyDocument | None
    load_error: str | None = None  # set => fail closed
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def allow_all(cls) -> "Policy":
        return cls(source=BUILT_IN, digest=None, document=PolicyDocument(default="allow"))

    @classmethod
    def load(cls, path: str | Path | None) -> "Policy":
        """Load ``path``; never raises. ``None`` means no policy configured."""
        if path is None:
            return cls.allow_all()
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(str(path), None, None, f"policy file {path} is configured but does not exist")
        except OSError as exc:
            return cls(str(path), None, None, f"policy file {path} is unreadable: {exc.strerror or exc}")
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        try:
            document = PolicyDocument.model_validate(tomllib.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            return cls(str(path), digest, None, f"policy file {path} is not valid TOML: {exc}")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return cls(str(path), digest, None, f"policy file {path}: {where}: {first['msg']}")
        return cls(str(path), digest, document)

    def decide(self, request: AdmissionRequest, now: datetime | None = None) -> PolicyDecision:
        now = now or datetime.now(timezone.utc)
        pod = request.pod
        reasons = self._reasons(request, now)
        return PolicyDecision(
            pod=pod.metadata.name, tenant=pod.metadata.tenant, allowed=not reasons, reasons=reasons,
            policy_source=self.source, policy_digest=self.digest, decided_at=now,
        )

    def provider_refusal(self, tenant: str, provider: str, kind: str | None) -> str | None:
        """Why ``tenant`` may not run on ``provider`` (of ``kind``), or None when it may.

        Placement asks this of every candidate, so a tenant's provider allowlist
        holds for every pod, not only for pods pinned to a provider.
        """
        rule, refusal = self._rule(tenant)
        if rule is None:
            return refusal
        return _provider_refusal(rule, tenant, provider, kind)

    def _rule(self, tenant: str) -> tuple[TenantRule | None, str | None]:
        """The tenant's rule, or (None, why every pod of the tenant is refused)."""
        if self.document is None:
            return None, f"fail closed: {self.load_error}"
        rule = self.document.tenants.get(tenant)
        if rule is None:
            if self.document.default == "deny":
                return None, f"tenant {tenant!r} is not in the policy ({self.source}) and default is deny"
            rule = TenantRule(cache_scopes=list(CacheScope))
        return rule, None

    def _reasons(self, request: AdmissionRequest, now: datetime) -> list[str]:
        pod = request.pod
        tenant = pod.metadata.tenant
        rule, refusal = self._rule(tenant)
        if rule is None:
            return [refusal or "refused"]
        doc = self.document
        assert doc is not None
        reasons: list[str] = []
        if not _matches_model(rule.models, request, pod):
            wanted = request.model_name or pod.spec.model.name or pod.spec.model.digest
            reasons.append(f"model {wanted!r} is not allowed for tenant {tenant!r} (allowed: {', '.join(rule.models)})")
        provider = request.provider_name or pod.spec.provider
        if provider is not None:
            refused = _provider_refusal(rule, tenant, provider, request.provider_kind)
            if refused:
                reasons.append(refused)
        for index, segment in enumerate(pod.spec.context):
            if segment.scope not in rule.cache_scopes:
                allowed = ", ".join(s.value for s in rule.cache_scopes)
                reasons.append(f"spec.context[{index}].scope {segment.scope.value!r} is not allowed for tenant {tenant!r} (allowed: {allowed})")
        limits = [v for v in (rule.max_context, doc.limits.max_context) if v is not None]
        if limits:
            cap = min(limits)
            if pod.spec.model.min_context > cap:
                reasons.append(f"spec.model.minContext {pod.spec.model.min_context} exceeds the largest context allowed ({cap})")
            if request.prompt_tokens is not None:
                needed = request.prompt_tokens + sum(t.max_tokens for t in pod.spec.turns)
                if needed > cap:
                    reasons.append(f"context of {needed} tokens (prompt {request.prompt_tokens} + max tokens) exceeds the largest allowed ({cap})")
        if doc.limits.max_turns is not None and len(pod.spec.turns) > doc.limits.max_turns:
            reasons.append(f"spec.turns has {len(pod.spec.turns)} turns; the policy allows {doc.limits.max_turns}")
        deadline = pod.spec.policy.deadline
        if deadline is not None:
            aware = deadline if deadline.tzinfo else deadline.replace(tzinfo=timezone.utc)
            if aware <= now:
                reasons.append(f"spec.policy.deadline {aware.isoformat()} has passed")
        return reasons


def _provider_refusal(rule: TenantRule, tenant: str, provider: str, kind: str | None) -> str | None:
    if _matches_any(rule.providers, [provider, kind]):
        return None
    return f"provider {provider!r} is not allowed for tenant {tenant!r} (allowed: {', '.join(rule.providers)})"


def _matches_any(patterns: list[str], values: list[str | None]) -> bool:
    return any(fnmatch.fnmatchcase(v, p) for p in patterns for v in values if v)


def _matches_model(patterns: list[str], request: AdmissionRequest, pod: AgentPod) -> bool:
    names: list[str | None] = [request.model_name, pod.spec.model.name]
    # "tiny" in a policy means tiny:latest, as in model names.
    names += [n.split(":")[0] for n in names if n and n.endswith(":latest")]
    names += [n + ":latest" for n in list(names) if n and ":" not in n]
    return _matches_any(patterns, names + [request.model_digest, pod.spec.model.digest])


def load_policy(config: Mapping[str, object] | None) -> Policy:
    """The policy named by the config key ``policy.path`` (None: not configured)."""
    path = None if config is None else config.get("path")
    return Policy.load(path if isinstance(path, (str, Path)) else None)
