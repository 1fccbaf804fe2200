"""Eviction (hypothesis): budgets never exceeded, pinned and in-use entries never
evicted, T1 demotes to T2 before anything is dropped, hits promote."""

import itertools
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent.kvcache.blocks import Namespace
from nodeagent.kvcache.manager import CacheManager
from nodeagent.kvcache.tiers import TierStore
from nodeagent.store import connect

MODEL = "sha256:" + "d" * 64
NS = Namespace(MODEL, "tenant", "acme")
B = 4
_counter = itertools.count()


def manager(tmp_path, t1, t2):
    base = tmp_path / f"e{next(_counter)}"
    return CacheManager(connect(base / "db"), TierStore("T1", base / "t1", t1), TierStore("T2", base / "t2", t2),
                        block_tokens=B)


def put(cm, first_token, size, pinned=False):
    path = cm.staging_path()
    path.write_bytes(os.urandom(size))
    return cm.put(path, [first_token] + list(range(2 * B)), NS, state_format="f", pinned=pinned)


def check_invariants(cm, pinned_ids):
    for tier, store in cm.stores.items():
        used = cm.index.used_bytes(tier)
        assert used <= store.budget_bytes, f"{tier} holds {used} > budget {store.budget_bytes}"
        # The index and the directory agree, and no staged state is left behind.
        assert store.entry_ids_on_disk() == {e.id for e in cm.entries(tier=tier)}
        assert not list(store.directory.glob(".staging-*")), "a staged state file was left behind"
    present = {e.id for e in cm.entries()}
    assert pinned_ids <= present, "a pinned entry was evicted"


op = st.one_of(
    st.tuples(st.just("put"), st.integers(0, 30), st.integers(1, 400), st.booleans()),
    st.tuples(st.just("hit"), st.integers(0, 30), st.just(0), st.just(False)),
    st.tuples(st.just("hold"), st.integers(0, 30), st.integers(1, 400), st.just(False)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=25), t1=st.integers(200, 900), t2=st.integers(300, 1500))
def test_budgets_hold_and_pinned_or_in_use_entries_survive(tmp_path, ops, t1, t2):
    cm = manager(tmp_path, t1, t2)
    pinned: set[str] = set()
    for kind, token, size, pin in ops:
        if kind == "put":
            entry = put(cm, token, size, pinned=pin and len(pinned) < 2)
            if entry is not None and entry.pinned:
                pinned.add(entry.id)
        elif kind == "hit":
            found = cm.lookup([token] + list(range(2 * B)), NS, state_format="f").best
            if found:
                with cm.restoring(found) as restore:
                    assert restore is not None
        else:  # hold an entry in use while others are stored: it must stay
            found = cm.lookup([token] + list(range(2 * B)), NS, state_format="f").best
            if found:
                with cm.restoring(found) as restore:
                    held = restore.entry.id
                    for extra in range(3):
                        put(cm, 100 + extra + token, size)
                        assert cm.get(held) is not None, "an in-use entry was evicted"
                        check_invariants(cm, pinned)
        check_invariants(cm, pinned)


def test_t1_demotes_to_t2_before_dropping_and_gdsf_keeps_the_hot_entry(tmp_path):
    cm = manager(tmp_path, t1=250, t2=250)
    hot = put(cm, 1, 100)
    for _ in range(3):  # make it frequently used
        with cm.restoring(cm.lookup([1] + list(range(2 * B)), NS, state_format="f").best):
            pass
    cold = put(cm, 2, 100)
    third = put(cm, 3, 100)  # T1 full: the lowest priority (cold) goes to T2, not away
    assert cm.get(hot.id).tier == "T1"
    assert cm.get(cold.id).tier == "T2"
    assert cm.get(third.id).tier == "T1"
    stats = cm.stats()
    assert stats.demotions == 1 and stats.evictions == 0


def test_a_hit_in_t2_promotes_to_t1(tmp_path):
    cm = manager(tmp_path, t1=150, t2=1000)
    first = put(cm, 1, 100)
    put(cm, 2, 100)  # demotes the first
    assert cm.get(first.id).tier == "T2"
    found = cm.lookup([1] + list(range(2 * B)), NS, state_format="f").best
    assert found.tier == "T2"
    with cm.restoring(found) as restore:
        assert restore.served_from == "T2"
        assert restore.path.parent == cm.stores["T1"].directory
    assert cm.get(first.id).tier == "T1"
    stats = cm.stats()
    assert stats.promotions == 1 and stats.hits["T2"] == 1


def test_a_state_larger_than_every_budget_is_rejected_not_stored(tmp_path):
    cm = manager(tmp_path, t1=100, t2=100)
    assert put(cm, 1, 500) is None
    assert cm.stats().rejected == 1
    assert not list(cm.stores["T1"].directory.iterdir())  # the staged file was cleaned up


def test_pinned_entries_block_room_rather_than_being_evicted(tmp_path):
    cm = manager(tmp_path, t1=120, t2=120)
    pinned_t1 = put(cm, 1, 100, pinned=True)
    pinned_t2 = put(cm, 2, 100, pinned=True)  # T1 holds a pinned entry: goes to T2
    assert cm.get(pinned_t2.id).tier == "T2"
    assert put(cm, 3, 100) is None  # no room anywhere without evicting a pinned entry
    assert {e.id for e in cm.entries()} == {pinned_t1.id, pinned_t2.id}
