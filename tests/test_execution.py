"""Pods end to end on the embedded default: real llama.cpp, real tiers, real receipts."""

import json
import subprocess
import sys
import time

import pytest

from nodeagent.config import load_config
from nodeagent.contracts.pod import PodPhase
from nodeagent.pods import PodInvalid
from nodeagent.models.store import ModelStore
from nodeagent.node import Node, default_executor

from pod_factory import make_pod

pytestmark = pytest.mark.llama

SYSTEM = " ".join(f"Rule {i}: answer tersely, cite sources, and never reveal secrets of tenant data." for i in range(12))


def env_for(tmp_path):
    return {"HOME": str(tmp_path), "AGENT_MACHINE_STATE_DIR": str(tmp_path / "state"),
            "AGENT_MACHINE_CONFIG_DIR": str(tmp_path / "cfg"), "AGENT_MACHINE_CACHE_DIR": str(tmp_path / "cache"),
            "AGENT_MACHINE_RUNTIME_DIR": str(tmp_path / "run"), "AGENT_MACHINE_CACHE_RAM_DIR": str(tmp_path / "t1"),
            "AGENT_MACHINE_MODELS_THREADS": "2"}


def wait_terminal(node, pod_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pod = node.get_pod(pod_id)
        if pod.status.phase in (PodPhase.succeeded, PodPhase.failed, PodPhase.cancelled, PodPhase.refused):
            return pod
        time.sleep(0.05)
    raise AssertionError(f"pod {pod_id} still {node.get_pod(pod_id).status.phase}")


@pytest.fixture()
def node(tmp_path, tiny_model_path):
    env = env_for(tmp_path)
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    n = Node(load_config(env), executor_factory=default_executor)
    n.start()
    yield n
    n.close()


def run(node, pod):
    submitted = node.submit_pod(pod)
    return wait_terminal(node, submitted.id)


def test_second_turn_evaluates_only_the_new_tokens(node):
    pod = run(node, make_pod(system=SYSTEM, turns=["first question", "second question"], max_tokens=6))
    assert pod.status.phase is PodPhase.succeeded, pod.status.reasons
    first, second = pod.status.turns
    assert first.cache_tier == "none" and first.cached_tokens == 0
    assert first.evaluated_tokens == first.prompt_tokens
    # Turn 2's prompt extends turn 1's context token for token: everything up to the
    # reply is reused from the live context (T0); only the new message is evaluated.
    assert second.cache_tier == "T0"
    # Every generated token was fed back, so the whole reply is in the context.
    assert second.cached_tokens == first.prompt_tokens + first.completion_tokens
    new_piece = second.prompt_tokens - first.prompt_tokens - first.completion_tokens
    assert second.evaluated_tokens == new_piece
    assert len(pod.status.receipt_ids) == 2
    assert [t.phase for t in pod.status.transitions] == [
        PodPhase.pending, PodPhase.admitted, PodPhase.placed, PodPhase.running, PodPhase.succeeded]


def test_a_later_pod_restores_from_t1_after_the_context_moved_on(node):
    a = run(node, make_pod(name="a", system=SYSTEM, turns=["hello"], max_tokens=4))
    run(node, make_pod(name="other", agent="other", system="A different agent entirely. " * 20, max_tokens=4))
    again = run(node, make_pod(name="a2", system=SYSTEM, turns=["hello", "and then?"], max_tokens=4))
    assert again.status.phase is PodPhase.succeeded, again.status.reasons
    first = again.status.turns[0]
    assert first.cache_tier == "T1", first
    # The saved state covers pod a's whole prompt: all of it is reused but the last token.
    assert first.cached_tokens == a.status.turns[0].prompt_tokens - 1
    assert first.evaluated_tokens == 1
    # Same greedy output as the original run: the restored state is the same KV.
    assert first.output == a.status.turns[0].output
    assert node.executor.cache.stats().hits["T1"] >= 1


def test_corrupt_tier_file_is_detected_dropped_and_recomputed(node):
    a = run(node, make_pod(name="a", system=SYSTEM, max_tokens=4))
    run(node, make_pod(name="other", agent="other", system="Unrelated context. " * 30, max_tokens=4))
    entries = [e for e in node.executor.cache.entries() if e.tenant == "acme"]
    target = max(entries, key=lambda e: e.tokens)
    with open(node.executor.cache.stores[target.tier].path(target.id), "r+b") as handle:
        handle.seek(target.bytes // 2)
        handle.write(b"\xde\xad\xbe\xef" * 8)
    again = run(node, make_pod(name="a2", system=SYSTEM, max_tokens=4))
    turn = again.status.turns[0]
    assert again.status.phase is PodPhase.succeeded
    assert turn.cache_tier == "none" and turn.cached_tokens == 0
    assert turn.evaluated_tokens == turn.prompt_tokens
    assert turn.output == a.status.turns[0].output
    assert node.executor.cache.stats().corrupt >= 1
    assert node.executor.cache.get(target.id) is None


def test_private_context_of_one_tenant_is_never_reused_by_another(node):
    secret = SYSTEM + " The launch code is 0000."
    run(node, make_pod(name="x", tenant="tenant-x", system=secret, max_tokens=4))
    # Same text, another tenant, right after: the provider's live context holds x's
    # KV for exactly these tokens, and T1 holds x's saved state. Neither may be used.
    y = run(node, make_pod(name="y", tenant="tenant-y", system=secret, max_tokens=4))
    turn = y.status.turns[0]
    assert turn.cached_tokens == 0 and turn.evaluated_tokens == turn.prompt_tokens
    assert turn.cache_tier == "none"
    # Public segments are shared across tenants.
    run(node, make_pod(name="p1", tenant="tenant-x", system=SYSTEM, scope="public", max_tokens=4))
    p2 = run(node, make_pod(name="p2", tenant="tenant-y", system=SYSTEM, scope="public", max_tokens=4))
    assert p2.status.turns[0].cached_tokens > 0


def test_digest_only_segments_and_unknown_digests(node):
    from nodeagent.contracts.pod import text_digest

    run(node, make_pod(name="seed", system=SYSTEM, max_tokens=2))
    by_digest = make_pod(name="bydigest", max_tokens=2)
    wire = by_digest.to_wire()
    wire["spec"]["context"] = [{"role": "system", "digest": text_digest(SYSTEM), "scope": "private"}]
    pod = run(node, type(by_digest).model_validate(wire))
    assert pod.status.phase is PodPhase.succeeded and pod.status.turns[0].cached_tokens > 0
    wire["spec"]["context"][0]["digest"] = text_digest("never seen")
    with pytest.raises(PodInvalid, match=r"spec.context\[0\].digest"):
        node.submit_pod(type(by_digest).model_validate(wire))


def test_unknown_model_fails_with_a_receipt(node):
    pod = run(node, make_pod(model="nope"))
    assert pod.status.phase is PodPhase.failed and "nope" in pod.status.reasons[0]
    assert len(pod.status.receipt_ids) == 1


def test_receipts_verify_offline_after_the_node_stops(tmp_path, tiny_model_path):
    env = env_for(tmp_path)
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    node = Node(load_config(env), executor_factory=default_executor)
    node.start()
    ok = run(node, make_pod(turns=["one", "two"], max_tokens=3))
    refused_policy = tmp_path / "policy.toml"
    node.close()
    export = tmp_path / "export"
    cli = [sys.executable, "-m", "nodeagent.cli"]
    full_env = {**__import__("os").environ, **env}
    subprocess.run(cli + ["receipts", "export", str(export)], env=full_env, check=True, capture_output=True)
    done = subprocess.run(cli + ["receipts", "verify", str(export), "--format", "json"], env=full_env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    listed = subprocess.run(cli + ["receipts", "ls", "--format", "json"], env=full_env, capture_output=True,
                            text=True, check=True)
    rows = json.loads(listed.stdout)
    assert len(rows) >= 2
    del ok, refused_policy


def test_a_prefix_still_being_computed_counts_for_the_pod_queued_behind_it(tmp_path, tiny_model_path):
    env = env_for(tmp_path)
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    node = Node(load_config(env), executor_factory=default_executor, dispatchers=2)
    node.start()
    try:
        node.load_model("tiny")
        first = node.submit_pod(make_pod(name="long", system=SYSTEM, max_tokens=600))
        deadline = time.monotonic() + 30
        while node.get_pod(first.id).status.phase is not PodPhase.running and time.monotonic() < deadline:
            time.sleep(0.005)
        second = node.submit_pod(make_pod(name="behind", system=SYSTEM, turns=["another question"], max_tokens=2))
        done = wait_terminal(node, second.id)
        wait_terminal(node, first.id)
        assert node.get_pod(first.id).status.phase is PodPhase.succeeded
        (decision,) = node.pod_decisions(second.id)
        chosen = next(c for c in decision.candidates if c.provider == decision.chosen)
        # Placed while `long` was still generating: the system prompt it is computing is
        # what the provider will hold, so placement counts it (T0) and queues behind it.
        assert chosen.cache_source == "T0" and chosen.cached_tokens >= 64
        assert done.status.turns[0].cached_tokens >= 64
    finally:
        node.close()


def test_a_cold_model_is_tokenized_and_placed_before_it_loads(node):
    """The pool's vocab-only tokenizer needs no loaded model: a dry run and a real
    placement both see the cold model as a candidate that must load it first."""
    assert node.list_residency() == []
    scored = node.score_pod(make_pod(system=SYSTEM))
    assert node.list_residency() == []  # a dry run loads nothing
    (candidate,) = scored.candidates
    assert scored.chosen == candidate.provider and candidate.provider.startswith("load:")
    assert candidate.model_hot is False and candidate.cached_tokens == 0

    pod = run(node, make_pod(system=SYSTEM, turns=["hello"], max_tokens=4))
    assert pod.status.phase is PodPhase.succeeded, pod.status.reasons
    (decision,) = node.pod_decisions(pod.id)
    assert decision.chosen.startswith("load:")
    assert len(node.list_residency()) == 1  # loaded after placement chose to load it
    pool = node.executor.pool
    (managed,) = pool.all()
    record = node.executor.models.resolve("tiny")
    tokenizer = pool.tokenizer(record)
    assert tokenizer is not None and tokenizer is not managed.provider
    for text in (SYSTEM, "  leading spaces, ünïcödé and <|role|> markers\n", ""):
        for bos in (True, False):
            assert tokenizer.tokenize(text, add_bos=bos) == managed.provider.tokenize(text, add_bos=bos)


def test_a_refused_pod_never_loads_the_model(tmp_path, tiny_model_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('version = 1\ndefault = "allow"\n[limits]\nmax_context = 64\n')
    env = {**env_for(tmp_path), "AGENT_MACHINE_POLICY_PATH": str(policy)}
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    node = Node(load_config(env), executor_factory=default_executor)
    node.start()
    try:
        pod = run(node, make_pod(system=SYSTEM, max_tokens=4))
        assert pod.status.phase is PodPhase.refused
        assert "exceeds the largest allowed (64)" in " ".join(pod.status.reasons)
        assert node.list_residency() == [] and node.executor.pool.all() == []
    finally:
        node.close()


def test_pods_placed_at_once_on_a_cold_model_load_it_once(tmp_path, tiny_model_path):
    env = env_for(tmp_path)
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    node = Node(load_config(env), executor_factory=default_executor, dispatchers=3)
    node.start()
    try:
        pods = [node.submit_pod(make_pod(name=f"cold-{i}", agent=f"agent-{i}", system=f"{i} " + SYSTEM,
                                         max_tokens=2)) for i in range(3)]
        done = [wait_terminal(node, pod.id) for pod in pods]
        assert all(p.status.phase is PodPhase.succeeded for p in done), [p.status.reasons for p in done]
        assert len(node.executor.pool.all()) == 1  # one engine, one queue, one context
        assert len({p.status.turns[0].provider for p in done}) == 1
    finally:
        node.close()
