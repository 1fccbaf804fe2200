"""`PlacementDecision`: where a pod's next request should run, and why.

Every candidate provider is listed with the terms of its estimated time to
first token (queue wait, model load, restore, prefill), the rates used and
where each came from, and why it was or was not eligible. ``reason`` says in a
sentence why the chosen one won. A dry run (``dryRun: true``) is the same
computation without running anything.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from nodeagent.contracts.base import Contract, Resource

CacheSource = Literal["T0", "T1", "T2", "none"]
RateSource = Literal["observed", "provider", "calibrated", "fallback", "unknown"]


class RateUsed(Contract):
    quantity: str  # prefill_tokens_per_s, decode_tokens_per_s, restore_bytes_per_s:T1, load_bytes_per_s
    value: float | None  # null: unknown
    source: RateSource
    samples: int = 0  # observations folded into the moving average


class TtftTerms(Contract):
    """Seconds. A term is null when its rate is unknown; then ttftS is null too."""

    queue_wait_s: float | None
    load_s: float | None
    restore_s: float | None
    prefill_s: float | None


class CandidateAssessment(Contract):
    provider: str
    eligible: bool
    rejected: list[str] = Field(default_factory=list)  # memory, policy, health reasons
    model_hot: bool
    cache_source: CacheSource
    cached_tokens: int
    uncached_tokens: int
    restore_bytes: int
    queued_requests: int
    queued_tokens: int
    terms: TtftTerms
    ttft_s: float | None
    rates: list[RateUsed] = Field(default_factory=list)
    guarded: bool = False  # excluded by the load guard (see LoadGuardReport)


class LoadGuardReport(Contract):
    rule: str  # the rule, in words, with its thresholds
    applied: bool  # true when it changed the choice
    excluded: list[str] = Field(default_factory=list)


class PlacementDecision(Resource):
    kind: Literal["PlacementDecision"] = "PlacementDecision"
    id: str
    created_at: datetime
    dry_run: bool = False
    pod: str | None = None
    tenant: str | None = None
    model: str  # model digest (or name when the digest is not known)
    prompt_tokens: int
    block_tokens: int
    chosen: str | None  # provider name; null when no candidate is eligible
    reason: str
    candidates: list[CandidateAssessment]
    load_guard: LoadGuardReport
    decision_us: int | None = None  # time the decision took, microseconds
