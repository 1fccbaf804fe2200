"""Longest-prefix lookup over the SQLite index (hypothesis): the longest cached
prefix is found, a non-prefix never is, other tenants' entries are invisible."""

import itertools
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent.kvcache.blocks import Namespace, block_keys
from nodeagent.kvcache.index import MIGRATIONS, CacheIndex, ProbeMap
from nodeagent.kvcache.manager import TIERS, CacheManager, visible_owners
from nodeagent.kvcache.tiers import TierStore
from nodeagent.store import connect, migrate

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


def test_lookup_filters_by_state_format_and_queries_are_logarithmic(tmp_path, monkeypatch):
    cm = make_manager(tmp_path)
    tokens = list(range(64 * B))
    ns = Namespace(MODEL, "tenant", "acme")
    store(cm, tokens[: 40 * B], ns, fmt="llama_cpp_python")
    assert cm.lookup(tokens, ns, state_format="llama_server").best is None
    calls = []
    original = ProbeMap.probe
    monkeypatch.setattr(ProbeMap, "probe", lambda *a, **k: calls.append(1) or original(*a, **k))
    found = cm.lookup(tokens, ns, state_format="llama_cpp_python")
    assert found.best.blocks == 40
    assert 0 < len(calls) <= 2 * 7  # two tiers x ceil(log2(64 + 1)) probes, not 64 per tier


def test_longer_state_of_the_same_prefix_supersedes_the_shorter(tmp_path):
    cm = make_manager(tmp_path)
    ns = Namespace(MODEL, "tenant", "acme")
    first = store(cm, list(range(2 * B + 1)), ns)
    second = store(cm, list(range(2 * B + 3)), ns)
    assert cm.get(first.id) is None and cm.get(second.id) is not None
    # And a shorter one after a longer one is not stored again.
    again = store(cm, list(range(2 * B + 1)), ns)
    assert again.id == second.id


# ---------------------------------------------------------------- the in-memory probe map vs the tables
def both_sources_agree(cm, tokens, namespace, fmt="fmt"):
    """The decision path (probe map) answers, per tier, exactly what a brute-force
    scan of the entries' stored block keys answers."""
    keys = cm.keys(tokens, namespace)
    owners = visible_owners(namespace)
    fast = cm.index.deepest_per_tier(keys, owners, fmt)
    for tier in TIERS:
        expected, covering = 0, []
        for entry in cm.entries(tier=tier):
            if entry.state_format != fmt or entry.owner not in owners:
                continue
            held = cm.index.entry_keys(entry.id)
            n = 0
            while n < min(len(held), len(keys)) and held[n] == keys[n]:
                n += 1
            if n > expected:
                expected, covering = n, [entry]
            elif n == expected and n:
                covering.append(entry)
        assert (fast[tier][0] if tier in fast else 0) == expected
        from_rows = cm.index.deepest(keys, owners, fmt, tier)
        assert (from_rows[0] if from_rows else 0) == expected
        if tier in fast:  # the entry named really covers that prefix, in that tier
            entry = cm.get(fast[tier][1].id)
            assert entry is not None and entry.tier == tier
            assert cm.index.entry_keys(entry.id)[:expected] == keys[:expected]
            assert fast[tier][1].n_tokens == entry.tokens and fast[tier][1].bytes == entry.bytes
            assert entry.bytes == min(e.bytes for e in covering)  # the cheapest state to restore


map_op = st.one_of(
    st.tuples(st.just("put"), st.integers(0, 5), st.integers(1, 6), st.integers(1, 300)),
    st.tuples(st.just("hit"), st.integers(0, 5), st.integers(1, 6), st.just(0)),
    st.tuples(st.just("evict_elsewhere"), st.integers(0, 5), st.integers(1, 6), st.just(0)),
    st.tuples(st.just("put_elsewhere"), st.integers(0, 5), st.integers(1, 6), st.integers(1, 300)),
    st.tuples(st.just("shrink"), st.sampled_from(TIERS), st.just(0), st.integers(0, 400)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(map_op, max_size=20), t1=st.integers(150, 600), t2=st.integers(200, 900))
def test_the_probe_map_stays_exactly_the_tables_through_writes_moves_and_other_connections(tmp_path, ops, t1, t2):
    """Puts, hits (promotions), demotions, shrinks, and changes committed by a second
    CacheManager on the same database (as `agent-machine cache evict` is to the daemon):
    after each, both probe paths agree and the tables satisfy the index invariants."""
    base = tmp_path / f"p{next(_counter)}"
    mine = CacheManager(connect(base / "state.db"), TierStore("T1", base / "t1", t1), TierStore("T2", base / "t2", t2),
                        block_tokens=B)
    other = CacheManager(connect(base / "state.db"), TierStore("T1", base / "t1", t1),
                         TierStore("T2", base / "t2", t2), block_tokens=B)
    ns = Namespace(MODEL, "tenant", "acme")

    def seq(prefix, blocks):  # sequences that share leading blocks when their prefixes match
        return [prefix] * B + list(range(blocks * B))

    for kind, a, blocks, size in ops:
        if kind == "put":
            store(mine, seq(a, blocks), ns, size=size)
        elif kind == "put_elsewhere":
            store(other, seq(a, blocks), ns, size=size)
        elif kind == "hit":
            found = mine.lookup(seq(a, blocks), ns, state_format="fmt").best
            if found is not None:
                with mine.restoring(found):
                    pass
        elif kind == "evict_elsewhere":
            victims = other.entries()
            if victims:
                other.evict(victims[a % len(victims)].id)
        else:
            mine.shrink(a, size)
        assert mine.index.check_consistency() == []
        for prefix in range(6):
            both_sources_agree(mine, seq(prefix, 6), ns)
    both_sources_agree(mine, seq(0, 6), ns)
    assert mine.index.map_builds >= 1


def test_a_rolled_back_write_never_reaches_the_probe_map(tmp_path):
    cm = make_manager(tmp_path)
    ns = Namespace(MODEL, "tenant", "acme")
    tokens = list(range(4 * B))
    kept = store(cm, tokens[: 2 * B], ns)
    assert cm.lookup(tokens, ns, state_format="fmt").best.blocks == 2  # the map is built now
    with pytest.raises(RuntimeError, match="boom"):
        with cm.index.transaction():
            row = cm.index.get(kept.id)
            row.id, row.n_blocks, row.n_tokens = "ghost", 4, 4 * B
            row.deepest_key = cm.keys(tokens, ns)[-1]
            cm.index.insert(row, cm.keys(tokens, ns))
            raise RuntimeError("boom")
    assert cm.lookup(tokens, ns, state_format="fmt").best.blocks == 2
    assert cm.index.get("ghost") is None and cm.index.check_consistency() == []
    with pytest.raises(RuntimeError, match="inside CacheIndex.transaction"):
        cm.index.delete(kept.id)


def test_an_eviction_by_another_connection_is_seen_by_the_next_lookup(tmp_path):
    base = tmp_path / "shared"
    daemon = CacheManager.open(base / "state.db", t1_dir=base / "t1", t2_dir=base / "t2", block_tokens=B)
    cli = CacheManager.open(base / "state.db", t1_dir=base / "t1", t2_dir=base / "t2", block_tokens=B)
    ns = Namespace(MODEL, "tenant", "acme")
    tokens = list(range(5 * B))
    entry = store(daemon, tokens, ns)
    assert daemon.lookup(tokens, ns, state_format="fmt").best.entry_id == entry.id
    builds = daemon.index.map_builds
    cli.evict(entry.id)
    assert daemon.lookup(tokens, ns, state_format="fmt").best is None
    assert daemon.index.map_builds == builds + 1
    # A commit elsewhere that does not touch the cache's blocks keeps the map.
    cli.record_lookup(10)
    again = store(daemon, tokens, ns)
    assert daemon.lookup(tokens, ns, state_format="fmt").best.entry_id == again.id
    assert daemon.index.map_builds == builds + 1


def test_an_index_of_the_first_schema_is_migrated_in_place(tmp_path):
    """Step 0 kept one row per block; steps 1-2 fold them into their entry's row, in
    depth order, and drop an entry whose rows were incomplete."""
    conn = connect(tmp_path / "state.db")
    migrate(conn, "kvcache", MIGRATIONS[:1])
    ns = Namespace(MODEL, "tenant", "acme")
    tokens = list(range(3 * B))
    keys = block_keys(tokens, ns, block_tokens=B)
    conn.execute("BEGIN")
    conn.execute(
        "INSERT INTO kv_entries (id, deepest_key, model_digest, scope, owner, tenant, state_format, n_tokens,"
        " n_blocks, block_tokens, tier, file, bytes, content_digest, hits, created_at, last_used_at, pinned,"
        " priority) VALUES ('old', ?, ?, 'tenant', 'acme', 'acme', 'fmt', ?, 3, ?, 'T2', 'f', 10, 'sha256:x', 0,"
        " 0, 0, 0, 0)", (keys[-1], MODEL, len(tokens), B))
    conn.executemany("INSERT INTO kv_blocks (block_key, depth, entry_id) VALUES (?, ?, 'old')",
                     [(k, d) for d, k in reversed(list(enumerate(keys)))])  # any insertion order
    conn.execute(
        "INSERT INTO kv_entries (id, deepest_key, model_digest, scope, owner, tenant, state_format, n_tokens,"
        " n_blocks, block_tokens, tier, file, bytes, content_digest, hits, created_at, last_used_at, pinned,"
        " priority) SELECT 'torn', deepest_key, model_digest, scope, owner, tenant, state_format, n_tokens,"
        " n_blocks, block_tokens, tier, file, bytes, content_digest, hits, created_at, last_used_at, pinned,"
        " priority FROM kv_entries WHERE id = 'old'")
    conn.execute("INSERT INTO kv_blocks (block_key, depth, entry_id) VALUES (?, 0, 'torn')", (keys[0],))
    conn.execute("COMMIT")
    index = CacheIndex(conn)
    assert index.check_consistency() == []
    assert index.entry_keys("old") == keys
    assert index.get("torn") is None  # 1 of its 3 block rows: not servable, dropped
    found = index.deepest_per_tier(keys, ["acme", "public"], "fmt")
    assert set(found) == {"T2"} and found["T2"][0] == 3 and found["T2"][1].id == "old"
    assert index.deepest(keys[:2], ["acme"], "fmt", "T2")[0] == 2
