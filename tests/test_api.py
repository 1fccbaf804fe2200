"""The local API under real uvicorn on a temporary Unix socket, driven by httpx."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from nodeagent.contracts.machine import MachineProfile
from nodeagent.contracts.pod import AgentPod, PodPhase
from nodeagent.node import Node

from pod_factory import make_pod
from test_api_harness import ServedApi, WithoutMethod, fixture_profile, make_node, wait_for


def pod_body(**kwargs) -> dict:
    return make_pod(**kwargs).to_wire()


@pytest.fixture()
def node(tmp_path):
    n = make_node(tmp_path)
    yield n
    n.executor.hold.clear()
    n.close()


@pytest.fixture()
def served(node, tmp_path):
    api = ServedApi(node, tmp_path / "run" / "agent-machine" / "api.sock")
    yield api
    api.stop()


@pytest.fixture()
def client(served):
    with served.client() as c:
        yield c


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


# ------------------------------------------------------------------ socket
def test_socket_is_0600_in_a_0700_directory(served):
    mode = os.stat(served.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(served.socket_path.parent).st_mode) == 0o700


def test_health_and_readiness(client, node):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    node.drain(timeout_s=0)
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    # the declared ErrorBody, one detail per reason
    assert error_of(not_ready)["type"] == "draining"
    assert [d["message"] for d in error_of(not_ready)["details"]] == ["draining: not accepting new pods"]


def test_status_summarises_the_node(client, served):
    client.post("/v1/pods", json=pod_body())
    status = client.get("/v1/status").json()
    assert status["pid"] == os.getpid()
    assert status["listeners"] == [f"unix:{served.socket_path}"]
    assert sum(status["pods"].values()) == 1
    assert status["queueLimit"] == 64


# ------------------------------------------------------------------ machine
def test_machine_profile_is_cached_until_refresh(client, node):
    first = client.get("/v1/machine")
    assert first.status_code == 200
    profile = MachineProfile.model_validate(first.json())
    assert profile.host.hostname == "fixture-host-1"
    assert client.get("/v1/machine").json()["host"]["hostname"] == "fixture-host-1"
    assert node._probe_fn.calls == 1
    refreshed = client.get("/v1/machine", params={"refresh": "1"}).json()
    assert refreshed["host"]["hostname"] == "fixture-host-2"
    assert client.get("/v1/machine").json()["host"]["hostname"] == "fixture-host-2"


def test_machine_refresh_must_be_a_boolean(client):
    response = client.get("/v1/machine", params={"refresh": "banana"})
    assert response.status_code == 422
    assert error_of(response)["field"] == "refresh"


def test_machine_with_the_real_probe(tmp_path):
    pytest.importorskip("nodeagent.probe")
    from nodeagent.probe import probe  # noqa: F401 - the real probe must exist for this test

    node = Node(__import__("nodeagent.config", fromlist=["load_config"]).load_config(
        {"HOME": str(tmp_path), "AGENT_MACHINE_STATE_DIR": str(tmp_path / "state"),
         "AGENT_MACHINE_CACHE_DIR": str(tmp_path / "cache"), "AGENT_MACHINE_CONFIG_DIR": str(tmp_path / "cfg"),
         "AGENT_MACHINE_RUNTIME_DIR": str(tmp_path / "run" / "agent-machine")}))
    node.start()
    api = ServedApi(node, tmp_path / "run" / "agent-machine" / "api.sock")
    try:
        with api.client(timeout=60) as client:
            response = client.get("/v1/machine")
        assert response.status_code == 200, response.text
        profile = MachineProfile.model_validate(response.json())
        assert profile.host.hostname == os.uname().nodename
        assert any(device.kind == "cpu" for device in profile.devices)
    finally:
        api.stop()
        node.close()


# ------------------------------------------------------------------ pods
def test_submitted_pod_runs_and_is_readable(client):
    response = client.post("/v1/pods", json=pod_body(turns=["hello", "again"]))
    assert response.status_code == 201, response.text
    pod = AgentPod.model_validate(response.json())
    assert response.headers["location"] == f"/v1/pods/{pod.id}"
    assert pod.status.phase in (PodPhase.admitted, PodPhase.placed, PodPhase.running, PodPhase.succeeded)
    assert wait_for(lambda: client.get(f"/v1/pods/{pod.id}").json()["status"]["phase"] == "Succeeded")
    done = client.get(f"/v1/pods/{pod.id}").json()
    assert [t["output"] for t in done["status"]["turns"]] == ["olleh", "niaga"]
    listed = client.get("/v1/pods", params={"phase": "Succeeded"}).json()["items"]
    assert [p["id"] for p in listed] == [pod.id]
    assert client.get("/v1/pods", params={"phase": "Running"}).json()["items"] == []


def test_refused_pod_is_created_with_reasons(client, node):
    # A pod whose deadline has passed is refused by admission at once.
    response = client.post("/v1/pods", json=pod_body(policy={"deadline": "2000-01-01T00:00:00Z"}))
    assert response.status_code == 201
    status = response.json()["status"]
    assert status["phase"] == "Refused", status
    assert any("deadline" in reason for reason in status["reasons"]), status["reasons"]


def test_unknown_and_malformed_pod_ids(client):
    missing = client.get("/v1/pods/0123456789abcdef")
    assert missing.status_code == 404
    assert error_of(missing)["field"] == "pod_id"
    assert "0123456789abcdef" in error_of(missing)["message"]
    assert client.delete("/v1/pods/0123456789abcdef").status_code == 404
    bad = client.get("/v1/pods/NOT-HEX")
    assert bad.status_code == 422
    assert error_of(bad)["field"] == "pod_id"


def test_cancel_a_queued_pod(client, node):
    node.pause_dispatch()
    pod = client.post("/v1/pods", json=pod_body()).json()
    cancelled = client.delete(f"/v1/pods/{pod['id']}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"]["phase"] == "Cancelled"
    # Cancelling again returns the finished pod unchanged.
    assert client.delete(f"/v1/pods/{pod['id']}").json()["status"]["phase"] == "Cancelled"


def test_cancel_a_running_pod(client, node):
    node.executor.hold.set()
    pod = client.post("/v1/pods", json=pod_body()).json()
    assert wait_for(lambda: client.get(f"/v1/pods/{pod['id']}").json()["status"]["phase"] == "Running")
    client.delete(f"/v1/pods/{pod['id']}")
    assert wait_for(lambda: client.get(f"/v1/pods/{pod['id']}").json()["status"]["phase"] == "Cancelled")


def test_dispatch_pause_and_resume(client, node):
    assert client.post("/v1/dispatch:pause").json() == {"dispatching": False}
    pod = client.post("/v1/pods", json=pod_body()).json()
    time.sleep(0.3)
    assert client.get(f"/v1/pods/{pod['id']}").json()["status"]["phase"] == "Admitted"
    assert client.post("/v1/dispatch:resume").json() == {"dispatching": True}
    assert wait_for(lambda: client.get(f"/v1/pods/{pod['id']}").json()["status"]["phase"] == "Succeeded")


# ------------------------------------------------------------------ limits
def test_full_queue_answers_429_with_retry_after(tmp_path):
    node = make_node(tmp_path, AGENT_MACHINE_QUEUE_MAX_PODS="2", AGENT_MACHINE_RECONCILE_INTERVAL_S="7")
    api = ServedApi(node, tmp_path / "run" / "agent-machine" / "api.sock")
    try:
        node.pause_dispatch()
        with api.client() as client:
            assert client.post("/v1/pods", json=pod_body(name="a")).status_code == 201
            assert client.post("/v1/pods", json=pod_body(name="b")).status_code == 201
            full = client.post("/v1/pods", json=pod_body(name="c"))
            assert full.status_code == 429
            assert full.headers["retry-after"] == "7"
            assert error_of(full)["type"] == "queue_full"
            assert {p["metadata"]["name"] for p in client.get("/v1/pods").json()["items"]} == {"a", "b"}
    finally:
        api.stop()
        node.close()


def test_draining_node_answers_503(client, node):
    node.drain(timeout_s=0)
    response = client.post("/v1/pods", json=pod_body())
    assert response.status_code == 503
    assert error_of(response)["type"] == "draining"
    assert "retry-after" in response.headers


def test_body_over_the_cap_is_413(tmp_path):
    node = make_node(tmp_path, AGENT_MACHINE_API_MAX_BODY_BYTES="2048")
    api = ServedApi(node, tmp_path / "run" / "agent-machine" / "api.sock")
    try:
        with api.client() as client:
            big = pod_body(system="x" * 4000)
            declared = client.post("/v1/pods", json=big)
            assert declared.status_code == 413
            assert error_of(declared)["field"] == "body"
            assert "api.max_body_bytes" in error_of(declared)["message"]

            def chunks():  # no Content-Length: counted while it streams
                payload = json.dumps(big).encode()
                for i in range(0, len(payload), 500):
                    yield payload[i:i + 500]

            streamed = client.post("/v1/pods", content=chunks(), headers={"content-type": "application/json"})
            assert streamed.status_code == 413
            assert error_of(streamed)["field"] == "body"
            assert client.post("/v1/pods", json=pod_body()).status_code == 201
    finally:
        api.stop()
        node.close()


def test_slow_request_times_out_with_504(tmp_path):
    def slow_probe(**kwargs):
        time.sleep(1.5)
        return fixture_profile()

    node = make_node(tmp_path, probe_fn=slow_probe, AGENT_MACHINE_API_REQUEST_TIMEOUT_S="0.3")
    api = ServedApi(node, tmp_path / "run" / "agent-machine" / "api.sock")
    try:
        with api.client() as client:
            began = time.monotonic()
            response = client.get("/v1/machine")
            assert response.status_code == 504
            assert time.monotonic() - began < 1.4
            assert "api.request_timeout_s" in error_of(response)["message"]
            assert client.get("/healthz").status_code == 200
    finally:
        api.stop()
        node.close()


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("mutate, field", [
    (lambda b: b["spec"].pop("turns"), "spec.turns"),
    (lambda b: b["spec"].update(bogus=1), "spec.bogus"),
    (lambda b: b["metadata"].update(tenant="Not Valid!"), "metadata.tenant"),
    (lambda b: b["spec"]["turns"][0].update(maxTokens=0), "spec.turns[0].maxTokens"),
    (lambda b: b["spec"]["context"][0].pop("text"), "spec.context[0]"),
    (lambda b: b.update(apiVersion="agent-machine/v0"), "body"),
    (lambda b: b.update(id="00112233aabbccdd"), "id"),
    (lambda b: b.update(status={"phase": "Succeeded"}), "status"),
])
def test_invalid_pod_names_the_field(client, mutate, field):
    body = pod_body()
    mutate(body)
    response = client.post("/v1/pods", json=body)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request"
    assert error["field"] == field or (field == "body" and "apiVersion" in error["message"]), error
    assert error["param"] == error["field"]


def test_malformed_json_is_400_naming_the_body(client):
    response = client.post("/v1/pods", content=b'{"kind": "AgentPod",', headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["field"] == "body" and "invalid JSON" in error["message"]


def test_non_json_content_type_is_415(client):
    response = client.post("/v1/pods", content=b"a=b", headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415
    assert error_of(response)["field"] == "Content-Type"


def test_unknown_route_and_method(client):
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and error_of(missing)["field"] == "path"
    wrong = client.put("/v1/pods")
    assert wrong.status_code == 405 and error_of(wrong)["field"] == "method"


def test_list_filters_are_validated(client):
    response = client.get("/v1/pods", params={"phase": "Sleeping"})
    assert response.status_code == 422 and error_of(response)["field"] == "phase"
    response = client.get("/v1/pods", params={"limit": "0"})
    assert response.status_code == 422 and error_of(response)["field"] == "limit"


# ------------------------------------------------------------------ events
def read_events(client, pod_id: str, fmt: str = "ndjson") -> list[dict]:
    events = []
    with client.stream("GET", f"/v1/pods/{pod_id}/events", params={"format": fmt}) as response:
        assert response.status_code == 200
        if fmt == "sse":
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[len("data: "):]))
        else:
            assert response.headers["content-type"].startswith("application/x-ndjson")
            events = [json.loads(line) for line in response.iter_lines() if line]
    return events


def test_event_stream_follows_a_pod_to_its_end(client, node):
    node.executor.hold.set()
    pod = client.post("/v1/pods", json=pod_body(turns=["one", "two"])).json()
    assert wait_for(lambda: client.get(f"/v1/pods/{pod['id']}").json()["status"]["phase"] == "Running")
    import threading

    threading.Timer(0.4, node.executor.hold.clear).start()
    events = read_events(client, pod["id"])
    kinds = [(e["type"], e.get("phase") or (e["turn"]["index"] if e.get("turn") else None)) for e in events]
    assert kinds == [("transition", "Pending"), ("transition", "Admitted"), ("transition", "Placed"),
                     ("transition", "Running"), ("turn", 0), ("turn", 1), ("transition", "Succeeded"),
                     ("end", "Succeeded")]
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[4]["turn"]["output"] == "eno"


def test_event_stream_as_sse_for_a_finished_pod(client):
    pod = client.post("/v1/pods", json=pod_body()).json()
    assert wait_for(lambda: client.get(f"/v1/pods/{pod['id']}").json()["status"]["phase"] == "Succeeded")
    events = read_events(client, pod["id"], fmt="sse")
    assert events[-1]["type"] == "end" and events[-1]["phase"] == "Succeeded"
    assert [e["type"] for e in events].count("turn") == 1


def test_event_stream_of_unknown_pod_is_404(client):
    response = client.get("/v1/pods/00000000deadbeef/events")
    assert response.status_code == 404 and error_of(response)["field"] == "pod_id"


# ------------------------------------------------------------------ metrics, openapi
def test_metrics_expose_the_families(client):
    client.get("/v1/machine")
    pod = client.post("/v1/pods", json=pod_body()).json()
    assert wait_for(lambda: client.get(f"/v1/pods/{pod['id']}").json()["status"]["phase"] == "Succeeded")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'agent_machine_api_requests_total{code="200",method="GET",route="/v1/machine"}' in text
    assert 'agent_machine_pods{phase="Succeeded"} 1.0' in text
    assert 'agent_machine_pods{phase="Running"} 0.0' in text
    for family in ("agent_machine_placements_total", "agent_machine_cache_hits_total",
                   "agent_machine_model_residency", "agent_machine_provider_up", "agent_machine_cache_bytes",
                   "agent_machine_pod_ttft_seconds", "agent_machine_receipts_total", "process_resident_memory_bytes"):
        assert f"# TYPE {family.removesuffix('_total')}" in text, family


def test_openapi_documents_every_route_with_models(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path, method in [("/v1/machine", "get"), ("/v1/pods", "post"), ("/v1/pods", "get"),
                         ("/v1/pods/{pod_id}", "get"), ("/v1/pods/{pod_id}", "delete"),
                         ("/v1/pods/{pod_id}/events", "get"), ("/v1/store/models", "get"),
                         ("/v1/models/{name}:load", "post"), ("/v1/models/{name}:unload", "post"),
                         ("/v1/models", "get"), ("/v1/models/{model_id}", "get"), ("/v1/completions", "post"),
                         ("/v1/providers", "get"), ("/v1/cache", "get"), ("/v1/placements:score", "post"),
                         ("/v1/receipts", "get"), ("/v1/receipts/{receipt_id}", "get"),
                         ("/v1/checkpoints/latest", "get"), ("/v1/chat/completions", "post"),
                         ("/openai/v1/models", "get"), ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get")]:
        assert method in paths.get(path, {}), f"{method.upper()} {path} missing from /openapi.json"
    schemas = spec["components"]["schemas"]
    assert {"AgentPod", "MachineProfile", "ErrorBody", "PodEvent"} <= set(schemas)
    post_pods = paths["/v1/pods"]["post"]
    # an AgentPod without id and status (the node sets them)
    assert post_pods["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/PodSubmission")
    assert "429" in post_pods["responses"] and "422" in post_pods["responses"]
    machine = paths["/v1/machine"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert machine["$ref"].endswith("/MachineProfile")


# ------------------------------------------------------------------ later routes
LATER = [("GET", "/v1/store/models", "list_models"), ("GET", "/v1/models", "list_models"),
         ("GET", "/v1/models/tiny", "list_models"), ("POST", "/v1/models/qwen2:0.5b:load", "load_model"),
         ("POST", "/v1/models/tiny:unload", "unload_model"), ("GET", "/v1/providers", "list_providers"),
         ("GET", "/v1/cache", "cache_summary"), ("GET", "/v1/receipts?since=0", "list_receipts"),
         ("GET", "/v1/receipts/abc", "get_receipt"), ("GET", "/v1/checkpoints/latest", "latest_checkpoint"),
         ("GET", "/openai/v1/models", "list_models")]


@pytest.mark.parametrize("method, path, node_method", LATER)
def test_routes_without_their_node_method_answer_501_naming_it(node, tmp_path, method, path, node_method):
    api = ServedApi(WithoutMethod(node, node_method), tmp_path / "other" / "agent-machine" / "api.sock")
    try:
        with api.client() as client:
            response = client.request(method, path)
    finally:
        api.stop()
    assert response.status_code == 501, response.text
    assert f"{node_method}()" in error_of(response)["message"]


def test_colon_routes_parse_names_with_colons(served, client):
    calls = []
    served.node.load_model = lambda name: calls.append(("load", name)) or {"name": name, "state": "hot"}
    served.node.unload_model = lambda name: calls.append(("unload", name)) or {"name": name, "state": "cold"}
    assert client.post("/v1/models/qwen2:0.5b:load").json() == {"name": "qwen2:0.5b", "state": "hot"}
    assert client.post("/v1/models/tiny:unload").json() == {"name": "tiny", "state": "cold"}
    assert calls == [("load", "qwen2:0.5b"), ("unload", "tiny")]
    # No custom method :explode: the path names a model (id "tiny:explode"), which OpenAI's route reads.
    unknown = client.post("/v1/models/tiny:explode")
    assert unknown.status_code == 405 and unknown.headers["allow"] == "GET"
    assert client.get("/v1/models/tiny:load").status_code in (404, 405)
    bad = client.post("/v1/models/..%2F..:load")  # no :load route takes a name with a slash; GET /v1/models/{id} does
    assert bad.status_code in (404, 405, 422)
    assert calls == [("load", "qwen2:0.5b"), ("unload", "tiny")]  # it never reached the node


def test_placement_score_validates_the_pod_before_the_node(served, client):
    seen = []
    served.node.score_pod = lambda pod: seen.append(pod.metadata.name) or {"kind": "PlacementDecision", "pod": pod.id}
    body = pod_body(name="scored")
    assert client.post("/v1/placements:score", json=body).status_code == 200
    assert seen == ["scored"]
    del body["spec"]["model"]
    bad = client.post("/v1/placements:score", json=body)
    assert bad.status_code == 422 and error_of(bad)["field"] == "spec.model"
    assert seen == ["scored"]
