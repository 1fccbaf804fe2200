"""`wipe --tenant`: after it no file of T1, T2 or the state database holds the tenant's private text
(scanned for planted strings), other tenants' states still restore, and the wipe receipt verifies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodeagent.config import load_config
from nodeagent.contracts.pod import PodPhase
from nodeagent.models.store import ModelStore
from nodeagent.node import Node, default_executor
from nodeagent.receipts import verify_bundle
from nodeagent.receipts.dsse import parse_envelope

from pod_factory import make_pod
from test_execution import env_for, wait_terminal

pytestmark = pytest.mark.llama

ACME_SYSTEM = "PLANTED-ACME-SYSTEM-6b1f0e You are acme's coder. " + "Acme keeps its build notes private. " * 12
ACME_USER = "PLANTED-ACME-USER-93ad21 what is in the vault?"
GLOBEX_SYSTEM = "Globex assistant. " + "Globex answers about widgets and gears. " * 12
PLANTED = (b"PLANTED-ACME-SYSTEM-6b1f0e", b"PLANTED-ACME-USER-93ad21")


@pytest.fixture()
def node(tmp_path, tiny_model_path):
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    n = Node(load_config(env_for(tmp_path)), executor_factory=default_executor)
    n.start()
    yield n
    n.close()


def _scan(paths: list[Path]) -> dict[str, list[bytes]]:
    found: dict[str, list[bytes]] = {}
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for file in files:
            data = file.read_bytes()
            hits = [s for s in PLANTED if s in data]
            if hits:
                found[str(file)] = hits
    return found


def test_wipe_removes_a_tenants_states_and_texts_and_keeps_other_tenants(node, tmp_path):
    state = tmp_path / "state"
    globex = wait_terminal(node, node.submit_pod(make_pod(name="g1", tenant="globex", system=GLOBEX_SYSTEM,
                                                          turns=["hello"], max_tokens=2)).id)
    acme = wait_terminal(node, node.submit_pod(make_pod(name="a1", tenant="acme", system=ACME_SYSTEM,
                                                        scope="private", turns=[ACME_USER], max_tokens=2)).id)
    acme_tenant = wait_terminal(node, node.submit_pod(make_pod(name="a2", tenant="acme", agent="reviewer",
                                                               system=ACME_SYSTEM, scope="tenant",
                                                               turns=["PLANTED-ACME-USER-93ad21 again"],
                                                               max_tokens=2)).id)
    assert globex.status.phase == acme.status.phase == acme_tenant.status.phase == PodPhase.succeeded
    cache = node.executor.cache
    before = cache.entries(tenant="acme")
    assert before and {e.owner for e in before} >= {"acme/coder"}
    db_files = [state / "state.db", state / "state.db-wal", state / "state.db-shm"]
    assert _scan([f for f in db_files if f.exists()]), "the planted text should be in the database before the wipe"

    report = node.wipe_tenant("acme")

    assert cache.entries(tenant="acme") == []
    assert {e["id"] for e in report.kv_entries} == {e.id for e in before}
    assert any(t["action"] in ("restarted", "slot-erased") for t in report.t0)
    tiers = [Path(s.directory) for s in cache.stores.values()]
    leftovers = _scan(tiers + [f for f in db_files if f.exists()])
    assert leftovers == {}, leftovers
    assert report.scrub["walTruncated"]
    # the pods are still there, by digest, with their receipts
    wiped = node.get_pod(acme.id)
    assert wiped.spec.context[0].text is None and wiped.spec.context[0].digest
    assert wiped.spec.turns[0].messages[0].content.startswith("wiped:sha256:")
    assert wiped.status.receipt_ids == acme.status.receipt_ids
    assert {p["id"] for p in report.pods} == {acme.id, acme_tenant.id}

    # globex's state still restores (T0 was emptied by the wipe, so it comes from a tier)
    again = wait_terminal(node, node.submit_pod(make_pod(name="g2", tenant="globex", system=GLOBEX_SYSTEM,
                                                         turns=["hello"], max_tokens=2)).id)
    assert again.status.phase == PodPhase.succeeded
    assert again.status.turns[0].cache_tier in ("T1", "T2") and again.status.turns[0].cached_tokens >= 64

    # the wipe receipt verifies with the machine key alone and lists what went, by digest
    receipts = node.executor.receipts
    receipts.checkpoint()
    assert verify_bundle(receipts.directory, {receipts.key_id: receipts.signer.public}).ok
    line = receipts.read_line(int(next(r for r in _rows(receipts) if r[1] == "wipe")[0]))
    predicate = json.loads(parse_envelope(line).payload)["predicate"]
    assert predicate["tenant"] == "acme" and predicate["body"]["kvEntries"]
    assert all(d.startswith("sha256:") for d in predicate["body"]["segments"])
    assert not any(s.decode() in line.decode() for s in PLANTED)


def _rows(receipts):
    out = []
    for seq in range(receipts.size):
        statement = json.loads(parse_envelope(receipts.read_line(seq)).payload)
        out.append((seq, statement["predicate"].get("event")))
    return out


def test_wipe_of_one_agent_keeps_the_tenants_other_agents_and_its_tenant_scoped_states(node):
    for name, agent, scope in (("c1", "coder", "private"), ("r1", "reviewer", "private"), ("t1", "coder", "tenant")):
        pod = wait_terminal(node, node.submit_pod(make_pod(name=name, agent=agent, scope=scope,
                                                           system=f"{agent} {scope} " + ACME_SYSTEM,
                                                           turns=["hi"], max_tokens=2)).id)
        assert pod.status.phase == PodPhase.succeeded
    owners = {e.owner for e in node.executor.cache.entries(tenant="acme")}
    assert {"acme/coder", "acme/reviewer"} <= owners
    report = node.wipe_tenant("acme", agent="coder")
    left = {e.owner for e in node.executor.cache.entries(tenant="acme")}
    assert "acme/coder" not in left and "acme/reviewer" in left
    assert {e["owner"] for e in report.kv_entries} == {"acme/coder"}
    reviewer = [p for p in node.list_pods(tenant="acme") if p.metadata.agent == "reviewer"][0]
    assert reviewer.spec.context[0].text is not None  # the other agent's pod keeps its text
    assert {p["name"] for p in report.pods} == {"c1", "t1"}


def test_wipe_erases_the_llama_server_slot_holding_the_tenant_and_leaves_other_slots(tmp_path, tiny_model_path):
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    config = tmp_path / "config.toml"
    config.write_text('[[providers]]\nmodel = "tiny"\nkind = "llama_server"\nmode = "subprocess"\nslots = 2\n'
                      'ctx_per_slot = 1024\n')
    node = Node(load_config({**env_for(tmp_path), "AGENT_MACHINE_CONFIG": str(config)}),
                executor_factory=default_executor)
    node.start()
    try:
        for name, tenant, system in (("g1", "globex", GLOBEX_SYSTEM), ("a1", "acme", ACME_SYSTEM)):
            pod = wait_terminal(node, node.submit_pod(make_pod(name=name, tenant=tenant, system=system,
                                                               turns=["hi"], max_tokens=2)).id)
            assert pod.status.phase == PodPhase.succeeded, pod.status.reasons
        held = {m.name: {ns.owner for _, ns in m.held.spans} for m in node.executor.pool.all()}
        acme_slots = {name for name, owners in held.items() if "acme/coder" in owners}
        assert acme_slots
        report = node.wipe_tenant("acme")
        assert {t["provider"] for t in report.t0} == acme_slots
        assert all(t["action"] == "slot-erased" for t in report.t0)
        after = {m.name: {ns.owner for _, ns in m.held.spans} for m in node.executor.pool.all()}
        assert not any("acme/coder" in owners for owners in after.values())
        for name in set(held) - acme_slots:  # slots that held no acme span are untouched
            assert after[name] == held[name]
    finally:
        node.close()
