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
4. chooses the minimum of estimated TTFT + k x (restore + prefill), the engine time the
   option adds, with k = the share of eligible candidates that have work running or
   queued (`busy_fraction`; ties: lower load, less queued work, then name). On an idle
   fleet k = 0 and this is the plain TTFT. When engines are busy, the extra prefill of
   a placement away from the cached prefix also delays the requests that queue behind
   it, and duplicating a prefix on a second engine costs cache space; k charges that.
   Measured (bench/README.md "## sweep", offline replica of the simulated fleet, 9
   cells x 3 seeds, `python -m bench.sweep_offline`): p90 TTFT lower in 5 of 9 cells and
   equal in a 6th, e.g. private prompts at load 0.9, working set 2x: 3.99 -> 1.81 s; where
   it loses (public-prefix cells), +0.07 s p90 and up to +0.18 s p50 at most.
   If no eligible candidate has every rate known, it chooses by (model hot,
   fewest uncached tokens, least queued work) and says that rates were unknown.

Load guard (`LoadGuard`): cache affinity can pile work onto one warm provider
while others idle (a popular agent's pods all want the provider that holds its
context). The queue-wait term pushes back only once the queue costs more than
the prefix saves, which under light load is never. The guard is the explicit
rule: with ``load`` = the context tokens of the live sessions (pods) a
candidate holds and ``floor`` = the least-loaded eligible candidate's,

    when a session is placed for the first time, or when a saved state (T1/T2)
    holds at least as much of its prompt as its current provider does, a
    candidate is excluded if load > floor * rel + abs_tokens (default rel 1.5,
    abs 0),

unless that would exclude every eligible candidate. Otherwise a session's later
turns are not moved by the guard, only by the cost model: moving a pod away from
its own history means recomputing it, which costs more than the imbalance it
would fix. When its history is saved in a tier, moving it costs a restore, which
the cost model then weighs like any other option. Measured with and without the
guard in bench/README.md ("## scheduler").
"""

from __future__ import annotations

import time
import uuid
from array import array
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

from nodeagent.scheduler.cost import Terms
from nodeagent.scheduler.rates import ProviderRates, RateEstimate, RateRegistry


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
        return (f"exclude a candidate whose live-session tokens exceed {self.rel:g} x the least-loaded "
                f"eligible candidate's + {self.abs_tokens:g}, unless that excludes all; a later turn's own "
                f"provider is never excluded unless a saved state makes moving it a restore")

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


class Decision:
    """The plain result of `place`; `to_contract()` renders the PlacementDecision.

    Deciding builds one compact score tuple per candidate and a full
    `Assessment` only for the chosen one; ``assessments`` (every candidate with
    its terms and rates, for the contract, `explain` and metrics) is built from
    the scores on first access, so a decision over many providers allocates
    little and stays well under a millisecond.
    """

    __slots__ = ("request", "chosen", "reason", "guard", "guard_applied", "decision_us", "created_at",
                 "_id", "_scores", "_chosen_index", "_guarded", "_assessments")

    def __init__(self, request: PlacementRequest, chosen: Assessment | None, reason: str, scores: list[tuple],
                 guard: LoadGuard, guard_applied: bool, decision_us: int, *, chosen_index: int = -1,
                 guarded: frozenset[int] = frozenset()) -> None:
        self.request = request
        self.chosen = chosen
        self.reason = reason
        self.guard = guard
        self.guard_applied = guard_applied
        self.decision_us = decision_us
        self._id: str | None = None
        self.created_at = time.time()
        self._scores = scores
        self._chosen_index = chosen_index
        self._guarded = guarded
        self._assessments: list[Assessment] | None = None

    @property
    def id(self) -> str:
        """Random, made on first use (a uuid costs a system call the decision need not wait for)."""
        if self._id is None:
            self._id = uuid.uuid4().hex
        return self._id

    @property
    def provider(self) -> str | None:
        return self.chosen.state.provider if self.chosen else None

    @property
    def assessments(self) -> list[Assessment]:
        """Every candidate, in the order given, the chosen one being `chosen` itself."""
        if self._assessments is None:
            self._assessments = [
                self.chosen if i == self._chosen_index else _assessment(self.request, score, i in self._guarded)
                for i, score in enumerate(self._scores)
            ]
        return self._assessments

    def to_contract(self):
        from nodeagent.contracts.placement import (CandidateAssessment, LoadGuardReport, PlacementDecision,
                                                   RateUsed, TtftTerms)

        req = self.request
        assessments = self.assessments
        return PlacementDecision(
            id=self.id, created_at=datetime.fromtimestamp(self.created_at, tz=timezone.utc),
            dry_run=req.dry_run, pod=req.pod, tenant=req.tenant, model=req.model,
            prompt_tokens=req.prompt_tokens, block_tokens=req.block_tokens, chosen=self.provider,
            reason=self.reason, decision_us=self.decision_us,
            load_guard=LoadGuardReport(rule=self.guard.rule(), applied=self.guard_applied,
                                       excluded=[a.state.provider for a in assessments if a.guarded]),
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
                for a in assessments
            ],
        )


# A candidate's score as `_score` computes it: (state, rates, queue_s, load_s, cache_source,
# cached_tokens, restore_bytes, restore_s, prefill_s, ttft_s, restore_estimate, exact). A plain
# tuple: the decision path builds one per candidate and nothing else.
_STATE, _RATES, _QUEUE, _LOAD, _SOURCE, _CACHED, _BYTES, _RESTORE, _PREFILL, _TTFT, _RESTORE_RATE, _EXACT = range(12)
_INF = float("inf")


def _score(prompt: int, matches: Sequence[TierMatch], state: CandidateState, rates: ProviderRates,
           bound: float = _INF) -> tuple:
    """The best cache option for one candidate, with its terms.

    The terms are cost.py's formulas (queue_wait_s, load_s, restore_s,
    prefill_s) written out inline: this runs for every candidate of every
    decision, and function calls would be most of its time. A property test
    checks it against `cost.ttft_terms`.

    Queue and load do not depend on the cache option, so they are computed
    once; each option (T0 / T1 / T2 / none) adds restore + prefill. Known
    totals beat unknown ones (lowest total, then more cached tokens); among
    unknown ones, more cached tokens wins.

    ``bound``: when queue + load alone exceed it, the candidate cannot be
    among the ones the caller still needs exactly (every term is >= 0), so
    the T1/T2 options are not evaluated and the score is marked inexact (its
    total is then only an upper bound); `_assessment` redoes it in full.
    """
    prefill_rate = rates.prefill_value
    queue = state.running_remaining_s
    if queue < 0.0:
        queue = 0.0
    waiting = state.queued_prefill_tokens
    if waiting > 0:
        queue = None if prefill_rate is None else queue + waiting / prefill_rate
    waiting = state.queued_decode_tokens
    if waiting > 0 and queue is not None:
        decode_rate = rates.decode_value
        queue = None if decode_rate is None else queue + waiting / decode_rate
    if state.model_hot:
        load = 0.0
        t0 = state.t0_cached_tokens
        if t0 > prompt:
            t0 = prompt
    else:
        model_bytes, load_rate, t0 = state.model_bytes, rates.load_value, 0
        load = 0.0 if model_bytes <= 0 else (None if load_rate is None else model_bytes / load_rate)
    fixed = None if queue is None or load is None else queue + load
    uncached = prompt - t0
    prefill = 0.0 if uncached <= 0 else (None if prefill_rate is None else uncached / prefill_rate)
    total = None if fixed is None or prefill is None else fixed + prefill
    source, cached, nbytes, restore, restore_rate = ("T0" if t0 else "none"), t0, 0, 0.0, None
    state_format = state.state_format
    if state_format is None or not matches:
        return (state, rates, queue, load, source, cached, nbytes, restore, prefill, total, None, True)
    if fixed is not None and fixed > bound:
        return (state, rates, queue, load, source, cached, nbytes, restore, prefill, total, None, False)
    for match in matches:
        option_cached = match.cached_tokens
        if match.state_format != state_format or option_cached <= 0:
            continue
        if option_cached > prompt:
            option_cached = prompt
        estimate = rates.restore_t1 if match.tier == "T1" else rates.restore(match.tier)
        restore_rate_value, option_bytes = estimate.value, match.bytes
        option_restore = (0.0 if option_bytes <= 0 else
                          (None if restore_rate_value is None else option_bytes / restore_rate_value))
        uncached = prompt - option_cached
        option_prefill = 0.0 if uncached <= 0 else (None if prefill_rate is None else uncached / prefill_rate)
        option_total = (None if fixed is None or option_restore is None or option_prefill is None
                        else fixed + option_restore + option_prefill)
        if option_total is not None:
            better = total is None or option_total < total or (option_total == total and option_cached > cached)
        else:
            better = total is None and option_cached > cached
        if better:
            source, cached, nbytes, restore, prefill, total, restore_rate = (
                match.tier, option_cached, option_bytes, option_restore, option_prefill, option_total, estimate)
    return (state, rates, queue, load, source, cached, nbytes, restore, prefill, total, restore_rate, True)


def _assessment(request: PlacementRequest, score: tuple, guarded: bool = False) -> Assessment:
    if not score[_EXACT]:
        score = _score(request.prompt_tokens, request.tier_matches, score[_STATE], score[_RATES])
    state: CandidateState = score[_STATE]
    rates: ProviderRates = score[_RATES]
    used = [rates.prefill, rates.decode]
    if not state.model_hot:
        used.append(rates.load)
    if score[_RESTORE_RATE] is not None:
        used.append(score[_RESTORE_RATE])
    return Assessment(state, not state.rejected, list(state.rejected), score[_SOURCE], score[_CACHED], score[_BYTES],
                      Terms(score[_QUEUE], score[_LOAD], score[_RESTORE], score[_PREFILL]), used, score[_TTFT],
                      guarded)


def assess(request: PlacementRequest, state: CandidateState, registry: RateRegistry) -> Assessment:
    """One candidate's best cache option and its terms (what `place` computes for each)."""
    return _assessment(request, _score(request.prompt_tokens, request.tier_matches, state,
                                       registry.resolved(state.provider)))


def _movable(request: PlacementRequest, candidates: Sequence[CandidateState]) -> bool:
    """Whether the load guard may place this request away from its session's provider:
    always for a new session; for a later turn, when a saved state holds at least as
    many of its prompt's tokens as that provider's context (moving costs a restore,
    not a recompute)."""
    if request.session_provider is None:
        return True
    formats = {c.state_format for c in candidates if c.state_format is not None and not c.rejected}
    saved = max((m.cached_tokens for m in request.tier_matches if m.state_format in formats), default=0)
    if saved <= 0:
        return False
    held = next((c.t0_cached_tokens for c in candidates if c.provider == request.session_provider), 0)
    return saved >= min(held, request.prompt_tokens)


def _tie_key(state: CandidateState) -> tuple:
    return (state.load, state.queued_prefill_tokens + state.queued_decode_tokens, state.provider)


def _cost(score: tuple, work_weight: float) -> float | None:
    """What `place` minimises: the estimated TTFT plus ``work_weight`` x the engine time
    this option adds (restore + prefill), which every request queued behind it waits."""
    t = score[_TTFT]
    if t is None or not work_weight:
        return t
    return t + work_weight * ((score[_RESTORE] or 0.0) + (score[_PREFILL] or 0.0))


def busy_fraction(candidates: Sequence[CandidateState], folded: "Folded | None" = None) -> float:
    """Share of the eligible candidates with work ahead of a new request (the default
    work weight): 0 on an idle fleet, where only this request's TTFT matters; 1 when
    every engine is busy, where an option's extra prefill delays later requests as
    much as it delays this one. ``folded``: eligible slots the caller left out
    (`SlotFolder`), counted as they are."""
    eligible = [c for c in candidates if not c.rejected]
    busy = sum(1 for c in eligible if _has_work(c.running_remaining_s, c.queued_prefill_tokens, c.queued_decode_tokens))
    total = len(eligible)
    if folded is not None:
        busy, total = busy + folded.busy, total + folded.idle + folded.busy
    return busy / total if total else 0.0


def _has_work(running_remaining_s: float, queued_prefill_tokens: int, queued_decode_tokens: int) -> bool:
    """A candidate with work ahead of a new request: what `busy_fraction` counts as busy."""
    return running_remaining_s > 0 or queued_prefill_tokens > 0 or queued_decode_tokens > 0


@dataclass(frozen=True, slots=True)
class Folded:
    """How many candidates a caller left out of `place` (`SlotFolder`): with no work
    ahead (idle) and with some (busy)."""

    idle: int = 0
    busy: int = 0

    @property
    def total(self) -> int:
        return self.idle + self.busy


class SlotFolder:
    """Leaves out the slots of an engine that cannot win because a sibling beats them.

    The slots of one engine (a llama-server replica's parallel slots) share its
    rates and residency, and each one's queue term counts its siblings' work.
    Among its eligible slots that hold the same T0 prefix of the prompt (most
    often none; with a shared system prompt, that prompt), every cache option
    (T0, none, T1, T2) costs the same restore and prefill, so they differ only
    in their queue: time left of a running turn, queued prefill and queued
    decode tokens, each of which only adds to the estimate. A slot whose three
    are all >= a sibling's and whose tie-break key (load, queued work, name) is
    greater can never be chosen over that sibling, nor change what the load
    guard does (its load is not lower). `fold` keeps, per engine and T0 prefix,
    the slots no sibling dominates: one when the engine has an idle slot of the
    least load (64 replicas x 8 slots are then scored as ~70 candidates instead
    of 512).

    The caller offers only eligible slots that are not the session's own
    provider (the load guard reads that one's T0), each with its T0 prefix
    length and under an ``engine`` key that includes their rates if those could
    differ, and passes the `Folded` counts to `place`, which counts them in the
    busy fraction and says how many in the reason.
    """

    __slots__ = ("_fronts", "_idle", "_busy")

    def __init__(self) -> None:
        self._fronts: dict[Any, list[tuple]] = {}  # per engine: the slots no sibling offered so far beats
        self._idle = self._busy = 0

    def offer(self, engine: Any, t0_cached_tokens: int, running_remaining_s: float, queued_prefill_tokens: int,
              queued_decode_tokens: int, load: float, name: str, item: Any) -> None:
        """One slot, in any order; only slots of one engine holding as much of the prompt
        are compared. Domination is transitive, so a slot beaten by one that is itself
        beaten later stays beaten by the later one."""
        tie = (load, queued_prefill_tokens + queued_decode_tokens, name)
        engine = (engine, t0_cached_tokens)
        front = self._fronts.get(engine)
        if front is None:
            self._fronts[engine] = [(running_remaining_s, queued_prefill_tokens, queued_decode_tokens, tie, item)]
            return
        for f in front:
            if (running_remaining_s >= f[0] and queued_prefill_tokens >= f[1] and queued_decode_tokens >= f[2]
                    and tie > f[3]):
                self._count(running_remaining_s, queued_prefill_tokens, queued_decode_tokens)
                return
        kept = []
        for f in front:
            if f[0] >= running_remaining_s and f[1] >= queued_prefill_tokens and f[2] >= queued_decode_tokens \
                    and f[3] > tie:
                self._count(f[0], f[1], f[2])
            else:
                kept.append(f)
        kept.append((running_remaining_s, queued_prefill_tokens, queued_decode_tokens, tie, item))
        self._fronts[engine] = kept

    def _count(self, remaining: float, prefill: int, decode: int) -> None:
        if _has_work(remaining, prefill, decode):
            self._busy += 1
        else:
            self._idle += 1

    def fold(self) -> tuple[list[Any], Folded]:
        """The items to score (the slots no sibling beats), and the counts of those left out."""
        return [f[4] for front in self._fronts.values() for f in front], Folded(self._idle, self._busy)


def _best(scores: list[tuple], pool: Sequence[int], prompt: int, work_weight: float = 0.0) -> int:
    """Index of the best candidate of ``pool``: the lowest known TTFT; ties go to the
    least-loaded one (several idle providers, none holding the prefix, would otherwise
    pile on the first by name), then less queued work, then the name. Without any
    known TTFT: model hot, fewest uncached tokens, load, queued work, name."""
    best_i, best_t = -1, 0.0
    ties: list[int] = []
    for i in pool:
        t = _cost(scores[i], work_weight)
        if t is None:
            continue
        if best_i < 0 or t < best_t:
            best_i, best_t, ties = i, t, []
        elif t == best_t:
            ties.append(i)
    if best_i >= 0:
        if not ties:
            return best_i
        ties.append(best_i)
        return min(ties, key=lambda i: _tie_key(scores[i][_STATE]))

    def unknown_key(i: int) -> tuple:
        state = scores[i][_STATE]
        return (not state.model_hot, prompt - scores[i][_CACHED], *_tie_key(state))

    return min(pool, key=unknown_key)


_DEFAULT_GUARD = LoadGuard()


def place(
    request: PlacementRequest,
    candidates: Sequence[CandidateState],
    registry: RateRegistry,
    guard: LoadGuard | None = None,
    work_weight: float | None = None,
    folded: Folded | None = None,
) -> Decision:
    """Choose among ``candidates`` (see the module docstring). ``folded``: slots the
    caller left out because a sibling beats them (`SlotFolder`), counted in the busy
    fraction and named in the reason."""
    started = time.perf_counter_ns()
    guard = guard or _DEFAULT_GUARD
    k = busy_fraction(candidates, folded) if work_weight is None else work_weight
    prompt = request.prompt_tokens
    matches = request.tier_matches
    resolved = registry.resolved
    eligible = [i for i, state in enumerate(candidates) if not state.rejected]

    # The load guard depends on loads only, so its pools are known before any TTFT.
    # A later turn the guard may not move keeps its own provider eligible, but if
    # the cost model moves it anyway (that provider's queue), it lands like a new
    # session: never on another overloaded provider.
    guarded: frozenset[int] = frozenset()
    if guard.enabled and len(eligible) > 1:
        limit = guard.limit(min(candidates[i].load for i in eligible))
        over = [i for i in eligible if candidates[i].load > limit]
        if over and not _movable(request, candidates):
            over = [i for i in over if candidates[i].provider != request.session_provider]
        if over and len(over) < len(eligible):
            guarded = frozenset(over)
    pool = [i for i in eligible if i not in guarded] if guarded else eligible

    # Scores. What must be exact: the two best of the pool (choice and runner-up in the
    # reason) and, when the guard excludes some, the best of all eligible (did it change
    # the choice?). `bound` lets _score skip the T1/T2 options of a candidate whose
    # queue + load alone already exceed those.
    scores: list[tuple] = []
    first = second = best_guarded = _INF
    for i, state in enumerate(candidates):
        if state.rejected:
            bound = -_INF
        elif guarded and i in guarded:
            bound = first if first < best_guarded else best_guarded
        else:
            bound = second
        score = _score(prompt, matches, state, resolved(state.provider), bound)
        scores.append(score)
        total = _cost(score, k)
        if total is not None and score[_EXACT] and not state.rejected:
            if guarded and i in guarded:
                if total < best_guarded:
                    best_guarded = total
            elif total < first:
                first, second = total, first
            elif total < second:
                second = total

    guard_applied = bool(guarded) and _best(scores, eligible, prompt, k) in guarded
    chosen_index = _best(scores, pool, prompt, k) if pool else -1
    chosen = _assessment(request, scores[chosen_index]) if chosen_index >= 0 else None
    reason = _reason(request, chosen, chosen_index, pool, scores, guarded, guard_applied)
    if folded is not None and folded.total:
        reason += f"; {folded.total} slots not scored (a sibling slot of their engine beats each)"
    return Decision(request, chosen, reason, scores, guard, guard_applied,
                    (time.perf_counter_ns() - started) // 1000, chosen_index=chosen_index, guarded=guarded)


def _reason(request: PlacementRequest, chosen: Assessment | None, chosen_index: int, pool: list[int],
            scores: list[tuple], guarded: frozenset[int], guard_applied: bool) -> str:
    if chosen is None:
        if not scores:
            return "no candidate providers"
        refusals = "; ".join(f"{s[_STATE].provider}: {', '.join(s[_STATE].rejected)}"
                             for s in scores if s[_STATE].rejected)
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
        runner_up = -1
        for i in pool:
            t = scores[i][_TTFT]
            if i != chosen_index and t is not None and (runner_up < 0 or t < scores[runner_up][_TTFT]):
                runner_up = i
        if runner_up >= 0:
            text += f"; next {scores[runner_up][_STATE].provider} at {scores[runner_up][_TTFT]:.3f} s"
        fallbacks = sorted({r.quantity for r in chosen.rates if r.source == "fallback"})
        if fallbacks:
            text += f"; fallback (slowest known) rates used for {', '.join(fallbacks)}"
    if guard_applied:
        excluded = [scores[i][_STATE].provider for i in sorted(guarded)]
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


def packed_tokens(tokens: Sequence[int]) -> bytes:
    """Tokens as 8-byte integers, for `common_prefix_packed`."""
    return array("q", tokens).tobytes()


def common_prefix_packed(context: bytes, prompt: bytes) -> int:
    """`common_prefix_tokens` of two `packed_tokens`: the same count, compared as bytes
    (memcmp) instead of int by int: a 2000-token shared system prompt costs ~5 us a
    context instead of 25-70, which 512 slots would pay on every placement."""
    n = min(len(context), len(prompt)) // 8
    i = 0
    for step in (512, 64, 8, 1):  # each pass narrows to the first differing chunk of the last
        width = 8 * step
        while i + step <= n and context[8 * i:8 * i + width] == prompt[8 * i:8 * i + width]:
            i += step
    return min(i, max(0, len(prompt) // 8 - 1))


class PackedPrompt:
    """A prompt matched against many T0 contexts (`HeldContext.reusable`): packed once,
    on the first context that shares its first token."""

    __slots__ = ("_tokens", "_packed")

    def __init__(self, tokens: Sequence[int]) -> None:
        self._tokens, self._packed = tokens, b""

    @property
    def packed(self) -> bytes:
        if not self._packed:
            self._packed = packed_tokens(self._tokens)
        return self._packed


def common_prefix_tokens(context: Sequence[int], prompt: Sequence[int]) -> int:
    """Tokens a provider's live context (T0) shares with ``prompt``; a prompt is never
    wholly cached (at least one token must be evaluated), hence the cap."""
    n = min(len(context), len(prompt))
    if not n or context[0] != prompt[0]:
        return 0  # the common case with many slots: nothing shared (no slices copied)
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
        keys = self.keys
        if not prompt_keys or prompt_keys[0] not in keys:
            return 0  # the common case on a node with many providers: nothing shared at all
        lo, hi = 1, len(prompt_keys)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if prompt_keys[mid - 1] in keys:
                lo = mid
            else:
                hi = mid - 1
        return lo
