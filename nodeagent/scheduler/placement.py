"""Placement: pick the provider with the lowest estimated TTFT, and say why.

The core works on plain snapshots so that the simulated-worker benchmark and
the real node run the same code: the caller describes each candidate
(`CandidateState`: model hot?, what its context holds now (T0), its queue,
and any memory/policy/health refusal it already determined) and the node-wide
saved states that match the prompt (`TierMatch` for T1/T2, from
CacheManager.lookup). `place` then, for each candidate:

1. considers every cache option it could use: T0 (its live context, only if
   the model is hot), T1 or T2 (if it can restore states of that format), or
   none; and keeps the one with the lowest TTFT (cost.ttft_terms);
2. marks it ineligible if the caller gave refusal reasons;
3. applies the load guard (below) to the eligible ones;
4. chooses the minimum estimated TTFT (ties: lower load, less queued work, then name).
   If no eligible candidate has every rate known, it chooses by (model hot,
   fewest uncached tokens, least queued work) and says that rates were unknown.

Load guard (`LoadGuard`): cache affinity can pile work onto one warm provider
while others idle (a popular agent's pods all want the provider that holds its
context). The queue-wait term pushes back only once the queue costs more than
the prefix saves, which under light load is never. The guard is the explicit
rule: with ``load`` = the context tokens of the live sessions (pods) a
candidate holds and ``floor`` = the least-loaded eligible candidate's,

    when a session is placed for the first time, a candidate is excluded
    if load > floor * rel + abs_tokens (default rel 1.5, abs 0),

unless that would exclude every eligible candidate. A session's later turns
are not moved by the guard, only by the cost model: moving a pod away from its
own history costs more than the imbalance it would fix. Measured with and
without the guard in bench/README.md ("## scheduler").
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Sequence

from nodeagent.scheduler.cost import Terms, load_s, prefill_s, queue_wait_s, restore_s
from nodeagent.scheduler.rates import DECODE, LOAD, PREFILL, RateEstimate, RateRegistry, restore_quantity


@dataclass(frozen=True)
class TierMatch:
    """A saved state in T1 or T2 that shares ``cached_tokens`` with the prompt."""

    tier: str  # T1 | T2
    cached_tokens: int
    bytes: int
    state_format: str
    entry_id: str = ""


@dataclass
class CandidateState:
    provider: str
    model_hot: bool
    model_bytes: int = 0  # what loading the model reads, when not hot
    t0_cached_tokens: int = 0  # prompt tokens the provider's context holds now
    state_format: str | None = None  # saved-state format it can restore; None: cannot restore
    queued_requests: int = 0
    queued_prefill_tokens: int = 0  # uncached prompt tokens of work queued ahead
    queued_decode_tokens: int = 0  # decode tokens queued ahead that block this request
    running_remaining_s: float = 0.0
    load: float = 0.0  # context tokens of live sessions (pods) it holds, for the load guard and ties
    rejected: tuple[str, ...] = ()  # memory-fit / policy / health refusals, from the caller


@dataclass(frozen=True)
class PlacementRequest:
    model: str
    prompt_tokens: int
    tier_matches: tuple[TierMatch, ...] = ()
    pod: str | None = None
    tenant: str | None = None
    block_tokens: int = 64
    dry_run: bool = False
    # The provider already holding this session's (pod's) own context from an
    # earlier turn; None when the session is placed for the first time.
    session_provider: str | None = None


@dataclass(frozen=True)
class LoadGuard:
    rel: float = 1.5
    abs_tokens: float = 0.0
    enabled: bool = True

    def rule(self) -> str:
        if not self.enabled:
            return "off"
        return (f"placing a new session, exclude a candidate whose live-session tokens exceed {self.rel:g} x "
                f"the least-loaded eligible candidate's + {self.abs_tokens:g}, unless that excludes all")

    def limit(self, floor: float) -> float:
        return floor * self.rel + self.abs_tokens


@dataclass(slots=True)
class Assessment:
    state: CandidateState
    eligible: bool
    rejected: list[str]
    cache_source: str
    cached_tokens: int
    restore_bytes: int
    terms: Terms
    rates: list[RateEstimate]
    ttft_s: float | None  # terms.total, computed once
    guarded: bool = False


@dataclass
class Decision:
    """The plain result of `place`; `to_contract()` renders the PlacementDecision."""

    request: PlacementRequest
    chosen: Assessment | None
    reason: str
    assessments: list[Assessment]
    guard: LoadGuard
    guard_applied: bool
    decision_us: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)

    @property
    def provider(self) -> str | None:
        return self.chosen.state.provider if self.chosen else None

    def to_contract(self):
        from nodeagent.contracts.placement import (CandidateAssessment, LoadGuardReport, PlacementDecision,
                                                   RateUsed, TtftTerms)

        req = self.request
        return PlacementDecision(
            id=self.id, created_at=datetime.fromtimestamp(self.created_at, tz=timezone.utc),
            dry_run=req.dry_run, pod=req.pod, tenant=req.tenant, model=req.model,
            prompt_tokens=req.prompt_tokens, block_tokens=req.block_tokens, chosen=self.provider,
            reason=self.reason, decision_us=self.decision_us,
            load_guard=LoadGuardReport(rule=self.guard.rule(), applied=self.guard_applied,
                                       excluded=[a.state.provider for a in self.assessments if a.guarded]),
            candidates=[
                CandidateAssessment(
                    provider=a.state.provider, eligible=a.eligible, rejected=a.rejected,
                    model_hot=a.state.model_hot, cache_source=a.cache_source, cached_tokens=a.cached_tokens,
                    uncached_tokens=max(0, req.prompt_tokens - a.cached_tokens), restore_bytes=a.restore_bytes,
                    queued_requests=a.state.queued_requests,
                    queued_tokens=a.state.queued_prefill_tokens + a.state.queued_decode_tokens,
                    terms=TtftTerms(queue_wait_s=a.terms.queue_wait_s, load_s=a.terms.load_s,
                                    restore_s=a.terms.restore_s, prefill_s=a.terms.prefill_s),
                    ttft_s=a.ttft_s, guarded=a.guarded,
                    rates=[RateUsed(quantity=r.quantity, value=r.value, source=r.source, samples=r.samples)
                           for r in a.rates],
                )
                for a in self.assessments
            ],
        )


def assess(request: PlacementRequest, state: CandidateState, registry: RateRegistry) -> Assessment:
    """The best cache option for one candidate, with its terms.

    Queue and load terms do not depend on the cache option, so they are
    computed once; each option (T0 / T1 / T2 / none) adds restore + prefill.
    """
    provider = state.provider
    prefill = registry.estimate(provider, PREFILL)
    decode = registry.estimate(provider, DECODE)
    rates = [prefill, decode]
    queue = queue_wait_s(state.queued_prefill_tokens, state.queued_decode_tokens, state.running_remaining_s,
                         prefill.value, decode.value)
    if state.model_hot:
        load = 0.0
    else:
        load_rate = registry.estimate(provider, LOAD)
        rates.append(load_rate)
        load = load_s(False, state.model_bytes, load_rate.value)
    fixed = None if queue is None or load is None else queue + load
    prompt = request.prompt_tokens
    t0 = min(state.t0_cached_tokens, prompt) if state.model_hot else 0
    best_source, best_cached, best_bytes = ("T0" if t0 else "none"), t0, 0
    best_restore: float | None = 0.0
    best_prefill = prefill_s(prompt - t0, prefill.value)
    best_rank = (0, fixed + best_prefill, -t0) if fixed is not None and best_prefill is not None else (1, 0.0, -t0)
    restore_rate = None
    for match in request.tier_matches:
        if state.state_format is None or match.state_format != state.state_format or match.cached_tokens <= 0:
            continue
        estimate = registry.estimate(provider, restore_quantity(match.tier))
        cached = min(match.cached_tokens, prompt)
        restore = restore_s(match.tier, match.bytes, estimate.value)
        pre = prefill_s(prompt - cached, prefill.value)
        # Known totals beat unknown ones; among unknown, more cached tokens wins.
        if fixed is not None and restore is not None and pre is not None:
            rank = (0, fixed + restore + pre, -cached)
        else:
            rank = (1, 0.0, -cached)
        if rank < best_rank:
            best_rank, best_source, best_cached, best_bytes = rank, match.tier, cached, match.bytes
            best_restore, best_prefill, restore_rate = restore, pre, estimate
    if restore_rate is not None:
        rates.append(restore_rate)
    terms = Terms(queue, load, best_restore, best_prefill)
    return Assessment(state, not state.rejected, list(state.rejected), best_source, best_cached, best_bytes,
                      terms, rates, best_rank[1] if best_rank[0] == 0 else None)


def place(
    request: PlacementRequest,
    candidates: Sequence[CandidateState],
    registry: RateRegistry,
    guard: LoadGuard | None = None,
) -> Decision:
    started = time.perf_counter_ns()
    guard = guard or LoadGuard()
    assessments = [assess(request, state, registry) for state in candidates]
    eligible = [a for a in assessments if a.eligible]

    def key(a: Assessment) -> tuple:
        known = a.ttft_s is not None
        # Ties (common: several idle providers, none holding the prefix) go to the
        # least-loaded one; falling through to the name would pile them on one.
        if known:
            return (0, a.ttft_s, a.state.load, a.state.queued_prefill_tokens + a.state.queued_decode_tokens,
                    a.state.provider)
        return (1, not a.state.model_hot, request.prompt_tokens - a.cached_tokens, a.state.load,
                a.state.queued_prefill_tokens + a.state.queued_decode_tokens, a.state.provider)

    guard_applied = False
    pool = eligible
    if guard.enabled and request.session_provider is None and len(eligible) > 1:
        limit = guard.limit(min(a.state.load for a in eligible))
        kept = [a for a in eligible if a.state.load <= limit]
        if kept and len(kept) < len(eligible):
            unguarded_choice = min(eligible, key=key)
            for a in eligible:
                a.guarded = a.state.load > limit
            pool = kept
            guard_applied = unguarded_choice.guarded
    chosen = min(pool, key=key) if pool else None
    reason = _reason(request, chosen, pool, assessments, guard_applied)
    return Decision(request, chosen, reason, assessments, guard, guard_applied,
                    (time.perf_counter_ns() - started) // 1000)


def _reason(request: PlacementRequest, chosen: Assessment | None, pool: list[Assessment],
            assessments: list[Assessment], guard_applied: bool) -> str:
    if chosen is None:
        if not assessments:
            return "no candidate providers"
        refusals = "; ".join(f"{a.state.provider}: {', '.join(a.rejected)}" for a in assessments if a.rejected)
        return f"no eligible provider ({refusals})"
    cache = (f"{chosen.cache_source} prefix {chosen.cached_tokens}/{request.prompt_tokens} tokens"
             if chosen.cached_tokens else f"no cached prefix of {request.prompt_tokens} tokens")
    if chosen.ttft_s is None:
        unknown = sorted({r.quantity for r in chosen.rates if r.value is None})
        text = (f"{chosen.state.provider}: rates unknown ({', '.join(unknown)}), chosen by model "
                f"{'hot' if chosen.state.model_hot else 'cold'}, {cache}, least queued work")
    else:
        text = f"{chosen.state.provider}: lowest estimated TTFT {chosen.ttft_s:.3f} s ({cache}"
        if chosen.terms.queue_wait_s:
            text += f", queue {chosen.terms.queue_wait_s:.3f} s"
        if chosen.terms.load_s:
            text += f", model load {chosen.terms.load_s:.3f} s"
        text += ")"
        others = sorted((a for a in pool if a is not chosen and a.ttft_s is not None), key=lambda a: a.ttft_s)
        if others:
            text += f"; next {others[0].state.provider} at {others[0].ttft_s:.3f} s"
        fallbacks = sorted({r.quantity for r in chosen.rates if r.source == "fallback"})
        if fallbacks:
            text += f"; fallback (slowest known) rates used for {', '.join(fallbacks)}"
    if guard_applied:
        excluded = [a.state.provider for a in assessments if a.guarded]
        text += f"; load guard excluded {', '.join(excluded)}"
    return text


def explain(decision) -> str:
    """A PlacementDecision (contract) as a table for people."""
    lines = [f"decision {decision.id}  model {decision.model}  prompt {decision.prompt_tokens} tokens"
             f"{'  (dry run)' if decision.dry_run else ''}",
             f"chosen: {decision.chosen or '-'}", f"reason: {decision.reason}",
             f"load guard: {decision.load_guard.rule}"]
    header = ("provider", "eligible", "cache", "cached", "queue_s", "load_s", "restore_s", "prefill_s", "ttft_s", "notes")
    rows = []

    def fmt(value):
        return "?" if value is None else f"{value:.3f}"

    for c in decision.candidates:
        notes = ", ".join(c.rejected + (["load guard"] if c.guarded else [])
                          + [f"{r.quantity} {r.source}" for r in c.rates if r.source in ("fallback", "unknown")])
        rows.append((c.provider, "yes" if c.eligible else "no", c.cache_source, c.cached_tokens,
                     fmt(c.terms.queue_wait_s), fmt(c.terms.load_s), fmt(c.terms.restore_s),
                     fmt(c.terms.prefill_s), fmt(c.ttft_s), notes))
    cells = [list(header)] + [[str(x) for x in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines += ["  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip() for r in cells]
    return "\n".join(lines)


def common_prefix_tokens(context: Sequence[int], prompt: Sequence[int]) -> int:
    """Tokens a provider's live context (T0) shares with ``prompt``; a prompt is never
    wholly cached (at least one token must be evaluated), hence the cap."""
    n = min(len(context), len(prompt))
    i = 0
    # Compare in slices: far faster than a per-token loop for long, equal prefixes.
    step = 256
    while i + step <= n and context[i:i + step] == prompt[i:i + step]:
        i += step
    while i < n and context[i] == prompt[i]:
        i += 1
    return min(i, max(0, len(prompt) - 1))


class ContextBlocks:
    """The block keys a provider's context (or simulated KV cache) holds, for O(log n) T0 matching.

    Relies on chained keys: if the key of block d is held, the prefix up to d
    is the same sequence, so matching is monotone and binary search is exact
    as long as the holder keeps every ancestor of a key it keeps.
    """

    def __init__(self, keys: Sequence[bytes] = ()) -> None:
        self.keys = set(keys)

    def matched_blocks(self, prompt_keys: Sequence[bytes]) -> int:
        lo, hi = 0, len(prompt_keys)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if prompt_keys[mid - 1] in self.keys:
                lo = mid
            else:
                hi = mid - 1
        return lo
