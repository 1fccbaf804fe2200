"""Block hashing: full blocks only, chained, salted by model and scope (hypothesis)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.kvcache.blocks import BLOCK_TOKENS, Namespace, block_keys

MODEL = "sha256:" + "a" * 64
tokens_st = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=40)
B = 4  # small blocks keep the examples small; the code path is the same


def ns(scope="tenant", tenant="acme", agent=None, model=MODEL):
    return Namespace(model, scope, None if scope == "public" else tenant, agent)


@given(tokens_st)
def test_only_full_blocks_are_keyed(tokens):
    assert len(block_keys(tokens, ns(), block_tokens=B)) == len(tokens) // B


@given(tokens_st, tokens_st)
def test_keys_of_a_prefix_are_a_prefix_of_the_keys(a, b):
    a = a[: len(a) // B * B]
    assert block_keys(a + b, ns(), block_tokens=B)[: len(a) // B] == block_keys(a, ns(), block_tokens=B)


@given(st.lists(st.integers(0, 1000), min_size=B, max_size=40), st.data())
def test_changing_a_token_changes_its_block_and_every_later_key_only(tokens, data):
    i = data.draw(st.integers(0, len(tokens) - 1))
    changed = list(tokens)
    changed[i] += 1
    before, after = block_keys(tokens, ns(), block_tokens=B), block_keys(changed, ns(), block_tokens=B)
    block = i // B
    assert before[:block] == after[:block]
    assert all(x != y for x, y in zip(before[block:], after[block:]))


@given(st.lists(st.integers(0, 1000), min_size=B, max_size=24))
def test_salts_isolate_tenants_models_and_scopes(tokens):
    variants = [ns(), ns(tenant="other"), ns(model="sha256:" + "b" * 64), ns(scope="private"),
                ns(scope="private", agent="bot"), ns(scope="public")]
    key_sets = [set(block_keys(tokens, v, block_tokens=B)) for v in variants]
    for i in range(len(key_sets)):
        for j in range(i + 1, len(key_sets)):
            assert not key_sets[i] & key_sets[j]


@settings(max_examples=30)
@given(st.lists(st.integers(0, 1000), min_size=3 * B, max_size=24))
def test_public_prefix_is_shared_across_tenants_and_private_tail_is_not(tokens):
    a = [(0, ns(scope="public")), (2 * B, ns(tenant="acme"))]
    b = [(0, ns(scope="public")), (2 * B, ns(tenant="other"))]
    ka, kb = block_keys(tokens, a, block_tokens=B), block_keys(tokens, b, block_tokens=B)
    assert ka[:2] == kb[:2]
    assert all(x != y for x, y in zip(ka[2:], kb[2:]))


def test_scope_may_not_become_less_private_along_a_prefix():
    with pytest.raises(ValueError, match="more private"):
        block_keys(list(range(128)), [(0, ns(scope="tenant")), (64, ns(scope="public"))])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="tenant"):
        Namespace(MODEL, "private", None)
    with pytest.raises(ValueError, match="model digest"):
        Namespace("", "public")
    with pytest.raises(ValueError, match="token ids"):
        block_keys([-1] * BLOCK_TOKENS, ns())
    with pytest.raises(ValueError, match="start at token 0"):
        block_keys([1] * 128, [(64, ns())])
