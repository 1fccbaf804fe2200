"""A request carrying a grant (header X-Agent-Machine-Grant) is authorised by it, on top of its credential:
refused with the grant's reason when expired, mis-signed or not covering the pod; installed when valid."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest

from nodeagent.api.principal import GRANT_HEADER
from nodeagent.governance.grants import GrantStore, admin_signer, issue_grant
from nodeagent.receipts.keys import Signer

from pod_factory import make_pod
from test_api_harness import ServedApi, make_node


@pytest.fixture()
def served(tmp_path):
    node = make_node(tmp_path)
    api = ServedApi(node, tmp_path / "run" / "api.sock")
    yield api, node, tmp_path
    api.stop()
    node.close()


def _header(signer, **kw) -> dict[str, str]:
    args = {"issuer": "registry", "tenant": "acme", "agent": "coder", "models": ["tiny"]}
    _, line = issue_grant(signer, **{**args, **kw})
    return {GRANT_HEADER: base64.b64encode(line).decode()}


def test_pods_under_a_grant_header_pass_or_are_refused_with_its_reason(served):
    api, node, tmp_path = served
    admin = admin_signer(node.paths.state_dir)
    body = make_pod(model="tiny").to_wire()
    with api.client() as client:
        ok = client.post("/v1/pods", json=body, headers=_header(admin))
        assert ok.status_code == 201, ok.text
        assert [g for g, _ in GrantStore(node.paths.state_dir).lines()]  # installed for activation

        lacking = client.post("/v1/pods", json=body, headers=_header(admin, models=["smol"]))
        assert lacking.status_code == 403 and "does not list model 'tiny'" in lacking.text
        assert GRANT_HEADER in lacking.text

        expired = client.post("/v1/pods", json=body, headers=_header(
            admin, ttl=timedelta(hours=1), now=datetime.now(timezone.utc) - timedelta(hours=3)))
        assert expired.status_code == 403 and "expired" in expired.text

        foreign = client.post("/v1/pods", json=body, headers=_header(Signer.generate()))
        assert foreign.status_code == 403 and "signature" in foreign.text

        garbage = client.post("/v1/pods", json=body, headers={GRANT_HEADER: "not a grant"})
        assert garbage.status_code == 403

        other = client.post("/v1/pods", json=make_pod(tenant="globex").to_wire(), headers=_header(admin))
        assert other.status_code == 403 and "tenant" in other.text
