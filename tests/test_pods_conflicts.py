"""`agent-machine pods conflicts` end to end: CLI -> client -> GET /v1/pods:conflicts -> Node.pod_conflicts.

The node is real (SQLite, admission, dispatchers paused so pods stay in
flight); the API runs under real uvicorn on a Unix socket; the CLI finds it
the way a user's shell does, through the runtime directory.
"""

from __future__ import annotations

import json

import pytest

from nodeagent.cli import main

from pod_factory import make_pod
from test_api_harness import ServedApi, env_for, make_node


@pytest.fixture()
def node(tmp_path, monkeypatch):
    for name, value in env_for(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AGENT_MACHINE_URL", raising=False)
    n = make_node(tmp_path)
    n.pause_dispatch()  # submitted pods stay Admitted: in flight, and nothing runs
    yield n
    n.close()


@pytest.fixture()
def served(node, tmp_path):
    api = ServedApi(node, tmp_path / "run" / "agent-machine" / "api.sock")
    yield api
    api.stop()


def conflicts_json(capsys) -> list[dict]:
    assert main(["pods", "conflicts", "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_two_pods_on_one_provider_are_reported_by_the_cli(node, served, capsys):
    a = node.submit_pod(make_pod(name="a", provider="llama-a"))
    b = node.submit_pod(make_pod(name="b", provider="llama-a"))
    node.submit_pod(make_pod(name="c", provider="llama-b"))  # alone on its provider: no conflict
    items = conflicts_json(capsys)
    assert [(c["kind"], c["provider"], sorted(c["pods"])) for c in items] == [
        ("provider", "llama-a", sorted([a.id, b.id]))]
    assert "2 pods share llama-a's context" in items[0]["detail"]
    assert main(["pods", "conflicts"]) == 0
    table = capsys.readouterr().out
    assert "llama-a" in table and a.id[:8] in table and b.id[:8] in table


def test_no_conflicts_prints_so(node, served, capsys):
    node.submit_pod(make_pod(name="a", provider="llama-a"))
    assert conflicts_json(capsys) == []
    assert main(["pods", "conflicts"]) == 0
    assert capsys.readouterr().out.strip() == "no conflicts"


def test_the_route_is_its_own_path_and_documented(served):
    with served.client() as client:
        response = client.get("/v1/pods:conflicts")
        assert response.status_code == 200, response.text
        assert response.json() == {"items": []}
        spec = client.get("/openapi.json").json()
    route = spec["paths"]["/v1/pods:conflicts"]["get"]
    assert route["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ObjectList")
    assert "needBytes" in route["description"]


def test_without_an_agent_the_cli_says_how_to_start_one(node, capsys):
    assert main(["pods", "conflicts"]) == 1
    assert "agent-machine serve" in capsys.readouterr().err
