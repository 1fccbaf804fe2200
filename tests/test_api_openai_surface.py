"""The OpenAI surface as a client sees it, without a model: model listing and lookup,
text-completion validation, and errors in OpenAI's shape on the OpenAI routes only.

(The same routes with a real model and real clients: tests/test_openai_clients.py.)
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_api_fuzz import json_values
from test_api_harness import ServedApi, make_node


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_path):
    from nodeagent.models.store import ModelStore

    tmp_path = tmp_path_factory.mktemp("openai-surface")
    store = ModelStore(tmp_path / "state")
    store.import_model(tiny_model_path, "tiny")
    store.import_model(tiny_model_path, "org/tiny:q4")  # a second name of the same file
    store.close()
    node = make_node(tmp_path)
    api = ServedApi(node, tmp_path / "run" / "agent-machine" / "api.sock")
    yield api
    api.stop()
    node.close()


@pytest.fixture()
def client(served):
    with served.client() as c:
        yield c


def digest_of(client) -> str:
    [record] = client.get("/v1/store/models").json()["items"]
    return record["digest"]


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
def test_models_are_listed_in_openais_shape_one_per_name(client, prefix):
    body = client.get(f"{prefix}/models").json()
    assert body["object"] == "list"
    assert sorted(m["id"] for m in body["data"]) == ["org/tiny:q4", "tiny:latest"]
    assert all(m["object"] == "model" and m["owned_by"] == "agent-machine" and m["created"] > 0
               for m in body["data"])


def test_a_model_is_found_by_id_by_name_without_tag_and_by_digest(client):
    assert client.get("/v1/models/tiny:latest").json()["id"] == "tiny:latest"
    assert client.get("/v1/models/tiny").json()["id"] == "tiny:latest"
    assert client.get("/v1/models/org/tiny:q4").json()["id"] == "org/tiny:q4"  # a name in several parts
    assert client.get(f"/openai/v1/models/{digest_of(client)}").json()["object"] == "model"


def test_an_unknown_model_is_404_in_openais_shape(client):
    response = client.get("/v1/models/nope")
    assert response.status_code == 404
    assert response.json() == {"error": {
        "message": response.json()["error"]["message"], "type": "not_found_error", "param": "model",
        "code": "model_not_found", "field": "model", "details": []}}
    assert "'nope'" in response.json()["error"]["message"]


def test_the_agents_own_listing_keeps_its_shape_and_path(client):
    body = client.get("/v1/store/models").json()
    assert set(body) == {"items", "residency"} and body["items"][0]["kind"] == "ModelRecord"
    # and the agent's own routes keep the agent's error shape
    error = client.get("/v1/no-such-route").json()["error"]
    assert error["type"] == "not_found" and "code" not in error
    # while a path under the alias prefix is OpenAI's, routed or not
    assert client.get("/openai/v1/no-such-route").json()["error"]["type"] == "not_found_error"


def test_a_text_completion_runs_as_a_one_turn_pod_with_the_prompt_as_is(served, client):
    answer = client.post("/v1/completions", json={"model": "tiny", "prompt": ["Once upon"], "max_tokens": 3,
                                                  "user": "alice"}).json()
    assert answer["object"] == "text_completion" and answer["model"] == "tiny"
    assert answer["choices"] == [{"index": 0, "text": "nopu ecnO", "logprobs": None, "finish_reason": "stop"}]
    pod = served.node.get_pod(answer["id"].removeprefix("cmpl-"))
    [turn] = pod.spec.turns
    assert (turn.prompt, turn.messages, turn.max_tokens) == ("Once upon", [], 3)
    assert not pod.spec.context and not pod.spec.tools
    assert (pod.metadata.tenant, pod.metadata.agent, pod.metadata.session) == ("default", "openai", "alice")
    # left out, sampling is llama.cpp's default chain, as for chat
    assert (turn.sampling.temperature, turn.sampling.top_k, turn.sampling.top_p) == (0.8, 40, 0.95)


COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
                     "presence_penalty", "frequency_penalty", "repeat_penalty", "logit_bias", "stream_options",
                     "echo", "n", "best_of", "logprobs", "suffix", "user"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(COMPLETION_FIELDS), value=json_values)
def test_near_valid_completions_are_answered_or_name_the_field(client, field, value):
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once", field: value})
    assert response.status_code in (200, 400, 404, 422), response.text
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["param"] and error["param"].startswith(field), error
        assert error["type"] in ("invalid_request_error", "not_found_error") and error["code"], error


@pytest.mark.parametrize("extra,field,status", [
    ({"echo": True}, "echo", 400),
    ({"n": 2}, "n", 400),
    ({"best_of": 3}, "best_of", 400),
    ({"logprobs": 1}, "logprobs", 400),
    ({"suffix": "end"}, "suffix", 400),
    ({"prompt": ["one", "two"]}, "prompt", 400),
    ({"prompt": ""}, "prompt", 422),
    ({"prompt": ["one", ""]}, "prompt[1]", 422),
    ({"prompt": [1, 2, 3]}, "prompt", 422),  # token ids are not taken
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", 422),
    ({"max_tokens": 0}, "max_tokens", 422),
    ({"temperature": 3}, "temperature", 422),
    ({"logit_bias": {"x": 1}}, "logit_bias.x", 422),
    ({"temprature": 0.5}, "temprature", 422),
])
def test_completion_requests_it_cannot_serve_name_the_field(client, extra, field, status):
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once", **extra})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == field, error
    assert error["type"] == "invalid_request_error"
    assert error["code"] == ("unsupported_parameter" if status == 400 else "invalid_request")


def test_a_streamed_completion_refused_at_admission_is_a_plain_error(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('version = 1\ndefault = "deny"\n')
    node = make_node(tmp_path, AGENT_MACHINE_POLICY_PATH=str(policy))
    api = ServedApi(node, tmp_path / "run" / "agent-machine" / "api.sock")
    try:
        with api.client() as client:
            response = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once", "stream": True})
    finally:
        api.stop()
        node.close()
    assert response.status_code == 403, response.text  # before any chunk: no 200 stream
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "refused"
