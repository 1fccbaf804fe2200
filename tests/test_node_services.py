"""Node services the API exposes, against real llama.cpp: chat, score, providers,
models, receipts, checkpoints, reconcile after a crash."""

import os
import re
import signal
import time

import pytest

from nodeagent.config import load_config
from nodeagent.contracts.pod import PodPhase
from nodeagent.models.store import ModelStore
from nodeagent.node import Node, default_executor
from nodeagent.openai_compat import ChatCompletionFailed
from nodeagent.pods import PodInvalid

from pod_factory import make_pod
from test_execution import SYSTEM, env_for, wait_terminal

pytestmark = pytest.mark.llama


@pytest.fixture()
def node(tmp_path, tiny_model_path):
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    n = Node(load_config({**env_for(tmp_path), "AGENT_MACHINE_MODELS_DEFAULT": "tiny"}),
             executor_factory=default_executor)
    n.start()
    yield n
    n.close()


def test_chat_completion_runs_a_one_turn_pod_and_reuses_system_prompts(node):
    body = {"model": "tiny", "messages": [{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": "hi"}], "max_tokens": 5}
    first = node.chat_completion(body)
    assert first["object"] == "chat.completion" and first["choices"][0]["message"]["role"] == "assistant"
    assert first["usage"]["completion_tokens"] <= 5 and first["usage"]["prompt_tokens"] > 64
    second = node.chat_completion({**body, "messages": body["messages"][:1] + [{"role": "user", "content": "yo"}]})
    # the system prompt's blocks are served from the provider's live context
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 64
    # default model from config, content parts, unknown OpenAI parameters ignored
    third = node.chat_completion({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                                  "max_tokens": 2, "presence_penalty": 0.5})
    assert third["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("body,field", [
    ({"messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),  # one choice per request
    ({"model": "tiny", "messages": [{"role": "system", "content": "only system"}]}, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
])
def test_bad_chat_requests_name_the_field(node, body, field):
    with pytest.raises(PodInvalid, match=re.escape(field)):
        node.chat_completion(body)


def test_chat_with_unknown_model_reports_failure(node):
    with pytest.raises(ChatCompletionFailed, match="nope"):
        node.chat_completion({"model": "nope", "messages": [{"role": "user", "content": "x"}]})


def test_score_is_a_dry_run_that_explains_every_candidate(node):
    node.load_model("tiny")
    pods_before = len(node.list_pods())
    decision = node.score_pod(make_pod(system=SYSTEM))
    assert decision.dry_run and decision.chosen and decision.candidates
    assert decision.candidates[0].terms is not None and decision.reason
    assert len(node.list_pods()) == pods_before  # nothing was submitted


def test_models_providers_and_residency(node):
    assert [m.names for m in node.list_models()] == [["tiny:latest"]]
    row = node.load_model("tiny")
    assert row.state == "hot" and row.processor == "100% CPU"
    providers = node.list_providers()
    assert len(providers) == 1 and providers[0].state == "running" and providers[0].pid
    assert node.unload_model("tiny") is True
    assert node.list_residency() == []
    assert node.list_providers() == [] or all(p.state == "stopped" for p in node.list_providers())


def test_receipts_listing_and_checkpoint(node):
    pod = wait_terminal(node, node.submit_pod(make_pod(turns=["a", "b"], max_tokens=2)).id)
    receipts = node.list_receipts(since=0)
    assert len(receipts) == 2
    assert {r.statement.predicate.pod.run_id for r in receipts} == {f"{pod.id}-t0", f"{pod.id}-t1"}
    assert node.get_receipt(receipts[0].receipt_id).seq == receipts[0].seq
    assert node.list_receipts(since=receipts[-1].seq + 1) == []
    checkpoint = node.latest_checkpoint()
    assert checkpoint["size"] >= 2 and checkpoint["checkpoint"].splitlines()[1] == str(checkpoint["size"])


def test_reconcile_restarts_a_crashed_provider(node):
    node.load_model("tiny")
    managed = node.executor.pool.all()[0]
    os.kill(managed.provider.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while managed.provider.health().ok and time.monotonic() < deadline:
        time.sleep(0.05)
    report = node.reconcile_once()
    assert report["restarted"] == [managed.name]
    assert managed.provider.health().ok
    pod = wait_terminal(node, node.submit_pod(make_pod(max_tokens=2)).id)
    assert pod.status.phase is PodPhase.succeeded


def test_load_requests_recorded_without_an_agent_are_applied_at_start(tmp_path, tiny_model_path):
    from nodeagent.models.residency import record_intent
    from nodeagent.store import connect

    store = ModelStore(tmp_path / "state")
    record = store.import_model(tiny_model_path, "tiny")
    record_intent(connect(tmp_path / "state" / "state.db"), record.digest, keep_alive_s=-1, pinned=True, n_ctx=None)
    node = Node(load_config(env_for(tmp_path)), executor_factory=default_executor)
    node.start()
    try:
        deadline = time.monotonic() + 30
        while not node.list_residency() and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = node.list_residency()
        assert [r.digest for r in rows] == [record.digest]
        assert rows[0].pinned and rows[0].keep_alive_s == -1
    finally:
        node.close()


def test_a_pods_keep_alive_applies_when_its_turn_ends(node):
    node.load_model("tiny")
    pod = wait_terminal(node, node.submit_pod(make_pod(max_tokens=2, policy={"keepAlive": "-1"})).id)
    assert pod.status.phase is PodPhase.succeeded
    (row,) = node.list_residency()
    assert row.keep_alive_s == -1 and row.until is None  # loaded for good
    pod = wait_terminal(node, node.submit_pod(make_pod(name="p2", system=SYSTEM, max_tokens=2,
                                                       policy={"keepAlive": "0"})).id)
    assert pod.status.phase is PodPhase.succeeded
    assert node.list_residency() == []  # unloaded as soon as it was idle
    # its state was saved before the model went: the next pod restores it (T1)
    again = wait_terminal(node, node.submit_pod(make_pod(name="p3", system=SYSTEM, max_tokens=2)).id)
    assert again.status.turns[0].cache_tier == "T1"
