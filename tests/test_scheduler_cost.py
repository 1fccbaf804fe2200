"""Cost model and placement: monotone in uncached tokens and queue (hypothesis),
rates measured and refined, decisions that list every candidate and say why."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.contracts.placement import PlacementDecision
from nodeagent.providers.base import Rates
from nodeagent.scheduler.cost import CostInputs, ttft_terms
from nodeagent.scheduler.placement import (CandidateState, ContextBlocks, LoadGuard, PlacementRequest, TierMatch,
                                           common_prefix_tokens, explain, place)
from nodeagent.scheduler.rates import DECODE, LOAD, PREFILL, RateEstimate, RateRegistry, restore_quantity

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


def test_t0_helpers():
    assert common_prefix_tokens([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix_tokens(list(range(1000)), list(range(1000))) == 999  # never the whole prompt
    keys = [bytes([i]) * 32 for i in range(10)]
    assert ContextBlocks(keys[:6]).matched_blocks(keys) == 6
    assert ContextBlocks([]).matched_blocks(keys) == 0
