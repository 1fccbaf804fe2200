"""The gates at the real seams: a declared provider whose activation is denied is never started (the
fleet's start asks `pool.check_start`), and the decision in the log says why; teardown stops what the
node started, with a receipt."""

from __future__ import annotations

import json

import pytest

from nodeagent.config import load_config
from nodeagent.contracts.pod import PodPhase
from nodeagent.models.store import ModelStore
from nodeagent.node import Node, default_executor
from nodeagent.receipts import verify_bundle
from nodeagent.receipts.dsse import parse_envelope

from pod_factory import make_pod, wait_for
from test_execution import env_for, wait_terminal

pytestmark = pytest.mark.llama


def _events(node, event):
    receipts = node.executor.receipts
    out = []
    for seq in range(receipts.size):
        statement = json.loads(parse_envelope(receipts.read_line(seq)).payload)
        if statement["predicate"].get("event") == event:
            out.append(statement["predicate"])
    return out


def test_a_declared_provider_denied_activation_never_starts_and_the_decision_says_why(tmp_path, tiny_model_path):
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    config = tmp_path / "config.toml"
    config.write_text('[[providers]]\nmodel = "tiny"\nkind = "llama_server"\nmode = "podman"\n'
                      'name = "tiny-pod"\nimage = "ghcr.io/ggml-org/llama.cpp:server"\nload = "eager"\n')
    node = Node(load_config({**env_for(tmp_path), "AGENT_MACHINE_CONFIG": str(config)}),
                executor_factory=default_executor)
    node.start()
    try:
        def provider_decisions():
            return [e for e in _events(node, "activation") if e["body"]["subject"]["kind"] == "provider"]
        assert wait_for(provider_decisions, timeout=30)  # the eager start runs in a thread of its own
        assert node.executor.pool.all() == []  # nothing started
        denied = provider_decisions()
        assert denied and denied[0]["body"]["verdict"] == "denied"
        assert denied[0]["body"]["lacking"] == ["image-pinned"]
        assert "ghcr.io/ggml-org/llama.cpp:server" in denied[0]["body"]["reasons"][0]
        assert not _events(node, "provider-start")
        # a pod for the model cannot run either: its plan says it lacks the pinned image
        pod = wait_terminal(node, node.submit_pod(make_pod(turns=["hi"], max_tokens=2)).id)
        assert pod.status.phase in (PodPhase.refused, PodPhase.failed)
        assert any("image-pinned" in r or "not pinned" in r for r in pod.status.reasons), pod.status.reasons
        plan = node.plan(make_pod(turns=["hi"]))
        assert not plan["wouldRun"] and "image-pinned" in plan["activation"]["lacking"]
        assert plan["providers"][0]["activation"]["verdict"] == "denied"
    finally:
        node.close()


def test_teardown_stops_every_provider_the_node_started_with_a_receipt(tmp_path, tiny_model_path):
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    node = Node(load_config(env_for(tmp_path)), executor_factory=default_executor)
    node.start()
    try:
        pod = wait_terminal(node, node.submit_pod(make_pod(turns=["hi"], max_tokens=2)).id)
        assert pod.status.phase == PodPhase.succeeded
        assert _events(node, "provider-start")  # the embedded worker started after an allowed decision
        plan = node.plan(make_pod(name="p9", turns=["hi"]))
        assert plan["wouldRun"] and plan["placement"]["chosen"] and plan["restore"]["tier"] in ("T0", "T1", "T2")
        providers = node.executor.pool.all()
        assert providers
        report = node.teardown()
        assert {s["provider"] for s in report.stopped} == {m.name for m in providers}
        assert all(not m.provider.health().ok for m in providers)
        receipts = node.executor.receipts
        receipts.checkpoint()
        assert verify_bundle(receipts.directory, {receipts.key_id: receipts.signer.public}).ok
        assert _events(node, "teardown")[-1]["body"]["stopped"]
    finally:
        node.close()
