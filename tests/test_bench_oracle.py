"""Traces and hit-rate bounds: GSP reproduces O1 = 15/16 x 2048/2176, O2 <= O1, and
O2 is a real capacity bound (never below an LRU of the same pooled size)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from bench.oracle import capped_hit, keys_of, o1, o2
from bench.simworker import BlockLRU
from bench.traces import Trace, agent_trace, decode, encode, generated_shared_prefix


def test_gsp_defaults_and_o1_bound():
    trace = generated_shared_prefix(seed=3)
    assert len(trace.requests) == 64 * 16
    assert {len(r.tokens) for r in trace.requests} == {2176}
    assert {r.output_tokens for r in trace.requests} == {256}
    bound = o1([r.tokens for r in trace.requests])
    assert bound.hit_tokens == 64 * 15 * 2048
    assert abs(bound.rate - 15 / 16 * 2048 / 2176) < 1e-12  # 0.882...


def test_traces_are_seedable_and_round_trip(tmp_path):
    a, b = agent_trace(seed=5, pods=10), agent_trace(seed=5, pods=10)
    assert a.requests == b.requests
    assert agent_trace(seed=6, pods=10).requests != a.requests
    path = tmp_path / "t.json"
    a.save(path)
    assert Trace.load(path).requests == a.requests
    assert decode(encode([0, 7, 2**20 - 1])) == [0, 7, 2**20 - 1]


def test_agent_trace_turns_extend_the_previous_prompt():
    trace = agent_trace(seed=1, pods=12)
    by_id = trace.by_id()
    for r in trace.requests:
        if r.after:
            prev = by_id[r.after]
            assert r.session == prev.session and r.tokens[: len(prev.tokens)] == prev.tokens
            grown = len(r.tokens) - len(prev.tokens)
            assert 100 + 200 <= grown <= 500 + 2000  # a reply and a tool result
        else:
            assert 2048 + 50 <= len(r.tokens) <= 8192 + 200
    ordered = trace.nominal_order()
    position = {r.rid: i for i, r in enumerate(ordered)}
    assert all(position[r.after] < position[r.rid] for r in trace.requests if r.after)


seqs = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=64 * 4).map(
    lambda xs: [x for x in xs for _ in range(16)]), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(sequences=seqs, capacity=st.integers(0, 12))
def test_o2_is_between_lru_and_o1(sequences, capacity):
    bound1, bound2 = o1(sequences), o2(sequences, capacity)
    assert bound2.hit_tokens <= bound1.hit_tokens
    lru, hits = BlockLRU(capacity), 0
    for tokens in sequences:
        ks = keys_of(tokens)
        hits += capped_hit(lru.matched_blocks(ks), len(tokens))
        lru.touch(ks)
    assert hits <= bound2.hit_tokens


def test_o2_with_room_for_everything_equals_o1():
    trace = generated_shared_prefix(groups=4, prompts_per_group=4)
    sequences = [r.tokens for r in trace.requests]
    assert o2(sequences, 10_000).hit_tokens == o1(sequences).hit_tokens
    assert o2(sequences, 0).hit_tokens == 0
