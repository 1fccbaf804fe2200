"""`PolicyDecision`: the admission verdict for a pod, with every reason."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from nodeagent.contracts.base import Resource


class PolicyDecision(Resource):
    kind: Literal["PolicyDecision"] = "PolicyDecision"
    pod: str  # pod name
    tenant: str
    allowed: bool
    reasons: list[str] = Field(default_factory=list)  # empty when allowed
    policy_source: str  # file path, or "built-in (no policy configured)"
    policy_digest: str | None = None  # sha256 of the policy file bytes
    decided_at: datetime
