"""Tenant-bound credentials (issue #11 D5): what each token sees and may do, through the real app.

Two tenants' tokens from a real credentials file, served under real uvicorn on
TCP (token required) and on a Unix socket (no token = the socket's owner).
The end-to-end test at the bottom runs pods on the tiny model: tenant B's pod
with tenant A's private text gets 0 cached tokens, and B's token cannot read
A's pods, receipts or cache entries.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from nodeagent.api.auth import Authenticate
from nodeagent.config import load_config
from nodeagent.contracts.pod import PodPhase
from nodeagent.credentials import CredentialSet, CredentialsError, issue, parse, revoke, token_sha256

from pod_factory import make_pod, wait_for
from test_api_harness import ServedApi, env_for, make_node

ADMIN = "admin-token-for-tests-0123456789"
MISSING_POD = "0123456789abcdef"


@dataclass
class Tenants:
    api: ServedApi
    node: object
    path: Path
    tokens: dict[str, str]

    def client(self, who: str | None) -> httpx.Client:
        """A client with ``who``'s token: "a", "b", "admin", a raw token, or None for no header."""
        token = {"admin": ADMIN, **self.tokens}.get(who, who) if who else None
        return self.api.client(headers={"Authorization": f"Bearer {token}"} if token else {})


def issue_token(path: Path, tenant: str | None = None, **limits) -> str:
    return issue(path, tenant=tenant, admin=tenant is None, **limits)[1]


def serve(node, path: Path, *, socket: Path | None = None) -> ServedApi:
    credentials = CredentialSet.open(path, ADMIN)
    if socket is not None:
        return ServedApi(node, socket, guard=lambda app: Authenticate(app, credentials, token_required=False))
    return ServedApi(node, tcp=True, guard=lambda app: Authenticate(app, credentials, token_required=True))


@pytest.fixture()
def tenants(tmp_path):
    node = make_node(tmp_path)
    path = tmp_path / "cfg" / "credentials.toml"
    tokens = {"a": issue_token(path, "tenant-a"), "b": issue_token(path, "tenant-b")}
    api = serve(node, path)
    yield Tenants(api, node, path, tokens)
    node.executor.hold.clear()
    api.stop()
    node.close()


def new_pod(**pod) -> dict:
    """A new pod's body: what make_pod builds, without the id and status the node sets."""
    wire = make_pod(**pod).to_wire()
    return {key: value for key, value in wire.items() if key not in ("id", "status")}


def submit(client: httpx.Client, **pod) -> dict:
    response = client.post("/v1/pods", json=new_pod(**pod))
    assert response.status_code == 201, response.text
    return response.json()


def finished(client: httpx.Client, pod_id: str) -> dict:
    assert wait_for(lambda: client.get(f"/v1/pods/{pod_id}").json()["status"]["phase"] == "Succeeded")
    return client.get(f"/v1/pods/{pod_id}").json()


def error(response: httpx.Response) -> dict:
    return response.json()["error"]


# ------------------------------------------------------------------ pods
def test_tenant_b_token_gets_404_on_tenant_a_pod(tenants):
    tenants.node.executor.hold.set()  # keep A's pod running: B's cancel must not reach it
    with tenants.client("a") as a, tenants.client("b") as b:
        pod = submit(a, tenant="tenant-a")
        assert wait_for(lambda: a.get(f"/v1/pods/{pod['id']}").json()["status"]["phase"] == "Running")
        for method, path in (("GET", f"/v1/pods/{pod['id']}"), ("DELETE", f"/v1/pods/{pod['id']}"),
                             ("GET", f"/v1/pods/{pod['id']}/events")):
            theirs = b.request(method, path)
            missing = b.request(method, path.replace(pod["id"], MISSING_POD))
            assert theirs.status_code == missing.status_code == 404, theirs.text
            # The same answer as for a pod that does not exist: existence does not leak.
            assert error(theirs) == {**error(missing),
                                     "message": error(missing)["message"].replace(MISSING_POD, pod["id"])}
        assert a.get(f"/v1/pods/{pod['id']}").json()["status"]["phase"] == "Running"


def test_a_tenant_lists_its_own_pods_only_and_may_not_ask_for_another(tenants):
    with tenants.client("a") as a, tenants.client("b") as b, tenants.client("admin") as admin:
        mine = {submit(a, name="a1", tenant="tenant-a")["id"], submit(a, name="a2", tenant="tenant-a")["id"]}
        theirs = submit(b, name="b1", tenant="tenant-b")["id"]
        assert {p["id"] for p in a.get("/v1/pods").json()["items"]} == mine
        assert [p["id"] for p in b.get("/v1/pods").json()["items"]] == [theirs]
        assert [p["id"] for p in b.get("/v1/pods", params={"tenant": "tenant-b"}).json()["items"]] == [theirs]
        asked = b.get("/v1/pods", params={"tenant": "tenant-a"})
        assert asked.status_code == 403 and error(asked)["field"] == "tenant"
        assert {p["id"] for p in admin.get("/v1/pods").json()["items"]} == mine | {theirs}
        assert [p["id"] for p in admin.get("/v1/pods", params={"tenant": "tenant-b"}).json()["items"]] == [theirs]


def test_submitting_or_scoring_as_another_tenant_is_403_naming_metadata_tenant(tenants):
    with tenants.client("b") as b:
        for path in ("/v1/pods", "/v1/placements:score"):
            response = b.post(path, json=new_pod(tenant="tenant-a"))
            assert response.status_code == 403, response.text
            assert error(response)["field"] == "metadata.tenant"
            assert "tenant-a" in error(response)["message"] and "tenant-b" in error(response)["message"]
    assert tenants.node.list_pods() == []


def test_an_agent_bound_token_submits_and_sees_its_agents_pods_only(tenants):
    coder = issue_token(tenants.path, "tenant-a", agents=["coder"])
    with tenants.client(coder) as client, tenants.client("admin") as admin:
        other = submit(admin, name="r", tenant="tenant-a", agent="reviewer")
        refused = client.post("/v1/pods", json=new_pod(tenant="tenant-a", agent="reviewer"))
        assert refused.status_code == 403 and error(refused)["field"] == "metadata.agent"
        own = submit(client, name="c", tenant="tenant-a", agent="coder")
        assert [p["id"] for p in client.get("/v1/pods").json()["items"]] == [own["id"]]
        assert client.get(f"/v1/pods/{other['id']}").status_code == 404


def test_a_scope_bound_token_may_not_declare_other_cache_scopes(tenants):
    private_only = issue_token(tenants.path, "tenant-a", scopes=["private"])
    with tenants.client(private_only) as client:
        refused = client.post("/v1/pods", json=new_pod(tenant="tenant-a", scope="public"))
        assert refused.status_code == 403 and error(refused)["field"] == "spec.context[0].scope"
        submit(client, tenant="tenant-a", scope="private")


def test_node_wide_controls_are_admin_only(tenants):
    with tenants.client("b") as b, tenants.client("admin") as admin:
        for path in ("/v1/dispatch:pause", "/v1/dispatch:resume", "/v1/models/tiny:load", "/v1/models/tiny:unload"):
            response = b.post(path)
            assert response.status_code == 403, (path, response.text)
            assert error(response)["type"] == "forbidden" and "admin" in error(response)["message"]
        assert b.get("/v1/pods:conflicts").status_code == 403
        assert tenants.node.ready()  # nothing was paused
        assert admin.post("/v1/dispatch:pause").json() == {"dispatching": False}
        assert admin.post("/v1/dispatch:resume").json() == {"dispatching": True}
        assert admin.get("/v1/pods:conflicts").status_code == 200
        # Node-wide facts that name no tenant stay readable.
        assert b.get("/v1/status").status_code == 200


# ------------------------------------------------------------------ OpenAI
def chat(client: httpx.Client, **extra) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"}], **extra})


def test_the_openai_endpoint_takes_the_tenant_from_the_token(tenants):
    with tenants.client("b") as b, tenants.client("admin") as admin:
        # A request field cannot choose the tenant; the token does.
        response = chat(b, metadata={"tenant": "tenant-a"}, user="alice")
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "olleh"
        assert chat(admin).status_code == 200
    pods = {p.id: p for p in tenants.node.list_pods()}
    made = pods[response.json()["id"].removeprefix("chatcmpl-")]
    assert (made.metadata.tenant, made.metadata.agent, made.metadata.session) == ("tenant-b", "openai", "alice")
    assert made.spec.context[0].scope.value == "private"
    # Admin keeps the behaviour from before credentials: the default tenant.
    assert sorted(p.metadata.tenant for p in pods.values()) == ["default", "tenant-b"]


def test_an_openai_request_with_a_one_agent_token_runs_as_that_agent(tenants):
    coder = issue_token(tenants.path, "tenant-a", agents=["coder"])
    two = issue_token(tenants.path, "tenant-a", agents=["coder", "reviewer"])
    with tenants.client(coder) as client:
        assert chat(client).status_code == 200
    with tenants.client(two) as client:
        refused = chat(client)
        assert refused.status_code == 403 and "openai" in error(refused)["message"]
    assert [(p.metadata.tenant, p.metadata.agent) for p in tenants.node.list_pods()] == [("tenant-a", "coder")]


# ------------------------------------------------------------------ credentials
def test_unknown_and_revoked_tokens_are_401_and_new_ones_work_at_once(tenants):
    with tenants.client("amt_" + "x" * 43) as stranger:
        assert stranger.get("/v1/pods").status_code == 401
    with tenants.client("b") as b:
        assert b.get("/v1/pods").status_code == 200
        [credential] = [c for c in parse(tenants.path.read_text())
                        if c.token_sha256 == token_sha256(tenants.tokens["b"])]
        revoke(tenants.path, credential.id)
        refused = b.get("/v1/pods")
        assert refused.status_code == 401 and error(refused)["field"] == "Authorization"
    fresh = issue_token(tenants.path, "tenant-c")
    with tenants.client(fresh) as c:
        assert c.get("/v1/pods").status_code == 200
    with tenants.client("a") as a:
        assert a.get("/v1/pods").status_code == 200


def test_a_credentials_file_others_can_read_is_refused_at_start_and_fails_closed_later(tenants, caplog):
    os.chmod(tenants.path, 0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        CredentialSet.open(tenants.path, ADMIN)
    # The running agent re-reads the file at the next request: its tokens stop working, the admin one does not.
    with caplog.at_level(logging.ERROR, logger="agent_machine.credentials"):
        with tenants.client("a") as a, tenants.client("admin") as admin:
            assert a.get("/v1/pods").status_code == 401
            assert admin.get("/v1/pods").status_code == 200
    assert "chmod 600" in caplog.text
    os.chmod(tenants.path, 0o600)
    with tenants.client("a") as a:
        assert a.get("/v1/pods").status_code == 200


@pytest.mark.parametrize("text,field", [
    ('[[credential]]\nid = "x"\ntenant = "t"\ntoken_sha256 = "' + "a" * 64 + '"\ncolour = "red"\n',
     "credential[0].colour"),
    ('[[credential]]\nid = "x"\ntenant = "t"\nadmin = true\ntoken_sha256 = "' + "a" * 64 + '"\n', "credential[0]"),
    ('[[credential]]\nid = "x"\ntenant = "t"\nscopes = ["secret"]\ntoken_sha256 = "' + "a" * 64 + '"\n',
     "credential[0].scopes"),
    ('[[credential]]\nid = "x"\ntenant = "T T"\ntoken_sha256 = "' + "a" * 64 + '"\n', "credential[0].tenant"),
    ('[[credential]]\nid = "x"\ntenant = "t"\ntoken_sha256 = "not-hex"\n', "credential[0].token_sha256"),
    ('[[credential]]\nid = "x"\ntenant = "t"\ntoken_sha256 = "' + "a" * 64 + '"\n'
     '[[credential]]\nid = "x"\ntenant = "u"\ntoken_sha256 = "' + "b" * 64 + '"\n', "credential[1].id"),
])
def test_a_bad_credentials_file_is_an_error_naming_the_field(text, field):
    with pytest.raises(CredentialsError) as err:
        parse(text, "credentials.toml")
    assert f"credentials.toml: {field}" in str(err.value)


def test_the_file_keeps_hashes_only_and_stays_private(tmp_path):
    path = tmp_path / "cfg" / "credentials.toml"
    tokens = [issue_token(path, "tenant-a") for _ in range(3)]
    text = path.read_text()
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert not any(token in text for token in tokens)
    assert all(token_sha256(token) in text for token in tokens)
    credentials = CredentialSet.open(path)
    assert [credentials.resolve(token).tenant for token in tokens] == ["tenant-a"] * 3


# ------------------------------------------------------------------ the socket
def test_on_the_socket_no_token_is_the_owner_and_a_tenant_token_binds_the_request(tmp_path):
    node = make_node(tmp_path)
    path = tmp_path / "cfg" / "credentials.toml"
    b_token = issue_token(path, "tenant-b")
    api = serve(node, path, socket=tmp_path / "run" / "agent-machine" / "api.sock")
    try:
        with api.client() as owner:
            a_pod = submit(owner, name="a", tenant="tenant-a")
        with api.client(headers={"Authorization": f"Bearer {b_token}"}) as b:
            submit(b, name="b", tenant="tenant-b")
            assert [p["metadata"]["tenant"] for p in b.get("/v1/pods").json()["items"]] == ["tenant-b"]
            assert b.get(f"/v1/pods/{a_pod['id']}").status_code == 404
        with api.client() as owner:
            assert {p["metadata"]["tenant"] for p in owner.get("/v1/pods").json()["items"]} == {"tenant-a", "tenant-b"}
        # An OpenAI client's placeholder api_key is not a credential: the socket's owner.
        with api.client(headers={"Authorization": "Bearer sk-unused-on-the-socket"}) as placeholder:
            assert len(placeholder.get("/v1/pods").json()["items"]) == 2
        # An agent-machine token that is not (or no longer) valid is refused, never the owner's.
        with api.client(headers={"Authorization": "Bearer amt_" + "y" * 43}) as stale:
            assert stale.get("/v1/pods").status_code == 401
    finally:
        api.stop()
        node.close()


def test_serve_refuses_to_start_with_an_unsafe_credentials_file(tmp_path):
    from nodeagent.daemon import load_start

    path = tmp_path / "cfg" / "credentials.toml"
    issue_token(path, "tenant-a")
    os.chmod(path, 0o640)
    # What serve (and doctor) read before building the node; serve() itself would also
    # tighten this test process's umask and logging, so ask the shared step directly.
    with pytest.raises(CredentialsError, match="credentials file .* chmod 600"):
        load_start(load_config(env_for(tmp_path)))
    os.chmod(path, 0o600)
    _, _, credentials = load_start(load_config(env_for(tmp_path)))
    assert credentials.path == path


# ------------------------------------------------------------------ end to end on the tiny model
SECRET = " ".join(f"Rule {i}: tenant A's private playbook says the launch code is 0{i}41." for i in range(12))


@pytest.mark.llama
def test_tenant_b_cannot_read_or_reuse_tenant_a_pods_receipts_and_cache(tmp_path, tiny_model_path):
    from nodeagent.models.store import ModelStore
    from nodeagent.node import Node, default_executor

    env = env_for(tmp_path, AGENT_MACHINE_CACHE_RAM_DIR=str(tmp_path / "t1"), AGENT_MACHINE_MODELS_THREADS="2")
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    node = Node(load_config(env), executor_factory=default_executor)
    node.start()
    path = tmp_path / "cfg" / "credentials.toml"
    tokens = {"a": issue_token(path, "tenant-a"), "b": issue_token(path, "tenant-b")}
    api = serve(node, path)
    world = Tenants(api, node, path, tokens)
    try:
        with world.client("a") as a, world.client("b") as b, world.client("admin") as admin:
            a_pod = wait_done(a, submit(a, name="a", tenant="tenant-a", system=SECRET, max_tokens=4)["id"])
            a_turn = a_pod["status"]["turns"][0]
            # The same private text under tenant B, right after: neither A's live context (T0)
            # nor A's saved state (T1) may serve it.
            b_pod = wait_done(b, submit(b, name="b", tenant="tenant-b", system=SECRET, max_tokens=4)["id"])
            b_turn = b_pod["status"]["turns"][0]
            assert b_turn["cachedTokens"] == 0 and b_turn["cacheTier"] == "none", b_turn
            assert b_turn["evaluatedTokens"] == b_turn["promptTokens"] == a_turn["promptTokens"]
            # ...while tenant A's own next pod is served from that cache: the 0 above is the boundary.
            again = wait_done(a, submit(a, name="a2", tenant="tenant-a", system=SECRET, max_tokens=4)["id"])
            assert again["status"]["turns"][0]["cachedTokens"] > 0

            # Receipts: B lists its own only; A's is 404 exactly like a missing one.
            a_receipt = a_pod["status"]["receiptIds"][0]
            b_receipts = b.get("/v1/receipts").json()["items"]
            assert [r["receiptId"] for r in b_receipts] == b_pod["status"]["receiptIds"]
            assert {r["statement"]["predicate"]["pod"]["tenant"] for r in b_receipts} == {"tenant-b"}
            theirs, missing = b.get(f"/v1/receipts/{a_receipt}"), b.get("/v1/receipts/" + "f" * 64)
            assert theirs.status_code == missing.status_code == 404
            assert error(theirs) == {**error(missing),
                                     "message": error(missing)["message"].replace("f" * 64, a_receipt)}
            assert a.get(f"/v1/receipts/{a_receipt}").status_code == 200
            assert len(admin.get("/v1/receipts").json()["items"]) == 3

            # Cache entries: B sees its own only; A's is 404.
            a_entries = a.get("/v1/cache/entries").json()["items"]
            b_entries = b.get("/v1/cache/entries").json()["items"]
            assert a_entries and b_entries
            assert {e["tenant"] for e in a_entries} == {"tenant-a"} and {e["tenant"] for e in b_entries} == {"tenant-b"}
            assert not {e["id"] for e in a_entries} & {e["id"] for e in b_entries}
            assert b.get(f"/v1/cache/entries/{a_entries[0]['id']}").status_code == 404
            assert a.get(f"/v1/cache/entries/{a_entries[0]['id']}").json()["owner"] == "tenant-a/coder"
            assert b.get("/v1/cache/entries", params={"tenant": "tenant-a"}).status_code == 403
            assert len(admin.get("/v1/cache/entries").json()["items"]) == len(a_entries) + len(b_entries)
            assert b.get(f"/v1/pods/{a_pod['id']}").status_code == 404
    finally:
        api.stop()
        node.close()


def wait_done(client: httpx.Client, pod_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pod = client.get(f"/v1/pods/{pod_id}").json()
        if pod["status"]["phase"] in {p.value for p in (PodPhase.succeeded, PodPhase.failed, PodPhase.cancelled,
                                                         PodPhase.refused)}:
            assert pod["status"]["phase"] == "Succeeded", pod["status"]
            return pod
        time.sleep(0.05)
    raise AssertionError(f"pod {pod_id} did not finish in {timeout}s")
