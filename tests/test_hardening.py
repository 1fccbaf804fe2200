"""Issue #11 regressions: no pod stops the node, dead providers leave placement,
receipts come before reports, and a tenant's provider allowlist holds for every pod.

Each test here failed on the code before the fix (noted per test).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
from pydantic import ValidationError

from nodeagent.config import load_config
from nodeagent.contracts.names import as_label
from nodeagent.contracts.pod import AgentPod, ModelRef, PodPhase, Sampling
from nodeagent.models.store import ModelStore
from nodeagent.node import Node, default_executor
from nodeagent.pods import RESTART_REASON, PodStore
from nodeagent.receipts import LogReader, receipts_dir
from nodeagent.store import connect

from pod_factory import make_pod, wait_for

POISON = "bad\u0001name"


def env_for(tmp_path, **extra):
    return {"HOME": str(tmp_path), "AGENT_MACHINE_STATE_DIR": str(tmp_path / "state"),
            "AGENT_MACHINE_CONFIG_DIR": str(tmp_path / "cfg"), "AGENT_MACHINE_CACHE_DIR": str(tmp_path / "cache"),
            "AGENT_MACHINE_RUNTIME_DIR": str(tmp_path / "run"), "AGENT_MACHINE_CACHE_RAM_DIR": str(tmp_path / "t1"),
            "AGENT_MACHINE_MODELS_THREADS": "2", **extra}


def terminal(node, pod_id, timeout=120.0):
    assert wait_for(lambda: node.get_pod(pod_id).status.phase in
                    (PodPhase.succeeded, PodPhase.failed, PodPhase.cancelled, PodPhase.refused), timeout), \
        node.get_pod(pod_id).status
    return node.get_pod(pod_id)


def receipts_of(state_dir, run_id_prefix):
    """The execution receipts whose runId starts with ``run_id_prefix``, as predicates."""
    with LogReader(receipts_dir(state_dir)) as reader:
        found = []
        for row in reader.rows(newest_first=False):
            if row.kind != "execution":
                continue
            predicate = reader.view(row)[0].statement.predicate
            if predicate.pod.run_id.startswith(run_id_prefix):
                found.append(predicate)
        return found


def poison_pod(name="poison") -> AgentPod:
    """A pod as an older agent stored it: its model name breaks today's rule."""
    pod = make_pod(name=name)
    bad_model = ModelRef.model_construct(name=POISON, digest=None, min_context=0)
    return pod.model_copy(update={"spec": pod.spec.model_copy(update={"model": bad_model})})


def store_admitted(state_dir, pod: AgentPod) -> AgentPod:
    """Leave ``pod`` in the state database as an agent that died after admitting it would."""
    conn = connect(state_dir / "state.db")
    try:
        store = PodStore(conn)
        stored = store.create(pod)
        store.transition(stored.id, PodPhase.admitted)
        return stored
    finally:
        conn.close()


# ------------------------------------------------------------------ D1: names at the boundary
@pytest.mark.parametrize("name", [POISON, "x" * 201, "tiny:" + "t" * 129, "has space", "café", "a\x7f"])
def test_a_model_name_that_no_receipt_could_carry_is_refused_at_submit_naming_the_field(name):
    # Before: accepted (201), and the pod killed the dispatcher when its receipt was refused.
    with pytest.raises(ValidationError) as err:
        make_pod(model=name)
    assert err.value.errors()[0]["loc"] == ("spec", "model", "name")


@pytest.mark.parametrize("name", ["tiny", "Tiny:Q4_K_M", "library/smollm2:135m-instruct", "sha256:0a1b2c",
                                  "0a1b2c3d", "x" * 200])
def test_model_references_the_store_resolves_are_accepted(name):
    assert make_pod(model=name).spec.model.name == name


def test_a_provider_pin_is_a_provider_name():
    with pytest.raises(ValidationError) as err:
        make_pod(provider="evil\nname")
    assert err.value.errors()[0]["loc"] == ("spec", "provider")


def test_as_label_escapes_control_characters_and_bounds_the_length():
    assert as_label(POISON) == "bad\\x01name"
    assert len(as_label("y" * 400)) == 253 and as_label("y" * 400).endswith("…")
    assert as_label("") == "unnamed"


class ExplodingReceipts:
    """An executor whose every receipt fails to build, as the poison pod's did."""

    def __init__(self, node):
        self.node = node
        self.ran = []

    def run(self, pod):
        if pod.metadata.name.startswith("boom"):
            raise RuntimeError("the run broke")
        self.node.pod_transition(pod.id, PodPhase.placed)
        self.node.pod_transition(pod.id, PodPhase.running)
        self.ran.append(pod.id)
        self.node.pod_transition(pod.id, PodPhase.succeeded)

    def before_end(self, pod, phase, reason, error_class=None):
        raise ValueError("receipt refused: 1 validation error for ReceiptInput")


def test_a_pod_whose_handling_and_receipt_both_fail_ends_failed_and_the_next_pod_runs(tmp_path):
    # Before: the receipt error escaped _finish, the only dispatcher died, /readyz went 503.
    node = Node(load_config(env_for(tmp_path)), executor_factory=ExplodingReceipts)
    node.start()
    try:
        bad = node.submit_pod(make_pod(name="boom"))
        after = terminal(node, bad.id, timeout=5)
        assert after.status.phase is PodPhase.failed
        assert any("no receipt could be written" in r for r in after.status.reasons)
        good = node.submit_pod(make_pod(name="good"))
        assert terminal(node, good.id, timeout=5).status.phase is PodPhase.succeeded
        assert node.ready()
    finally:
        node.close()


class DispatcherKiller:
    """Raises what no `except Exception` catches, so the dispatcher thread dies."""

    def __init__(self, node):
        self.node = node

    def run(self, pod):
        if pod.metadata.name == "fatal":
            self.node.pod_transition(pod.id, PodPhase.placed)
            raise SystemExit("a pod took the thread down")
        self.node.pod_transition(pod.id, PodPhase.placed)
        self.node.pod_transition(pod.id, PodPhase.running)
        self.node.pod_transition(pod.id, PodPhase.succeeded)

    def before_end(self, pod, phase, reason, error_class=None):
        self.ended = (pod.id, phase, reason, error_class)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_watchdog_restarts_a_dead_dispatcher_and_ends_its_pod_with_a_receipt(tmp_path):
    node = Node(load_config(env_for(tmp_path)), executor_factory=DispatcherKiller)
    node.start()
    try:
        fatal = node.submit_pod(make_pod(name="fatal"))
        assert wait_for(lambda: not node.ready(), 5)
        report = node.reconcile_once()
        assert report["dispatchers_restarted"] == ["pod-dispatch-0"]
        ended = node.get_pod(fatal.id)
        assert ended.status.phase is PodPhase.failed
        assert ended.status.transitions[-1].reason == "dispatcher-died"
        assert node.executor.ended == (fatal.id, PodPhase.failed, "dispatcher-died", "DispatcherDied")
        assert node.ready()
        nxt = node.submit_pod(make_pod(name="next"))
        assert terminal(node, nxt.id, timeout=5).status.phase is PodPhase.succeeded
    finally:
        node.close()


@pytest.fixture()
def tiny_state(tmp_path, tiny_model_path):
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    return tmp_path


@pytest.mark.llama
def test_a_stored_poison_pod_ends_failed_with_a_receipt_on_restart_and_the_next_pod_succeeds(tiny_state):
    # Before: crash recovery raised building the receipt, and `serve` exited 1 on every start.
    state = tiny_state / "state"
    stored = store_admitted(state, poison_pod())

    node = Node(load_config(env_for(tiny_state)), executor_factory=default_executor)
    assert node.start() == [stored.id]
    try:
        ended = node.get_pod(stored.id)
        assert ended.spec.model.name == POISON  # recorded as it was stored
        assert ended.status.phase is PodPhase.failed
        assert ended.status.transitions[-1].reason == RESTART_REASON
        [receipt] = receipts_of(state, stored.id)
        assert receipt.model.name == "bad\\x01name"
        assert receipt.outcome.error_class == "AgentRestart"
        assert ended.status.receipt_ids
        fresh = node.submit_pod(make_pod(name="fresh"))
        assert terminal(node, fresh.id).status.phase is PodPhase.succeeded
        # Cancelling the stored pod answers it unchanged (it has ended), never an error.
        assert node.cancel_pod(stored.id).status.phase is PodPhase.failed
    finally:
        node.close()


# ------------------------------------------------------------------ D2: dead providers
@pytest.mark.llama
def test_after_kill_9_of_the_worker_the_next_pods_succeed_within_3_s(tiny_state):
    # Before: placement kept choosing the dead provider; pods failed for 15-20 s.
    node = Node(load_config(env_for(tiny_state)), executor_factory=default_executor)
    node.start()
    try:
        first = node.submit_pod(make_pod(name="warm"))
        assert terminal(node, first.id).status.phase is PodPhase.succeeded
        [managed] = node.executor.pool.all()
        os.kill(managed.provider.pid, signal.SIGKILL)
        killed = time.monotonic()
        ids = [node.submit_pod(make_pod(name=f"after-{i}")).id for i in range(5)]
        first_after = terminal(node, ids[0], timeout=30)
        assert first_after.status.phase is PodPhase.succeeded, first_after.status.reasons
        assert time.monotonic() - killed < 3.0
        for pod_id in ids[1:]:
            assert terminal(node, pod_id).status.phase is PodPhase.succeeded
        assert managed.restarts == 1 and managed.provider.running
    finally:
        node.close()


@pytest.mark.llama
def test_turns_queued_behind_a_provider_that_dies_are_placed_again(tiny_state):
    """Three dispatchers share one provider: the running turn fails with a receipt,
    the turns waiting in that provider's queue run on the restarted provider."""
    node = Node(load_config(env_for(tiny_state)), executor_factory=default_executor, dispatchers=3)
    node.start()
    try:
        warm = node.submit_pod(make_pod(name="warm"))
        assert terminal(node, warm.id).status.phase is PodPhase.succeeded
        [managed] = node.executor.pool.all()
        long = node.submit_pod(make_pod(name="long", turns=["tell me a long story"], max_tokens=2000))
        assert wait_for(lambda: managed.running is not None, 10)
        queued = [node.submit_pod(make_pod(name=f"queued-{i}", agent=f"a{i}")).id for i in range(2)]
        assert wait_for(lambda: managed.queued_requests >= 3, 10), managed.queued_requests
        os.kill(managed.provider.pid, signal.SIGKILL)
        crashed = terminal(node, long.id)
        assert crashed.status.phase is PodPhase.failed
        assert "ProviderCrashed" in crashed.status.reasons[-1]
        assert receipts_of(tiny_state / "state", long.id)[-1].outcome.status == "failed"
        for pod_id in queued:
            pod = terminal(node, pod_id)
            assert pod.status.phase is PodPhase.succeeded, pod.status.reasons
    finally:
        node.close()


# ------------------------------------------------------------------ D3: receipt before report
@pytest.mark.llama
def test_a_turn_is_recorded_only_after_its_receipt_is_durable(tiny_state, monkeypatch):
    # Before: record_turn ran before the receipt was signed; a crash between left a turn with none.
    node = Node(load_config(env_for(tiny_state)), executor_factory=default_executor)
    node.start()
    seen = []
    try:
        log = node.executor.receipts
        append = log.append

        def append_and_look(data):
            pod_id = data.pod.run_id.split("-t")[0]
            seen.append(len(node.get_pod(pod_id).status.turns))  # turns visible when the receipt is written
            return append(data)

        monkeypatch.setattr(log, "append", append_and_look)
        pod = node.submit_pod(make_pod(turns=["one", "two"]))
        done = terminal(node, pod.id)
        assert done.status.phase is PodPhase.succeeded
        assert seen == [0, 1]  # each turn's receipt was appended before the turn was recorded
        assert len(done.status.receipt_ids) == 2
    finally:
        node.close()


# ------------------------------------------------------------------ D7: provider allowlist
@pytest.mark.llama
def test_a_provider_allowlist_refuses_placement_on_other_kinds_and_the_decision_is_kept(tiny_state):
    # Before: placement never passed its provider to the policy; llama-cpp-python ran anyway.
    policy = tiny_state / "policy.toml"
    policy.write_text('version = 1\ndefault = "deny"\n[tenants.acme]\nproviders = ["vllm"]\n'
                      '[tenants.open]\nproviders = ["llama_cpp_python"]\n')
    node = Node(load_config(env_for(tiny_state, AGENT_MACHINE_POLICY_PATH=str(policy))),
                executor_factory=default_executor)
    node.start()
    try:
        refused = terminal(node, node.submit_pod(make_pod(tenant="acme")).id)
        assert refused.status.phase is PodPhase.refused
        assert any("provider 'load:tiny:latest' is not allowed" in r or "is not allowed for tenant 'acme'" in r
                   for r in refused.status.reasons), refused.status.reasons
        assert not refused.status.turns
        allowed = terminal(node, node.submit_pod(make_pod(tenant="open")).id)
        assert allowed.status.phase is PodPhase.succeeded
        decision = allowed.status.policy
        assert decision is not None and decision.allowed
        assert decision.policy_source == str(policy) and decision.policy_digest.startswith("sha256:")
        [receipt] = receipts_of(tiny_state / "state", allowed.id)
        assert receipt.policy.verdict == "allowed" and receipt.policy.digest == decision.policy_digest
        [refusal] = receipts_of(tiny_state / "state", refused.id)
        assert refusal.outcome.status == "refused" and refusal.outcome.error_class == "PolicyRefused"
    finally:
        node.close()


def test_a_refused_pod_keeps_the_policy_decision_that_refused_it(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('version = 1\ndefault = "deny"\n')
    node = Node(load_config(env_for(tmp_path, AGENT_MACHINE_POLICY_PATH=str(policy))))
    node.start()
    try:
        pod = node.submit_pod(make_pod(tenant="ghost"))
        assert pod.status.phase is PodPhase.refused
        assert pod.status.policy is not None and not pod.status.policy.allowed
        assert json.dumps(pod.to_wire()["status"]["policy"]["reasons"]).count("ghost") == 1
    finally:
        node.close()


@pytest.mark.llama
@pytest.mark.slow
def test_kill_9_at_random_moments_and_around_the_receipt_leaves_no_turn_without_one(tmp_path):
    """CI's share of `python -m bench.crash_rounds --rounds 200` (bench/README.md)."""
    from bench.crash_rounds import run_rounds

    summary = run_rounds(9, seed=1, root=tmp_path)
    assert summary["by_kill_point"] == {"random": 3, "before-receipt": 3, "after-receipt": 3}
    assert summary["turns"] > 0
    assert summary["turns_without_receipt"] == []
    assert summary["terminal_pods_without_receipt"] == []
    assert summary["log_verifies"], summary["log_failures"]


# ------------------------------------------------------------------ D5: segments by digest
def test_a_segment_digest_resolves_only_for_its_own_tenant_or_when_public(tmp_path):
    # Before: any tenant could name (and so confirm and use) another tenant's private text by its digest.
    import threading

    from nodeagent.contracts.pod import ContextSegment, text_digest
    from nodeagent.pods import PodReferenceUnknown
    from nodeagent.segments import SegmentStore

    conn = connect(tmp_path / "state.db")
    store = SegmentStore(conn, threading.RLock())
    secret, shared = "tenant A's private system prompt", "a public tool catalogue"
    store.remember([ContextSegment(role="system", text=secret, scope="private"),
                    ContextSegment(role="tools", text=shared, scope="public")], "tenant-a")
    by_digest = [ContextSegment(role="system", digest=text_digest(secret))]
    assert store.texts(by_digest, "tenant-a") == [secret]
    with pytest.raises(PodReferenceUnknown, match=r"spec.context\[0\].digest"):
        store.texts(by_digest, "tenant-b")
    assert store.texts([ContextSegment(role="tools", digest=text_digest(shared))], "tenant-b") == [shared]


@pytest.mark.llama
@pytest.mark.slow
def test_serve_starts_cleanly_with_a_poison_pod_stored_and_runs_the_next_pod(tiny_state):
    """D1 as systemd sees it: the stored poison pod no longer makes `serve` exit 1 on every start."""
    from test_daemon import Serve

    state = tiny_state / "state"
    stored = store_admitted(state, poison_pod())
    server = Serve(tiny_state, watchdog_usec=None)
    try:
        server.wait_for_message("READY", timeout=60)
        with server.client(timeout=30) as client:
            ended = client.get(f"/v1/pods/{stored.id}").json()
            assert ended["status"]["phase"] == "Failed"
            assert client.delete(f"/v1/pods/{stored.id}").status_code == 200  # before: 422
            fresh = client.post("/v1/pods", json=make_pod(name="fresh").to_wire()).json()
            assert wait_for(lambda: client.get(f"/v1/pods/{fresh['id']}").json()["status"]["phase"] == "Succeeded",
                            60)
            assert client.get("/readyz").status_code == 200
    finally:
        assert server.stop() == 0, server.read_log()[-2000:]


def test_a_stored_pod_this_agent_cannot_read_does_not_stop_the_start(tmp_path):
    """A document stored under older, looser rules (memoryBytes above 2^53 was once accepted)."""
    state = tmp_path / "state"
    stored = store_admitted(state, make_pod(name="old"))
    conn = connect(state / "state.db")
    document = json.loads(conn.execute("SELECT document FROM pods WHERE id = ?", (stored.id,)).fetchone()[0])
    document["spec"]["resources"] = {"accelerator": "any", "memoryBytes": 2**60}
    conn.execute("UPDATE pods SET document = ? WHERE id = ?", (json.dumps(document), stored.id))
    conn.close()
    node = Node(load_config(env_for(tmp_path)), executor_factory=ExplodingReceipts)
    try:
        assert node.start() == [stored.id]
        nxt = node.submit_pod(make_pod(name="next"))
        assert terminal(node, nxt.id, timeout=5).status.phase is PodPhase.succeeded
        conn = connect(state / "state.db")
        assert conn.execute("SELECT phase FROM pods WHERE id = ?", (stored.id,)).fetchone()[0] == "Failed"
        conn.close()
    finally:
        node.close()


@pytest.mark.parametrize("spec_extra,where", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "maximum": 2**63 - 1}}}}}]},
     "spec.tools[0].function.parameters.properties.n.maximum"),
    ({"context": [{"role": "system", "text": "bad\ud800"}]}, "spec.context[0].text"),
])
def test_a_pod_its_receipt_could_not_carry_is_refused_at_the_boundary_naming_the_field(spec_extra, where):
    # Before: accepted, run, and then ended without a receipt (or the API answered 500).
    document = make_pod().to_wire()
    document["spec"].update(spec_extra)
    with pytest.raises(ValidationError, match=re.escape(where)):
        AgentPod.model_validate(document)


@pytest.mark.llama
def test_what_only_the_model_decides_is_refused_at_submit_not_in_the_turn(tiny_state):
    # Before: a logit bias outside the vocabulary, or messages the template refuses, failed the turn (502 on chat).
    from nodeagent.pods import PodInvalid

    node = Node(load_config(env_for(tiny_state)), executor_factory=default_executor)
    node.start()
    try:
        outside = make_pod()
        outside.spec.turns[0].sampling = Sampling(logit_bias={"99999999": 5.0})
        with pytest.raises(PodInvalid, match=r"spec.turns\[0\].sampling.logitBias: token id 99999999"):
            node.submit_pod(outside)
        store = node.executor.models
        record = store.resolve("tiny")
        store.set_template(record.digest, "{{ raise_exception('Conversation roles must alternate') }}")
        with pytest.raises(PodInvalid, match=r"spec.turns\[0\].messages: .*roles must alternate"):
            node.submit_pod(make_pod(name="refused-by-template"))
        assert node.list_pods() == []  # nothing stored for either
    finally:
        node.close()
