"""Idempotency-Key (issue #11 D6): a retried submit whose answer was lost makes no second pod.

Through the real app on TCP with two tenants' tokens, and at the store where
the key is written in the pod's own transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timedelta, timezone

import pytest

from nodeagent.idempotency import IdempotencyConflict, IdempotencyKey, IdempotencyStore, check_key
from nodeagent.pods import PodStore
from nodeagent.store import connect

from pod_factory import make_pod
from test_api_harness import make_node
from test_api_tenants import Tenants, issue_token, new_pod, serve


@pytest.fixture()
def tenants(tmp_path):
    node = make_node(tmp_path)
    path = tmp_path / "cfg" / "credentials.toml"
    tokens = {"a": issue_token(path, "tenant-a"), "b": issue_token(path, "tenant-b")}
    api = serve(node, path)
    yield Tenants(api, node, path, tokens)
    api.stop()
    node.close()


def post_pod(client, key: str | None, **pod):
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/v1/pods", json=new_pod(**pod), headers=headers)


def test_a_retry_with_the_same_key_and_body_answers_the_same_pod(tenants):
    with tenants.client("a") as a:
        first = post_pod(a, "order-42", tenant="tenant-a")
        assert first.status_code == 201 and "idempotent-replayed" not in first.headers
        again = post_pod(a, "order-42", tenant="tenant-a")
        assert again.status_code == 200, again.text
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["location"] == f"/v1/pods/{first.json()['id']}"
    assert len(tenants.node.list_pods()) == 1


def test_the_same_key_with_another_body_is_409_naming_the_header(tenants):
    with tenants.client("a") as a:
        first = post_pod(a, "order-42", tenant="tenant-a", turns=["hello"])
        conflict = post_pod(a, "order-42", tenant="tenant-a", turns=["something else"])
    assert conflict.status_code == 409, conflict.text
    assert conflict.json()["error"]["field"] == "Idempotency-Key"
    assert first.json()["id"] in conflict.json()["error"]["message"]
    assert len(tenants.node.list_pods()) == 1


def test_keys_are_scoped_to_the_tenant(tenants):
    with tenants.client("a") as a, tenants.client("b") as b:
        ours = post_pod(a, "shared-key", tenant="tenant-a")
        theirs = post_pod(b, "shared-key", tenant="tenant-b")
        assert ours.status_code == theirs.status_code == 201
        assert ours.json()["id"] != theirs.json()["id"]
        # B replaying its key gets its own pod, never A's.
        assert post_pod(b, "shared-key", tenant="tenant-b").json()["id"] == theirs.json()["id"]


def test_without_a_key_every_submit_is_a_new_pod(tenants):
    with tenants.client("a") as a:
        ids = {post_pod(a, None, tenant="tenant-a").json()["id"] for _ in range(3)}
    assert len(ids) == 3


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_a_malformed_key_is_422_naming_the_header(tenants, key):
    with tenants.client("a") as a:
        response = a.post("/v1/pods", json=new_pod(tenant="tenant-a"),
                          headers=[("Idempotency-Key", key.encode("latin-1"))])
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "Idempotency-Key"
    assert tenants.node.list_pods() == []


@pytest.mark.parametrize("key,valid", [("a", True), ("order 42", True), ("~" * 255, True), (" a", False),
                                       ("a ", False), ("x" * 256, False), ("", False), ("caf\u00e9", False)])
def test_what_a_key_may_be(key, valid):
    # Printable ASCII without a space at either end: HTTP strips those, so the server never sees them.
    if valid:
        assert check_key(key) == key
    else:
        with pytest.raises(ValueError, match="Idempotency-Key"):
            check_key(key)


def test_a_key_still_replays_after_a_restart(tmp_path):
    path = tmp_path / "cfg" / "credentials.toml"
    token = issue_token(path, "tenant-a")
    node = make_node(tmp_path)
    api = serve(node, path)
    try:
        with api.client(headers={"Authorization": f"Bearer {token}"}) as a:
            first = post_pod(a, "before-the-crash", tenant="tenant-a").json()
    finally:
        api.stop()
        node.close()
    node = make_node(tmp_path)  # a new Node on the same state directory
    api = serve(node, path)
    try:
        with api.client(headers={"Authorization": f"Bearer {token}"}) as a:
            again = post_pod(a, "before-the-crash", tenant="tenant-a")
        assert again.status_code == 200 and again.json()["id"] == first["id"]
        assert len(node.list_pods()) == 1
    finally:
        api.stop()
        node.close()


def test_concurrent_retries_with_one_key_make_one_pod(tenants):
    answers: list[tuple[int, str]] = []

    def retry() -> None:
        with tenants.client("a") as a:
            response = post_pod(a, "burst", tenant="tenant-a")
            answers.append((response.status_code, response.json()["id"]))

    threads = [threading.Thread(target=retry) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(code for code, _ in answers) == [200] * 7 + [201]
    assert len({pod_id for _, pod_id in answers}) == 1
    assert len(tenants.node.list_pods()) == 1


# ------------------------------------------------------------------ OpenAI
def chat(client, key: str, content: str = "hello"):
    return client.post("/v1/chat/completions", headers={"Idempotency-Key": key},
                       json={"model": "tiny", "messages": [{"role": "user", "content": content}]})


def test_an_openai_retry_answers_the_completion_of_the_pod_it_made(tenants):
    with tenants.client("b") as b:
        first = chat(b, "chat-1")
        again = chat(b, "chat-1")
        conflict = chat(b, "chat-1", content="another question")
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.json() == first.json()
    assert conflict.status_code == 409 and conflict.json()["error"]["field"] == "Idempotency-Key"
    assert len(tenants.node.list_pods()) == 1


# ------------------------------------------------------------------ the store
def key(value: str = "k", body: str = "x") -> IdempotencyKey:
    return IdempotencyKey("tenant-a", value, body * 64)


@pytest.fixture()
def stores(tmp_path):
    conn = connect(tmp_path / "state.db")
    pods = PodStore(conn)
    keys = IdempotencyStore(conn)
    yield pods, keys, conn
    conn.close()


def test_the_key_is_written_in_the_pods_transaction(stores):
    pods, keys, conn = stores
    first = pods.create(make_pod(name="one"), idempotency=key())
    # A second insert of a live key fails inside create's transaction: no pod row is left behind.
    with pytest.raises(sqlite3.IntegrityError):
        pods.create(make_pod(name="two"), idempotency=key())
    assert [p.id for p in pods.list()] == [first.id]
    assert keys.find(key()) == first.id
    with pytest.raises(IdempotencyConflict):
        keys.find(key(body="y"))


def test_a_key_expires_after_a_day(stores):
    pods, keys, _ = stores
    old = pods.create(make_pod(name="old"), now=datetime.now(timezone.utc) - timedelta(hours=25),
                      idempotency=key())
    assert keys.find(key()) is None
    fresh = pods.create(make_pod(name="new"), idempotency=key(body="y"))  # the expired row makes way
    assert keys.find(key(body="y")) == fresh.id != old.id


def test_admin_credentials_have_their_own_key_scope(tenants):
    with tenants.client("admin") as admin, tenants.client("a") as a:
        as_admin = post_pod(admin, "k", tenant="tenant-a")
        as_tenant = post_pod(a, "k", tenant="tenant-a")
        assert as_admin.status_code == as_tenant.status_code == 201
        assert as_admin.json()["id"] != as_tenant.json()["id"]
        assert post_pod(admin, "k", tenant="tenant-a").json()["id"] == as_admin.json()["id"]
