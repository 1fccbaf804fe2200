"""Cost model and placement: monotone in uncached tokens and queue (hypothesis),
rates measured and refined, decisions that list every candidate and say why."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.contracts.placement import PlacementDecision
from nodeagent.providers.base import Rates
from nodeagent.scheduler.cost import CostInputs, ttft_terms
from nodeagent.scheduler.placement import (CandidateState, ContextBlocks, Folded, LoadGuard, PlacementRequest,
                                           SlotFolder, TierMatch, busy_fraction, common_prefix_packed,
                                           common_prefix_tokens, explain, packed_tokens, place)
from nodeagent.scheduler.rates import DECODE, LOAD, PREFILL, QUANTITIES, RateEstimate, RateRegistry, restore_quantity

rate = st.floats(min_value=1.0, max_value=1e9, allow_nan=False)
count = st.integers(min_value=0, max_value=1_000_000)


def rates_of(prefill, decode, restore, load):
    return {PREFILL: RateEstimate(PREFILL, prefill, "observed"), DECODE: RateEstimate(DECODE, decode, "observed"),
            restore_quantity("T1"): RateEstimate("r", restore, "observed"),
            restore_quantity("T2"): RateEstimate("r", restore / 4, "observed"), LOAD: RateEstimate(LOAD, load, "observed")}


@given(prompt=count, cached_a=count, cached_b=count, prefill=rate, decode=rate, restore=rate, load=rate,
       source=st.sampled_from(["T0", "T1", "T2", "none"]), queued=count, hot=st.booleans())
def test_ttft_is_monotone_in_uncached_tokens(prompt, cached_a, cached_b, prefill, decode, restore, load, source,
                                             queued, hot):
    rates = rates_of(prefill, decode, restore, load)
    more_cached, less_cached = max(cached_a, cached_b), min(cached_a, cached_b)

    def total(cached):
        return ttft_terms(CostInputs(prompt_tokens=prompt, cached_tokens=cached, cache_source=source,
                                     restore_bytes=1000, model_hot=hot, model_bytes=10**6,
                                     queued_prefill_tokens=queued), rates).total

    assert total(less_cached) >= total(more_cached)  # more uncached tokens never cost less


@given(q1=count, q2=count, d1=count, d2=count, busy1=st.floats(0, 1e4), busy2=st.floats(0, 1e4), prefill=rate,
       decode=rate, prompt=count)
def test_ttft_is_monotone_in_queue(q1, q2, d1, d2, busy1, busy2, prefill, decode, prompt):
    rates = rates_of(prefill, decode, 1e9, 1e9)

    def total(q, d, busy):
        return ttft_terms(CostInputs(prompt_tokens=prompt, cached_tokens=0, cache_source="none",
                                     queued_prefill_tokens=q, queued_decode_tokens=d, running_remaining_s=busy),
                          rates).total

    lo = total(min(q1, q2), min(d1, d2), min(busy1, busy2))
    hi = total(max(q1, q2), max(d1, d2), max(busy1, busy2))
    assert hi >= lo


def test_terms_add_up_and_unknown_rates_make_the_total_unknown():
    rates = rates_of(1000.0, 50.0, 1e6, 1e8)
    terms = ttft_terms(CostInputs(prompt_tokens=3000, cached_tokens=1000, cache_source="T1", restore_bytes=2_000_000,
                                  model_hot=False, model_bytes=10**9, queued_prefill_tokens=500,
                                  queued_decode_tokens=100, running_remaining_s=0.25), rates)
    assert terms.queue_wait_s == pytest.approx(0.25 + 0.5 + 2.0)
    assert terms.load_s == pytest.approx(10.0)
    assert terms.restore_s == pytest.approx(2.0)
    assert terms.prefill_s == pytest.approx(2.0)
    assert terms.total == pytest.approx(16.75)
    unknown = ttft_terms(CostInputs(prompt_tokens=10, cached_tokens=0, cache_source="none"), {})
    assert unknown.prefill_s is None and unknown.total is None


def test_rates_prefer_observations_refine_by_ewma_and_fall_back_to_the_slowest():
    registry = RateRegistry(alpha=0.5)
    assert registry.estimate("a", PREFILL).source == "unknown"
    registry.seed_from_provider("a", Rates(prefill_tokens_per_s=1000, decode_tokens_per_s=20,
                                           restore_bytes_per_s=5e8))
    assert registry.estimate("a", PREFILL) == RateEstimate(PREFILL, 1000, "provider", 0)
    assert registry.estimate("a", restore_quantity("T2")).value == 5e8
    registry.observe("a", PREFILL, 4000, 2.0)  # 2000 tok/s replaces the start-up figure
    registry.observe("a", PREFILL, 1000, 1.0)  # then averages: 0.5 * 2000 + 0.5 * 1000
    assert registry.estimate("a", PREFILL) == RateEstimate(PREFILL, 1500, "observed", 2)
    registry.set("a", PREFILL, 99, "calibrated")  # a seed never overwrites observations
    assert registry.estimate("a", PREFILL).value == 1500
    registry.set("b", PREFILL, 3000, "calibrated")
    fallback = registry.estimate("c", PREFILL)
    assert fallback.source == "fallback" and fallback.value == 1500  # slowest known: conservative
    registry.set(None, LOAD, 2e9, "calibrated")  # machine-wide calibration
    assert registry.estimate("c", LOAD) == RateEstimate(LOAD, 2e9, "calibrated", 0)
    with pytest.raises(ValueError, match="quantity"):
        registry.set("a", "tokens_per_fortnight", 1, "provider")
    with pytest.raises(ValueError, match="> 0"):
        registry.set("a", PREFILL, 0, "provider")


def registry_for(*names, prefill=1000.0):
    registry = RateRegistry()
    for name in names:
        registry.set(name, PREFILL, prefill, "provider")
        registry.set(name, DECODE, 20.0, "provider")
        registry.set(name, restore_quantity("T1"), 1e9, "calibrated")
        registry.set(name, restore_quantity("T2"), 1e8, "calibrated")
        registry.set(name, LOAD, 1e9, "calibrated")
    return registry


def test_placement_prefers_the_warm_provider_and_explains_every_candidate():
    registry = registry_for("warm", "cold", "loading")
    request = PlacementRequest("sha256:m", 4000, pod="p1", tenant="acme", dry_run=True)
    decision = place(request, [
        CandidateState("cold", True, state_format="f"),
        CandidateState("warm", True, t0_cached_tokens=3500, queued_prefill_tokens=200, state_format="f"),
        CandidateState("loading", False, model_bytes=4 * 10**9),
        CandidateState("full", True, rejected=("memory: needs 5.0 GiB, 2.0 GiB free",)),
    ], registry)
    assert decision.provider == "warm"
    contract = decision.to_contract()
    PlacementDecision.model_validate(contract.to_wire())  # round-trips on the wire
    assert contract.dry_run and [c.provider for c in contract.candidates] == ["cold", "warm", "loading", "full"]
    by_name = {c.provider: c for c in contract.candidates}
    assert by_name["warm"].cache_source == "T0" and by_name["warm"].ttft_s == pytest.approx(0.2 + 0.5)
    assert by_name["cold"].ttft_s == pytest.approx(4.0)
    assert by_name["loading"].terms.load_s == pytest.approx(4.0)
    assert not by_name["full"].eligible and "memory" in by_name["full"].rejected[0]
    assert "warm: lowest estimated TTFT 0.700 s" in contract.reason
    text = explain(contract)
    assert "full" in text and "memory" in text and "(dry run)" in text


def test_restore_from_a_tier_beats_recompute_when_it_is_faster():
    registry = registry_for("a")
    matches = (TierMatch("T2", 3000, 2 * 10**8, "f"), TierMatch("T1", 2000, 10**6, "f"))
    decision = place(PlacementRequest("m", 4000, tier_matches=matches), [CandidateState("a", True, state_format="f")],
                     registry)
    chosen = decision.chosen
    # T1: 1 ms restore + 2 s prefill beats T2: 2 s restore + 1 s prefill, and no cache (4 s).
    assert chosen.cache_source == "T1" and chosen.cached_tokens == 2000
    # A provider that cannot restore this format only has its own context.
    other = place(PlacementRequest("m", 4000, tier_matches=matches),
                  [CandidateState("a", True, state_format="other-format")], registry)
    assert other.chosen.cache_source == "none"


def test_no_eligible_candidate_yields_no_choice_with_reasons():
    decision = place(PlacementRequest("m", 10), [CandidateState("x", True, rejected=("policy: provider not allowed",))],
                     registry_for("x"))
    assert decision.provider is None and "policy: provider not allowed" in decision.reason


def test_unknown_rates_are_reported_and_choice_falls_back_to_cache_and_queue():
    decision = place(PlacementRequest("m", 1000), [CandidateState("a", True, t0_cached_tokens=0),
                                                   CandidateState("b", True, t0_cached_tokens=900)], RateRegistry())
    assert decision.provider == "b"
    assert "rates unknown" in decision.reason
    assert decision.to_contract().candidates[1].ttft_s is None


def test_ties_go_to_the_least_loaded_provider():
    decision = place(PlacementRequest("m", 1000), [CandidateState(n, True, load=l) for n, l in
                                                   (("a", 500), ("b", 100), ("c", 300))], registry_for("a", "b", "c"))
    assert decision.provider == "b"


def test_a_later_turn_is_moved_by_the_guard_only_when_its_history_is_saved_in_a_tier():
    registry = registry_for("hot", "idle")
    candidates = [CandidateState("hot", True, t0_cached_tokens=3000, load=50_000, state_format="f"),
                  CandidateState("idle", True, load=1_000, state_format="f")]
    saved = (TierMatch("T1", 3000, 10**6, "f"),)
    moved = place(PlacementRequest("m", 4000, saved, session_provider="hot"), candidates, registry)
    assert moved.provider == "idle" and moved.guard_applied and moved.chosen.cache_source == "T1"
    shorter = (TierMatch("T1", 2000, 10**6, "f"),)  # the tier holds less than its provider: recompute to move
    stays = place(PlacementRequest("m", 4000, shorter, session_provider="hot"), candidates, registry)
    assert stays.provider == "hot" and not stays.guard_applied
    other_format = (TierMatch("T1", 3000, 10**6, "g"),)  # nobody here can restore it
    assert place(PlacementRequest("m", 4000, other_format, session_provider="hot"), candidates,
                 registry).provider == "hot"


def test_load_guard_diverts_new_sessions_only_and_says_so():
    registry = registry_for("hot", "idle")
    candidates = [CandidateState("hot", True, t0_cached_tokens=3000, load=50_000),
                  CandidateState("idle", True, load=1_000)]
    guard = LoadGuard(rel=1.5, abs_tokens=0)
    new = place(PlacementRequest("m", 4000), candidates, registry, guard)
    assert new.provider == "idle" and new.guard_applied and "load guard excluded hot" in new.reason
    assert new.to_contract().load_guard.excluded == ["hot"]
    again = place(PlacementRequest("m", 4000, session_provider="hot"), candidates, registry, guard)
    assert again.provider == "hot" and not again.guard_applied
    off = place(PlacementRequest("m", 4000), candidates, registry, LoadGuard(enabled=False))
    assert off.provider == "hot"


def test_a_later_turn_moved_off_its_busy_provider_lands_like_a_new_session():
    registry = registry_for("home", "crowded", "light")
    # Its own provider is far behind (queue), so the cost model moves it; "crowded" holds
    # a little of its prefix and is one token of queue cheaper than "light", but it is over
    # the guard's limit: a session leaving home must not pile onto it.
    candidates = [CandidateState("home", True, t0_cached_tokens=3000, load=9_000, queued_prefill_tokens=400_000),
                  CandidateState("crowded", True, t0_cached_tokens=64, load=30_000),
                  CandidateState("light", True, load=5_000)]
    guard = LoadGuard(rel=1.5, abs_tokens=0)
    moved = place(PlacementRequest("m", 4000, session_provider="home"), candidates, registry, guard)
    assert moved.provider == "light" and moved.guard_applied
    assert moved.to_contract().load_guard.excluded == ["crowded"]  # never its own provider
    unguarded = place(PlacementRequest("m", 4000, session_provider="home"), candidates, registry,
                      LoadGuard(enabled=False))
    assert unguarded.provider == "crowded"


@settings(max_examples=300, deadline=None)
@given(shared=st.integers(0, 1500), context=st.lists(st.integers(0, 2**40), max_size=600),
       prompt=st.lists(st.integers(0, 2**40), max_size=600))
def test_packed_t0_matching_counts_what_token_matching_counts(shared, context, prompt):
    head = list(range(7, 7 + shared))  # a shared prefix of any length, then anything
    context, prompt = head + context, head + prompt
    assert common_prefix_packed(packed_tokens(context), packed_tokens(prompt)) == common_prefix_tokens(context, prompt)


def test_t0_helpers():
    assert common_prefix_tokens([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix_tokens(list(range(1000)), list(range(1000))) == 999  # never the whole prompt
    keys = [bytes([i]) * 32 for i in range(10)]
    assert ContextBlocks(keys[:6]).matched_blocks(keys) == 6
    assert ContextBlocks([]).matched_blocks(keys) == 0


# ---------------------------------------------------------------- place() against a brute-force reference
def reference_place(request, candidates, registry, guard):
    """The documented rule, spelled out the slow way: every cache option of every
    candidate through cost.ttft_terms, then the minimum with the tie and guard rules."""
    prompt = request.prompt_tokens
    best, work = {}, {}
    for state in candidates:
        rates = {q: registry.estimate(state.provider, q) for q in QUANTITIES}
        t0 = min(state.t0_cached_tokens, prompt) if state.model_hot else 0
        options = [("T0" if t0 else "none", t0, 0)]
        options += [(m.tier, min(m.cached_tokens, prompt), m.bytes) for m in request.tier_matches
                    if state.state_format is not None and m.state_format == state.state_format and m.cached_tokens > 0]
        ranked = []
        for source, cached, nbytes in options:
            terms = ttft_terms(CostInputs(prompt, cached, source, nbytes, state.model_hot, state.model_bytes,
                                          state.queued_prefill_tokens, state.queued_decode_tokens,
                                          state.running_remaining_s), rates)
            total = terms.total
            ranked.append(((0, total, -cached) if total is not None else (1, 0.0, -cached), source, cached, total,
                           (terms.restore_s or 0.0) + (terms.prefill_s or 0.0)))
        top = min(ranked, key=lambda r: r[0])  # first of equals: the base option
        best[state.provider] = top[:4]
        work[state.provider] = top[4]

    # The objective: TTFT + k x the engine time the option adds, k = the share of eligible
    # candidates with work queued or running (0 on an idle fleet).
    eligible = [s for s in candidates if not s.rejected]
    busy = [s for s in eligible if s.running_remaining_s > 0 or s.queued_prefill_tokens > 0
            or s.queued_decode_tokens > 0]
    k = len(busy) / len(eligible) if eligible else 0.0

    def key(state):
        _, _, cached, total = best[state.provider]
        queued = state.queued_prefill_tokens + state.queued_decode_tokens
        if total is not None:
            return (0, total + k * work[state.provider] if k else total, state.load, queued, state.provider)
        return (1, not state.model_hot, prompt - cached, state.load, queued, state.provider)

    pool, applied = eligible, False
    # A later turn is guarded too when a restorable saved state holds as much of the prompt
    # as its own provider's context: moving it then costs a restore, not a recompute.
    formats = {s.state_format for s in eligible if s.state_format is not None}
    saved = max([m.cached_tokens for m in request.tier_matches if m.state_format in formats] + [0])
    own = [s.t0_cached_tokens for s in candidates if s.provider == request.session_provider]
    movable = request.session_provider is None or (saved > 0 and saved >= min(own[0] if own else 0, prompt))
    # A later turn that may not be moved keeps its own provider, whatever its load; the
    # guard still applies to every other provider it could be moved to.
    if guard.enabled and len(eligible) > 1:
        limit = guard.limit(min(s.load for s in eligible))

        def allowed(s):
            return s.load <= limit or (not movable and s.provider == request.session_provider)

        kept = [s for s in eligible if allowed(s)]
        if kept and len(kept) < len(eligible):
            applied = not allowed(min(eligible, key=key))
            pool = kept
    chosen = min(pool, key=key).provider if pool else None
    return chosen, applied, best


names = [f"p{i}" for i in range(8)]
candidate = st.builds(
    lambda hot, t0, fmt, qp, qd, busy, load, rejected: dict(
        model_hot=hot, model_bytes=10**9, t0_cached_tokens=t0, state_format=fmt, queued_prefill_tokens=qp,
        queued_decode_tokens=qd, running_remaining_s=busy, load=load, rejected=("no",) if rejected else ()),
    st.booleans(), st.sampled_from([0, 0, 64, 1000, 4000, 9000]), st.sampled_from([None, "f", "g"]),
    st.sampled_from([0, 0, 500, 4000, 20000]), st.sampled_from([0, 0, 64, 300]), st.sampled_from([0.0, 0.0, 0.5, 2.0]),
    st.sampled_from([0, 1000, 1500, 3000, 50000]), st.sampled_from([False, False, False, True]))
match = st.builds(TierMatch, st.sampled_from(["T1", "T2"]), st.sampled_from([0, 64, 2000, 5000, 9000]),
                  st.sampled_from([0, 10**6, 10**9]), st.sampled_from(["f", "g"]))
known_rates = st.fixed_dictionaries({}, optional={PREFILL: st.sampled_from([1000.0, 4000.0]),
                                                  DECODE: st.sampled_from([20.0, 50.0]),
                                                  LOAD: st.sampled_from([1e8, 1e9]),
                                                  restore_quantity("T1"): st.sampled_from([1e9, 4e9]),
                                                  restore_quantity("T2"): st.sampled_from([1e8, 5e8])})


@settings(max_examples=300, deadline=None)
@given(specs=st.lists(st.tuples(candidate, known_rates), min_size=1, max_size=8),
       matches=st.lists(match, max_size=3), prompt=st.sampled_from([1, 64, 3000, 8000]),
       guard=st.sampled_from([LoadGuard(), LoadGuard(rel=1.0), LoadGuard(rel=2.0, abs_tokens=500),
                              LoadGuard(enabled=False)]),
       session=st.sampled_from([None, "p0"]))
def test_place_chooses_what_the_brute_force_rule_chooses_and_reports_every_candidate_exactly(
        specs, matches, prompt, guard, session):
    """The fast path (inline terms, options skipped for candidates that cannot matter,
    assessments built lazily) decides and explains exactly as the rule it implements."""
    registry = RateRegistry()
    candidates = []
    for name, (spec, rates) in zip(names, specs):
        for quantity, value in rates.items():
            registry.set(name, quantity, value, "calibrated")
        candidates.append(CandidateState(name, **spec))
    request = PlacementRequest("m", prompt, tuple(matches), session_provider=session)
    decision = place(request, candidates, registry, guard)
    chosen, applied, best = reference_place(request, candidates, registry, guard)
    assert decision.provider == chosen
    assert decision.guard_applied == applied
    for assessment in decision.assessments:
        _, source, cached, total = best[assessment.state.provider]
        assert (assessment.cache_source, assessment.cached_tokens) == (source, cached)
        assert assessment.ttft_s == (None if total is None else pytest.approx(total))
        assert assessment.terms.total == (None if total is None else pytest.approx(total))
    if decision.chosen is not None:
        assert decision.chosen is decision.assessments[[c.provider for c in candidates].index(chosen)]
        runner_up = sorted((t, p) for p, (_, _, _, t) in best.items()
                           if t is not None and p != chosen and p in {a.state.provider for a in decision.assessments
                                                                       if a.eligible and not a.guarded})
        if decision.chosen.ttft_s is not None and runner_up:
            assert f"; next {runner_up[0][1]} at {runner_up[0][0]:.3f} s" in decision.reason


# ---------------------------------------------------------------- folding the slots a sibling beats
slot = st.fixed_dictionaries({
    "t0": st.sampled_from([0, 0, 0, 64, 3000]), "own_prefill": st.sampled_from([0, 0, 0, 500, 4000]),
    "own_decode": st.sampled_from([0, 0, 64]), "running": st.sampled_from([0.0, 0.0, 1.5]),
    "load": st.sampled_from([0, 0, 1000, 3000]), "rejected": st.sampled_from([False, False, False, True])})
engine = st.tuples(st.lists(slot, min_size=1, max_size=6), known_rates, st.booleans())


@settings(max_examples=400, deadline=None)
@given(engines=st.lists(engine, min_size=1, max_size=5), matches=st.lists(match, max_size=2),
       prompt=st.sampled_from([64, 3000, 8000]), session=st.sampled_from([None, "e0/s0", "e1/s1"]),
       guard=st.sampled_from([LoadGuard(enabled=False), LoadGuard(), LoadGuard(rel=1.0)]))
def test_scoring_only_the_slots_no_sibling_beats_decides_as_scoring_them_all(engines, matches, prompt, session, guard):
    """The slots of an engine share its rates, and each one's queue term carries its
    siblings' work at the executor's contention weights (prefill 1.0, decode 0.1). Leaving
    out of `place` the slots a sibling holding the same T0 prefix dominates (with their
    counts) changes neither the choice, nor the guard's part in it, nor the busy fraction."""
    registry = RateRegistry()
    every, kept, folder = [], [], SlotFolder()
    for e, (slots, rates, hot) in enumerate(engines):
        engine_prefill = sum(s["own_prefill"] for s in slots)
        engine_decode = sum(s["own_decode"] for s in slots)
        for j, spec in enumerate(slots):
            name = f"e{e}/s{j}"
            for quantity, value in rates.items():
                registry.set(name, quantity, value, "calibrated")
            busy = bool(spec["own_prefill"] or spec["own_decode"] or spec["running"])
            state = CandidateState(
                name, model_hot=hot, model_bytes=10**9, t0_cached_tokens=spec["t0"] if hot else 0, state_format="f",
                queued_requests=int(busy), queued_prefill_tokens=engine_prefill,
                queued_decode_tokens=spec["own_decode"] + int(0.1 * (engine_decode - spec["own_decode"])),
                running_remaining_s=spec["running"], load=float(spec["load"]),
                rejected=("pinned elsewhere",) if spec["rejected"] else ())
            every.append(state)
            if not state.rejected and name != session:
                folder.offer(f"e{e}", state.t0_cached_tokens, state.running_remaining_s, state.queued_prefill_tokens,
                             state.queued_decode_tokens, state.load, name, state)
            else:
                kept.append(state)
    offered, folded = folder.fold()
    kept += offered
    request = PlacementRequest("m", prompt, tuple(matches), session_provider=session)
    full = place(request, every, registry, guard)
    part = place(request, kept, registry, guard, folded=folded)
    assert len(kept) + folded.total == len(every)
    assert part.provider == full.provider
    assert part.guard_applied == full.guard_applied
    assert busy_fraction(kept, folded) == pytest.approx(busy_fraction(every))
    if folded.total:
        assert f"{folded.total} slots not scored" in part.reason


def test_a_slot_is_left_out_only_when_a_sibling_holding_as_much_has_no_more_queue_and_wins_the_tie_break():
    folder = SlotFolder()
    folder.offer("a", 0, 0.0, 0, 0, 0, "a/1", "a/1")  # idle: the best of engine a
    folder.offer("a", 0, 0.0, 0, 0, 0, "a/2", "a/2")  # its twin, later by name: left out (idle)
    folder.offer("a", 0, 2.0, 100, 19, 0, "a/3", "a/3")  # more of everything: left out (busy)
    folder.offer("a", 0, 2.0, 100, 19, -1, "a/4", "a/4")  # more queue but a lower load, it may win a tie: kept
    folder.offer("a", 300, 5.0, 900, 90, 9, "a/5", "a/5")  # holds 300 tokens of the prompt: no rival of a/1, kept
    folder.offer("a", 300, 5.0, 900, 90, 9, "a/6", "a/6")  # holds as much, later by name: left out (busy)
    folder.offer("b", 0, 0.0, 90, 30, 0, "b/1", "b/1")  # less prefill than b/2 ...
    folder.offer("b", 0, 0.0, 100, 10, 0, "b/2", "b/2")  # ... less decode than b/1: neither beats the other
    folder.offer("b", 0, 1.0, 100, 30, 0, "b/3", "b/3")  # b/2 beats it: left out (busy)
    kept, folded = folder.fold()
    assert sorted(kept) == ["a/1", "a/4", "a/5", "b/1", "b/2"]
    assert folded == Folded(idle=1, busy=3) and folded.total == 4


def test_resolved_rates_follow_every_change_that_can_move_them():
    registry = RateRegistry()
    registry.set("a", PREFILL, 1000, "provider")
    registry.set("b", PREFILL, 3000, "provider")
    assert registry.resolved("a").prefill_value == 1000
    assert registry.resolved("c").prefill.source == "fallback" and registry.resolved("c").prefill_value == 1000
    registry.observe("a", PREFILL, 500, 1.0)  # a's own rate moves, and so does the slowest known
    assert registry.resolved("a").prefill_value == 500 and registry.resolved("a").prefill.source == "observed"
    assert registry.resolved("c").prefill_value == 500
    registry.set(None, PREFILL, 2000, "calibrated")  # a machine-wide value now beats the fallback for c
    assert registry.resolved("c").prefill == RateEstimate(PREFILL, 2000, "calibrated", 0)
    assert registry.resolved("b").prefill_value == 3000  # its own rate is untouched by the others
    assert registry.resolved("b") is registry.resolved("b")  # cached while nothing changes


def test_a_candidate_that_cannot_win_is_still_assessed_exactly_and_the_runner_up_is_right():
    """`place` skips the T1/T2 options of candidates whose queue alone rules them out;
    the runner-up named in the reason and every reported assessment stay exact."""
    registry = registry_for("a", "b", "c", "d")
    matches = (TierMatch("T1", 3900, 10**6, "f"),)
    candidates = [
        CandidateState("a", True, t0_cached_tokens=3900),  # 0.1 s from its own context
        CandidateState("b", True, queued_prefill_tokens=200, state_format="f"),  # 0.2 + 0.001 + 0.1 via T1
        CandidateState("c", True, t0_cached_tokens=2000),  # 2.0 s
        CandidateState("d", True, queued_prefill_tokens=5000, state_format="f"),  # 5 s of queue: cannot matter
    ]
    decision = place(PlacementRequest("m", 4000, matches), candidates, registry, LoadGuard(enabled=False))
    assert decision.provider == "a"
    assert "; next b at 0.301 s" in decision.reason
    by_name = {a.state.provider: a for a in decision.assessments}
    assert by_name["d"].cache_source == "T1" and by_name["d"].ttft_s == pytest.approx(5.0 + 0.001 + 0.1)
    assert by_name["b"].cache_source == "T1" and by_name["b"].ttft_s == pytest.approx(0.301)
