"""Evidence bundles and the governance CLI, end to end: a node runs pods (activation decisions and
storage receipts land in its log), `evidence bundle` exports, `evidence verify --key` passes with the
machine key alone and fails after any byte of any file changes; `grants`, `activate evaluate`,
`render plan` and `wipe` refuse as well as allow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent.config import load_config
from nodeagent.contracts.pod import PodPhase
from nodeagent.models.store import ModelStore
from nodeagent.node import Node, default_executor

from pod_factory import make_pod
from test_execution import env_for, wait_terminal

pytestmark = pytest.mark.llama
CLI = [sys.executable, "-m", "nodeagent.cli"]


@pytest.fixture()
def ran(tmp_path, tiny_model_path):
    """A node that ran two pods and was shut down; its environment for the CLI."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AGENT_MACHINE_")}, **env_for(tmp_path)}
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    node = Node(load_config(env_for(tmp_path)), executor_factory=default_executor)
    node.start()
    try:
        for name in ("p1", "p2"):
            pod = wait_terminal(node, node.submit_pod(make_pod(name=name, turns=["hi"], max_tokens=2)).id)
            assert pod.status.phase == PodPhase.succeeded
    finally:
        node.close()
    return tmp_path, env


def am(env, *args, check=None):
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)
    if check is not None:
        assert done.returncode == check, (done.stdout, done.stderr)
    return done


def test_an_evidence_bundle_verifies_with_the_machine_key_alone_and_fails_after_any_byte_changes(ran):
    tmp_path, env = ran
    bundle = tmp_path / "evidence"
    made = json.loads(am(env, "evidence", "bundle", str(bundle), "--format", "json", check=0).stdout)
    assert made["storageReceipts"] >= 1 and made["activationDecisions"] >= 2
    key = next((tmp_path / "state" / "receipts" / "keys").glob("*.pem"))
    ok = json.loads(am(env, "evidence", "verify", str(bundle), "--key", str(key), "--format", "json", check=0).stdout)
    assert ok["ok"] and ok["entries"] == made["entries"] and not ok["failures"]
    names = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert {"machine-profile.json", "config.json", "providers.json", "storage-receipts.jsonl",
            "activation-decisions.jsonl", "bundle.dsse", "receipts/receipts.jsonl"} <= names
    assert any(n.startswith("receipts/checkpoints/") for n in names) and any(n.startswith("receipts/keys/") for n in names)

    from nodeagent.governance.bundle import verify_evidence
    from nodeagent.receipts.keys import PublicKey
    keys = {PublicKey.load(key).key_id: PublicKey.load(key)}
    for name in sorted(names):  # one byte of any file changed: refused, naming the damage
        path = bundle / name
        original = path.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        path.chmod(0o644)
        path.write_bytes(bytes(data))
        report = verify_evidence(bundle, keys)
        assert not report.ok, name
        path.write_bytes(original)
    assert verify_evidence(bundle, keys).ok
    (bundle / "extra.txt").write_text("added later")
    assert "added" in " ".join(verify_evidence(bundle, keys).failures)
    (bundle / "extra.txt").unlink()
    # another key is refused
    from nodeagent.receipts.keys import Signer
    other = Signer.generate()
    assert not verify_evidence(bundle, {other.key_id: other.public}).ok
    refused = am(env, "evidence", "verify", str(bundle), "--key", str(_pem(tmp_path, other)))
    assert refused.returncode == 1 and "FAILED" in refused.stdout

    # the DSSE parts verify with securesystemslib
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey
    sslib = SSlibKey.from_crypto(load_pem_public_key(key.read_bytes()), keyid=next(iter(keys)))
    lines = [(bundle / "bundle.dsse").read_bytes()]
    lines += (bundle / "storage-receipts.jsonl").read_bytes().splitlines()
    lines += (bundle / "activation-decisions.jsonl").read_bytes().splitlines()
    for line in lines:
        assert list(Envelope.from_dict(json.loads(line)).verify([sslib], 1)) == [next(iter(keys))]


def _pem(tmp_path: Path, signer) -> Path:
    path = tmp_path / "other.pem"
    path.write_text(signer.public.pem())
    return path


def test_grants_activation_and_plan_from_the_command_line(ran):
    tmp_path, env = ran
    pod = tmp_path / "pod.json"
    pod.write_text(json.dumps(make_pod(name="p3", turns=["hi"], max_tokens=2).to_wire()))
    grant = tmp_path / "acme.grant"
    am(env, "grants", "issue", "--tenant", "acme", "--agent", "coder", "--model", "tiny", "--out", str(grant),
       "--install", check=0)
    assert json.loads(am(env, "grants", "verify", str(grant), "--pod", str(pod), "--format", "json",
                         check=0).stdout)["valid"]
    narrow = tmp_path / "narrow.grant"
    am(env, "grants", "issue", "--tenant", "acme", "--agent", "coder", "--model", "smol", "--out", str(narrow), check=0)
    refused = json.loads(am(env, "grants", "verify", str(narrow), "--pod", str(pod), "--format", "json",
                            check=1).stdout)
    assert "does not list model 'tiny'" in refused["refusals"][0]
    ls = json.loads(am(env, "grants", "ls", "--format", "json", check=0).stdout)
    assert [r["state"] for r in ls] == ["valid"]
    assert "no installed grant" in am(env, "grants", "rm", "grant-0000000000000000", check=1).stderr

    decision = json.loads(am(env, "activate", "evaluate", str(pod), "--format", "json", check=0).stdout)
    assert decision["verdict"] == "allowed" and {p["name"] for p in decision["preconditions"]} >= {
        "policy", "grant", "storage", "model-present", "model-digest", "memory-fit"}
    denied = json.loads(am(env, "activate", "evaluate", str(pod), "--grant", str(narrow), "--format", "json",
                           check=1).stdout)
    assert denied["verdict"] == "denied" and denied["lacking"] == ["grant"]

    plan = json.loads(am(env, "render", "plan", str(pod), "--format", "json").stdout)
    assert plan["kind"] == "PodPlan" and plan["admission"]["allowed"] and plan["activation"]["verdict"] == "allowed"
    assert plan["model"]["digest"].startswith("sha256:") and "daemon is not running" in plan["placementNote"]
    table = am(env, "render", "plan", str(pod), "--grant", str(narrow))
    assert table.returncode == 1 and "WOULD NOT RUN" in table.stdout and "LACKING" in table.stdout

    bad = am(env, "grants", "issue", "--tenant", "acme", "--agent", "coder", "--model", "tiny", "--ttl", "soon")
    assert bad.returncode == 2 and "--ttl" in bad.stderr

    dry = am(env, "wipe", "--tenant", "acme", check=0)
    assert "add --yes" in dry.stdout
    wiped = json.loads(am(env, "wipe", "--tenant", "acme", "--yes", "--format", "json", check=0).stdout)
    assert wiped["receiptId"] and len(wiped["pods"]) == 2
    verify = am(env, "receipts", "verify", "--format", "json", check=0)
    assert json.loads(verify.stdout)["ok"]
    down = json.loads(am(env, "teardown", "--yes", "--format", "json", check=0).stdout)
    assert down["receiptId"] and down["stopped"] == []
