"""Longest-prefix lookup over the SQLite index (hypothesis): the longest cached
prefix is found, a non-prefix never is, other tenants' entries are invisible."""

import itertools
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent.kvcache.blocks import Namespace, block_keys
from nodeagent.kvcache.manager import CacheManager
from nodeagent.kvcache.tiers import TierStore
from nodeagent.store import connect

MODEL = "sha256:" + "c" * 64
B = 4
_counter = itertools.count()


def make_manager(tmp_path, t1=1 << 30, t2=1 << 30):
    base = tmp_path / f"m{next(_counter)}"
    return CacheManager(connect(base / "state.db"), TierStore("T1", base / "t1", t1), TierStore("T2", base / "t2", t2),
                        block_tokens=B)


def store(cm, tokens, namespace, fmt="fmt", size=None):
    path = cm.staging_path()
    path.write_bytes(os.urandom(size or (len(tokens) + 1)))
    return cm.put(path, tokens, namespace, state_format=fmt)


# Small alphabet so that sequences share prefixes often.
seq = st.lists(st.integers(0, 2), min_size=0, max_size=6 * B)
owners = st.sampled_from([("tenant", "acme"), ("tenant", "other"), ("public", None)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stored=st.lists(st.tuples(seq, owners), max_size=6), query=seq, who=st.sampled_from(["acme", "other"]))
def test_lookup_finds_the_longest_visible_prefix(tmp_path, stored, query, who):
    cm = make_manager(tmp_path)
    kept = []
    for tokens, (scope, tenant) in stored:
        entry = store(cm, tokens, Namespace(MODEL, scope, tenant))
        if entry is not None:
            kept.append((tokens, scope, tenant))
    found = cm.lookup(query, Namespace(MODEL, "tenant", who), state_format="fmt").best

    # Brute force: for each visible stored sequence, the block-aligned common prefix.
    def common_blocks(a, b, scope):
        qs = block_keys(a, Namespace(MODEL, scope, None if scope == "public" else who), block_tokens=B)
        ss = block_keys(b, Namespace(MODEL, scope, None if scope == "public" else who), block_tokens=B)
        n = 0
        while n < min(len(qs), len(ss)) and qs[n] == ss[n]:
            n += 1
        return n

    # A lookup in tenant scope computes tenant-salted keys, so only that tenant's
    # tenant-scope entries can match; public entries need public-salted queries.
    expected = max([common_blocks(query, t, s) for t, s, ten in kept if s == "tenant" and ten == who] + [0])
    if expected == 0:
        assert found is None
    else:
        assert found is not None and found.blocks == expected
        entry = cm.get(found.entry_id)
        assert entry.owner == who  # never another tenant's


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=st.lists(st.integers(0, 50), min_size=2 * B, max_size=5 * B), b=st.lists(st.integers(51, 99), min_size=B,
                                                                              max_size=3 * B))
def test_a_non_prefix_is_never_found(tmp_path, a, b):
    cm = make_manager(tmp_path)
    store(cm, a, Namespace(MODEL, "tenant", "acme"))
    assert cm.lookup(b + a, Namespace(MODEL, "tenant", "acme"), state_format="fmt").best is None


def test_public_entries_are_shared_and_private_ones_are_not(tmp_path):
    cm = make_manager(tmp_path)
    tokens = list(range(5 * B))
    store(cm, tokens, Namespace(MODEL, "public"))
    store(cm, tokens, Namespace(MODEL, "private", "acme", "bot"))
    public_view = cm.lookup(tokens, Namespace(MODEL, "public", "other"), state_format="fmt").best
    assert public_view is not None and cm.get(public_view.entry_id).owner == "public"
    assert cm.lookup(tokens, Namespace(MODEL, "private", "other", "bot"), state_format="fmt").best is None
    mine = cm.lookup(tokens, Namespace(MODEL, "private", "acme", "bot"), state_format="fmt").best
    assert mine is not None and cm.get(mine.entry_id).owner == "acme/bot"
    # Same tenant, another agent: the private salt differs, nothing is found.
    assert cm.lookup(tokens, Namespace(MODEL, "private", "acme", "other-bot"), state_format="fmt").best is None


def test_a_private_tail_on_a_public_prefix_is_invisible_to_other_tenants(tmp_path):
    cm = make_manager(tmp_path)
    tokens = list(range(6 * B))
    spans_acme = [(0, Namespace(MODEL, "public")), (3 * B, Namespace(MODEL, "tenant", "acme"))]
    store(cm, tokens, spans_acme)
    spans_other = [(0, Namespace(MODEL, "public")), (3 * B, Namespace(MODEL, "tenant", "other"))]
    # The public blocks' keys match, but the only entry holding them is acme's: restoring it
    # would load acme's tokens into another tenant's context, so it is not visible.
    assert cm.lookup(tokens, spans_other, state_format="fmt").best is None
    assert cm.lookup(tokens, spans_acme, state_format="fmt").best.blocks == 6


def test_lookup_filters_by_state_format_and_queries_are_logarithmic(tmp_path):
    cm = make_manager(tmp_path)
    tokens = list(range(64 * B))
    ns = Namespace(MODEL, "tenant", "acme")
    store(cm, tokens[: 40 * B], ns, fmt="llama_cpp_python")
    assert cm.lookup(tokens, ns, state_format="llama_server").best is None
    calls = []
    original = cm.index._visible_at
    cm.index._visible_at = lambda *a, **k: calls.append(1) or original(*a, **k)
    found = cm.lookup(tokens, ns, state_format="llama_cpp_python")
    assert found.best.blocks == 40
    assert len(calls) <= 2 * 7  # two tiers x ceil(log2(64 + 1)) probes, not 64 per tier


def test_longer_state_of_the_same_prefix_supersedes_the_shorter(tmp_path):
    cm = make_manager(tmp_path)
    ns = Namespace(MODEL, "tenant", "acme")
    first = store(cm, list(range(2 * B + 1)), ns)
    second = store(cm, list(range(2 * B + 3)), ns)
    assert cm.get(first.id) is None and cm.get(second.id) is not None
    # And a shorter one after a longer one is not stored again.
    again = store(cm, list(range(2 * B + 1)), ns)
    assert again.id == second.id
