"""Bearer-token auth on TCP (127.0.0.1) and on the Unix socket, and how the admin token is loaded.

What each credential may see and do is specified in tests/test_api_tenants.py.
"""

from __future__ import annotations

import os

import pytest

from nodeagent.api.auth import Authenticate, TokenError, load_token
from nodeagent.credentials import CredentialSet

from pod_factory import make_pod
from test_api_harness import ServedApi, make_node

TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture()
def tcp_api(tmp_path):
    node = make_node(tmp_path)
    api = ServedApi(node, tcp=True,
                    guard=lambda app: Authenticate(app, CredentialSet(None, TOKEN), token_required=True))
    yield api
    api.stop()
    node.close()


def test_tcp_without_token_is_401(tcp_api):
    with tcp_api.client() as client:
        response = client.get("/v1/machine")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert error["field"] == "Authorization" and "missing" in error["message"]


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}x", "Bearer wrong", f"Basic {TOKEN}", "Bearer", TOKEN])
def test_tcp_with_a_wrong_token_is_401(tcp_api, header):
    with tcp_api.client(headers={"Authorization": header}) as client:
        assert client.get("/v1/machine").status_code == 401
        assert client.post("/v1/pods", json=make_pod().to_wire()).status_code == 401
    assert tcp_api.node.list_pods() == []


def test_tcp_with_the_token_works(tcp_api):
    with tcp_api.client(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        assert client.get("/v1/machine").status_code == 200
        assert client.post("/v1/pods", json=make_pod().to_wire()).status_code == 201
        assert client.get("/metrics").status_code == 200


def test_healthz_needs_no_token(tcp_api):
    with tcp_api.client() as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 401


def test_the_admin_token_matches_exactly():
    credentials = CredentialSet(None, TOKEN)
    assert credentials.resolve(TOKEN).admin
    for other in (TOKEN + "x", TOKEN[:-1], "", TOKEN.upper()):
        assert credentials.resolve(other) is None
    assert CredentialSet(None, None).resolve(TOKEN) is None


def test_load_token_from_a_private_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    os.chmod(path, 0o600)
    assert load_token(str(path), env={}) == TOKEN
    assert load_token(None, env={}) is None


def test_load_token_refuses_unsafe_files(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    os.chmod(path, 0o644)
    with pytest.raises(TokenError, match="chmod 600"):
        load_token(str(path), env={})
    os.chmod(path, 0o600)
    path.write_text("short")
    with pytest.raises(TokenError, match="at least 16"):
        load_token(str(path), env={})
    with pytest.raises(TokenError, match="missing|No such file"):
        load_token(str(tmp_path / "missing"), env={})


def test_load_token_from_a_systemd_credential(tmp_path):
    (tmp_path / "api-token").write_text(TOKEN)
    os.chmod(tmp_path / "api-token", 0o440)
    assert load_token(None, env={"CREDENTIALS_DIRECTORY": str(tmp_path)}) == TOKEN
