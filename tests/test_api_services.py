"""The model, provider, cache, placement, receipt and checkpoint routes on the production node.

The node is what `agent-machine serve` builds (`daemon.default_node`: model
store, llama-cpp-python workers, KV tiers, signed receipts) with the tiny
generated GGUF imported through the CLI, served by real uvicorn on a socket.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from nodeagent.config import load_config
from nodeagent.daemon import default_node

from pod_factory import make_pod
from test_api_harness import ServedApi, env_for

pytestmark = pytest.mark.llama

CLI = [shutil.which("agent-machine")] if shutil.which("agent-machine") else [sys.executable, "-m", "nodeagent.cli"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_path):
    tmp = tmp_path_factory.mktemp("services")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AGENT_MACHINE_")}, **env_for(tmp)}
    imported = subprocess.run([*CLI, "models", "import", str(tiny_model_path), "--name", "tiny"], env=env,
                              capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    node = default_node(load_config(env_for(tmp)))
    node.start()
    api = ServedApi(node, tmp / "run" / "agent-machine" / "api.sock")
    yield api
    api.stop()
    node.close()


@pytest.fixture(scope="module")
def client(served):
    with served.client(timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def finished_pod(client):
    pod = client.post("/v1/pods", json=make_pod(name="svc", model="tiny", turns=["hi", "more"]).to_wire()).json()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        current = client.get(f"/v1/pods/{pod['id']}").json()
        if current["status"]["phase"] in ("Succeeded", "Failed", "Cancelled", "Refused"):
            break
        time.sleep(0.1)
    assert current["status"]["phase"] == "Succeeded", current["status"]
    return current


def test_models_list_with_residency(client):
    body = client.get("/v1/store/models").json()
    assert set(body) == {"items", "residency"}
    assert any("tiny:latest" in m["names"] or "tiny" in m["names"] for m in body["items"])
    assert all(m["kind"] == "ModelRecord" for m in body["items"])


def test_load_providers_and_unload(client):
    loaded = client.post("/v1/models/tiny:load")
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["state"] == "hot"
    providers = client.get("/v1/providers").json()["items"]
    assert len(providers) == 1 and providers[0]["state"] == "running"
    assert providers[0]["modelDigest"] == loaded.json()["digest"]
    metrics = client.get("/metrics").text
    assert f'agent_machine_provider_up{{provider="{providers[0]["name"]}"}} 1.0' in metrics
    assert 'agent_machine_model_residency{model="tiny:latest",state="hot"} 1.0' in metrics \
        or 'state="hot"} 1.0' in metrics
    unloaded = client.post("/v1/models/tiny:unload")
    assert unloaded.status_code == 200 and unloaded.json() == {"model": "tiny", "unloaded": True}


def test_unknown_model_is_404_naming_it(client):
    response = client.post("/v1/models/nope:load")
    assert response.status_code == 404, response.text
    assert "nope" in response.json()["error"]["message"]


def test_cache_summary(client, finished_pod):
    body = client.get("/v1/cache").json()
    assert {t["tier"] for t in body["tiers"]} >= {"T1", "T2"}
    assert "misses" in body and "hits" in body
    metrics = client.get("/metrics").text
    assert 'agent_machine_cache_budget_bytes{tier="T1"}' in metrics


def test_placement_score_is_a_dry_run(client):
    before = len(client.get("/v1/pods").json()["items"])
    response = client.post("/v1/placements:score", json=make_pod(name="dry", model="tiny").to_wire())
    assert response.status_code == 200, response.text
    decision = response.json()
    assert decision["kind"] == "PlacementDecision"
    assert len(client.get("/v1/pods").json()["items"]) == before


def test_receipts_and_checkpoint(client, finished_pod):
    receipt_ids = finished_pod["status"]["receiptIds"]
    assert receipt_ids
    listed = client.get("/v1/receipts", params={"since": 0}).json()["items"]
    assert listed and all(r["kind"] == "ExecutionReceipt" for r in listed)
    one = client.get(f"/v1/receipts/{receipt_ids[-1]}")
    assert one.status_code == 200, one.text
    assert one.json()["receiptId"].startswith(receipt_ids[-1][:8])
    assert client.get("/v1/receipts", params={"since": 10_000}).json()["items"] == []
    missing = client.get("/v1/receipts/" + "f" * 64)
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "receipt_id"
    checkpoint = client.get("/v1/checkpoints/latest")
    assert checkpoint.status_code == 200, checkpoint.text
    assert checkpoint.json()["size"] >= len(listed)


def test_ps_joins_the_running_agents_providers(served, client):
    assert client.post("/v1/models/tiny:load").status_code == 200
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AGENT_MACHINE_")},
           **env_for(served.socket_path.parent.parent.parent)}
    result = subprocess.run([*CLI, "ps", "--format", "json"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    import json

    rows = json.loads(result.stdout)
    assert len(rows) == 1
    row = rows[0]
    assert row["host"] == os.uname().nodename
    assert row["state"] == "running" and row["processState"] in ("running", "sleeping")
    assert row["model"] == "tiny:latest" and row["drift"] == []
    assert row["healthyAgo"].endswith("s ago")
    table = subprocess.run([*CLI, "ps"], env=env, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "tiny:latest" in table.stdout and "PROVIDER" in table.stdout


def test_load_with_keep_alive_and_pin(client):
    loaded = client.post("/v1/models/tiny:load", json={"keepAliveS": 120, "pin": True})
    assert loaded.status_code == 200, loaded.text
    row = loaded.json()
    assert row["state"] == "hot" and row["pinned"] is True and row["keepAliveS"] == 120
    bad = client.post("/v1/models/tiny:load", json={"keepAlive": 5})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "keepAlive"
    assert client.post("/v1/models/tiny:unload").json()["model"] == "tiny"
