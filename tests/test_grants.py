"""AgentRegistryGrant: issued, verified, refused (expired, revoked, mis-signed, altered), checked against pods."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone

import pytest

from nodeagent.governance.grants import (
    GrantError,
    GrantStore,
    RevocationList,
    issue_grant,
    trusted_issuers,
    verify_grant,
)
from nodeagent.receipts.keys import Signer

from pod_factory import make_pod

REGISTRY = Signer.generate()
OTHER = Signer.generate()
KEYS = {REGISTRY.key_id: REGISTRY.public}


def _grant(**kw):
    args = {"issuer": "registry.example", "tenant": "acme", "agent": "coder", "models": ["tiny"]}
    return issue_grant(kw.pop("signer", REGISTRY), **{**args, **kw})


def test_a_grant_issued_by_a_trusted_registry_verifies_and_covers_its_pod():
    grant, line = _grant()
    verified = verify_grant(line, KEYS)
    assert verified.id == grant.id and verified.key_id == REGISTRY.key_id
    assert verified.refusals(make_pod(model="tiny")) == []
    # a header may carry it base64-encoded: the same bytes
    from nodeagent.governance.grants import read_grant_text
    assert read_grant_text(base64.b64encode(line).decode()) == line


def test_an_expired_grant_is_refused_with_its_expiry():
    _, line = _grant(ttl=timedelta(hours=1), now=datetime.now(timezone.utc) - timedelta(hours=2))
    with pytest.raises(GrantError, match="expired at") as caught:
        verify_grant(line, KEYS)
    assert caught.value.check == "expired"


def test_a_revoked_grant_is_refused_and_an_unreadable_revocation_file_refuses_all(tmp_path):
    grant, line = _grant()
    revocations = tmp_path / "revoked.txt"
    revocations.write_text("# revoked grants\n")
    listed = RevocationList(revocations)
    assert verify_grant(line, KEYS, revocations=listed).id == grant.id
    RevocationList.add(revocations, grant.id, reason="agent retired")
    with pytest.raises(GrantError, match="revocation file") as caught:
        verify_grant(line, KEYS, revocations=listed)
    assert caught.value.check == "revoked"
    # by the envelope's digest too
    other, other_line = _grant()
    revocations.write_text(other.envelope_digest + "\n")
    with pytest.raises(GrantError, match="revoked|revocation"):
        verify_grant(other_line, KEYS, revocations=listed)
    revocations.unlink()  # configured but gone: fail closed
    with pytest.raises(GrantError, match="unreadable"):
        verify_grant(other_line, KEYS, revocations=RevocationList(revocations))


def test_a_mis_signed_or_altered_grant_is_refused():
    _, foreign = _grant(signer=OTHER)
    with pytest.raises(GrantError, match="no trusted issuer key") as caught:
        verify_grant(foreign, KEYS)
    assert caught.value.check == "signature"
    _, line = _grant()
    envelope = json.loads(line)
    document = json.loads(base64.b64decode(envelope["payload"]))
    document["scopes"]["models"] = ["*"]  # widen the scopes without the issuer
    envelope["payload"] = base64.b64encode(json.dumps(document).encode()).decode()
    with pytest.raises(GrantError, match="does not verify"):
        verify_grant(json.dumps(envelope).encode(), KEYS)
    with pytest.raises(GrantError, match="no grant issuer key is trusted"):
        verify_grant(line, {})


def test_a_pod_outside_its_grant_is_refused_field_by_field():
    grant = verify_grant(_grant(models=["tiny"], max_context=1024, cache_write=["private"])[1], KEYS)
    assert any("spec.model" in r and "smol" in r for r in grant.refusals(make_pod(model="smol")))
    assert any("tenant" in r for r in grant.refusals(make_pod(tenant="globex")))
    assert any("agent" in r for r in grant.refusals(make_pod(agent="reviewer")))
    assert any("minContext" in r for r in grant.refusals(_pod_with_context(4096)))
    assert any("may not write the tenant cache" in r for r in grant.refusals(make_pod(scope="tenant")))
    assert any("may not share public cache" in r for r in grant.refusals(make_pod(scope="public")))
    # a model named by digest is allowed through the store's names
    digest = "sha256:" + "a" * 64
    assert grant.allows_model(None, digest, ["tiny:latest"])


def _pod_with_context(n):
    pod = make_pod(model="tiny")
    data = pod.to_wire()
    data["spec"]["model"]["minContext"] = n
    from nodeagent.contracts.pod import AgentPod
    return AgentPod.model_validate(data)


def test_bad_grant_documents_name_the_field():
    with pytest.raises(GrantError, match="scopes.cacheRead"):
        _grant(cache_read=["everything"])
    with pytest.raises(GrantError, match="subject.tenant"):
        _grant(tenant="Not A Name")


def test_the_admin_key_is_trusted_once_it_exists_and_the_store_keeps_envelopes(tmp_path):
    from nodeagent.governance.grants import admin_signer
    assert trusted_issuers(tmp_path, []) == {}
    admin = admin_signer(tmp_path)
    assert (tmp_path / "governance" / "admin-grant.key").stat().st_mode & 0o077 == 0
    assert set(trusted_issuers(tmp_path, [])) == {admin.key_id}
    grant, line = issue_grant(admin, issuer="node-admin", tenant="acme", agent="coder", models=["*"])
    store = GrantStore(tmp_path)
    store.install(verify_grant(line, trusted_issuers(tmp_path, [])))
    assert store.line(grant.id) == line and [g for g, _ in store.lines()] == [grant.id]
    pem = tmp_path / "registry.pem"
    pem.write_text(REGISTRY.public.pem())
    assert REGISTRY.key_id in trusted_issuers(tmp_path, [str(pem)])
