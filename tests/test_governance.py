"""Activation decisions and node events: the gates refuse as well as allow, and every decision is signed
into the receipt log, which keeps verifying offline with the machine key alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nodeagent.admission import Policy
from nodeagent.config import GovernanceConfig
from nodeagent.execution import ProviderPool, ProviderStart
from nodeagent.governance.activation import Activation
from nodeagent.governance.grants import GRANT_LABEL, GrantStore, admin_signer, issue_grant, trusted_issuers, verify_grant
from nodeagent.governance.storage import roles_for, take_storage_receipt
from nodeagent.models.store import ModelStore
from nodeagent.providers.base import StartRefused
from nodeagent.receipts import ReceiptLog, Signer, verify_bundle
from nodeagent.receipts.dsse import parse_envelope

from pod_factory import make_pod

PINNED = "ghcr.io/ggml-org/llama.cpp@sha256:" + "ab" * 32


@pytest.fixture()
def setup(tmp_path, tiny_model_path):
    state = tmp_path / "state"
    models = ModelStore(state)
    record = models.import_model(tiny_model_path, "tiny")
    signer = Signer.generate()
    log = ReceiptLog(state / "receipts", signer)

    def make(**governance):
        roles = roles_for(state, tmp_path / "t1", t1_budget=1 << 30, t2_budget=1 << 30)
        return Activation(state_dir=state, governance=GovernanceConfig(**governance), policy=Policy.allow_all(),
                          models=models, receipts=log, storage=lambda: take_storage_receipt(roles),
                          budget_bytes=lambda: 8 << 30, context=512)

    yield make, models, record, log, signer, state
    log.close()


def _events(log: ReceiptLog, event: str) -> list[dict]:
    lines = (Path(log.directory) / "receipts.jsonl").read_bytes().splitlines()
    out = []
    for line in lines:
        statement = json.loads(parse_envelope(line).payload)
        if statement["predicate"].get("event") == event:
            out.append(statement["predicate"])
    return out


def _start(record, **kw):
    base = {"model_digest": record.digest, "model": "tiny", "kind": "llama_server", "mode": "podman",
            "provider": "tiny-server", "image": PINNED}
    return ProviderStart(**{**base, **kw})


def test_a_declared_provider_with_an_unpinned_image_never_starts_and_the_decision_says_why(setup):
    make, _models, record, log, signer, _ = setup
    pool = ProviderPool()
    pool.start_gate = make().start_gate
    with pytest.raises(StartRefused) as refused:
        pool.check_start(_start(record, image="ghcr.io/ggml-org/llama.cpp:server"))
    assert "image-pinned" in str(refused.value) and any("not pinned" in r for r in refused.value.reasons)
    denied = _events(log, "activation")[-1]
    assert denied["body"]["verdict"] == "denied" and denied["body"]["lacking"] == ["image-pinned"]
    assert denied["body"]["storageReceipt"] == _events(log, "storage")[0]["body"]["digest"]
    assert not _events(log, "provider-start")

    pool.check_start(_start(record))  # pinned: allowed, and the start is logged with its decision
    allowed = _events(log, "activation")[-1]
    assert allowed["body"]["verdict"] == "allowed"
    assert _events(log, "provider-start")[-1]["body"]["image"] == PINNED
    # a local image counts as pinned only when it resolves to an image id (it was built here)
    with pytest.raises(StartRefused, match="image-pinned"):
        pool.check_start(_start(record, image="localhost/agent-machine-test/no-such-image:latest"))
    # subprocess engines have no image to pin
    pool.check_start(_start(record, mode="subprocess", image=None))
    log.checkpoint()
    report = verify_bundle(log.directory, {signer.key_id: signer.public})
    assert report.ok, report.failures


def test_activation_is_denied_for_a_model_whose_digest_no_longer_matches(setup):
    make, _models, record, log, _signer, _ = setup
    activation = make()
    assert activation.pod_gate(make_pod(model="tiny"), record) == []
    blob = Path(record.path)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # one byte of the weights changed on disk
    blob.write_bytes(bytes(data))
    reasons = activation.pod_gate(make_pod(model="tiny"), record)
    assert reasons and "model-digest" in reasons[0] and "not " + record.digest in reasons[0]
    with pytest.raises(StartRefused, match="model-digest"):
        activation.start_gate(_start(record, mode="subprocess", image=None))
    missing = blob.with_suffix(".gone")
    blob.rename(missing)
    assert any("missing from the store" in r for r in activation.pod_gate(make_pod(model="tiny"), record))


def test_a_pod_whose_grant_lacks_its_model_is_denied_and_one_it_covers_runs(setup):
    make, _models, record, log, _signer, state = setup
    activation = make(require_grants=True)
    pod = make_pod(model="tiny")
    reasons = activation.pod_gate(pod, record)
    assert reasons and "require_grants" in reasons[0]

    admin = admin_signer(state)
    narrow = verify_grant(issue_grant(admin, issuer="node-admin", tenant="acme", agent="coder", models=["smol"])[1],
                          trusted_issuers(state, []))
    GrantStore(state).install(narrow)
    reasons = activation.pod_gate(pod, record)
    assert reasons and "does not list model 'tiny'" in " ".join(reasons)
    decision = _events(log, "activation")[-1]["body"]
    assert decision["verdict"] == "denied" and decision["lacking"] == ["grant"]

    wide = verify_grant(issue_grant(admin, issuer="node-admin", tenant="acme", agent="coder", models=["tiny"])[1],
                        trusted_issuers(state, []))
    GrantStore(state).install(wide)
    named = make_pod(model="tiny")
    named.metadata.labels[GRANT_LABEL] = wide.id
    assert activation.pod_gate(named, record) == []
    assert _events(log, "activation")[-1]["body"]["grant"]["id"] == wide.id
    # a pod naming the narrow grant is held to it
    held = make_pod(model="tiny")
    held.metadata.labels[GRANT_LABEL] = narrow.id
    assert activation.pod_gate(held, record)
    # another tenant's pod is untouched by acme's grants only when grants are not required
    assert activation.pod_gate(make_pod(tenant="globex"), record)
    assert make().pod_gate(make_pod(tenant="globex"), record) == []


def test_a_revoked_grant_denies_activation(setup, tmp_path):
    make, _models, record, log, _signer, state = setup
    admin = admin_signer(state)
    grant = verify_grant(issue_grant(admin, issuer="node-admin", tenant="acme", agent="coder", models=["tiny"])[1],
                         trusted_issuers(state, []))
    GrantStore(state).install(grant)
    revoked = tmp_path / "revoked.txt"
    revoked.write_text(grant.id + "\n")
    reasons = make(require_grants=True, revocation_file=str(revoked)).pod_gate(make_pod(), record)
    assert reasons and "revocation file" in " ".join(reasons)


def test_node_events_verify_offline_and_with_securesystemslib_and_fail_when_altered(setup, tmp_path):
    make, _models, record, log, signer, _ = setup
    make().pod_gate(make_pod(model="tiny"), record)
    log.append_event("wipe", "tenant:acme", {"kvEntries": [], "segments": ["sha256:" + "0" * 64]}, tenant="acme")
    log.checkpoint()
    keys = {signer.key_id: signer.public}
    assert verify_bundle(log.directory, keys).ok
    rows = (Path(log.directory) / "receipts.jsonl").read_bytes().splitlines()

    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey
    key = SSlibKey.from_crypto(load_pem_public_key(signer.public.pem().encode()), keyid=signer.key_id)
    for line in rows:
        assert list(Envelope.from_dict(json.loads(line)).verify([key], 1)) == [signer.key_id]

    copy = tmp_path / "copy"
    shutil.copytree(log.directory, copy, ignore=shutil.ignore_patterns("lock", "index.db*"))
    data = bytearray((copy / "receipts.jsonl").read_bytes())
    data[len(rows[0]) // 2] ^= 0x01
    (copy / "receipts.jsonl").write_bytes(bytes(data))
    assert not verify_bundle(copy, keys).ok

    # floats and unknown event types are refused before signing
    with pytest.raises(ValueError, match="floats"):
        log.append_event("wipe", "x", {"ratio": 0.5})
    with pytest.raises(ValueError, match="predicate.event"):
        log.append_event("party", "x", {})


def test_the_storage_receipt_names_each_role_and_is_logged_once_until_it_changes(setup, tmp_path):
    make, _models, record, log, _signer, state = setup
    activation = make()
    receipt, digest = activation.storage_receipt()
    roles = {loc["role"]: loc for loc in receipt.locations}
    assert set(roles) == {"models", "kv-t1", "kv-t2", "scratch", "receipts", "state-db"}
    for loc in roles.values():
        assert loc["fsType"] and loc["medium"] in ("memory", "disk") and loc["encryption"]
        assert loc["freeBytes"] > 0
    assert roles["kv-t1"]["budgetBytes"] == 1 << 30
    activation.storage_receipt()
    assert len(_events(log, "storage")) == 1
    (tmp_path / "t1").mkdir()  # the layout changed (T1 now exists): a new receipt
    activation.storage_receipt()
    assert len(_events(log, "storage")) == 2


def test_a_reloaded_config_applies_to_the_next_decision(setup):
    from types import SimpleNamespace

    from nodeagent.config import Config
    make, _models, record, _log, _signer, _ = setup
    activation = make()
    node = SimpleNamespace(config=Config(), policy=Policy.allow_all())
    activation._node = node
    assert activation.pod_gate(make_pod(model="tiny"), record) == []
    node.config = Config.model_validate({"governance": {"require_grants": True}})  # what SIGHUP does
    assert any("require_grants" in r for r in activation.pod_gate(make_pod(model="tiny"), record))
